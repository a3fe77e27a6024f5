"""ITI (inference-time intervention, Li et al. 2023): per-head probes on the last token's values, and the
steering edit `alpha * sigma_h * theta_h` they define at any chosen heads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import checks, probes
from ..scores import Scores
from .edit import Edit, Head, _at, _check_heads, additive, top_k


@dataclass
class ITIProbe:
    """ITI's per-head probes (Li et al. 2023, likenneth/honest_llama) on the last token's head values.

    accuracy: held-out (validation) accuracy of a logistic probe per head, Scores over (layer, head).
    theta: `[n_layers, n_heads, d_head]` unit mass-mean direction, true minus false, on the training split.
    sigma: `[n_layers, n_heads]` std (ddof 0) of the training activations projected on theta.
    train: `[n]` bool, the rows theta and sigma were computed on.
    """

    accuracy: Scores
    theta: torch.Tensor
    sigma: torch.Tensor
    train: torch.Tensor

    def top(self, k: int) -> list[str]:
        """The k heads with the highest validation accuracy."""
        return top_k(self.accuracy, k)


def fit_iti(
    m,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    pos: int = -1,
    batch_size: int = 64,
    progress: bool | None = None,
    remote: bool = False,
) -> ITIProbe:
    """Collect head values at `pos` for `tokens` `[n, seq]` and fit ITI's probes (labels `[n]`, True = truthful).

    `groups` `[n]` keeps related rows (a statement and its false twin) in one split. With `remote=True`
    the head values are collected on NDIF and the probes fit here.
    """
    x = probes.collect(m, tokens, site="heads", pos=pos, batch_size=batch_size, progress=progress,
                       remote=remote)  # (n, L, H, dh)
    return fit_iti_activations(x, labels, groups, test_fraction, seed)


def fit_iti_activations(
    x: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None, test_fraction: float = 0.3,
    seed: int = 0,
) -> ITIProbe:
    """`fit_iti` on activations already collected, `x` `[n, n_layers, n_heads, d_head]`."""
    if x.dim() != 4:
        raise ValueError(f"x must be head values [n, n_layers, n_heads, d_head], got {tuple(x.shape)}")
    y = probes._check(x.flatten(1), labels, dims=2)[1]
    accuracy, _ = probes.sweep(x, y, probe="logistic", test_fraction=test_fraction, seed=seed, groups=groups)
    with warnings.catch_warnings():  # the sweep has already warned about rows it cannot separate
        warnings.simplefilter("ignore")
        joined = probes.split_groups(x.flatten(1), y, groups)
    train, _ = probes.split(len(y), test_fraction, seed, joined)  # the split the sweep used
    xt, yt = x[train].float(), y[train]
    diff = xt[yt].mean(0) - xt[~yt].mean(0)  # (L, H, dh)
    norm = diff.norm(dim=-1, keepdim=True)
    if (norm < 1e-12).any():
        raise ValueError("some head has the same mean activation for both labels: no direction to steer along")
    theta = diff / norm
    sigma = torch.einsum("nlhd,lhd->nlh", xt, theta).std(0, correction=0)  # (L, H)
    accuracy.meta.update(title="ITI probe validation accuracy", probe="logistic")
    return ITIProbe(accuracy, theta, sigma, train)


def iti(m, probe: ITIProbe, heads: list[Head], alpha: float, positions: str = "all") -> Edit:
    """ITI: add `alpha * sigma_h * theta_h` to each chosen head (any heads: probe-ranked or random)."""
    heads = _check_heads(m, heads)
    alpha = checks.number(alpha, "alpha")
    return additive(m, {h: alpha * probe.sigma[_at(h)] * probe.theta[_at(h)] for h in heads}, positions)
