"""Linear probes: mass-mean and logistic-regression directions on activations.

Two steps, kept apart so each can be tested alone:

1. `collect(m, tokens)` reads activations with nnsight, one trace per batch
   and every layer at once: the residual stream after each block
   (`resid`, `[n, n_layers, d_model]`) and the per-head values that enter the
   attention output projection (`heads`, `[n, n_layers, n_heads, d_head]`).
2. `fit(x, y)` trains a probe on one split and scores it on a held-out split.
   `sweep(x, y)` does that for every layer (and head) at once.

A probe's `direction` is a unit vector in the space it was read from: a
`resid` probe gives a residual-stream direction (comparable with the left
singular vectors of an MLP or attention output projection, see weights.py),
a `heads` probe gives a direction in that head's `d_head` value space.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import bars, checks
from .scores import Scores

SITES = ("resid", "heads")
PROBES = ("mass_mean", "logistic")


@dataclass
class Probe:
    """A linear classifier `x · direction > threshold` with its held-out score.

    direction: unit vector `[d]` in the space of the activations it was fit on.
    threshold: the decision boundary along `direction`.
    train_accuracy / test_accuracy: accuracy on the training and held-out splits.
    """

    name: str  # which probe: one of PROBES
    direction: torch.Tensor
    threshold: float
    train_accuracy: float
    test_accuracy: float

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance past the threshold: `[n, d] -> [n]`."""
        return x.float() @ self.direction - self.threshold

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (bool) `[n]`."""
        return self.project(x) > 0

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.predict(x) == y.bool()).float().mean().item()


def collect(
    m,
    tokens: torch.Tensor,
    site: str = "resid",
    pos: int = -1,
    batch_size: int = 64,
    progress: bool | None = None,
    remote: bool = False,
) -> torch.Tensor:
    """Activations at token position `pos` for every layer, one trace per batch.

    tokens: `[n, seq]`. Returns `[n, n_layers, d_model]` for `site="resid"`
    (each block's output) or `[n, n_layers, n_heads, d_head]` for
    `site="heads"` (the input of `spec.head_values`, split by head).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {SITES}")
    checks.tokens(m, tokens)
    checks.batch_size(batch_size)
    checks.remote(m, remote)
    if not -tokens.shape[1] <= pos < tokens.shape[1]:
        raise ValueError(f"pos={pos} is outside prompts of {tokens.shape[1]} tokens")
    batches = torch.split(tokens, batch_size)
    chunks = [_collect_batch(m, batch, site, pos, remote) for batch in bars.bar(batches, progress, f"collect {site}")]
    return torch.cat(chunks)


def _collect_batch(m, tokens: torch.Tensor, site: str, pos: int, remote: bool) -> torch.Tensor:
    # Stacked and saved inside the trace: a remote run sends back that one tensor.
    with torch.no_grad(), m.nn.trace(tokens, remote=remote):
        per_layer = []
        for layer in range(m.n_layers):
            if site == "resid":
                out = m.envoy(f"{m.spec.blocks}.{layer}").output
                out = out[0] if isinstance(out, tuple) else out  # (B, T, d_model)
                per_layer.append(out[:, pos])
            else:
                per_layer.append(m.envoy(m.spec.head_values, layer).input[:, pos])  # (B, nh*hs)
        acts = torch.stack(per_layer, dim=1).float().cpu().save()  # (B, L, d)
    if site == "heads":
        acts = acts.view(acts.shape[0], m.n_layers, m.n_heads, m.d_head)  # (B, L, nh, hs)
    return acts


def task_activations(m, task, site: str = "resid", pos: int = -1, batch_size: int = 64,
                     progress: bool | None = None, remote: bool = False):
    """Clean prompts labelled 1 and corrupt prompts labelled 0, with a group per row.

    Returns `(x [2n, ...], y [2n] bool, groups [2n])`: pass `groups` to `fit`/`sweep`
    so that a clean prompt and its corrupt twin, and every repeat of one prompt (a task
    with few distinct prompts repeats them, and one row's clean prompt can be another's
    corrupt prompt), always land in the same split.
    """
    tokens = torch.cat([task.clean, task.corrupt])
    x = collect(m, tokens, site=site, pos=pos, batch_size=batch_size, progress=progress, remote=remote)
    n = len(task)
    y = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    same_prompt = torch.unique(tokens.cpu(), dim=0, return_inverse=True)[1]
    groups = connected(torch.arange(n).repeat(2), same_prompt)
    return x, y, groups


def connected(*labelings: torch.Tensor) -> torch.Tensor:
    """Component ids `[n]` of the rows when rows sharing a label in any of `labelings` (each `[n]`) are joined."""
    n = len(labelings[0])
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for labels in labelings:
        first: dict[int, int] = {}
        for i, label in enumerate(labels.tolist()):
            j = first.setdefault(label, i)
            parent[root(i)] = root(j)
    return torch.unique(torch.tensor([root(i) for i in range(n)]), return_inverse=True)[1]


def split_groups(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The groups `fit` and `sweep` split by: `groups` `[n]` (default: one per row) with rows of identical
    activations joined, so repeats of one prompt never straddle the split. x: `[n, ...]`, y: `[n]`."""
    n = x.shape[0]
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape [{n}], got {tuple(groups.shape)}")
    same = torch.unique(x.reshape(n, -1), dim=0, return_inverse=True)[1]
    positives, rows = torch.bincount(same, weights=y.float()), torch.bincount(same).float()
    clash = int(((positives > 0) & (positives < rows))[same].sum())  # rows whose copies carry both labels
    if clash:
        warnings.warn(f"{clash} rows have the same activations as a row of the other label (e.g. a prompt "
                      "that is clean in one pair and corrupt in another); no probe can separate them.",
                      stacklevel=3)
    return connected(groups, same)


def split(n: int, test_fraction: float = 0.3, seed: int = 0, groups: torch.Tensor | None = None):
    """Boolean masks `(train [n], test [n])`; rows sharing a group stay together."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    groups = torch.arange(n) if groups is None else groups
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape [{n}], got {tuple(groups.shape)}")
    unique = groups.unique()
    if len(unique) < 2:
        raise ValueError("need at least two groups (examples) to make a train and a test split; rows that share "
                         "a group (a twin, or the same prompt) stay together, so use more distinct examples")
    gen = torch.Generator().manual_seed(seed)
    shuffled = unique[torch.randperm(len(unique), generator=gen)]
    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
    test = torch.isin(groups, shuffled[:n_test])
    return ~test, test


def mass_mean(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Direction from the label-0 mean to the label-1 mean, threshold at the midpoint.

    x: `[n, d]`, y: `[n]` bool. Returns `(direction [d] unit, threshold)`.
    """
    _finite(x)
    mu_pos, mu_neg = x[y].mean(0), x[~y].mean(0)
    direction = _unit(mu_pos - mu_neg)
    return direction, ((mu_pos + mu_neg) / 2 @ direction).item()


def logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 100) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression fit with L-BFGS, full batch.

    Features are centred and divided by one overall scale (not per feature), so
    the weight vector stays a direction in the original space. x: `[n, d]`,
    y: `[n]` bool. Returns `(direction [d] unit, threshold)`.
    """
    _finite(x)
    mean, scale = x.mean(0), x.std().clamp_min(1e-8)
    z = (x - mean) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    target = y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    # w·(x - mean)/scale + b > 0  <=>  x·w > w·mean - b·scale
    norm = w.norm().clamp_min(1e-12)
    return w / norm, ((w @ mean - b * scale) / norm).item()


def fit(x: torch.Tensor, y: torch.Tensor, probe: str = "mass_mean", test_fraction: float = 0.3, seed: int = 0,
        groups: torch.Tensor | None = None) -> Probe:
    """Fit a probe on a training split and score it on the held-out split.

    x: `[n, d]` activations, y: `[n]` labels (bool or 0/1); `groups` `[n]`
    keeps related rows (a clean prompt and its corrupt twin) in one split.
    """
    x, y = _check(x, y, dims=2)
    return _fit(x, y, probe, test_fraction, seed, split_groups(x, y, groups))


def _fit(x: torch.Tensor, y: torch.Tensor, probe: str, test_fraction: float, seed: int,
         groups: torch.Tensor) -> Probe:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {PROBES}")
    train, test = split(len(y), test_fraction, seed, groups)
    if y[train].all() or not y[train].any():
        raise ValueError("the training split has only one class; use more examples or another seed")
    direction, threshold = (mass_mean if probe == "mass_mean" else logistic)(x[train], y[train])
    fitted = Probe(probe, direction, threshold, float("nan"), float("nan"))
    fitted.train_accuracy = fitted.accuracy(x[train], y[train])
    fitted.test_accuracy = fitted.accuracy(x[test], y[test])
    return fitted


def sweep(x: torch.Tensor, y: torch.Tensor, probe: str = "mass_mean", test_fraction: float = 0.3, seed: int = 0,
          groups: torch.Tensor | None = None) -> tuple[Scores, torch.Tensor]:
    """One probe per layer (`x [n, L, d]`) or per head (`x [n, L, H, d_head]`), same split for all.

    Returns `(held-out accuracy Scores over layer[, head], directions [L, (H,) d])`.
    Rows whose activations are identical at every layer share a split.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"sweep expects [n, layer, d] or [n, layer, head, d_head] activations, got {tuple(x.shape)}")
    x, y = _check(x, y, dims=x.dim())
    groups = split_groups(x, y, groups)
    dims = ("layer", "head")[: x.dim() - 2]
    grid = x.shape[1:-1]
    accuracy, directions = torch.zeros(grid), torch.zeros(*grid, x.shape[-1])
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in grid)).view(-1, len(grid)).tolist():
        fitted = _fit(x[(slice(None), *idx)], y, probe, test_fraction, seed, groups)
        accuracy[tuple(idx)], directions[tuple(idx)] = fitted.test_accuracy, fitted.direction
    meta = dict(probe=probe, test_fraction=test_fraction, seed=seed, title=f"held-out accuracy of {probe} probes")
    return Scores(accuracy, dims, meta=meta), directions


def _finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"activations hold NaN or inf in {len(bad)} rows (first: {bad[:5]}); a probe fit on them "
                         "is meaningless. Find where they come from (e.g. an fp16 overflow) or drop those rows.")


def _check(x: torch.Tensor, y: torch.Tensor, dims: int):
    if x.dim() != dims:
        raise ValueError(f"expected activations [n, d], got shape {tuple(x.shape)}")
    _finite(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}] to match the activations, got {tuple(y.shape)}")
    y = y.bool() if y.dtype == torch.bool else _binary(y)
    return x.float(), y


def _binary(y: torch.Tensor) -> torch.Tensor:
    values = set(y.unique().tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be bool or 0/1, got values {sorted(values)[:6]}")
    return y.bool()


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm()
    if norm < 1e-12:
        raise ValueError("the two classes have the same mean; there is no direction to return")
    return v / norm
