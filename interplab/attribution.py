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

import nnsight
import torch

from . import bars, checks, circuits, edgewise, metrics
from .graph import Circuit, Graph
from .metrics import Metric
from .model import Model
from .scores import Scores
from .tasks import Task


class Gradients(edgewise.Hooks):
    """Gives every receiver an input tensor of its own and keeps sender outputs, in Graph order."""

    def __init__(self, n_receivers: int):
        self.n_receivers = n_receivers  # q, k, v receivers of one layer: H + 2 H_kv
        self.inputs: list[torch.Tensor] = []  # per layer: (B, H + 2 H_kv, T, D), (B, T, D); then logits (B, T, D)
        self.outputs: list[torch.Tensor] = []

    def embed_output(self, x):
        self.outputs.append(x.detach()[None])
        return x

    def qkv_input(self, layer, resid):
        B, T, D = resid.shape
        return self._keep(resid[:, None].expand(B, self.n_receivers, T, D))

    def heads_output(self, layer, heads):
        self.outputs.append(heads.detach().transpose(0, 1))
        return heads

    def mlp_input(self, layer, resid):
        return self._keep(resid.view_as(resid))

    def mlp_output(self, layer, out):
        self.outputs.append(out.detach()[None])
        return out

    def logits_input(self, resid):
        return self._keep(resid.view_as(resid))

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x

    def receiver_grads(self, metric: torch.Tensor) -> list[torch.Tensor]:
        """d metric / d (each receiver's input), in Graph receiver order, one tensor per group of receivers:
        `[B, H + 2 H_kv, T, D]` for a layer's q, k, v, `[B, 1, T, D]` for an MLP and for the logits."""
        grads = torch.autograd.grad(metric, self.inputs)
        return [g if g.dim() == 4 else g[:, None] for g in grads]


def _edge_products(delta: torch.Tensor, grads: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """`[S, R]`: sum over b, t, d of delta `[S, B, T, D]` times each receiver's gradient (`receiver_grads`).

    One batched matmul over examples per receiver group, so the (large) gradients are read in place,
    and only with the senders upstream of the group (a prefix in Graph order, from `valid` `[S, R]`):
    the rest are no edges, and skipping them halves the work."""
    S, B = delta.shape[:2]
    senders = delta.transpose(0, 1).reshape(B, S, -1)  # (B, S, T * D)
    out = delta.new_zeros(valid.shape)
    col = 0
    for g in grads:
        width = g.shape[1]
        reach = valid[:, col:col + width].any(1).nonzero()
        upstream = int(reach.max()) + 1 if len(reach) else 0
        receivers = g.reshape(B, width, -1).transpose(1, 2)  # (B, T * D, width), a view
        out[:upstream, col:col + width] = torch.bmm(senders[:, :upstream], receivers).sum(0)
        col += width
    return out


def _batches(task: Task, batch_size: int) -> list[tuple[int, Task]]:
    return [(i, task[i : i + batch_size]) for i in range(0, len(task), batch_size)]


def edges(m: Model, task: Task, method: str = "EAP-IG", steps: int = 5, batch_size: int = 16,
          normalize: bool = False, metric: Metric | None = None, progress: bool | None = None,
          remote: bool = False) -> Circuit:
    """Scores of every edge of the model's `Graph`, as a full `Circuit` (select with `.top(k)`).

    method: "EAP" (gradient on the clean run) or "EAP-IG" (gradient averaged over `steps`
    interpolations of the input embeddings from corrupt to clean, alpha = k/steps, k = 1..steps).
    A score estimates `m(clean) - m(clean, edge corrupted)` (divided by `m_clean - m_corrupt`
    with `normalize`). `metric`: a `metrics.Metric` (default: the task's logit difference).
    Cost per batch: one corrupt forward, and one forward and backward per step (their metrics check
    that it is finite); with `normalize`, first two forwards per batch for the gap. `remote=True`
    raises: the edge-wise forward runs outside nnsight (`nodes` runs remotely).
    """
    checks.local_only(remote, "attribution.edges", edgewise.LOCAL_ONLY)
    if method not in ("EAP", "EAP-IG"):
        raise ValueError(f"method must be 'EAP' or 'EAP-IG', got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    circuits.check(m, task, batch_size)
    metric = metric or metrics.task_metric(task)
    scale = 1.0
    if normalize:  # every score is divided by the gap: check it before the sweep, at the cost of two forwards
        clean, corrupt = circuits.checked_gap(m, task, batch_size, metric, normalize)
        scale = clean - corrupt
    steps = 1 if method == "EAP" else steps
    graph = Graph.from_model(m)
    total, clean_metric, corrupt_metric = 0, [], []
    batches = _batches(task, batch_size)
    for start, part in bars.bar(batches, progress, desc=method, steps=len(batches) * steps):
        scores, clean, corrupt = _edge_batch(m, part, steps, metric, circuits.examples(start, part), graph.valid)
        total = total + scores
        clean_metric.append(clean)
        corrupt_metric.append(corrupt)
    if not normalize:  # raw scores: the sweep's own clean and corrupt runs show whether the metric is finite
        metrics.check_gap(torch.cat(clean_metric), torch.cat(corrupt_metric), normalize, f"the {task.name} task")
    scores = (total / len(task) / scale).cpu().float() * graph.valid
    return Circuit.full(graph, scores, {"method": method, "steps": steps, "task": task.name, "normalize": normalize})


def _edge_batch(m: Model, part: Task, steps: int, metric: Metric, rows: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed-over-examples edge scores `[S, R]` of one batch, and its clean and corrupt metric `[b]`."""
    corrupt_logits, corrupt = edgewise.record(m, part.corrupt)
    clean_embeds = edgewise.embed(m, part.clean).detach()
    corrupt_embeds = edgewise.embed(m, part.corrupt).detach()
    grads = None
    for k in range(1, steps + 1):
        hooks = Gradients(edgewise.qkv_receivers(m))
        alpha = k / steps
        embeds = clean_embeds if k == steps else corrupt_embeds + alpha * (clean_embeds - corrupt_embeds)
        value = metrics.apply(metric, edgewise.run(m, embeds.requires_grad_(True), hooks), rows)
        step = hooks.receiver_grads(value.sum())
        grads = step if grads is None else [summed + g for summed, g in zip(grads, step)]
    delta = torch.cat(hooks.outputs) - corrupt.senders()  # clean - corrupt: the last step ran on the clean input
    clean_metric = value.detach().double().cpu()  # the last step's, on the clean input
    corrupt_metric = metrics.apply(metric, corrupt_logits, rows).double().cpu()
    return _edge_products(delta, grads, valid.to(delta.device)) / steps, clean_metric, corrupt_metric


def _node_run(m: Model, tokens: torch.Tensor, rows: torch.Tensor, metric: Metric, remote: bool,
              grad: bool) -> dict[str, torch.Tensor]:
    """One nnsight trace over `tokens` `[B, T]`: per-head values "z" `[L, B, T, H * dh]` (the input of the
    attention output projection), MLP outputs "mlp" `[L, B, T, D]`, residual inputs "resid" `[L + 1, B, T, D]`
    (each block's input, then the final norm's), the per-example metric "metric" `[B]`, and with `grad`
    their gradients "g_z", "g_mlp", "g_resid" (of the summed metric)."""
    # Only saved values and objects made before the trace outlive it (nnsight 0.8), hence `out` and `grads` here.
    L, blocks, out, grads = m.n_layers, m.envoy(m.spec.blocks), {}, {}
    with torch.set_grad_enabled(grad), m.nn.trace(tokens, remote=remote, logits_to_keep=1):
        acts = {"z": [], "mlp": [], "resid": []}
        for l in range(L):  # in the order the model computes them, as nnsight requires
            acts["resid"].append(blocks[l].input)
            if grad and l == 0:  # NDIF freezes the weights, so the gradient has to start at an activation
                acts["resid"][0].requires_grad_(True)
            acts["z"].append(m.envoy(m.spec.head_values, l).input)
            acts["mlp"].append(m.envoy(m.spec.mlp, l).output)
        acts["resid"].append(m.envoy(m.spec.final_norm).input)
        for name, values in acts.items():
            out[name] = torch.stack(values).detach().save()
        value = metrics.apply(metric, m.nn.output.logits[:, -1], rows)
        out["metric"] = value.detach().save()
        if grad:
            with value.sum().backward():  # gradients arrive from the last layer back
                grads["g_resid"] = [acts["resid"][L].grad.save()]
                for l in reversed(range(L)):
                    grads["g_mlp"] = [acts["mlp"][l].grad.save()] + grads.get("g_mlp", [])
                    grads["g_z"] = [acts["z"][l].grad.save()] + grads.get("g_z", [])
                    grads["g_resid"] = [acts["resid"][l].grad.save()] + grads["g_resid"]
        out, grads = nnsight.save(out), nnsight.save(grads)  # a remote run sends back only what is saved
    return out | {name: torch.stack(values) for name, values in grads.items()}


def nodes(m: Model, task: Task, batch_size: int = 16, per_position: bool = False, normalize: bool = False,
          metric: Metric | None = None, remote: bool = False) -> dict[str, Scores]:
    """Attribution patching of nodes: {"heads": (layer, head[, pos]), "mlp": (layer[, pos]),
    "resid": (layer, pos)} scores, `(a_clean - a_corrupt) . dm/da` averaged over examples: the
    first-order estimate of `m(clean) - m(clean, node corrupted)` (divided by the clean-vs-corrupt
    gap with `normalize`).

    Runs through nnsight (its gradients), so it works on every supported family and, with
    `remote=True`, on NDIF. A head's score is taken on its value vector `z_h` (the input of the
    output projection), which equals the score on its output `z_h W_O^h`: the map is linear.
    "resid" layer l is the residual stream before block l; layer n_layers is before the final norm.
    One corrupt forward and one clean forward and backward per batch; the clean and corrupt metrics
    of those runs give the gap, checked before anything is divided by it.
    """
    checks.task(m, task)
    checks.batch_size(batch_size)
    checks.remote(m, remote)
    metric = metric or metrics.task_metric(task)
    H = m.n_heads
    heads = mlps = resid = 0
    clean_metric, corrupt_metric = [], []
    for start, part in _batches(task, batch_size):
        rows = circuits.examples(start, part)
        corrupt = _node_run(m, part.corrupt, rows, metric, remote, grad=False)
        with checks.kept_grads(m.nn._module):  # the backward would leave .grad on every weight
            clean = _node_run(m, part.clean, rows, metric, remote, grad=True)
        clean_metric.append(clean["metric"].double().cpu())
        corrupt_metric.append(corrupt["metric"].double().cpu())
        d_z = ((clean["z"] - corrupt["z"]) * clean["g_z"]).unflatten(-1, (H, -1)).sum(-1)  # (L, B, T, H)
        heads = heads + d_z.sum(1).transpose(1, 2)  # (L, H, T)
        mlps = mlps + ((clean["mlp"] - corrupt["mlp"]) * clean["g_mlp"]).sum((1, -1))  # (L, T)
        resid = resid + ((clean["resid"] - corrupt["resid"]) * clean["g_resid"]).sum((1, -1))  # (L+1, T)
    gap = metrics.check_gap(torch.cat(clean_metric), torch.cat(corrupt_metric), normalize, f"the {task.name} task")
    n = len(task) * (gap if normalize else 1.0)
    heads, mlps, resid = (x.detach().cpu().float() / n for x in (heads, mlps, resid))
    if not per_position:
        heads, mlps = heads.sum(-1), mlps.sum(-1)
    pos = {"pos": [f"{t}" for t in range(task.clean.shape[1])]}
    meta = {"task": task.name, "method": "attribution patching", "normalize": normalize}
    return {
        "heads": Scores(heads, ("layer", "head", "pos")[:heads.dim()], meta={**meta, "title": "head attribution"}),
        "mlp": Scores(mlps, ("layer", "pos")[:mlps.dim()], meta={**meta, "title": "MLP attribution"}),
        "resid": Scores(resid, ("layer", "pos"), labels=pos, meta={**meta, "title": "residual attribution"}),
    }
