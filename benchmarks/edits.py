"""K edits trained together against K sequential trainings of the same arithmetic, in one run.

    python benchmarks/edits.py [--k 16] [--steps 10] [--batch-size 24] [--threads 1] [--repeats 3] [--objective ipo]

The edits are the K single-head learned vectors of tiny-sft (the parent of tiny-dpo), trained with the
IPO loss on the misconception preference pairs (`organisms.corpus.preference_pairs("train")`, 24 pairs):

- batched:     `il.edits.train(m, [e_1 .. e_K], ...)`: per step, one forward over the groups of rows of all
               edits that start at the same layer (each group carries its own edit), blocks below that layer
               replaced by their cached unedited output; and with `reuse_prefix=False`, one forward per step
               over all K groups from block 0
- sequential:  `il.edits.train(m, [e_k], ...)` for k = 1 .. K, one after another (same prefix cache)
- raw PyTorch: the same K trainings, one after another, with a `register_forward_pre_hook` on the output
               projection instead of nnsight, model weights frozen, every block run (no prefix cache)

All three must end at the same parameters (the max difference is printed), so a fast wrong trainer shows up.
`--batch-size` is the number of pairs per step (the same rows for every edit); small batches show where
batching pays: when a step is dominated by fixed per-step costs rather than arithmetic.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import interplab as il
from interplab import edits, training
from interplab.organisms import corpus


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def raw_sequential(m, heads, prompts, chosen, rejected, args) -> list[torch.Tensor]:
    """The per-head vector edits trained one by one with raw PyTorch hooks: same loss, rows, Adam."""
    ref = [training.sequence_logprob(m.hf, prompts, c).detach() for c in (chosen, rejected)]
    out = []
    for layer, head in heads:
        vec = torch.zeros(m.d_head, requires_grad=True)
        cols = slice(head * m.d_head, (head + 1) * m.d_head)

        def add(mod, inputs, vec=vec, cols=cols):
            values = inputs[0]
            pad = torch.zeros_like(values[0, 0]).index_copy(0, torch.arange(cols.start, cols.stop), vec)
            return (values + pad,) + inputs[1:]

        handle = m.module(m.spec.head_values, layer).register_forward_pre_hook(add)
        m.hf.requires_grad_(False)
        opt = torch.optim.Adam([vec], lr=args.lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            rows = torch.randperm(len(prompts), generator=gen)[: args.batch_size]
            both = training.sequence_logprob(m.hf, prompts[rows].repeat(2, 1),
                                             torch.cat([chosen[rows], rejected[rows]]))  # one forward, as il does
            pol_c, pol_r = both.split(len(rows))
            loss = training.preference_loss(pol_c, pol_r, ref[0][rows], ref[1][rows], beta=args.beta,
                                            objective=args.objective)
            (vec.grad,) = torch.autograd.grad(loss, [vec])
            opt.step()
        handle.remove()
        m.hf.requires_grad_(True)
        out.append(vec.detach())
    return out


@torch.no_grad()
def ms_per_row(m, tokens: torch.Tensor, rows: int, repeats: int = 5) -> float:
    """Plain forward time per row at a batch of `rows`: the most batching can save is the ratio across sizes."""
    batch = tokens[torch.arange(rows) % len(tokens)]
    m.hf(batch)
    seconds, _ = timed(lambda: [m.hf(batch) for _ in range(repeats)])
    return 1000 * seconds / repeats / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=16, help="number of single-head edits (at most 16)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=24, help="pairs per step (24 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time of each is shown")
    parser.add_argument("--objective", default="ipo", choices=["ipo", "dpo"])
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    m = il.load("interplab/tiny-sft")
    pairs = corpus.preference_pairs("train")
    prompts = m.to_tokens([p for p, _, _ in pairs])
    chosen, rejected = (m.to_tokens([x[i] for x in pairs], prepend_bos=False) for i in (1, 2))
    heads = edits.all_heads(m)[: args.k]
    common = dict(objective=args.objective, beta=args.beta, steps=args.steps, lr=args.lr, seed=0,
                  batch_size=args.batch_size, progress=False)
    load_before = os.getloadavg()[0]

    edits.train(m, [edits.vector(m, [heads[0]])], prompts, chosen, rejected, **{**common, "steps": 2})  # warm-up
    fresh = lambda: [edits.vector(m, [h]) for h in heads]  # noqa: E731
    runs = {
        "reuse": lambda es: edits.train(m, es, prompts, chosen, rejected, **common),
        "one": lambda es: edits.train(m, es, prompts, chosen, rejected, reuse_prefix=False, **common),
        "seq": lambda es: [edits.train(m, [e], prompts, chosen, rejected, **common) for e in es],
    }
    best, trained = {}, {}
    for _ in range(args.repeats):  # interleaved, best of: the least disturbed run of each on a shared machine
        for name, run in runs.items():
            trained[name] = fresh()
            seconds, _ = timed(lambda: run(trained[name]))
            best[name] = min(best.get(name, float("inf")), seconds)
        seconds, raw = timed(lambda: raw_sequential(m, heads, prompts, chosen, rejected, args))
        best["raw"] = min(best.get("raw", float("inf")), seconds)
    t_batched, t_one, t_seq, t_raw = best["reuse"], best["one"], best["seq"], best["raw"]
    together, one, alone = trained["reuse"], trained["one"], trained["seq"]
    sequences = torch.cat([prompts, chosen], 1)
    per_row = {rows: ms_per_row(m, sequences, rows) for rows in (2 * args.batch_size, 2 * args.batch_size * args.k)}
    load_after = os.getloadavg()[0]

    vec = lambda es: torch.stack([e.params["vector"][0] for e in es])  # noqa: E731
    diff_seq = max((vec(together) - vec(alone)).abs().max().item(), (vec(one) - vec(alone)).abs().max().item())
    diff_raw = (vec(together) - torch.stack(raw)).abs().max().item()
    rows = 2 * args.batch_size
    print(f"tiny-sft, K={args.k} single-head vector edits, {args.objective.upper()} beta={args.beta}, {args.steps} steps, "
          f"{args.batch_size} pairs/step ({rows} rows x {prompts.shape[1] + chosen.shape[1]} tokens per edit), "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats} interleaved runs")
    firsts = len({layer for layer, _ in heads})
    best = min(t_batched, t_one)
    lines = [(f"batched, {firsts} forwards per step (prefix reuse)", t_batched),
             (f"batched, 1 forward per step of {args.k * rows} rows (no reuse)", t_one),
             (f"sequential il.edits.train, {args.k} runs", t_seq),
             (f"sequential raw PyTorch hooks, {args.k} runs", t_raw)]
    for label, seconds in lines:
        print(f"{label:<52} {seconds:7.2f} s   {seconds / best:5.2f}x the faster batched")
    print(f"max |parameter difference|: batched vs sequential {diff_seq:.2e}, batched vs raw {diff_raw:.2e}")
    print("plain forward, ms per row: " + ", ".join(f"{ms:.3f} at {rows} rows" for rows, ms in per_row.items())
          + " (equal per-row cost means the model is compute-bound and batching cannot save arithmetic)")
    cores = os.cpu_count()
    shared = max(load_before, load_after) > args.threads + 0.5
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f} on {cores} cores"
          + (" -- the machine was shared with other jobs during this run" if shared else ""))


if __name__ == "__main__":
    main()
