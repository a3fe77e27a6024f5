"""A model's computational graph and circuits (scored edge subsets): the data types, no model runs.

Nodes are the standard ones of edge attribution patching. Senders write into the
residual stream: the input (token embedding, plus learned positions where the model
has them), every attention head and every MLP. Receivers read from it: every head's
query, key and value input, every MLP input, and the logits. An edge joins a sender
to every receiver downstream of it; each receiver's input is the sum of its senders'
outputs (plus the constant attention output biases), taken before the receiver's norm.

Two family differences show in the edges. In parallel blocks (GPT-NeoX) the MLP reads
the block input, so a layer's heads have no edge into its own MLP. Under grouped-query
attention (Llama, Qwen2, Mistral) keys and values exist once per kv head, so the key and
value receivers `a{l}.h{g}<k|v>` run over g < n_kv_heads, each shared by the query heads
of its group (`edgewise.kv_head`).

A `Circuit` is a subset of the edges with a score per edge. The runners that score
and test circuits live in `circuits.py` (faithfulness, edge patching) and
`attribution.py` (EAP, EAP-IG).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import figures
from .scores import top_order



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
    def from_model(cls, m) -> Graph:
        return cls(m.n_layers, m.n_heads, m.n_kv_heads, m.spec.is_parallel(m.config))

    def check_model(self, m) -> None:
        """Refuse a model this graph was not built for (its edges would index the wrong layers and heads)."""
        mine, theirs = self._shape(), Graph.from_model(m)._shape()
        if mine != theirs:
            raise ValueError(f"this circuit's graph has (layers, heads, kv heads, parallel) = {mine} but {m.name} "
                             f"has {theirs}; build the circuit on this model (Graph.from_model(m))")

    def _shape(self) -> tuple:
        return self.n_layers, self.n_heads, self.n_kv_heads, self.parallel

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

    def top(self, k: int) -> Circuit:
        """The `k` edges of this circuit with the largest |score|."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_edges:
            raise ValueError(f"k must be an int between 0 and {self.n_edges} (the edges in this circuit), got {k!r}")
        magnitude = torch.where(self.mask, self.scores.abs(), torch.tensor(-1.0))  # out-of-circuit edges last
        keep = torch.zeros(magnitude.numel(), dtype=torch.bool)
        keep[top_order(magnitude, k, by_abs=False)] = True
        return Circuit(self.graph, self.scores, keep.view_as(self.mask), {**self.meta, "selection": f"top {k}"})

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
        return figures.draw("circuit", self, title=title, **kwargs)
