"""`Scores`: a small labelled tensor, the result type of every sweep."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from . import checks, figures


def top_order(values: torch.Tensor, k: int, by_abs: bool = True) -> torch.Tensor:
    """Flat indices of the `k` largest entries of `values` (by |value| unless `by_abs=False`), largest first;
    ties keep index order. The one top-k rule of Scores, circuits, component lists and head choices."""
    flat = values.flatten()
    return (flat.abs() if by_abs else flat).argsort(descending=True, stable=True)[:k]


@dataclass
class Scores:
    """`values` with named dims and, optionally, a label per index of each dim.

    `Scores(values [n_layers, n_heads], dims=("layer", "head"))` is a head
    sweep; `labels={"pos": ["<bos>", "When", ...]}` names positions by token.
    `meta` records how it was computed (task, mode, normalize, ...).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = self.values.detach().cpu()
        self.dims = tuple(self.dims)
        if self.values.dim() != len(self.dims):
            raise ValueError(f"values have {self.values.dim()} dims but dims names {len(self.dims)}: {self.dims}")
        for dim, names in self.labels.items():
            if dim not in self.dims:
                raise ValueError(f"labels given for {dim!r}, which is not one of dims {self.dims}")
            size = self.values.shape[self.dims.index(dim)]
            if len(names) != size:
                raise ValueError(f"{len(names)} labels for dim {dim!r} of size {size}")
        checks.result(self.values, f"Scores over {self.dims}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def label(self, dim: str, index: int) -> str:
        names = self.labels.get(dim)
        return names[index] if names else str(index)

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[tuple[int, ...], float]]:
        """The k largest entries (by |value| unless `by_abs=False`): `[(index, value), ...]`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int (how many entries), got {k!r}; for the smallest "
                             "entries use by_abs=False on negated scores")
        checks.finite(self.values, "these Scores")  # NaN would sort first and be ranked the largest
        flat = self.values.flatten()
        order = top_order(flat, k, by_abs)
        return [(tuple(int(i) for i in torch.unravel_index(j, self.shape)), flat[j].item()) for j in order]

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape))
        if not torch.isfinite(self.values).all():
            return f"Scores({dims}; holds {int((~torch.isfinite(self.values)).sum())} non-finite values)"
        best = ", ".join(
            "(" + ", ".join(f"{d}={self.label(d, i)}" for d, i in zip(self.dims, idx)) + f"): {v:+.3f}"
            for idx, v in self.top(3)
        )
        return f"Scores({dims}; top: {best})"

    def plot(self, title: str | None = None, **kwargs):
        """A labelled plotly heatmap (2-D), bar chart (1-D), or one heatmap per leading index (3-D)."""
        return figures.draw("scores", self, title=title, **kwargs)

    def items(self):
        """Every `(index tuple, value)` in row-major order."""
        for idx in itertools.product(*(range(n) for n in self.shape)):
            yield idx, self.values[idx].item()
