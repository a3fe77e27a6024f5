"""Toy model of superposition (TMS, Elhage et al. 2022): a planted ground truth for decomposition.

`x̂ = ReLU(Wᵀ W x + b)` with `W` of shape `[n_hidden, n_features]` squeezes
`n_features` sparse features into `n_hidden < n_features` dimensions. Every
feature j owns one rank-1 piece `W[:, j] e_jᵀ` of `W`, so a parameter
decomposition of `W` has a known right answer.

The model is stored as two `nn.Linear` modules, `linear1` (weight `W`) and
`linear2` (weight `Wᵀ`, bias `b`), so that it can be decomposed like any other
model's linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bars


class TMS(nn.Module):
    """`x̂ = ReLU(linear2(linear1(x)))`; after `train_tms`, `linear2.weight == linear1.weight.T`."""

    def __init__(self, n_features: int, n_hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., n_features]` -> reconstruction `[..., n_features]`."""
        return F.relu(self.linear2(self.linear1(x)))

    @property
    def W(self) -> torch.Tensor:
        """The embedding matrix `[n_hidden, n_features]`."""
        return self.linear1.weight


def sparse_features(
    batch_size: int, n_features: int, feature_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each feature is present with probability `feature_prob`, with a value ~ U(0, 1): `[batch, n_features]`."""
    device = generator.device if generator is not None else None
    values = torch.rand(batch_size, n_features, generator=generator, device=device)
    present = torch.rand(batch_size, n_features, generator=generator, device=device) < feature_prob
    return values * present


def train_tms(
    n_features: int,
    n_hidden: int,
    feature_prob: float = 0.05,
    steps: int = 3000,
    batch_size: int = 1024,
    lr: float = 5e-3,
    seed: int = 0,
    progress: bool | None = None,
) -> TMS:
    """Train a tied-weight TMS on sparse features with MSE and return it (deterministic given `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(n_hidden, n_features, generator=generator) * (2 / n_features) ** 0.5)
    b = nn.Parameter(torch.zeros(n_features))
    optimizer = torch.optim.AdamW([W, b], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.05)
    for _ in bars.bar(range(steps), progress, "train TMS"):
        x = sparse_features(batch_size, n_features, feature_prob, generator)  # (B, F)
        x_hat = F.relu(x @ W.T @ W + b)  # (B, F)
        loss = F.mse_loss(x_hat, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    model = TMS(n_features, n_hidden)
    with torch.no_grad():
        model.linear1.weight.copy_(W)
        model.linear2.weight.copy_(W.T)
        model.linear2.bias.copy_(b)
    return model.requires_grad_(False)


def ground_truth_components(model: TMS) -> torch.Tensor:
    """The rank-1 pieces `W[:, j] e_jᵀ` of `linear1.weight`: `[n_features, n_hidden, n_features]`."""
    W = model.W.detach()  # (H, F)
    n_features = W.shape[1]
    return torch.einsum("hj,jk->jhk", W, torch.eye(n_features))


def match_ground_truth(components: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How well learned rank-1 components recover the true pieces.

    components: `[C, d_out, d_in]`; truth: `[F, d_out, d_in]`. Returns, per
    true piece, the largest cosine with any component `[F]` and the L2 norm
    ratio (component / truth) of that best match `[F]`. The SPD paper reports
    the mean of both (1.000 and 0.99-1.03 on TMS).
    """
    learned, truth = components.flatten(1), truth.flatten(1)  # (C, n), (F, n)
    cosine = F.normalize(truth, dim=1) @ F.normalize(learned, dim=1).T  # (F, C)
    best = cosine.max(dim=1)
    ratio = learned[best.indices].norm(dim=1) / truth.norm(dim=1)
    return best.values, ratio
