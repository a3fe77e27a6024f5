"""Path patching (Wang et al. 2022) and path hypotheses (Goldowsky-Dill et al. 2023).

`path_patch` asks, for every attention head as a *sender*, how much of the effect
flows from it directly into chosen *receivers* (the logits, an MLP, or chosen heads'
q/k/v inputs). In the IOI paper's order: (1) run the base prompt with every head
frozen to its base value except the sender, which takes its value from the source
prompt, and MLPs and norms recomputed, recording the receivers' inputs; (2) run the
base prompt again with only the receivers' inputs replaced by those recordings.
Rows of one batched run carry different senders. The default is denoising (base =
corrupt prompt, source = clean), as in `patching`; the IOI paper's noising is
`mode="noising"`. Either way +1 means the path carries the whole effect.

`test` evaluates a hypothesis: a set of paths from the input to the logits (or a
`Circuit`, a set of edges). The model is run "treeified": along every path in the set
the input is the clean prompt, along every other path the corrupt one, and the
report is the proportion of the clean-vs-corrupt effect that survives,
(m_hypothesis - m_corrupt) / (m_clean - m_corrupt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bars, checks, circuits, components, edgewise, metrics
from .graph import Circuit, Graph
from .metrics import Metric
from .model import Model
from .patching import check_mode, effect
from .scores import Scores
from .tasks import Task

_SLOTS = "qkv"


def _parse_receivers(m: Model, receivers: str | list[str]) -> list:
    """Receivers as ("logits",), ("mlp", l) or ("head", l, h, slot); "a1.h2" means all of q, k, v."""
    names = [receivers] if isinstance(receivers, str) else list(receivers)
    if not names:
        raise ValueError("receivers is empty; name at least one: 'logits', 'm{layer}', 'a{layer}.h{head}' "
                         "or 'a{layer}.h{head}<q|k|v>'")
    parsed = []
    for name in names:
        component, slot = components.split_slot(name) if isinstance(name, str) else (name, None)
        try:
            layer, h = components.parse(component) if name != "logits" else (None, None)
        except ValueError:
            layer = h = -1
        if name == "logits":
            parsed.append(("logits",))
        elif h is None and slot is None and layer < m.n_layers:
            parsed.append(("mlp", layer))
        elif h is not None and 0 <= layer < m.n_layers and h < (m.n_kv_heads if slot in ("k", "v") else m.n_heads):
            if slot:
                parsed.append(("head", layer, h, slot))
            else:  # every receiver the head reads: its query, and its group's key and value (GQA)
                parsed += [("head", layer, h, "q")] + [("head", layer, edgewise.kv_head(m, h), s) for s in "kv"]
        else:
            raise ValueError(f"unknown receiver {name!r}; use 'logits', 'm{{layer}}', 'a{{layer}}.h{{head}}' "
                             f"or 'a{{layer}}.h{{head}}<q|k|v>' with layer < {m.n_layers}, head < {m.n_heads} "
                             f"(< {m.n_kv_heads} kv heads for <k> and <v>)")
    return parsed


class _Freeze(edgewise.Hooks):
    """Step 1: heads frozen to base values except each row's sender; records receivers' inputs."""

    def __init__(self, base: list[torch.Tensor], source: list[torch.Tensor], senders: torch.Tensor):
        self.base, self.source, self.senders = base, source, senders  # senders: (C, L, H) bool
        self.resid_pre: list[torch.Tensor] = []
        self.mlp_in: list[torch.Tensor] = []

    def frozen_heads(self, layer, resid):
        self.resid_pre.append(resid)
        pick = self.senders[:, layer, None, :, None, None]  # (C, 1, H, 1, 1)
        return torch.where(pick, self.source[layer][None], self.base[layer][None]).flatten(0, 1)

    def mlp_input(self, layer, resid):
        self.mlp_in.append(resid)
        return resid

    def logits_input(self, resid):
        self.resid_pre.append(resid)
        return resid


class _Receive(edgewise.Hooks):
    """Step 2: the base run with only the receivers' inputs replaced by step 1's recordings."""

    def __init__(self, receivers: list, recorded: _Freeze, n_heads: int, n_kv_heads: int):
        self.receivers, self.recorded = receivers, recorded
        self.offset = {"q": 0, "k": n_heads, "v": n_heads + n_kv_heads}  # receiver index of head 0's slot
        self.n_receivers = n_heads + 2 * n_kv_heads

    def qkv_input(self, layer, resid):
        chosen = [self.offset[r[3]] + r[2] for r in self.receivers if r[0] == "head" and r[1] == layer]
        if not chosen:
            return resid[:, None]
        B, T, D = resid.shape
        x = resid[:, None].expand(B, self.n_receivers, T, D).clone()
        x[:, chosen] = self.recorded.resid_pre[layer][:, None]
        return x

    def mlp_input(self, layer, resid):
        return self.recorded.mlp_in[layer] if ("mlp", layer) in self.receivers else resid

    def logits_input(self, resid):
        return self.recorded.resid_pre[-1] if ("logits",) in self.receivers else resid


def _heads(record: edgewise.Record) -> list[torch.Tensor]:
    """Per-layer head outputs `[B, H, T, D]` of a recorded run (its senders alternate heads, MLP)."""
    return [heads.transpose(0, 1) for heads in record.outputs[1::2]]


@torch.no_grad()
def path_patch(m: Model, task: Task, receivers: str | list[str] = "logits", mode: str = "denoising",
               batch_size: int = 16, senders_per_run: int = 16, normalize: bool = True,
               metric: Metric | None = None, progress: bool | None = None, remote: bool = False) -> Scores:
    """Path-patching effect of every head (sender) on `receivers`: Scores over (layer, head).

    mode "denoising" (default): base = corrupt prompt, sender from the clean one; score
    `(m_patched - m_corrupt) / (m_clean - m_corrupt)`. mode "noising" (the IOI paper's): base =
    clean, sender from corrupt; score `(m_clean - m_patched) / (m_clean - m_corrupt)`. Either way
    +1 means the path carries the whole clean-vs-corrupt effect; `normalize=False` leaves out the
    division. A head at or after the last receiver's layer has no path to it and scores 0.
    Under grouped-query attention `a{l}.h{g}<k|v>` names kv head g, and a bare `a{l}.h{h}` means
    head h's query and its group's key and value (which the other heads of the group read too).
    `metric`: a `metrics.Metric` (default: the task's logit difference). `remote=True` raises: the
    edge-wise forward runs outside nnsight.
    """
    check_mode(mode)
    circuits.check(m, task, batch_size, remote=remote, function="paths.path_patch")
    checks.batch_size(senders_per_run, "senders_per_run")
    edgewise.check_per_head(m, "paths.path_patch (one head's output moved, the others frozen)")
    parsed = _parse_receivers(m, receivers)
    metric = metric or metrics.task_metric(task)
    clean, corrupt = circuits.checked_gap(m, task, batch_size, metric, normalize)
    L, H = m.n_layers, m.n_heads
    one_hot = torch.eye(L * H, dtype=torch.bool, device=m.device).view(L * H, L, H)
    totals = torch.zeros(L * H, dtype=torch.float64)
    batches = [(i, task[i : i + batch_size]) for i in range(0, len(task), batch_size)]
    chunks = range(0, L * H, senders_per_run)
    bar = bars.bar(progress=progress, desc="path patching", total=len(batches) * len(chunks))
    for start, part in batches:
        base_tokens, source_tokens = (part.clean, part.corrupt) if mode == "noising" else (part.corrupt, part.clean)
        _, base = edgewise.record(m, base_tokens)
        _, source = edgewise.record(m, source_tokens)
        for first in chunks:
            senders = one_hot[first:first + senders_per_run]
            freeze = _Freeze(_heads(base), _heads(source), senders)
            rows = edgewise.embed(m, base_tokens.repeat(len(senders), 1))
            edgewise.run(m, rows, freeze)
            logits = edgewise.run(m, rows, _Receive(parsed, freeze, H, m.n_kv_heads))
            values = metrics.apply(metric, logits, circuits.examples(start, part, len(senders)))
            totals[first:first + len(senders)] += values.view(len(senders), -1).sum(1).double().cpu()
            bar.update()
    bar.close()
    values = effect(totals / len(task), clean, corrupt, mode, normalize).float()
    return Scores(values.view(L, H), ("layer", "head"),
                  meta={"title": f"{mode} path patching → {receivers}", "mode": mode, "task": task.name,
                        "receivers": receivers, "clean": clean, "corrupt": corrupt, "normalize": normalize})


@dataclass(frozen=True)
class Hypothesis:
    """A set of paths from the input to the logits.

    A path names the receivers it passes through: ("input", "a0.h3<v>", "a2.h1<k>", "logits")
    enters head 0.3 through its value input, leaves it into head 2.1's key input, and leaves
    that head into the logits. MLPs appear as "m{layer}".
    """

    paths: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        for path in self.paths:
            if len(path) < 2 or path[0] != "input" or path[-1] != "logits":
                raise ValueError(f"a path must run from 'input' to 'logits', got {path}")

    @classmethod
    def of(cls, circuit: Circuit, limit: int = 100_000) -> Hypothesis:
        """Every complete input-to-logits path made of the circuit's edges (an error past `limit`)."""
        graph, found = circuit.graph, []
        _check_no_gqa(graph)

        def extend(suffix: tuple[str, ...]):
            r = graph.receiver_index(suffix[0])
            for s in circuit.mask[:, r].nonzero().flatten().tolist():
                sender = graph.senders[s]
                if sender == "input":
                    found.append(("input",) + suffix)
                    if len(found) > limit:
                        raise ValueError(f"the circuit has more than {limit} paths; test it as a Circuit instead")
                else:
                    for slot in _slots_of(sender):
                        if circuit.mask[:, graph.receiver_index(slot)].any():
                            extend((slot,) + suffix)

        extend(("logits",))
        return cls(tuple(found))


def _check_no_gqa(graph: Graph) -> None:
    """Path hypotheses name a head's own q/k/v inputs, which grouped-query attention shares between heads."""
    if graph.n_kv_heads != graph.n_heads:
        raise NotImplementedError(
            f"path hypotheses are not defined under grouped-query attention ({graph.n_heads} query heads over "
            f"{graph.n_kv_heads} kv heads: a key/value receiver feeds several heads); test a Circuit instead "
            "(paths.test(m, task, circuit) or circuits.faithfulness)")


def _slots_of(node: str) -> list[str]:
    """Receiver names through which a sender node takes its input."""
    return [node] if components.component_type(node) == "mlp" else [f"{node}<{s}>" for s in _SLOTS]


def _node(receiver: str) -> str:
    return components.split_slot(receiver)[0]


class _Treeified:
    """Evaluates a hypothesis: each node is computed once per path suffix it appears on."""

    def __init__(self, m: Model, graph: Graph, hypothesis: Hypothesis, clean_embeds, corrupt: edgewise.Record):
        self.m, self.graph, self.corrupt = m, graph, corrupt
        self.clean_embeds = clean_embeds
        self.corrupt_senders = corrupt.senders()
        self.suffixes = {(_node(p[i]), p[i + 1:]) for p in hypothesis.paths for i in range(len(p) - 1)}
        self.memo: dict = {}

    def logits(self) -> torch.Tensor:
        return edgewise.unembed(self.m, self._input("logits", ()))

    def _input(self, receiver: str, suffix: tuple[str, ...]) -> torch.Tensor:
        """The receiver's input on path suffix `suffix`: corrupt, except along hypothesis paths."""
        context = (receiver,) + suffix
        x = self._corrupt_input(receiver)
        r = self.graph.receiver_index(receiver)
        for s in self.graph.valid[:, r].nonzero().flatten().tolist():
            sender = self.graph.senders[s]
            if (sender, context) in self.suffixes:
                x = x + self._output(sender, context) - self.corrupt_senders[s]
        return x

    def _output(self, sender: str, suffix: tuple[str, ...]) -> torch.Tensor:
        key = (sender, suffix)
        if key not in self.memo:
            self.memo[key] = self._compute(sender, suffix)
        return self.memo[key]

    def _compute(self, sender: str, suffix: tuple[str, ...]) -> torch.Tensor:
        if sender == "input":
            return self.clean_embeds
        layer, head = components.parse(sender)
        if head is None:
            return edgewise.mlp(self.m, layer, self._input(sender, suffix))
        x_qkv = torch.stack([self._input(slot, suffix) for slot in _slots_of(sender)], 1)  # (B, 3, T, D)
        return edgewise.attend_head(self.m, layer, head, x_qkv)

    def _corrupt_input(self, receiver: str) -> torch.Tensor:
        if receiver == "logits":
            return self.corrupt.resid_pre[-1]
        layer, head = components.parse(components.split_slot(receiver)[0])
        return self.corrupt.mlp_in[layer] if head is None else self.corrupt.resid_pre[layer]


@torch.no_grad()
def test(m: Model, task: Task, hypothesis: Hypothesis | Circuit, batch_size: int = 32,
         metric: Metric | None = None, remote: bool = False) -> float:
    """Proportion of the clean-vs-corrupt effect explained: (m_hyp - m_corrupt) / (m_clean - m_corrupt).

    A `Circuit` is tested as its edge set (every path made only of its edges), which is its
    `circuits.faithfulness`. A `Hypothesis` is tested path by path, treeified. `remote=True` raises:
    the edge-wise forward runs outside nnsight.
    """
    checks.local_only(remote, "paths.test", edgewise.LOCAL_ONLY)
    if isinstance(hypothesis, Circuit):
        return circuits.faithfulness(m, task, hypothesis, batch_size, metric)
    if not isinstance(hypothesis, Hypothesis):
        raise TypeError(f"test takes a paths.Hypothesis or a Circuit, got {type(hypothesis).__name__}")
    circuits.check(m, task, batch_size)
    edgewise.check_per_head(m, "paths.test of a Hypothesis (treeified, head by head)")
    graph = Graph.from_model(m)
    _check_no_gqa(graph)
    for path in hypothesis.paths:
        for sender, receiver in zip(path, path[1:]):
            graph.edge_mask([(_node(sender), receiver)])  # raises on a non-edge
    metric = metric or metrics.task_metric(task)
    clean, corrupt = circuits.checked_gap(m, task, batch_size, metric)
    total = 0.0
    for start in range(0, len(task), batch_size):
        part = task[start : start + batch_size]
        _, recorded = edgewise.record(m, part.corrupt)
        run = _Treeified(m, graph, hypothesis, edgewise.embed(m, part.clean), recorded)
        total += metrics.apply(metric, run.logits(), circuits.examples(start, part)).sum().item()
    return (total / len(task) - corrupt) / (clean - corrupt)
