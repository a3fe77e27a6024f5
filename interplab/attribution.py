"""Attribution patching: a first-order estimate of every patch from one backward pass.

Patching a component from its clean value `a` to its corrupt value `a'` changes the
metric by about `(a' - a) . dm/da`, the gradient taken on the clean run. `nodes`
scores heads, MLPs and residual positions this way; `edges` scores every edge of the
`Graph` (EAP, Syed et al. 2023): for a sender s and receiver r, `(s - s') . dm/dx_r`
where `x_r` is r's own copy of its residual input, before its layer norm, so the
gradient passes through that norm.

EAP-IG (Hanna et al. 2024) replaces the gradient by its average over `steps` points
on the straight line from the corrupt to the clean input embeddings. The points are
`alpha = k / steps` for k = 1..steps (the right Riemann sum of the path integral, as
written in the paper), so one step is EAP; the authors' released code (hannamw/EAP-IG)
takes k = 0..steps-1, the left sum. Both converge to the integral as steps grow
(tests/test_attribution.py checks against a many-step trapezoid rule).

Sign, as everywhere in interplab: scores estimate the noising effect
`m(clean) - m(clean with this edge corrupted)`, averaged over examples, so +1 after
normalization (`normalize=True`, division by `m_clean - m_corrupt`) means the edge
carries the whole clean-vs-corrupt effect. Raw (unnormalized) by default.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import circuits, edgewise, metrics
from .graph import Circuit, Graph
from .metrics import Metric
from .model import Model
from .scores import Scores
from .tasks import Task


class Gradients(edgewise.Hooks):
    """Gives every receiver an input tensor of its own and keeps sender outputs, in Graph order."""

    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self.inputs: list[torch.Tensor] = []  # per layer: (B, 3, H, T, D), (B, T, D); then logits (B, T, D)
        self.outputs: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []
        self.mlps: list[torch.Tensor] = []
        self.resid_pre: list[torch.Tensor] = []

    def embed_output(self, x):
        self.outputs.append(x.detach()[None])
        return x

    def qkv_input(self, layer, resid):
        self.resid_pre.append(resid)
        B, T, D = resid.shape
        return self._keep(resid[:, None, None].expand(B, 3, self.n_heads, T, D))

    def heads_output(self, layer, heads):
        self.heads.append(heads)
        self.outputs.append(heads.detach().transpose(0, 1))
        return heads

    def mlp_input(self, layer, resid):
        return self._keep(resid.view_as(resid))

    def mlp_output(self, layer, out):
        self.mlps.append(out)
        self.outputs.append(out.detach()[None])
        return out

    def logits_input(self, resid):
        self.resid_pre.append(resid)
        return self._keep(resid.view_as(resid))

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x

    def receiver_grads(self, metric: torch.Tensor) -> torch.Tensor:
        """d metric / d (each receiver's input): `[R, B, T, D]` in Graph receiver order."""
        grads = torch.autograd.grad(metric, self.inputs)
        return torch.cat([g.flatten(1, 2).transpose(0, 1) if g.dim() == 5 else g[None] for g in grads])


def _batches(task: Task, batch_size: int) -> list[tuple[int, Task]]:
    return [(i, task[i : i + batch_size]) for i in range(0, len(task), batch_size)]


def _start(m: Model, task: Task, batch_size: int, metric: Metric | None, normalize: bool) -> tuple[Metric, float]:
    """Checks, then the metric to use and what to divide by: the clean-vs-corrupt gap, or 1 for raw scores."""
    circuits.check(m, task, batch_size)
    metric = metric or metrics.task_metric(task)
    clean, corrupt = circuits.checked_gap(m, task, batch_size, metric, normalize)
    return metric, (clean - corrupt) if normalize else 1.0


def edges(m: Model, task: Task, method: str = "EAP-IG", steps: int = 5, batch_size: int = 16,
          normalize: bool = False, metric: Metric | None = None) -> Circuit:
    """Scores of every edge of the model's `Graph`, as a full `Circuit` (select with `.top(n)`).

    method: "EAP" (gradient on the clean run) or "EAP-IG" (gradient averaged over `steps`
    interpolations of the input embeddings from corrupt to clean, alpha = k/steps, k = 1..steps).
    A score estimates `m(clean) - m(clean, edge corrupted)` (divided by `m_clean - m_corrupt`
    with `normalize`). `metric`: a `metrics.Metric` (default: the task's logit difference).
    Cost per batch: one corrupt forward, and one forward and backward per step.
    """
    if method not in ("EAP", "EAP-IG"):
        raise ValueError(f"method must be 'EAP' or 'EAP-IG', got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    metric, scale = _start(m, task, batch_size, metric, normalize)
    steps = 1 if method == "EAP" else steps
    graph = Graph.from_model(m)
    total = 0
    batches = _batches(task, batch_size)
    for start, part in tqdm(batches, desc=method, disable=len(batches) * steps < 8):
        total += _edge_batch(m, part, steps, metric, circuits.examples(start, part))
    scores = (total / len(task) / scale).cpu().float() * graph.valid
    return Circuit.full(graph, scores, {"method": method, "steps": steps, "task": task.name, "normalize": normalize})


def _edge_batch(m: Model, part: Task, steps: int, metric: Metric, rows: torch.Tensor) -> torch.Tensor:
    """Summed-over-examples edge scores `[S, R]` of one batch."""
    _, corrupt = edgewise.record(m, part.corrupt)
    clean_embeds = edgewise.embed(m, part.clean).detach()
    corrupt_embeds = edgewise.embed(m, part.corrupt).detach()
    grads = 0
    for k in range(1, steps + 1):
        hooks = Gradients(m.n_heads)
        alpha = k / steps
        embeds = (corrupt_embeds + alpha * (clean_embeds - corrupt_embeds)).requires_grad_(True)
        logits = edgewise.run(m, embeds, hooks)
        grads = grads + hooks.receiver_grads(metrics.apply(metric, logits, rows).sum())
    delta = torch.cat(hooks.outputs) - corrupt.senders()  # clean - corrupt: the last step ran on the clean input
    return torch.einsum("sbtd,rbtd->sr", delta, grads / steps)


def nodes(m: Model, task: Task, batch_size: int = 16, per_position: bool = False, normalize: bool = False,
          metric: Metric | None = None) -> dict[str, Scores]:
    """Attribution patching of nodes: {"heads": (layer, head[, pos]), "mlp": (layer[, pos]),
    "resid": (layer, pos)} scores, `(a_clean - a_corrupt) . dm/da` averaged over examples: the
    first-order estimate of `m(clean) - m(clean, node corrupted)` (divided by the clean-vs-corrupt
    gap with `normalize`).

    "resid" layer l is the residual stream before block l; layer n_layers is before the final norm.
    One corrupt forward and one clean forward and backward per batch.
    """
    metric, scale = _start(m, task, batch_size, metric, normalize)
    heads = mlps = resid = 0
    for start, part in _batches(task, batch_size):
        _, corrupt = edgewise.record(m, part.corrupt)
        hooks = Gradients(m.n_heads)
        logits = edgewise.run(m, edgewise.embed(m, part.clean).detach().requires_grad_(True), hooks)
        tensors = hooks.heads + hooks.mlps + hooks.resid_pre
        value = metrics.apply(metric, logits, circuits.examples(start, part)).sum()
        grads = torch.autograd.grad(value, tensors)
        L = m.n_layers
        g_heads, g_mlps, g_resid = torch.stack(grads[:L]), torch.stack(grads[L:2 * L]), torch.stack(grads[2 * L:])
        c_senders = corrupt.senders()[1:].unflatten(0, (L, -1))  # (L, H+1, B, T, D)
        d_heads = torch.stack(hooks.heads).detach() - c_senders[:, :-1].transpose(1, 2)  # (L, B, H, T, D)
        d_mlps = torch.stack(hooks.mlps).detach() - c_senders[:, -1]
        d_resid = torch.stack(hooks.resid_pre).detach() - torch.stack(corrupt.resid_pre)
        heads = heads + (d_heads * g_heads).sum((1, -1))  # (L, H, T)
        mlps = mlps + (d_mlps * g_mlps).sum((1, -1))  # (L, T)
        resid = resid + (d_resid * g_resid).sum((1, -1))  # (L+1, T)
    n = len(task) * scale
    heads, mlps, resid = heads / n, mlps / n, resid / n
    if not per_position:
        heads, mlps = heads.sum(-1), mlps.sum(-1)
    pos = {"pos": [f"{t}" for t in range(task.clean.shape[1])]}
    meta = {"task": task.name, "method": "attribution patching", "normalize": normalize}
    return {
        "heads": Scores(heads, ("layer", "head", "pos")[:heads.dim()], meta={**meta, "title": "head attribution"}),
        "mlp": Scores(mlps, ("layer", "pos")[:mlps.dim()], meta={**meta, "title": "MLP attribution"}),
        "resid": Scores(resid, ("layer", "pos"), labels=pos, meta={**meta, "title": "residual attribution"}),
    }
