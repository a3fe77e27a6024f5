"""Speed of EAP over every edge against one plain forward + backward on the same batch.

    python benchmarks/attribution.py [--n 4] [--seq 16] [--repeats 3]

For tiny-base (IOI prompts) and a randomly initialised GPT-2-small-shaped model
(12 layers, 12 heads, d_model 768, vocab 50257, random short prompts):

- EAP:       il.attribution.edges(method="EAP"): a corrupt forward, a clean forward with a
             separate input per receiver (3 * n_heads + 1 per layer, plus the logits), a backward
             to all of them, and the (sender x receiver) products
- baseline:  an unwrapped copy of the Hugging Face model, one forward of the clean batch and one
             backward of the summed logit difference to the parameters
- EAP-IG:    the same with steps=5, for scale

The target is EAP within 3x of the baseline. Times are the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import interplab as il
from setups import gpt2_small_shaped, tiny_base


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(raw, task) -> None:
    raw.zero_grad(set_to_none=True)
    task.metric(raw(task.clean).logits).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="prompts in the batch")
    parser.add_argument("--seq", type=int, default=16, help="prompt length of the random model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, m, raw, task in (tiny_base(args.n), gpt2_small_shaped(args.n, args.seq)):
        graph = il.circuits.Graph.from_model(m)
        base = median_seconds(lambda: forward_backward(raw, task), args.repeats)
        eap = median_seconds(lambda: il.attribution.edges(m, task, method="EAP", batch_size=args.n), args.repeats)
        ig = median_seconds(lambda: il.attribution.edges(m, task, method="EAP-IG", steps=5, batch_size=args.n), 1)
        print(f"{name}: batch {tuple(task.clean.shape)}, {graph.n_edges} edges")
        print(f"  plain forward+backward  {base * 1e3:8.1f} ms")
        print(f"  EAP, every edge         {eap * 1e3:8.1f} ms   ratio {eap / base:.2f}x (target <= 3x)")
        print(f"  EAP-IG, 5 steps         {ig * 1e3:8.1f} ms   ratio {ig / base:.2f}x")


if __name__ == "__main__":
    main()
