"""Argument checks shared by the public entry points, run before any model does.

A bad token id or an over-long prompt otherwise surfaces as a torch `IndexError`
twenty frames deep, and `batch_size=0` as an empty loop that returns nothing, so
every method that runs a model calls these first. Each error says what was wrong
and how to fix it, in one line.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

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
    """Check a task against a model: paired prompts, one answer and one wrong token per prompt, ids in range,
    and a model that answers the same way twice (no active dropout)."""
    deterministic(m.nn._module, "this analysis")
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
    if not value or getattr(m.nn, "model_key", None) is not None:  # named: the server says whether it hosts it
        return
    if getattr(m, "is_organism", False):
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


# ---- numbers: Python's slicing and coercion would otherwise turn a wrong value into a different question ----

def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(value, name: str, low: int = 1, high: int | None = None) -> int:
    """`value` if it is an int in `[low, high]`, else a clear error: a negative count would slice from the
    end and a float would be truncated, each quietly answering a different question."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        where = (f"an int between {low} and {high}" if high is not None else
                 "a positive int" if low == 1 else f"an int of at least {low}")
        raise ValueError(f"{name} must be {where}, got {value}")
    return int(value)


def seed(value, name: str = "seed") -> int:
    """A seed: a non-negative int (torch refuses floats deep inside; a bool is not a seed)."""
    return count(value, name, low=0, high=2**63 - 1)


def number(value, name: str, low: float | None = None, high: float | None = None,
           above: float | None = None) -> float:
    """A finite real in `[low, high]` (and `> above` where given), else a clear error: NaN and inf turn
    every later number into NaN without a word."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be greater than {above}, got {value}")
    return float(value)


def finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """`values` if every entry is finite, else an error saying how many are not."""
    if values.is_floating_point() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{what} holds {bad} non-finite value(s) (NaN or inf) of {values.numel()}; "
                         "fix what produced them before using it")
    return values


def indices(values, name: str, size: int, unique: bool = True) -> list[int]:
    """A list of ints in `[0, size)`, each once: a float would be truncated, a boolean mask read as
    indices 0/1, and a repeat counted twice."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_floating_point():
            raise TypeError(f"{name} must be integer indices, got a {values.dtype} tensor; "
                            "for a boolean mask use mask.nonzero().flatten().tolist()")
        values = values.flatten().tolist()
    values = list(values)
    for v in values:
        if not is_int(v):
            raise TypeError(f"{name} must hold int indices, got {v!r} ({type(v).__name__})")
        if not 0 <= v < size:
            raise ValueError(f"{name} holds the index {v}, outside [0, {size}): give indices 0..{size - 1}")
    if unique and len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{name} repeats {repeated}; each index may appear once (a repeat is counted twice)")
    return [int(v) for v in values]


def unique_names(names, what: str) -> list[str]:
    """`names` if none repeats (two entries under one name would be silently merged)."""
    names = list(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} repeat the name(s) {repeated}; give each a distinct name")
    return names


def template(text: str, field: str, name: str = "template") -> str:
    """A format string that holds `{field}` (without it every prompt would be the same)."""
    if not isinstance(text, str) or "{" + field + "}" not in text:
        raise ValueError(f"{name} must contain {{{field}}}, where each item goes, got {text!r}")
    return text


def nonempty(values, what: str):
    """`values` if it holds something (an empty list otherwise ends in `torch.cat` or a meaningless 1.0)."""
    if len(values) == 0:
        raise ValueError(f"{what} is empty; give at least one")
    return values


def nonzero(values: torch.Tensor, what: str) -> torch.Tensor:
    """A finite tensor that is not all zero (a zero direction or difference has no meaningful direction)."""
    finite(values, what)
    if not values.abs().sum() > 0:
        raise ValueError(f"{what} is all zero, so it has no direction to measure; check the inputs differ")
    return values


def choice(value, name: str, options) -> str:
    """`value` if it is one of `options`."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


# ---- masks and training: where a wrong mask broadcasts and a non-finite step trains on ----

def mask(value: torch.Tensor, shape, name: str) -> torch.Tensor:
    """A 0/1 tensor of exactly `shape` (a smaller one would broadcast), not all zero (nothing would train)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 0/1 of shape {tuple(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} has the wrong shape {tuple(value.shape)}: its parameter has {tuple(shape)}; "
                         "give a mask of the parameter's exact shape (a smaller one would broadcast)")
    if not ((value == 0) | (value == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    if not (value != 0).any():
        raise ValueError(f"{name} is all zero, so nothing would train; drop it or select some entries")
    return value


def training_step(step: int, loss: torch.Tensor, parameters) -> None:
    """Stop a training loop at the first non-finite loss or parameter, naming the step."""
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"the loss is {loss.detach().flatten()[:4].tolist()} (non-finite) at step {step}; "
                                 "lower the learning rate or check the loss function")
    for p in parameters:
        if not torch.isfinite(p.detach()).all():
            raise FloatingPointError(f"a parameter became non-finite at step {step}; lower the learning rate "
                                     "(or check the loss and its inputs)")


def deterministic(module: torch.nn.Module, what: str, training: bool = False) -> None:
    """Refuse a module with active dropout in training mode (or about to be run in it, `training=True`):
    two identical runs would give different answers."""
    if (module.training or training) and any(isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0
                               for sub in module.modules()):
        raise ValueError(f"{what} needs a deterministic model, but this one runs in train() mode with active "
                         "dropout; call .eval() on it first, or set its dropout probabilities to 0")


@contextlib.contextmanager
def kept_grads(module: torch.nn.Module):
    """Run a block, then put back every parameter's `.grad` as it was, even on error: a backward pass
    inside an analysis (or a training step) must not leave gradients behind, nor double them on a rerun."""
    grads = {p: p.grad for p in module.parameters()}
    try:
        yield module
    finally:
        for p, g in grads.items():
            p.grad = g


def result(values: torch.Tensor, what: str) -> torch.Tensor:
    """`values`, with a warning if it holds NaN or inf (a result that is wrong says so)."""
    if values.is_floating_point() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        warnings.warn(f"{what} holds {bad} non-finite value(s) of {values.numel()}: the inputs or the "
                      "intervention overflowed; do not trust it", RuntimeWarning, stacklevel=3)
    return values


def same_shape_family(saved: dict, m) -> None:
    """Refuse an object saved for one architecture being loaded onto another (same sizes, other layout)."""
    here = shape_record(m)
    wrong = {k: (v, here[k]) for k, v in saved.items() if k in here and here[k] != v}
    if wrong:
        differ = ", ".join(f"{k} {a} here {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"this was saved for a different model: {differ}; load it onto the model it was built for")


def shape_record(m) -> dict:
    """The family and sizes that decide whether an object built on `m` fits another model."""
    return {"family": m.spec.family, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_head": m.d_head,
            "d_model": m.d_model, "d_vocab": m.d_vocab}


def sample(values, what: str, at_least: int = 1, finite: bool = True):
    """A 1-D float64 numpy array of at least `at_least` finite values (an empty null gives p = 1.0 and a NaN
    gain p = 0.0, each without a word)."""
    import numpy as np  # only the statistics need it

    x = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat list of numbers, got shape {x.shape}")
    if x.size < at_least:
        raise ValueError(f"{what} has {x.size} value(s); it needs at least {at_least}")
    if finite and not np.isfinite(x).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(x)).sum())} non-finite value(s); fix the runs that "
                         "produced them")
    return x
