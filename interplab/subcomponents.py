"""Rank-1 subcomponents of one weight matrix and their causal-importance gates (the pieces `decompose`
trains): `Components`, the leaky hard sigmoids that gate them, and the minimality loss on the gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lower_leaky_hard_sigmoid(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """`clamp(x, 0, 1)` with slope `slope` below 0, so dead components still get gradient."""
    return torch.where(x < 0, slope * x, x.clamp(max=1.0))


def upper_leaky_hard_sigmoid(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """`clamp(x, 0, 1)` with slope `slope` above 1 (used by the minimality loss)."""
    return torch.where(x > 1, 1 + slope * (x - 1), x.clamp(min=0.0))


class Components(nn.Module):
    """`C` rank-1 subcomponents `U[:, c] V[c, :]` of one `[d_out, d_in]` matrix and their importance MLPs."""

    def __init__(self, d_in: int, d_out: int, C: int, hidden: int, generator: torch.Generator):
        super().__init__()
        rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
        self.V = nn.Parameter(rand(C, d_in) / math.sqrt(d_in))  # (C, d_in)
        self.U = nn.Parameter(rand(d_out, C) / math.sqrt(C))  # (d_out, C)
        self.gate_in = nn.Parameter(rand(C, hidden))  # (C, h)
        self.gate_in_bias = nn.Parameter(rand(C, hidden) * 0.1)  # (C, h)
        self.gate_out = nn.Parameter(rand(C, hidden) / math.sqrt(hidden))  # (C, h)
        self.gate_out_bias = nn.Parameter(torch.zeros(C))  # (C,)

    @property
    def C(self) -> int:
        return self.V.shape[0]

    def weight(self) -> torch.Tensor:
        """`U V`: `[d_out, d_in]`."""
        return self.U @ self.V

    def inner(self, a: torch.Tensor) -> torch.Tensor:
        """Inner activations `V[c] · a`: `[..., d_in]` -> `[..., C]`."""
        return a @ self.V.T

    def importance_logits(self, inner: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid causal importance, one small MLP per component: `[..., C]` -> `[..., C]`."""
        hidden = F.gelu(inner[..., None] * self.gate_in + self.gate_in_bias)  # (..., C, h)
        return (hidden * self.gate_out).sum(-1) + self.gate_out_bias

    def output(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`Σ_c m_c U[:, c] (V[c] · a)`: `[..., d_in]`, mask `[..., C]` -> `[..., d_out]`."""
        return (self.inner(a) * mask) @ self.U.T


def minimality_loss(g_upper: torch.Tensor, pnorm: float, beta: float = 0.0) -> torch.Tensor:
    """`Σ_c mean(g_c^p) · (1 + β log2(1 + Σ g_c^p))` over the rows of `g_upper` `[..., C]`.

    With `β = 0` this is the plain importance minimality `mean over rows of Σ_c g^p`.
    With `β > 0` a component active on many rows costs more than two components
    sharing those rows, which tips ties towards splitting merged components
    (SPD's frequency term; the sum runs over the batch, so β's effect grows
    slowly with the batch size).
    """
    if beta < 0 or pnorm <= 0:
        raise ValueError(f"need beta >= 0 and pnorm > 0 (got beta={beta}, pnorm={pnorm}); beta=0 is plain minimality")
    powered = (g_upper + 1e-12).pow(pnorm).flatten(0, -2)  # (rows, C)
    per_component = powered.mean(0) * (1 + beta * torch.log2(1 + powered.sum(0)))  # (C,)
    return per_component.sum()
