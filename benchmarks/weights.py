"""Wall time of the full weight-diff SVD table on the organisms, against raw PyTorch.

    python benchmarks/weights.py [--repeats 5]

interplab: `weights.diff_table` for base→sft and sft→dpo over every layer's
MLP and attention output projections (norms, top singular value, |cos| with
one direction per layer). Baseline, measured in the same run: the same
numbers from the state dicts with `torch.linalg.svd`, written out by hand.
The two must agree; the script checks that before printing the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

import interplab as il

MODULES = ("mlp.c_proj", "attn.c_proj")  # GPT-2 names, stored (in, out) as Conv1D


def raw_table(state_dicts: list[dict], directions: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[stage, module, layer, (norm, σ1, |cos|)] straight from state dicts."""
    out = torch.zeros(len(state_dicts) - 1, len(MODULES), n_layers, 3)
    for s, (a, b) in enumerate(zip(state_dicts, state_dicts[1:])):
        for j, module in enumerate(MODULES):
            for layer in range(n_layers):
                key = f"transformer.h.{layer}.{module}.weight"
                delta = (b[key] - a[key]).T  # (out, in)
                U, S, _ = torch.linalg.svd(delta, full_matrices=False)
                out[s, j, layer] = torch.stack([delta.norm(), S[0], (U[:, 0] @ directions[layer]).abs()])
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(repeats: int) -> None:
    torch.manual_seed(0)
    base, sft, dpo = (il.load(f"interplab/tiny-{s}") for s in ("base", "sft", "dpo"))
    directions = torch.nn.functional.normalize(torch.randn(base.n_layers, base.d_model), dim=1)
    stages = {"base→sft": (base, sft), "sft→dpo": (sft, dpo)}
    state_dicts = [{k: v.float() for k, v in m.hf.state_dict().items()} for m in (base, sft, dpo)]

    table = il.weights.diff_table(stages, directions)
    ours = torch.stack([table.norm.values, table.top_sv.values, table.alignment.values], -1)
    torch.testing.assert_close(ours, raw_table(state_dicts, directions, base.n_layers), rtol=1e-4, atol=1e-5)

    t_ours = best_of(lambda: il.weights.diff_table(stages, directions), repeats)
    t_raw = best_of(lambda: raw_table(state_dicts, directions, base.n_layers), repeats)
    n = 2 * len(MODULES) * base.n_layers
    print(f"SVD table, {n} diffs of organisms ({base.n_layers} layers, d_model {base.d_model}), "
          f"best of {repeats}, torch threads {torch.get_num_threads()}")
    print(f"  interplab.weights.diff_table: {t_ours * 1e3:8.1f} ms")
    print(f"  raw torch (state dicts):      {t_raw * 1e3:8.1f} ms")
    print(f"  ratio interplab / raw:        {t_ours / t_raw:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
