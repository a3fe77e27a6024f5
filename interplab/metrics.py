"""Metrics that turn logits into one number per example.

Each function accepts final-position logits `[n, d_vocab]` or full logits
`[n, seq, d_vocab]` (then the final position is used), because patching
sweeps only unembed the final position.
"""

from __future__ import annotations

import torch


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
    logp, logq = final(logits_p).log_softmax(-1), final(logits_q).log_softmax(-1)
    if logp.shape != logq.shape:
        raise ValueError(f"logits shapes differ: {tuple(logp.shape)} vs {tuple(logq.shape)}")
    return (logp.exp() * (logp - logq)).sum(-1)


def accuracy(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose top-1 final-position token is the answer (a 0-d tensor)."""
    logits = final(logits)
    answer = _ids(answer, logits.shape[0], "answer", logits.device)
    return (logits.argmax(-1) == answer).float().mean()
