"""Argument checks shared by the public entry points, run before any model does.

A bad token id or an over-long prompt otherwise surfaces as a torch `IndexError`
twenty frames deep, and `batch_size=0` as an empty loop that returns nothing, so
every method that runs a model calls these first. Each error says what was wrong
and how to fix it, in one line.
"""

from __future__ import annotations

import torch


def batch_size(value, name: str = "batch_size") -> int:
    """`value` if it is a positive int, else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (rows per forward pass), got {value!r}")
    return value


def context_length(m) -> int | None:
    """The longest sequence the model's position embedding (or rotary table) was built for, if it says."""
    config = m.config  # not m.hf: that would load a lazily built model's weights
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def tokens(m, ids: torch.Tensor, what: str = "tokens") -> torch.Tensor:
    """Check `ids` `[n, seq]`: integer ids below the model's vocabulary size, no longer than its context."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a LongTensor [n, seq] of token ids, got {shape}; use m.to_tokens(texts)")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= m.d_vocab):
        raise ValueError(f"{what} hold token ids in [{ids.min().item()}, {ids.max().item()}] but {m.name} has a "
                         f"vocabulary of {m.d_vocab}; tokenize with this model's tokenizer (m.to_tokens)")
    limit = context_length(m)
    if limit and ids.shape[1] > limit:
        raise ValueError(f"{what} have {ids.shape[1]} tokens but {m.name} takes at most {limit}; shorten the prompts")
    return ids


def task(m, t) -> None:
    """Check a task against a model: paired prompts, one answer and one wrong token per prompt, ids in range."""
    t.check_paired()
    n = len(t)
    if n == 0:
        raise ValueError("the task has no examples; build it with n >= 1")
    if t.answer.shape != (n,) or t.wrong.shape != (n,):
        raise ValueError(f"the task has {n} prompts but answer {tuple(t.answer.shape)} and wrong "
                         f"{tuple(t.wrong.shape)}; give one answer and one wrong token per prompt.")
    tokens(m, t.clean, "clean prompts")
    tokens(m, t.corrupt, "corrupt prompts")
    tokens(m, torch.stack([t.answer, t.wrong]), "answer and wrong tokens")


def remote(m, value: bool) -> None:
    """Refuse `remote=True` for a model NDIF cannot host: organisms and local folders exist only on this machine."""
    from .model import ORGANISMS

    if not value:
        return
    if m.name in ORGANISMS:
        raise ValueError(f"remote=True runs on NDIF, which hosts hub models only; {m.name} is a local organism. "
                         "Drop remote=True (organisms run in seconds on a CPU).")
    if getattr(m, "folder", None) is not None:
        raise ValueError(f"remote=True runs on NDIF, which hosts hub models by their hub id; {m.name} was loaded "
                         "from a local folder. Load it by hub id (il.load(name, remote=True)) or drop remote=True.")


def local_only(value: bool, function: str, why: str) -> None:
    """Refuse `remote=True` for a function that cannot run on NDIF, saying which and why."""
    if value:
        raise NotImplementedError(f"{function} cannot run remotely (remote=True): {why}. Run it locally "
                                  "(remote=False) on a model that fits this machine.")
