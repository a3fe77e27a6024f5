"""Running circuits: faithfulness, faithfulness curves and exact edge patching.

The data types, `Graph` (a model's senders, receivers and edges) and `Circuit` (a
scored subset of the edges), live in `graph.py` and are re-exported here.

A `Circuit` is a subset of the edges with a score per edge. `faithfulness` runs the
model with every edge outside the circuit carrying its corrupt value: each
receiver's input is rebuilt as the sum, over its senders, of the sender's output
in this very run if the edge is in the circuit, or on the corrupt prompt if not.
So the full graph reproduces the clean run and the empty circuit the corrupt run.
"""

from __future__ import annotations

import torch

from . import bars, checks, edgewise, metrics
from .graph import Circuit, Graph
from .metrics import Metric
from .model import Model
from .scores import Scores
from .tasks import Task


class Patched(edgewise.Hooks):
    """Rows carry different circuits: receiver inputs rebuilt edge by edge from `masks` `[C, S, R]`.

    Rows are (circuit, example) pairs, circuit-major. `corrupt` is a `Record` of the corrupt run.
    """

    def __init__(self, graph: Graph, masks: torch.Tensor, corrupt: edgewise.Record):
        self.graph, self.masks = graph, masks.float()
        self.corrupt = corrupt
        self.corrupt_senders = corrupt.senders()  # (S, B, T, D)
        self.outputs: list[torch.Tensor] = []
        self.layer_receivers = 2 * graph.n_kv_heads + graph.n_heads + 1

    def _input(self, receivers: slice, corrupt_input: torch.Tensor) -> torch.Tensor:
        """`[C * B, R', T, D]`: corrupt input plus, per in-circuit edge, (this run - corrupt) of its sender."""
        current = torch.cat(self.outputs)  # (S', C*B, T, D)
        n, C = current.shape[0], self.masks.shape[0]
        delta = current.unflatten(1, (C, -1)) - self.corrupt_senders[:n, None]  # (S', C, B, T, D)
        mixed = torch.einsum("csr,scbtd->cbrtd", self.masks[:, :n, receivers].to(delta.dtype), delta)
        return (mixed + corrupt_input[None, :, None]).flatten(0, 1)

    def embed_output(self, x):
        self.outputs.append(x[None])
        return x

    def qkv_input(self, layer, resid):
        start = layer * self.layer_receivers
        return self._input(slice(start, start + self.layer_receivers - 1), self.corrupt.resid_pre[layer])

    def heads_output(self, layer, heads):
        self.outputs.append(heads.transpose(0, 1))
        return heads

    def mlp_input(self, layer, resid):
        r = (layer + 1) * self.layer_receivers - 1
        return self._input(slice(r, r + 1), self.corrupt.mlp_in[layer])[:, 0]

    def mlp_output(self, layer, out):
        self.outputs.append(out[None])
        return out

    def logits_input(self, resid):
        return self._input(slice(-1, None), self.corrupt.resid_pre[-1])[:, 0]


def check(m: Model, task: Task, batch_size: int, what: str = "batch_size", remote: bool = False,
          function: str = "this edge-level method") -> None:
    """The checks every edge-level method runs first: a supported family, a valid task, a positive batch
    size, and no `remote=True` (the edge-wise forward runs locally only: a clear error naming `function`)."""
    checks.local_only(remote, function, edgewise.LOCAL_ONLY)
    edgewise.check_supported(m)
    checks.task(m, task)
    checks.batch_size(batch_size, what)


def examples(part_start: int, part: Task, repeats: int = 1) -> torch.Tensor:
    """Task row indices `[repeats * len(part)]` of a batch that starts at row `part_start`, repeated block-wise."""
    return torch.arange(part_start, part_start + len(part)).repeat(repeats)


@torch.no_grad()
def circuit_metrics(m: Model, task: Task, circuits: list[Circuit], batch_size: int = 32,
                    circuits_per_run: int = 8, metric: Metric | None = None, progress: bool | None = None,
                    remote: bool = False) -> torch.Tensor:
    """Mean metric of the model run as each circuit: `[len(circuits)]`.

    One run per `circuits_per_run` circuits and `batch_size` examples: rows carry different circuits.
    `metric` is a `metrics.Metric` (default: the task's logit difference). `remote=True` raises:
    the edge-wise forward runs outside nnsight.
    """
    check(m, task, batch_size, remote=remote, function="circuits.circuit_metrics")
    checks.batch_size(circuits_per_run, "circuits_per_run")
    if not circuits:
        raise ValueError("no circuits given; pass a Circuit or a non-empty list of them")
    for c in circuits:
        c.graph.check_model(m)
    metric = metric or metrics.task_metric(task)
    masks = torch.stack([c.mask for c in circuits]).to(m.device)
    totals = torch.zeros(len(circuits), dtype=torch.float64)
    batches = [(i, j) for i in range(0, len(task), batch_size) for j in range(0, len(circuits), circuits_per_run)]
    for start, first in bars.bar(batches, progress, desc="circuits"):
        part = task[start : start + batch_size]
        group = masks[first:first + circuits_per_run]
        _, corrupt = edgewise.record(m, part.corrupt)
        embeds = edgewise.embed(m, part.clean.repeat(len(group), 1))
        logits = edgewise.run(m, embeds, Patched(circuits[0].graph, group, corrupt))
        values = metrics.apply(metric, logits, examples(start, part, len(group)))
        totals[first:first + len(group)] += values.view(len(group), -1).sum(1).double().cpu()
    return (totals / len(task)).float()


@torch.no_grad()
def example_metrics(m: Model, task: Task, batch_size: int = 32,
                    metric: Metric | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example metric on the clean and on the corrupt prompts, `([n], [n])` (edge-wise forward)."""
    check(m, task, batch_size)
    metric = metric or metrics.task_metric(task)
    clean, corrupt = [], []
    for start in range(0, len(task), batch_size):
        part, rows = task[start : start + batch_size], torch.arange(start, min(start + batch_size, len(task)))
        clean.append(metrics.apply(metric, edgewise.run(m, edgewise.embed(m, part.clean)), rows).double().cpu())
        corrupt.append(metrics.apply(metric, edgewise.run(m, edgewise.embed(m, part.corrupt)), rows).double().cpu())
    return torch.cat(clean), torch.cat(corrupt)


def checked_gap(m: Model, task: Task, batch_size: int, metric: Metric | None,
                normalize: bool = True) -> tuple[float, float]:
    """Mean clean and corrupt metric, after checking their gap (an error if zero, a warning if within noise)."""
    clean, corrupt = example_metrics(m, task, batch_size, metric)
    metrics.check_gap(clean, corrupt, normalize, f"the {task.name} task")
    return clean.mean().item(), corrupt.mean().item()


def faithfulness(m: Model, task: Task, circuit: Circuit | list[Circuit], batch_size: int = 32,
                 metric: Metric | None = None, progress: bool | None = None,
                 remote: bool = False) -> float | torch.Tensor:
    """Normalized faithfulness (m_circuit - m_corrupt) / (m_clean - m_corrupt) of the mean metric.

    1 for the full graph, 0 for the empty circuit. A list of circuits gives a tensor `[n]`.
    `remote=True` raises: the edge-wise forward runs outside nnsight.
    """
    checks.local_only(remote, "circuits.faithfulness", edgewise.LOCAL_ONLY)
    circuits = [circuit] if isinstance(circuit, Circuit) else list(circuit)
    if not circuits:
        raise ValueError("faithfulness([]) has no circuit to test; pass a Circuit or a non-empty list of them")
    if not all(isinstance(c, Circuit) for c in circuits):
        raise TypeError("faithfulness takes a Circuit or a list of Circuits (build one with Circuit.from_edges "
                        "or attribution.edges(...).top(k))")
    check(m, task, batch_size)
    clean, corrupt = checked_gap(m, task, batch_size, metric)
    values = (circuit_metrics(m, task, circuits, batch_size, metric=metric, progress=progress) - corrupt) / (
        clean - corrupt)
    return values.item() if isinstance(circuit, Circuit) else values


def faithfulness_curve(m: Model, task: Task, scored: Circuit, ns: list[int] | None = None,
                       batch_size: int = 32, metric: Metric | None = None, progress: bool | None = None,
                       remote: bool = False) -> Scores:
    """Faithfulness of `scored.top(n)` for each n in `ns` (default: 16 sizes, log-spaced): Scores over n_edges.
    `remote=True` raises: the edge-wise forward runs outside nnsight."""
    checks.local_only(remote, "circuits.faithfulness_curve", edgewise.LOCAL_ONLY)
    if ns is None:
        ns = torch.logspace(0, torch.log10(torch.tensor(float(scored.n_edges))), 16).round().int().unique().tolist()
        ns = [0] + ns
    values = faithfulness(m, task, [scored.top(n) for n in ns], batch_size, metric, progress)
    return Scores(values, ("n_edges",), labels={"n_edges": [str(n) for n in ns]},
                  meta={"title": "faithfulness vs circuit size", "task": task.name, "n_edges": list(ns),
                        "total_edges": scored.graph.n_edges, **scored.meta})


def edge_patching(m: Model, task: Task, among: Circuit | None = None, batch_size: int = 32,
                  circuits_per_run: int = 16, normalize: bool = False, metric: Metric | None = None,
                  progress: bool | None = None, remote: bool = False) -> Circuit:
    """Exact effect of corrupting each edge alone, `m(clean) - m(every edge but this one)`, averaged over
    examples (noising, +1 = the whole effect when normalized by `m_clean - m_corrupt`): what EAP
    estimates to first order. `among` picks the edges (default: all of them); rows of one run carry
    different edges. `remote=True` raises: the edge-wise forward runs outside nnsight."""
    check(m, task, batch_size, remote=remote, function="circuits.edge_patching")
    among = among or Circuit.full(Graph.from_model(m))
    graph = among.graph
    graph.check_model(m)
    pairs = among.mask.nonzero().tolist()
    ablated = []
    for s, r in pairs:
        mask = graph.valid.clone()
        mask[s, r] = False
        ablated.append(Circuit(graph, torch.zeros(mask.shape), mask))
    clean, corrupt = checked_gap(m, task, batch_size, metric, normalize)
    if not pairs:
        raise ValueError("`among` has no edges; pass a circuit with at least one edge (default: every edge)")
    effects = clean - circuit_metrics(m, task, ablated, batch_size, circuits_per_run, metric, progress)
    if normalize:
        effects = effects / (clean - corrupt)
    scores = torch.zeros(graph.valid.shape)
    scores[tuple(torch.tensor(pairs).T)] = effects
    return Circuit(graph, scores, among.mask.clone(),
                   {"method": "edge patching", "task": task.name, "normalize": normalize})
