"""Wall time of 1,000 decomposition steps: TMS 40-10 and one organism MLP layer.

    python benchmarks/decompose.py [--steps 1000] [--device cpu] [--case all|tms|organism]

Each case is timed three ways in the same run:
- `interplab`: `Decomposition.fit` as shipped (PGD loss logged 50 times),
- `interplab, log 2x`: the same with logging (and its PGD evaluation) only at the first and last step,
- `raw torch`: the same losses written directly in PyTorch: the model's own modules with a
  permanent hook, no `functional_call`, no per-call hook registration, no logging.
The last two do the same arithmetic, so their ratio is the package's overhead.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from interplab.decompose import Decomposition
from interplab.subcomponents import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from interplab.toy_models import sparse_features, train_tms

TINY_BASE = Path(__file__).resolve().parents[1] / "interplab" / "organisms" / "weights" / "tiny-base"
LAYER = "transformer.h.1.mlp.c_proj"


def organism(device: str):
    """tiny-base if its weights exist, else a random GPT-2 of the same shape."""
    import interplab as il
    from interplab.organisms.recipes import architecture
    from interplab.organisms.tokenizer import build_tokenizer

    if (TINY_BASE / "model.safetensors").exists():
        return il.load("interplab/tiny-base", device=device).hf, "tiny-base"
    from transformers import GPT2LMHeadModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    return GPT2LMHeadModel(architecture(len(tokenizer), tokenizer)).to(device).eval(), "random GPT-2 (tiny-base shape)"


def raw_steps(model, name, data, steps, batch_size, C, lr, output_loss, seed=0):
    """The fit loop's stochastic + layerwise + faithfulness + minimality step, hand-written."""
    dec = Decomposition(model, [name], C, seed=seed)  # only for identical initial parameters
    comp, module = dec.components[name], model.get_submodule(name)
    weight = (module.weight.T if type(module).__name__ == "Conv1D" else module.weight).detach()
    bias = module.bias.detach() if module.bias is not None else 0
    model.requires_grad_(False)
    state = {"mask": None, "inputs": None}

    def hook(mod, args, output):
        state["inputs"] = args[0]
        if state["mask"] is None:
            return output
        return (args[0] @ comp.V.T * state["mask"]) @ comp.U.T + bias

    handle = module.register_forward_hook(hook)
    generator = torch.Generator(device=dec.device).manual_seed(seed)
    optimizer = torch.optim.Adam(comp.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    out = lambda x: model(x).logits if output_loss == "kl" else model(x)  # noqa: E731
    for _ in range(steps):
        x = data(batch_size, generator)
        state["mask"] = None
        with torch.no_grad():
            target = out(x)
        logits = comp.importance_logits(comp.inner(state["inputs"]))
        g = lower_leaky_hard_sigmoid(logits)
        state["mask"] = g + (1 - g) * torch.rand(g.shape, generator=generator, device=g.device)
        pred = out(x)
        if output_loss == "kl":
            recon = F.kl_div(pred.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none")
            recon = recon.sum(-1).mean()
        else:
            recon = F.mse_loss(pred, target)
        loss = 2 * recon + (weight - comp.U @ comp.V).pow(2).mean()
        loss = loss + 1e-3 * upper_leaky_hard_sigmoid(logits).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    handle.remove()


def timed(label: str, fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"  {label:<22} {seconds:8.2f} s", flush=True)
    return seconds


def bench(title, model, name, data, steps, batch_size, C, output_loss, device):
    print(f"{title}: {steps} steps, batch {batch_size}, C={C}, module {name}")
    options = dict(steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=0, progress=False)
    ours = timed("interplab", lambda: Decomposition(model, [name], C).fit(data, **options), device)
    quiet = timed("interplab, log 2x", lambda: Decomposition(model, [name], C).fit(
        data, log_every=steps - 1, **options), device)
    raw = timed("raw torch", lambda: raw_steps(model, name, data, steps, batch_size, C, 1e-2, output_loss), device)
    print(f"  ratio interplab/raw: {ours / raw:.2f} (with PGD logging), {quiet / raw:.2f} (same arithmetic)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", choices=["all", "tms", "organism"], default="all")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    if args.case in ("all", "tms"):
        tms = train_tms(40, 10, steps=1000, seed=0).to(args.device)
        tms_data = lambda n, g: sparse_features(n, 40, 0.05, g)  # noqa: E731
        bench("TMS 40-10", tms, "linear1", tms_data, args.steps, 512, 100, "mse", args.device)
    if args.case in ("all", "organism"):
        model, label = organism(args.device)
        vocab, seq = model.config.vocab_size, model.config.n_positions
        tokens = torch.randint(vocab, (1024, seq), generator=torch.Generator().manual_seed(0)).to(args.device)
        lm_data = lambda n, g: tokens[torch.randint(len(tokens), (n,), generator=g, device=g.device)]  # noqa: E731
        bench(f"{label}", model, LAYER, lm_data, args.steps, 16, 64, "kl", args.device)


if __name__ == "__main__":
    main()
