"""Speed of EAP over every edge against one plain forward + backward on the same batch, on every family.

    python benchmarks/attribution.py [--n 4] [--seq 16] [--repeats 3] [--threads T] [--only NAME ...]
                                     [--device cuda]

`--device` runs everything on that device (the first line names the card); `make gpu-check` uses it.

Setups (`--only` picks some, by these names; all five by default):

- tiny-base:   the shipped GPT-2 organism, IOI prompts
- gpt2-small:  a random GPT-2-small-shaped model (12 layers, 12 heads, d_model 768, vocab 50257)
- tiny-neox:   a random GPT-NeoX of tiny-base's shape, parallel residual, rotary on a quarter of each head
- tiny-llama:  a random Llama of tiny-base's shape with grouped-query attention (4 query / 2 kv heads)
- pythia-160m: a random Pythia-160m-shaped GPT-NeoX (12 layers, 12 heads, 768, MLP 3072, vocab 50304)

The random models run on random prompts of `--seq` tokens (`il.tasks.random_tokens`). Timed:

- baseline:  an unwrapped copy of the Hugging Face model, one forward of the clean batch and one
             backward of the summed logit difference to the parameters
- EAP:       il.attribution.edges(method="EAP"), the call users make (raw scores): a corrupt forward,
             a clean forward with a separate input per receiver (n_heads + 2 n_kv_heads + 1 per layer, plus
             the logits), a backward to all of them, and the (sender x receiver) products
- EAP-IG:    the same with steps=5, for scale

The target is EAP within 3x of the baseline. The three are timed in turn, round after round (so load
from other processes falls on all alike), for at least `--repeats` rounds and about a second in all;
times are medians.

Each setup is also checked, in the same run: the raw copy's logits equal interplab's edge-wise forward
(same weights), and each sender's EAP scores summed over its receivers equal its node attribution
through nnsight (`il.attribution.nodes`, a separate implementation), as the gradient of a node is the
sum of the gradients of the receivers it feeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
import warnings

import torch

import interplab as il
from interplab import edgewise
from setups import gpt2_small_shaped, pythia_160m_shaped, tiny_base, tiny_llama, tiny_neox

SETUPS = {
    "tiny-base": lambda args: tiny_base(args.n),
    "gpt2-small": lambda args: gpt2_small_shaped(args.n, args.seq),
    "tiny-neox": lambda args: tiny_neox(args.n, args.seq),
    "tiny-llama": lambda args: tiny_llama(args.n, args.seq),
    "pythia-160m": lambda args: pythia_160m_shaped(args.n, args.seq),
}
TARGET = 3.0


def interleaved_medians(fns: dict, repeats: int, min_seconds: float = 1.0) -> dict:
    """Median seconds of each function, timed in turn round after round, so that load from other
    processes falls on all of them alike; at least `repeats` rounds, more for fast functions
    (until about `min_seconds` of timing)."""
    start = time.perf_counter()
    for fn in fns.values():  # warm-up, and a first estimate of one round
        fn()
    rounds = max(repeats, math.ceil(min_seconds / (time.perf_counter() - start)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # GPU work is asynchronous: time it to its end
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_backward(raw, task) -> None:
    raw.zero_grad(set_to_none=True)
    task.metric(raw(task.clean).logits).sum().backward()


@torch.no_grad()
def raw_vs_edgewise(m, raw, task) -> float:
    """Largest |logit difference| between the raw copy and interplab's edge-wise forward: 0 up to rounding."""
    return (raw(task.clean).logits - edgewise.run(m, edgewise.embed(m, task.clean))).abs().max().item()


def node_sum_error(m, task, eap: il.graph.Circuit) -> float:
    """Largest |row sum of EAP - node attribution| over heads and MLPs, relative to the largest node score."""
    nodes = il.attribution.nodes(m, task, batch_size=len(task))
    rows = eap.scores.double().sum(1)  # (S,) every sender's edges summed over receivers
    graph = eap.graph
    heads = torch.tensor([[rows[graph.sender_index(f"a{l}.h{h}")] for h in range(m.n_heads)]
                          for l in range(m.n_layers)])  # (L, H)
    mlps = torch.stack([rows[graph.sender_index(f"m{l}")] for l in range(m.n_layers)])  # (L,)
    expected = torch.cat([nodes["heads"].values.double().flatten(), nodes["mlp"].values.double()])
    got = torch.cat([heads.flatten(), mlps])
    return ((got - expected).abs().max() / expected.abs().max()).item()


def on_device(setup, device: torch.device):
    """A setup `(name, m, raw, task)` moved to `device`."""
    name, m, raw, task = setup
    if device.type == "cpu":
        return setup
    m.hf.to(device)
    raw.to(device)
    moved = {field: getattr(task, field).to(device) for field in ("clean", "corrupt", "answer", "wrong")}
    return name, m, raw, dataclasses.replace(task, **moved)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{device.type}, {torch.get_num_threads()} threads"


def bench(name, m, raw, task, args) -> None:
    n = len(task)
    graph = il.circuits.Graph.from_model(m)
    times = interleaved_medians({
        "base": lambda: forward_backward(raw, task),
        "eap": lambda: il.attribution.edges(m, task, method="EAP", batch_size=n),
        "ig": lambda: il.attribution.edges(m, task, method="EAP-IG", steps=5, batch_size=n),
    }, args.repeats)
    base, eap, ig = times["base"], times["eap"], times["ig"]
    scores = il.attribution.edges(m, task, method="EAP", batch_size=n)
    met = "met" if eap / base <= TARGET else "MISSED"
    print(f"{name}: batch {tuple(task.clean.shape)}, {graph.n_edges} edges")
    print(f"  plain forward+backward  {base * 1e3:8.1f} ms")
    print(f"  EAP, every edge         {eap * 1e3:8.1f} ms   ratio {eap / base:.2f}x (target <= {TARGET:g}x: {met})")
    print(f"  EAP-IG, 5 steps         {ig * 1e3:8.1f} ms   ratio {ig / base:.2f}x")
    print(f"  check: raw vs edge-wise logits max |diff| {raw_vs_edgewise(m, raw, task):.1e}; "
          f"EAP row sums vs node attribution, max rel. diff {node_sum_error(m, task, scores):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="prompts in the batch")
    parser.add_argument("--seq", type=int, default=16, help="prompt length of the random models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--only", nargs="+", choices=list(SETUPS), default=list(SETUPS), metavar="NAME",
                        help=f"setups to run, of: {', '.join(SETUPS)}")
    parser.add_argument("--device", default="cpu", help="where to run: cpu (default) or cuda")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    print(f"torch {torch.__version__}, device: {device_name(device)}")
    # random models on random prompts: no real task, so the gap warning says nothing here
    warnings.filterwarnings("ignore", message="the clean-vs-corrupt gap")
    for key in args.only:
        bench(*on_device(SETUPS[key](args), device), args)


if __name__ == "__main__":
    main()
