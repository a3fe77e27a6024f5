"""A model's computational graph, circuits (scored edge subsets) and their faithfulness.

Nodes are the standard ones of edge attribution patching. Senders write into the
residual stream: the input (token + position embedding), every attention head and
every MLP. Receivers read from it: every head's query, key and value input, every
MLP input, and the logits. An edge joins a sender to every receiver downstream of
it; each receiver's input is the sum of its senders' outputs (plus the constant
attention output biases), taken before the receiver's layer norm.

A `Circuit` is a subset of the edges with a score per edge. `faithfulness` runs the
model with every edge outside the circuit carrying its corrupt value: each
receiver's input is rebuilt as the sum, over its senders, of the sender's output
in this very run if the edge is in the circuit, or on the corrupt prompt if not.
So the full graph reproduces the clean run and the empty circuit the corrupt run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import edgewise
from .model import Model
from .scores import Scores
from .tasks import Task


class Graph:
    """Senders, receivers and the valid edges `[S, R]` of a transformer.

    Sender names: "input", "a{l}.h{h}", "m{l}". Receiver names: "a{l}.h{h}<q|k|v>", "m{l}",
    "logits". Senders are ordered input, then per layer its heads and its MLP; receivers per
    layer its q, k, v receivers (head-major within each) and its MLP, then the logits.
    `parallel` marks blocks whose MLP reads the block input (GPT-NeoX), not the attention output.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel: bool = False):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.parallel = parallel
        self.senders, sender_layer = ["input"], [-1]
        self.receivers, receiver_layer = [], []
        for layer in range(n_layers):
            self.senders += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
            sender_layer += [layer] * n_heads + [layer + 0.5]
            for slot, count in (("q", n_heads), ("k", self.n_kv_heads), ("v", self.n_kv_heads)):
                self.receivers += [f"a{layer}.h{h}<{slot}>" for h in range(count)]
            self.receivers.append(f"m{layer}")
            receiver_layer += [layer] * (n_heads + 2 * self.n_kv_heads) + [layer if parallel else layer + 0.5]
        self.receivers.append("logits")
        receiver_layer.append(n_layers)
        self.sender_layer = torch.tensor(sender_layer, dtype=torch.float)  # heads at l, MLP at l + 0.5
        self.receiver_layer = torch.tensor(receiver_layer, dtype=torch.float)
        self.valid = self.sender_layer[:, None] < self.receiver_layer[None, :]  # (S, R)
        self._sender_index = {name: i for i, name in enumerate(self.senders)}
        self._receiver_index = {name: i for i, name in enumerate(self.receivers)}

    @classmethod
    def from_model(cls, m: Model) -> Graph:
        parallel = bool(getattr(m.hf.config, "use_parallel_residual", False))
        return cls(m.n_layers, m.n_heads, m.n_kv_heads, parallel)

    def __repr__(self) -> str:
        return f"Graph({len(self.senders)} senders, {len(self.receivers)} receivers, {self.n_edges} edges)"

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def sender_index(self, name: str) -> int:
        if name not in self._sender_index:
            raise KeyError(f"no sender {name!r}; senders are 'input', 'a{{layer}}.h{{head}}', 'm{{layer}}'")
        return self._sender_index[name]

    def receiver_index(self, name: str) -> int:
        if name not in self._receiver_index:
            raise KeyError(f"no receiver {name!r}; receivers are 'a{{layer}}.h{{head}}<q|k|v>', 'm{{layer}}', 'logits'")
        return self._receiver_index[name]

    def edge_mask(self, edges: list[tuple[str, str]]) -> torch.Tensor:
        """Boolean `[S, R]` mask of named edges `[(sender, receiver), ...]`, each checked to exist."""
        mask = torch.zeros_like(self.valid)
        for sender, receiver in edges:
            s, r = self.sender_index(sender), self.receiver_index(receiver)
            if not self.valid[s, r]:
                raise ValueError(f"{sender} -> {receiver} is not an edge: the sender is not upstream of the receiver")
            mask[s, r] = True
        return mask


@dataclass
class Circuit:
    """A subset of a graph's edges (`mask` `[S, R]`) with a score per edge (`scores` `[S, R]`)."""

    graph: Graph
    scores: torch.Tensor
    mask: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        shape = self.graph.valid.shape
        if self.scores.shape != shape or self.mask.shape != shape:
            raise ValueError(f"scores and mask must be [senders, receivers] = {tuple(shape)}")
        self.scores = self.scores.detach().cpu().float()
        self.mask = self.mask.cpu().bool() & self.graph.valid

    @classmethod
    def full(cls, graph: Graph, scores: torch.Tensor | None = None, meta: dict | None = None) -> Circuit:
        scores = torch.zeros(graph.valid.shape) if scores is None else scores
        return cls(graph, scores * graph.valid, graph.valid.clone(), meta or {})

    @classmethod
    def from_edges(cls, graph: Graph, edges: list[tuple[str, str]]) -> Circuit:
        mask = graph.edge_mask(edges)
        return cls(graph, mask.float(), mask)

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        best = ", ".join(f"{s}->{r}: {v:+.3g}" for s, r, v in self.edges()[:3])
        return f"Circuit({self.n_edges}/{self.graph.n_edges} edges; top: {best})"

    def top(self, n: int) -> Circuit:
        """The `n` edges of this circuit with the largest |score|."""
        if not 0 <= n <= self.n_edges:
            raise ValueError(f"n must be between 0 and {self.n_edges} (the edges in this circuit), got {n}")
        magnitude = torch.where(self.mask, self.scores.abs(), torch.tensor(-1.0)).flatten()
        keep = torch.zeros(magnitude.numel(), dtype=torch.bool)
        keep[magnitude.argsort(descending=True, stable=True)[:n]] = True
        return Circuit(self.graph, self.scores, keep.view_as(self.mask), {**self.meta, "selection": f"top {n}"})

    def threshold(self, tau: float) -> Circuit:
        """The edges of this circuit with |score| >= `tau`."""
        keep = self.mask & (self.scores.abs() >= tau)
        return Circuit(self.graph, self.scores, keep, {**self.meta, "selection": f"|score| >= {tau:g}"})

    def edges(self) -> list[tuple[str, str, float]]:
        """In-circuit edges `(sender, receiver, score)`, largest |score| first."""
        s_idx, r_idx = self.mask.nonzero(as_tuple=True)
        values = self.scores[s_idx, r_idx]
        order = values.abs().argsort(descending=True, stable=True)
        return [(self.graph.senders[s_idx[i]], self.graph.receivers[r_idx[i]], values[i].item()) for i in order]

    def plot(self, title: str | None = None, **kwargs):
        from .viz import circuit_figure

        return circuit_figure(self, title=title, **kwargs)


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
        x = self._input(slice(start, start + self.layer_receivers - 1), self.corrupt.resid_pre[layer])
        return x.unflatten(1, (3, -1))  # (C*B, 3, H, T, D)

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


@torch.no_grad()
def circuit_metrics(m: Model, task: Task, circuits: list[Circuit], batch_size: int = 32,
                    circuits_per_run: int = 8) -> torch.Tensor:
    """Mean task metric of the model run as each circuit: `[len(circuits)]`.

    One run per `circuits_per_run` circuits and `batch_size` examples: rows carry different circuits.
    """
    task.check_paired()
    edgewise.check_supported(m)
    masks = torch.stack([c.mask for c in circuits]).to(m.device)
    totals = torch.zeros(len(circuits), dtype=torch.float64)
    batches = [(i, j) for i in range(0, len(task), batch_size) for j in range(0, len(circuits), circuits_per_run)]
    for start, first in tqdm(batches, desc="circuits", disable=len(batches) < 4):
        part = task[start : start + batch_size]
        group = masks[first:first + circuits_per_run]
        _, corrupt = edgewise.record(m, part.corrupt)
        embeds = edgewise.embed(m, part.clean.repeat(len(group), 1))
        logits = edgewise.run(m, embeds, Patched(circuits[0].graph, group, corrupt))
        for c, rows in enumerate(logits.unflatten(0, (len(group), -1))):
            totals[first + c] += part.metric(rows).sum().item()
    return (totals / len(task)).float()


@torch.no_grad()
def clean_corrupt_metrics(m: Model, task: Task, batch_size: int = 32) -> tuple[float, float]:
    """Mean task metric on the clean and on the corrupt prompts (edge-wise forward, like the circuit runs)."""
    clean = corrupt = 0.0
    for start in range(0, len(task), batch_size):
        part = task[start : start + batch_size]
        clean += part.metric(edgewise.run(m, edgewise.embed(m, part.clean))).sum().item()
        corrupt += part.metric(edgewise.run(m, edgewise.embed(m, part.corrupt))).sum().item()
    return clean / len(task), corrupt / len(task)


def faithfulness(m: Model, task: Task, circuit: Circuit | list[Circuit], batch_size: int = 32) -> float | torch.Tensor:
    """Normalized faithfulness (m_circuit - m_corrupt) / (m_clean - m_corrupt) of the mean task metric.

    1 for the full graph, 0 for the empty circuit. A list of circuits gives a tensor `[n]`.
    """
    edgewise.check_supported(m)
    circuits = [circuit] if isinstance(circuit, Circuit) else list(circuit)
    clean, corrupt = clean_corrupt_metrics(m, task, batch_size)
    if abs(clean - corrupt) < 1e-6:
        raise ValueError(f"the task metric is {clean:.4g} on both clean and corrupt prompts, so no "
                         "effect is there to explain; use a task the model solves")
    values = (circuit_metrics(m, task, circuits, batch_size) - corrupt) / (clean - corrupt)
    return values.item() if isinstance(circuit, Circuit) else values


def faithfulness_curve(m: Model, task: Task, scored: Circuit, ns: list[int] | None = None,
                       batch_size: int = 32) -> Scores:
    """Faithfulness of `scored.top(n)` for each n in `ns` (default: 16 sizes, log-spaced): Scores over n_edges."""
    if ns is None:
        ns = torch.logspace(0, torch.log10(torch.tensor(float(scored.n_edges))), 16).round().int().unique().tolist()
        ns = [0] + ns
    values = faithfulness(m, task, [scored.top(n) for n in ns], batch_size)
    return Scores(values, ("n_edges",), labels={"n_edges": [str(n) for n in ns]},
                  meta={"title": "faithfulness vs circuit size", "task": task.name, "n_edges": list(ns),
                        "total_edges": scored.graph.n_edges, **scored.meta})


def edge_patching(m: Model, task: Task, among: Circuit | None = None, batch_size: int = 32,
                  circuits_per_run: int = 16) -> Circuit:
    """Exact effect of corrupting each edge alone, m(every edge but this one) - m(clean), averaged
    over examples: what EAP estimates to first order. `among` picks the edges (default: all of them);
    rows of one run carry different edges."""
    among = among or Circuit.full(Graph.from_model(m))
    graph = among.graph
    pairs = among.mask.nonzero().tolist()
    ablated = []
    for s, r in pairs:
        mask = graph.valid.clone()
        mask[s, r] = False
        ablated.append(Circuit(graph, torch.zeros(mask.shape), mask))
    clean, _ = clean_corrupt_metrics(m, task, batch_size)
    effects = circuit_metrics(m, task, ablated, batch_size, circuits_per_run) - clean
    scores = torch.zeros(graph.valid.shape)
    scores[tuple(torch.tensor(pairs).T)] = effects
    return Circuit(graph, scores, among.mask.clone(), {"method": "edge patching", "task": task.name})
