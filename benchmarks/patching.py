"""Speed of the head x position denoising sweep against raw-PyTorch baselines, measured in one run.

    python benchmarks/patching.py [--n 1] [--seq 4] [--tiny-n 8] [--batch-size 64] [--threads 2]

For tiny-base (IOI prompts) and a randomly initialised GPT-2-small-shaped
model (12 layers, 12 heads, d_model 768, vocab 50257, random short prompts):

- sweep:        il.patching.heads(per_position=True) with both reuses (the default: blocks before the
                patched layer skipped, positions before the patched one taken from the base run's
                key/value cache), with prefix reuse only, and with neither
- lower bound:  the same number of rows in plain batched forwards, no hooks
                (an unwrapped copy of the model, final-position logits only, like the sweep)
- naive:        one forward per component with a raw PyTorch forward pre-hook
- TransformerLens get_act_patch_attn_head_out_by_pos, if transformer-lens >= 4 is installed
                (`pip install 'interplab[lens]'`): a `TransformerBridge` built from a copy of the
                same Hugging Face module (same weights), in compatibility mode (HookedTransformer's
                hook names and weight processing: LayerNorm folded, weights centred)

The naive loop's and TransformerLens's values are compared to the sweep's, so a fast wrong sweep
(or a comparison on different weights) shows up here too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time

import torch
import transformers

import interplab as il
from interplab.model import ORGANISM_DIR
from setups import gpt2_small_shaped, tiny_base


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def mean_logit_diff(logits, task) -> float:
    rows = torch.arange(len(task))
    return (logits[rows, task.answer] - logits[rows, task.wrong]).mean().item()


@torch.no_grad()
def naive_sweep(raw, spec, task, n_heads: int, d_head: int) -> torch.Tensor:
    """Normalized effect [layer, head, pos]: one hooked forward of all examples per component."""
    layers = [raw.get_submodule(f"{spec.blocks}.{i}.{spec.head_values}") for i in range(len(raw.get_submodule(
        spec.blocks)))]
    clean_acts = []
    handles = [layer.register_forward_pre_hook(lambda mod, args: clean_acts.append(args[0])) for layer in layers]
    clean = mean_logit_diff(raw(task.clean, logits_to_keep=1).logits[:, -1], task)
    for handle in handles:
        handle.remove()
    corrupt = mean_logit_diff(raw(task.corrupt, logits_to_keep=1).logits[:, -1], task)
    seq = task.clean.shape[1]
    out = torch.empty(len(layers), n_heads, seq)
    for layer, module in enumerate(layers):
        for head in range(n_heads):
            cols = slice(head * d_head, (head + 1) * d_head)
            for pos in range(seq):
                def patch(mod, args, layer=layer, cols=cols, pos=pos):
                    act = args[0].clone()
                    act[:, pos, cols] = clean_acts[layer][:, pos, cols]
                    return (act,)

                handle = module.register_forward_pre_hook(patch)
                value = mean_logit_diff(raw(task.corrupt, logits_to_keep=1).logits[:, -1], task)
                handle.remove()
                out[layer, head, pos] = (value - corrupt) / (clean - corrupt)
    return out


@torch.no_grad()
def lower_bound(raw, task, n_rows: int, batch_size: int) -> None:
    """Plain forwards over `n_rows` corrupt prompts in batches of `batch_size`: no hooks, no patching."""
    rows = task.corrupt[torch.arange(n_rows) % len(task)]
    for start in range(0, n_rows, batch_size):
        raw(rows[start : start + batch_size], logits_to_keep=1)


@torch.no_grad()
def transformer_lens_sweep(raw, task) -> tuple[float, torch.Tensor] | str:
    """(seconds, normalized effect [layer, head, pos]) of TransformerLens's head x position patching through
    its bridge over a copy of `raw` (the bridge rewires the module it wraps), or why it cannot run.

    The bridge needs a tokenizer saved in a folder; it only ever sees token ids here, so the organisms'
    tokenizer serves for both models."""
    try:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return "not installed (pip install 'interplab[lens]', transformer-lens >= 4, to compare)"
    tokenizer = transformers.AutoTokenizer.from_pretrained(ORGANISM_DIR / "tiny-base")
    bridge = TransformerBridge.boot_transformers(raw.config.model_type, hf_model=copy.deepcopy(raw),
                                                 tokenizer=tokenizer, device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True)
    rows = torch.arange(len(task))

    def metric(logits):  # (B, T, V) -> mean logit difference at the final position
        return (logits[rows, -1, task.answer] - logits[rows, -1, task.wrong]).mean()

    _, cache = bridge.run_with_cache(task.clean)
    clean, corrupt = metric(bridge(task.clean)).item(), metric(bridge(task.corrupt)).item()
    with contextlib.redirect_stderr(io.StringIO()):  # its per-patch progress bar
        seconds, patched = timed(lambda: tl_patching.get_act_patch_attn_head_out_by_pos(
            bridge, task.corrupt, cache, metric))  # (L, T, H)
    return seconds, ((patched - corrupt) / (clean - corrupt)).permute(0, 2, 1)


def run(name, m, raw, task, batch_size: int) -> None:
    seq = task.clean.shape[1]
    n_rows = m.n_layers * m.n_heads * seq * len(task)
    print(f"\n{name}: {m.n_layers * m.n_heads * seq} components (layer x head x pos) x {len(task)} examples, "
          f"seq {seq}, batch {batch_size}, {torch.get_num_threads()} threads")
    def sweep(prefix: bool, positions: bool):
        return il.patching.heads(m, task, per_position=True, batch_size=batch_size, reuse_prefix=prefix,
                                 reuse_positions=positions, progress=False)

    lower_bound(raw, task, batch_size, batch_size)  # warm-up, so that no timed run pays for first calls
    il.patching.heads(m, task[:1], per_position=True, batch_size=batch_size, progress=False)
    t_reuse, scores = timed(lambda: sweep(True, True))
    t_prefix, prefix_scores = timed(lambda: sweep(True, False))
    t_plain, _ = timed(lambda: sweep(False, False))
    t_bound, _ = timed(lambda: lower_bound(raw, task, n_rows, batch_size))
    t_naive, naive = timed(lambda: naive_sweep(raw, m.spec, task, m.n_heads, m.d_head))
    error = (naive - scores.values.float()).abs().max().item()
    prefix_error = (naive - prefix_scores.values.float()).abs().max().item()
    lens = transformer_lens_sweep(raw, task)
    print(f"  lower bound (plain batched forwards) {t_bound:8.2f} s")
    for label, t in [("sweep, prefix + positions reuse", t_reuse), ("sweep, prefix reuse only", t_prefix),
                     ("sweep, no reuse", t_plain)]:
        print(f"  {label:<36} {t:8.2f} s   {t / t_bound:5.2f} x lower bound   {t_naive / t:6.1f} x faster than naive")
    print(f"  naive loop (one hooked forward each) {t_naive:8.2f} s")
    if isinstance(lens, str):
        print(f"  TransformerLens                      {lens}")
    else:
        t_lens, lens_values = lens
        print(f"  TransformerLens (bridge, compat.)    {t_lens:8.2f} s   {t_lens / t_reuse:5.2f} x the sweep "
              "with both reuses")
    print(f"  max |sweep - naive| normalized effect: {error:.1e} (both reuses), {prefix_error:.1e} (prefix only)")
    if not isinstance(lens, str):
        print(f"  max |sweep - TransformerLens| normalized effect: "
              f"{(lens_values - scores.values.float()).abs().max().item():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1, help="examples for the GPT-2-small-shaped model")
    parser.add_argument("--seq", type=int, default=4, help="prompt length for the GPT-2-small-shaped model")
    parser.add_argument("--tiny-n", type=int, default=8, help="IOI examples for tiny-base")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for setup in (tiny_base(args.tiny_n), gpt2_small_shaped(args.n, args.seq)):
        run(*setup, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
