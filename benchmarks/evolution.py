"""K masked fine-tuning runs trained together against the same K runs one after another.

    python benchmarks/evolution.py [--runs 16] [--steps 10] [--batch 4 8 16] [--threads 1]

The workload is the Random arm of the update experiment (`updates.update_experiment`): tiny-base
fine-tuned on the register task (cross-entropy of the answer at the final position, `--batch` prompts a
step), each run restricted to its own random set of 3 heads and 1 MLP matched by layer
(`components.random_components`). Measured in the same run:

- interplab: `training.train_masked` with all K masks (one vmapped forward/backward over stacked weights);
- sequential: K calls of `training.train(copy, grad_mask=mask)`, the one-run loop with the same
  arithmetic (what one would write without batching);
- sequential, batched code: K calls of `training.train_masked` with one mask each (separates the gain
  of batching from the gain of skipping frozen weights' gradients).

It checks that every parameter outside each run's mask is bit-identical to the base model and prints the
largest difference between batched and sequential parameters, losses and logits before the times. The
parameter difference is not rounding-sized in float32: AdamW divides each gradient by its own running
size, so entries whose gradient is rounding noise (key biases, which softmax ignores) take steps of up to
`lr` either way; they do not move the function, as the logit difference shows. tests/test_updates.py
checks the equality in float64.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import interplab as il
from interplab import components, training
from interplab.experiments import updates

STATIC = ["a1.h2", "a2.h0", "a3.h1", "m2"]


def register_loss(m: il.Model, batch: int):
    return training.answer_loss(il.tasks.make("register", m, n=256, seed=100), batch)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(m: il.Model, runs: int, steps: int, batch: int) -> None:
    loss_fn = register_loss(m, batch)
    masks = [components.component_masks(m, c) for c in components.random_components(m, STATIC, runs, seed=0)]
    base = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    kw = dict(steps=steps, lr=1e-3, warmup=5)

    batched, t_batched = timed(lambda: training.train_masked(m.hf, loss_fn, masks, desc="batched", **kw))

    def one_by_one():
        models, losses = [copy.deepcopy(m.hf) for _ in masks], []
        for model, mask in zip(models, masks):
            losses.append(training.train(model, loss_fn, grad_mask=mask, desc="sequential", **kw))
        return models, torch.tensor(losses).T  # (steps, K)

    (sequential, seq_losses), t_seq = timed(one_by_one)
    _, t_seq_masked = timed(lambda: [training.train_masked(m.hf, loss_fn, [mask], desc="one", **kw)
                                     for mask in masks])

    param_diff, logit_diff = 0.0, 0.0
    prompts = il.tasks.make("register", m, n=64, seed=1).clean
    for k, (model, mask) in enumerate(zip(sequential, masks)):
        mine = batched.load_into(copy.deepcopy(m.hf), k)
        for (name, p), q in zip(model.named_parameters(), mine.parameters()):
            frozen = mask.get(name, torch.zeros_like(p)) == 0
            if not (torch.equal(q[frozen], base[name][frozen]) and torch.equal(p[frozen], base[name][frozen])):
                raise AssertionError(f"run {k}: entries of {name} outside the mask moved")
            param_diff = max(param_diff, (p - q).abs().max().item())
        with torch.no_grad():
            logit_diff = max(logit_diff, (model(prompts).logits - mine(prompts).logits).abs().max().item())
    loss_diff = (batched.losses - seq_losses).abs().max().item()

    print(f"{runs} masked runs, {steps} steps, batch {batch} register prompts, torch threads {torch.get_num_threads()}")
    print(f"  frozen entries bit-identical to base: yes. max |batched - sequential|: parameter {param_diff:.1e}, "
          f"loss {loss_diff:.1e}, logit {logit_diff:.1e}")
    print(f"  interplab train_masked, {runs} runs together: {t_batched:8.2f} s")
    print(f"  sequential training.train x {runs}:          {t_seq:8.2f} s   ratio {t_seq / t_batched:5.2f}x")
    print(f"  sequential train_masked x {runs} (one each):  {t_seq_masked:8.2f} s   "
          f"ratio {t_seq_masked / t_batched:5.2f}x")


def main(runs: int, steps: int, batches: list[int], threads: int) -> None:
    torch.set_num_threads(threads)
    m = il.load("interplab/tiny-base")
    print(f"tiny-base ({sum(p.numel() for p in m.hf.parameters()):,} parameters); each run: 3 heads + 1 MLP")
    for batch in batches:
        compare(m, runs, steps, batch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    main(args.runs, args.steps, args.batch, args.threads)
