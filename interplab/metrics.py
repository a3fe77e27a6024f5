"""Metrics that turn logits into one number per example, and the checks every method applies to them.

Each function accepts final-position logits `[n, d_vocab]` or full logits
`[n, seq, d_vocab]` (then the final position is used), because patching
sweeps only unembed the final position.

Every method that scores a patch (patching, paths, attribution, circuits) takes
the same `Metric`: `metric(final_logits [B, d_vocab], examples LongTensor [B]) -> [B]`,
where `examples` are the task rows the logits belong to (rows may repeat, since a
batch can carry several components per example). `None` means the task's own
metric, the logit difference `answer - wrong` (`task_metric`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def final(logits: torch.Tensor) -> torch.Tensor:
    """Final-position logits `[n, d_vocab]` from `[n, seq, d_vocab]` or `[n, d_vocab]`."""
    if logits.dim() == 3:
        return logits[:, -1]
    if logits.dim() == 2:
        return logits
    raise ValueError(f"expected logits [n, d_vocab] or [n, seq, d_vocab], got shape {tuple(logits.shape)}")


def _ids(ids: torch.Tensor, n: int, what: str, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=device).long()
    if ids.shape != (n,):
        raise ValueError(f"{what} must be token ids of shape [{n}] (one per example), got {tuple(ids.shape)}")
    return ids


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """`logit[answer] - logit[wrong]` at the final position, per example: `[n]`."""
    logits = final(logits)
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    answer, wrong = _ids(answer, n, "answer", logits.device), _ids(wrong, n, "wrong", logits.device)
    return logits[rows, answer] - logits[rows, wrong]


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Probability of the answer token at the final position, per example: `[n]`."""
    logits = final(logits)
    answer = _ids(answer, logits.shape[0], "answer", logits.device)
    return logits.softmax(-1).gather(1, answer[:, None])[:, 0]


def normalized_effect(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """`(patched - corrupt) / (clean - corrupt)`: 0 where patching changed nothing, 1 where it
    moved the metric all the way from the corrupt to the clean value.

    Arguments broadcast; pass means over examples for the usual averaged effect.
    """
    clean, corrupt = torch.as_tensor(clean, dtype=patched.dtype), torch.as_tensor(corrupt, dtype=patched.dtype)
    gap = clean - corrupt
    if (gap.abs() < 1e-12).any():
        raise ValueError(
            f"the clean and corrupt runs score the same on the metric (clean={clean.tolist()}, "
            f"corrupt={corrupt.tolist()}), so the normalized effect is undefined. Check that the task's "
            "corruption changes the answer, or use normalize=False for raw metric values."
        )
    return (patched - corrupt) / gap


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """`KL(P || Q)` between the final-position next-token distributions, per example: `[n]`."""
    p, q = final(logits_p), final(logits_q)
    if p.shape != q.shape:
        raise ValueError(f"logits shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    return position_kl(p, q)


def position_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """`KL(P || Q)` between next-token distributions at every position: `[..., V]` twice -> `[...]`."""
    logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def accuracy(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose top-1 final-position token is the answer (a 0-d tensor)."""
    logits = final(logits)
    answer = _ids(answer, logits.shape[0], "answer", logits.device)
    return (logits.argmax(-1) == answer).float().mean()


def task_metric(task) -> Metric:
    """The task's logit difference as a `Metric`: `(final_logits [B, V], examples [B]) -> [B]`."""
    return lambda logits, examples: logit_diff(logits, task.answer[examples.cpu()], task.wrong[examples.cpu()])


def apply(metric: Metric, logits: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """`metric(final logits, examples)`, checked to give one finite-shaped value per row: `[B]`.

    A metric that averages (shape `[]` or `[1]`) would be broadcast over rows that belong to
    different components, so it is refused.
    """
    out = metric(final(logits), examples)
    if not isinstance(out, torch.Tensor) or out.shape != (len(examples),):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the metric returned {shape} for {len(examples)} rows; a metric must return one value per row, "
            f"shape [{len(examples)}] (do not average over examples: interplab averages after patching)."
        )
    return out


def check_gap(clean: torch.Tensor, corrupt: torch.Tensor, normalize: bool = True, what: str = "the task") -> float:
    """Check the clean-vs-corrupt gap before a sweep runs; return it (mean clean - mean corrupt).

    clean, corrupt: per-example metric values `[n]`. Raises when normalizing by a zero gap;
    warns, when normalizing, if the gap is within two standard errors of zero (from the spread
    of the per-example differences) or under a tenth of the metric's spread across prompts (the
    register task on tiny-base: gap -0.02, sd 0.31), where normalized scores are mostly noise.
    """
    clean, corrupt = clean.detach().double().cpu().flatten(), corrupt.detach().double().cpu().flatten()
    gap = (clean.mean() - corrupt.mean()).item()
    if not math.isfinite(gap):
        raise ValueError(f"the metric is not finite on {what} (clean {clean.mean():.4g}, corrupt {corrupt.mean():.4g})")
    if normalize and abs(gap) < 1e-6:
        raise ValueError(
            f"the metric scores {what} the same on clean and corrupt prompts (gap {gap:.3g}), so a "
            "normalized effect is undefined. Check that the corruption changes the answer, or pass "
            "normalize=False for raw effects."
        )
    if normalize and len(clean) + len(corrupt) > 2:
        spread = torch.cat([clean, corrupt]).std().item()
        stderr = (clean - corrupt).std().item() / math.sqrt(len(clean)) if len(clean) == len(corrupt) else 0.0
        if abs(gap) < 2 * stderr or abs(gap) < 0.1 * spread:
            why = (f"within two standard errors (2 × SE = {2 * stderr:.3g}) of zero" if abs(gap) < 2 * stderr else
                   f"under a tenth of the metric's spread across prompts (sd {spread:.3g})")
            warnings.warn(
                f"the clean-vs-corrupt gap on {what} is {gap:+.3g}, {why}: the model hardly tells clean from "
                "corrupt, so normalized effects are mostly noise. Use a task the model solves, or more examples.",
                stacklevel=3)
    return gap
