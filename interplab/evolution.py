"""Circuits over a checkpoint series: Circuit Distance, Stability and Conflict, and the temporal lag.

"Navigating by Old Maps" (2026) asks whether a circuit located on today's
weights still describes the model after more fine-tuning. It publishes no
formulas, so interplab defines them here. Components are heads `a{l}.h{h}` and
MLPs `m{l}`; a component score is the normalized effect (+1: the component
carries the whole clean-vs-corrupt effect; see `component_scores`); the circuit
`C_t` of a task at checkpoint t is the top-k components by |score|.

- Circuit Distance (migration): `1 - |C_s ∩ C_t| / |C_s ∪ C_t|` (`circuit_distance`),
  its score-weighted form `1 - Σ min(|a|,|b|) / Σ max(|a|,|b|)` over all components
  (`weighted_distance`), both also restricted to heads or to MLPs.
- Circuit Stability: functional, the faithfulness of `C_s` run on model θ_t
  (`node_faithfulness`), beside that of `C_t` on θ_t; the gap is the *temporal
  lag* of the static map. Rank: Spearman ρ of the full score vectors
  (`rank_stability`). Representational: per component, linear CKA of its
  outputs at s and at t on the same prompts (`representational_stability`).
- Circuit Conflict: the overlap `|C_A,t ∩ C_B,t|` of two tasks' circuits, and per
  component the cosine of the two tasks' loss gradients restricted to its
  parameters (`gradient_conflict`): negative means the tasks pull it opposite ways.

`track(checkpoints, tasks)` computes all of it over any list of `(label, Model)`
(the organism series of `organisms/series.py`, or Pythia revisions) into a
`Trajectory`, which draws its own figures (`viz.trajectory_*`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from scipy import stats

from . import attribution, bars, checks, figures, metrics, patching
from .components import component_masks, component_names, of_type
from .metrics import Metric
from .model import Model
from .scores import Scores, top_order
from .tasks import Task

LOCATORS = ("patching", "attribution")


# ---- component scores ----

def _component_scores(values: torch.Tensor, names: list[str], meta: dict) -> Scores:
    return Scores(values.float(), ("component",), {"component": list(names)}, meta)


def component_scores(m: Model, task: Task, locator: str | Callable = "patching", position: str = "all",
                     remote: bool = False, **options) -> Scores:
    """Scores over every component (`component_names(m)` order: per layer its heads, then its MLP).

    locator "patching": denoising activation patching, normalized: +1 = the component alone restores the
    clean metric. With `position="all"` a patch covers every position (`patching.heads`,
    `patching.mlp_out(per_position=False)`); with `position="final"` only the final position (the same
    runs as `node_faithfulness` of one-component circuits with `final_only=True`).
    "attribution": node attribution patching (`attribution.nodes(normalize=True)`), the first-order estimate of
    `(m_clean - m_corrupted) / (m_clean - m_corrupt)`, summed over positions (or at the final one).
    A callable `locator(m, task)` returning Scores with dims `("component",)` (e.g. a foresight locator)
    is used as it is. `options` go to the patching sweeps or to `attribution.nodes`. `remote=True` runs
    the patching or attribution on NDIF (a callable locator gets no `remote`: refused).
    """
    names = component_names(m)
    if position not in ("all", "final"):
        raise ValueError(f"position must be 'all' (patch every position) or 'final', got {position!r}")
    meta = {"task": task.name, "locator": locator, "position": position,
            "title": f"{locator} scores on {task.name} ({position} positions)"}
    if callable(locator):
        checks.local_only(remote, "evolution.component_scores with a callable locator",
                          "interplab cannot tell whether the callable runs the model through nnsight")
        scores = locator(m, task)
        _check_components(scores, _component_scores(torch.zeros(len(names)), names, {}), "locator output")
        return scores
    if locator not in LOCATORS:
        raise ValueError(f"locator must be one of {LOCATORS} or a callable (m, task) -> Scores, got {locator!r}")
    L, H = m.n_layers, m.n_heads
    if locator == "patching" and position == "final":
        return _component_scores(node_faithfulness(m, task, [[n] for n in names], final_only=True, remote=remote),
                                 names, meta)
    if locator == "patching":
        options = dict(progress=False, remote=remote) | options
        heads = patching.heads(m, task, **options).values  # (L, H)
        mlps = patching.mlp_out(m, task, per_position=False, **options).values  # (L,)
    else:
        options = options | ({"remote": True} if remote else {})
        nodes = attribution.nodes(m, task, per_position=True, normalize=True, **options)
        pick = (lambda v: v.sum(-1)) if position == "all" else (lambda v: v[..., -1])
        heads, mlps = pick(nodes["heads"].values), pick(nodes["mlp"].values)
    values = torch.cat([heads, mlps[:, None]], dim=1).reshape(L * (H + 1))  # per layer: heads, then MLP
    return _component_scores(values, names, meta)


# ---- distance and rank stability ----

def _check_components(a: Scores, b: Scores, what: str = "scores") -> None:
    for s in (a, b):
        if s.dims != ("component",) or "component" not in s.labels:
            raise ValueError(f"{what} must be Scores over dims ('component',) with component labels "
                             f"(from evolution.component_scores), got dims {s.dims}")
    if a.labels["component"] != b.labels["component"]:
        raise ValueError(f"{what} cover different components: {a.labels['component'][:4]}... vs "
                         f"{b.labels['component'][:4]}...; compare scores of models with the same architecture")


def top_components(s: Scores, k: int) -> list[str]:
    """The k components with the largest |score|, largest first (ties broken by component order)."""
    names = s.labels["component"]
    return [names[i] for i in _top_flat(s, k)]


def _top_flat(s: Scores, k: int) -> list[int]:
    """Flat indices of the k entries with the largest |value|, largest first (`top_order`'s rule)."""
    checks.count(k, "k", high=s.values.numel())
    checks.finite(s.values, "the scores ranked")  # NaN would be ranked first
    return top_order(s.values, k).tolist()


def jaccard_distance(a: set | list, b: set | list) -> float:
    """`1 - |A ∩ B| / |A ∪ B|`; 0 for two empty sets."""
    a, b = set(a), set(b)
    return 0.0 if not (a | b) else 1 - len(a & b) / len(a | b)


def circuit_distance(a: Scores, b: Scores, k: int, component: str | None = None) -> float:
    """`1 - Jaccard` of the top-k entries of `a` and of `b` by |value|: any two Scores over the same dims
    and labels (components, (layer, head), edges, ...).

    With `component` ("head" or "mlp"; component Scores only) the two top-k circuits are compared on that
    component type only.
    """
    if component is None and not a.dims == b.dims == ("component",):
        if a.dims != b.dims or a.shape != b.shape or a.labels != b.labels:
            raise ValueError(f"circuit_distance compares Scores over the same dims and labels, got {a.dims} "
                             f"{tuple(a.shape)} and {b.dims} {tuple(b.shape)}")
        return jaccard_distance(_top_flat(a, k), _top_flat(b, k))
    _check_components(a, b)
    keep = set(of_type(a.labels["component"], component))
    return jaccard_distance(set(top_components(a, k)) & keep, set(top_components(b, k)) & keep)


def weighted_distance(a: Scores, b: Scores, component: str | None = None) -> float:
    """`1 - Σ min(|a|, |b|) / Σ max(|a|, |b|)` over every component (of `component`, if given)."""
    _check_components(a, b)
    names = a.labels["component"]
    keep = set(of_type(names, component))
    idx = [i for i, n in enumerate(names) if n in keep]
    x, y = a.values[idx].abs(), b.values[idx].abs()
    total = torch.maximum(x, y).sum()
    if total == 0:
        raise ValueError("both score vectors are zero, so the weighted distance is undefined")
    return 1 - (torch.minimum(x, y).sum() / total).item()


def rank_stability(a: Scores, b: Scores) -> float:
    """Spearman ρ between the two full score vectors (`scipy.stats.spearmanr`)."""
    _check_components(a, b)
    return float(stats.spearmanr(a.values.numpy(), b.values.numpy()).statistic)


# ---- functional stability: node-level faithfulness ----

def _activations(m: Model, tokens: torch.Tensor, remote: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the heads' values (input of the attention output projection) `[L, B, T, H*d_head]`
    and the MLP outputs `[L, B, T, d_model]`."""
    with torch.no_grad(), m.nn.trace(tokens.to(m.device), remote=remote):
        z, out = [], []
        for layer in range(m.n_layers):
            z.append(m.envoy(m.spec.head_values, layer).input)
            out.append(m.envoy(m.spec.mlp_out, layer).output)
        z, out = torch.stack(z).save(), torch.stack(out).save()  # one saved tensor each comes back from NDIF
    return z, out


def _masks(m: Model, circuits: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[C, L, H]` head and `[C, L]` MLP membership of each circuit."""
    index = {n: i for i, n in enumerate(component_names(m))}
    member = torch.zeros(len(circuits), len(index), dtype=torch.bool)
    for c, circuit in enumerate(circuits):
        unknown = [n for n in circuit if n not in index]
        if unknown:
            raise ValueError(f"circuit {c} names components {unknown} that {m.name} does not have")
        member[c, [index[n] for n in circuit]] = True
    member = member.view(len(circuits), m.n_layers, m.n_heads + 1)
    return member[..., :-1], member[..., -1]


@torch.no_grad()
def node_faithfulness(m: Model, task: Task, circuits: list[list[str]], final_only: bool = False,
                      circuits_per_run: int = 16, metric: Metric | None = None, remote: bool = False) -> torch.Tensor:
    """Faithfulness of each circuit (a list of component names) on `m`: `[len(circuits)]`.

    Run `m` on the corrupt prompts with every component of the circuit set to its output on the clean
    prompt (a head: its `d_head` columns of the attention output projection's input; an MLP: its output),
    the rest computed as usual; faithfulness is `(m_circuit - m_corrupt) / (m_clean - m_corrupt)` of the
    mean `metric` (the one signature, `metrics.Metric`; default: the task's logit difference). 0 for the empty circuit; 1 for all components when the final token is the same in
    the clean and corrupt prompts (the embeddings stay corrupt). With `final_only` components take their
    clean output at the final position only (earlier positions stay corrupt). Rows of one run carry
    different circuits. `remote=True` runs every forward on NDIF.
    """
    checks.task(m, task)  # ids in range and no active dropout, before the runs
    checks.batch_size(circuits_per_run, "circuits_per_run")
    checks.remote(m, remote)
    metric = metric or metrics.task_metric(task)
    heads, mlps = _masks(m, circuits)
    z_clean, mlp_clean = _activations(m, task.clean, remote)
    n, dh = len(task), m.d_head
    rows = torch.arange(n)
    clean_values = metrics.apply(metric, m.logits(task.clean, remote=remote), rows)
    corrupt_values = metrics.apply(metric, m.logits(task.corrupt, remote=remote), rows)
    # finite, and a gap to divide by; no noise warning: `track` measures checkpoints before the task is
    # learned on purpose and records each gap itself (`Trajectory.gap`)
    metrics.check_gap(clean_values, corrupt_values, normalize=False, what=f"the {task.name} task on {m.name}")
    clean, corrupt = clean_values.mean().item(), corrupt_values.mean().item()
    if abs(clean - corrupt) < 1e-12:
        raise ValueError(f"{task.name}: clean and corrupt prompts score the same on {m.name}, so faithfulness "
                         "is undefined; use a task the model distinguishes")
    where = torch.zeros(task.clean.shape[1], 1, dtype=torch.bool, device=m.device)  # (T, 1): positions patched
    where[-1 if final_only else slice(None)] = True
    values = []
    for first in range(0, len(circuits), circuits_per_run):
        h, mm = heads[first:first + circuits_per_run], mlps[first:first + circuits_per_run]
        C = h.shape[0]
        tokens = task.corrupt.repeat(C, 1).to(m.device)  # row c * n + i: circuit c, example i
        with m.nn.trace(tokens, logits_to_keep=1, remote=remote):
            for layer in range(m.n_layers):
                cols = h[:, layer].repeat_interleave(dh, dim=1).repeat_interleave(n, dim=0)[:, None]  # (C*n, 1, H*dh)
                hv = m.envoy(m.spec.head_values, layer)
                hv.input = torch.where(cols.to(m.device) & where, z_clean[layer].repeat(C, 1, 1), hv.input)
                on = mm[:, layer].repeat_interleave(n)[:, None, None]  # (C*n, 1, 1)
                mo = m.envoy(m.spec.mlp_out, layer)
                mo.output = torch.where(on.to(m.device) & where, mlp_clean[layer].repeat(C, 1, 1), mo.output)
            logits = m.nn.output.logits[:, -1].save()
        values.append(metrics.apply(metric, logits, rows.repeat(C)).view(C, n).mean(1).cpu())
    return (torch.cat(values) - corrupt) / (clean - corrupt)


# ---- representational stability ----

def component_outputs(m: Model, tokens: torch.Tensor, remote: bool = False) -> torch.Tensor:
    """What each component writes into the residual stream, every position: `[n_components, B*T, d_model]`.

    A head's write is its value slice times its rows (Conv1D) / columns (Linear) of the output projection,
    computed inside the trace (with `remote=True`, on NDIF, where the weights are).
    """
    checks.remote(m, remote)
    checks.tokens(m, tokens)
    dh, H = m.d_head, m.n_heads
    with torch.no_grad(), m.nn.trace(tokens.to(m.device), remote=remote):
        outs = []
        for layer in range(m.n_layers):
            project = m.envoy(m.spec.head_values, layer)
            z = project.input  # (B, T, H*dh)
            w = m.spec.as_linear(project.weight).T  # [H*dh, D]
            zl = z.reshape(-1, H, dh)  # (B*T, H, dh)
            outs += [zl[:, h] @ w[h * dh:(h + 1) * dh] for h in range(H)]
            mlp = m.envoy(m.spec.mlp_out, layer).output
            outs.append(mlp.reshape(zl.shape[0], -1))
        outs = torch.stack(outs).cpu().save()  # (n_components, B*T, d_model)
    return outs


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same `n` inputs, `[n, d1]`, `[n, d2]`:
    `||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)` on column-centred X, Y. NaN if either is constant."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same inputs; got {x.shape[0]} and {y.shape[0]} rows")
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    denom = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return (torch.linalg.norm(y.T @ x) ** 2 / denom).item() if denom > 0 else float("nan")


def representational_stability(m_s: Model, m_t: Model, tokens: torch.Tensor, remote: bool = False) -> Scores:
    """Per component, linear CKA of its outputs under `m_s` and `m_t` on the same `tokens` `[B, T]`."""
    a, b = component_outputs(m_s, tokens, remote), component_outputs(m_t, tokens, remote)
    values = torch.tensor([linear_cka(x, y) for x, y in zip(a, b)])
    return _component_scores(values, component_names(m_s), {"title": "linear CKA of component outputs"})


# ---- conflict ----

def task_loss(task: Task, loss: str = "ce") -> Callable[[torch.nn.Module], torch.Tensor]:
    """A task's loss as a function of the Hugging Face model, on its clean prompts: "ce", the mean
    cross-entropy of the answer token (what fine-tuning on the task minimizes), or "logit_diff", minus
    the mean task metric (logit(answer) - logit(wrong)), which ignores every other token."""
    if loss not in ("ce", "logit_diff"):
        raise ValueError(f"loss must be 'ce' or 'logit_diff', got {loss!r}")

    def value(hf):
        logits = hf(task.clean.to(hf.device)).logits[:, -1]
        if loss == "ce":
            return F.cross_entropy(logits, task.answer.to(logits.device))
        return -task.metric(logits).mean()
    return value


def gradient_conflict(m: Model, loss_a: Task | Callable, loss_b: Task | Callable,
                      names: list[str] | None = None, loss: str = "ce", remote: bool = False) -> Scores:
    """Per component (default: all), the cosine between the gradients of two losses restricted to the
    component's parameters (`component_masks`). A Task stands for its `task_loss(task, loss)`.

    -1: the two losses pull the component's parameters in exactly opposite directions; NaN where a
    gradient is zero on the component. Local only (`remote=True` raises).
    """
    checks.local_only(remote, "evolution.gradient_conflict", "it differentiates the losses with respect to "
                      "every weight of the Hugging Face model (torch.autograd over a plain forward, not a trace)")
    names = component_names(m) if names is None else list(names)
    params = dict(m.hf.named_parameters())
    grads = []
    for given in (loss_a, loss_b):
        loss_fn = task_loss(given, loss) if isinstance(given, Task) else given
        value = loss_fn(m.hf)
        grads.append(dict(zip(params, torch.autograd.grad(value, list(params.values()), allow_unused=True))))
    values = []
    for name in names:
        dot = na = nb = 0.0
        for pname, mask in component_masks(m, [name]).items():
            ga, gb = (g[pname] if g[pname] is not None else torch.zeros_like(mask) for g in grads)
            ga, gb = (ga * mask).double(), (gb * mask).double()
            dot, na, nb = dot + (ga * gb).sum(), na + (ga * ga).sum(), nb + (gb * gb).sum()
        denom = (na * nb) ** 0.5
        values.append(float(dot / denom) if denom > 0 else float("nan"))
    return _component_scores(torch.tensor(values), names, {"title": "gradient cosine between tasks"})


# ---- the trajectory ----

@dataclass
class Trajectory:
    """Everything `track` measured, per checkpoint (index t over `labels`).

    scores[task]: `[n_ckpt, n_comp]` component scores. gap[task]: `[n_ckpt]` mean task metric clean minus
    corrupt, the denominator of every normalized score: where it is near 0 the model does not do the task
    and normalized scores and faithfulness are noise. faithfulness[task]: `[n_ckpt, n_ckpt]`, entry
    `[s, t]` the faithfulness of circuit `C_s` on model θ_t. cka[task]: `[n_ckpt, n_comp]` linear CKA of
    each component's outputs at t against checkpoint 0 on the task's clean prompts. cosine[(A, B)]:
    `[n_ckpt, n_comp]` gradient cosines of the two tasks' losses per component.
    """

    labels: list[str]
    components: list[str]
    k: int
    scores: dict[str, torch.Tensor]
    gap: dict[str, torch.Tensor]
    faithfulness: dict[str, torch.Tensor]
    cka: dict[str, torch.Tensor]
    cosine: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.scores)

    def score(self, task: str, t: int) -> Scores:
        return _component_scores(self.scores[task][t], self.components, {"task": task, "checkpoint":
                                                                         self.labels[t]})

    def circuit(self, task: str, t: int) -> list[str]:
        return top_components(self.score(task, t), self.k)

    def _ref(self, t: int, reference: str) -> int:
        if reference not in ("first", "previous"):
            raise ValueError(f"reference must be 'first' (checkpoint 0) or 'previous', got {reference!r}")
        return 0 if reference == "first" else max(t - 1, 0)

    def distance(self, task: str, reference: str = "first", component: str | None = None,
                 weighted: bool = False) -> torch.Tensor:
        """Circuit distance of each checkpoint to checkpoint 0 (or to the previous one): `[n_ckpt]`."""
        out = []
        for t in range(len(self.labels)):
            a, b = self.score(task, self._ref(t, reference)), self.score(task, t)
            out.append(weighted_distance(a, b, component) if weighted else circuit_distance(a, b, self.k, component))
        return torch.tensor(out)

    def rank_stability(self, task: str, reference: str = "first") -> torch.Tensor:
        return torch.tensor([rank_stability(self.score(task, self._ref(t, reference)), self.score(task, t))
                             for t in range(len(self.labels))])

    def lag(self, task: str) -> torch.Tensor:
        """Temporal lag of the static map at each checkpoint: faithfulness of `C_t` minus that of `C_0`, on θ_t."""
        f = self.faithfulness[task]
        return f.diagonal() - f[0]

    def overlap(self, a: str, b: str) -> torch.Tensor:
        """`|C_A,t ∩ C_B,t|` per checkpoint: `[n_ckpt]`."""
        return torch.tensor([len(set(self.circuit(a, t)) & set(self.circuit(b, t))) for t in range(len(self.labels))])

    def shared_cosine(self, a: str, b: str) -> torch.Tensor:
        """Mean gradient cosine over the components the two circuits share, per checkpoint (NaN if none)."""
        cos = self.cosine[(a, b)]
        out = []
        for t in range(len(self.labels)):
            shared = [self.components.index(n) for n in set(self.circuit(a, t)) & set(self.circuit(b, t))]
            out.append(cos[t, shared].nanmean().item() if shared else float("nan"))
        return torch.tensor(out)

    def table(self, task: str, digits: int = 2) -> str:
        """One row per checkpoint: the clean-corrupt gap, distances, rank stability, faithfulness of C_0 and
        C_t on θ_t, mean CKA."""
        cols = {
            "gap": self.gap[task],
            "dist@0": self.distance(task), "heads": self.distance(task, component="head"),
            "mlps": self.distance(task, component="mlp"), "weighted": self.distance(task, weighted=True),
            "dist@prev": self.distance(task, "previous"), "spearman@0": self.rank_stability(task),
            "F(C_0)": self.faithfulness[task][0], "F(C_t)": self.faithfulness[task].diagonal(),
            "lag": self.lag(task), "CKA@0": self.cka[task].nanmean(1),
        }
        width = max(len(x) for x in self.labels) + 2
        lines = [f"{task} (k = {self.k})", f"{'checkpoint':<{width}}" + "".join(f"{c:>11}" for c in cols)]
        for t, label in enumerate(self.labels):
            lines.append(f"{label:<{width}}" + "".join(f"{v[t].item():>11.{digits}f}" for v in cols.values()))
        return "\n".join(lines)

    def curves_figure(self, task: str):
        return figures.draw("trajectory_curves", self, task)

    def heatmap(self, task: str):
        return figures.draw("trajectory_heatmap", self, task)

    def conflict_figure(self):
        return figures.draw("trajectory_conflict", self)


def track(checkpoints: list[tuple[str, Model]], tasks: dict[str, Task] | list[Task], k: int = 8,
          locator: str | Callable = "patching", position: str = "all", conflicts: list[tuple[str, str]] = (),
          conflict_loss: str = "ce", cka_examples: int = 16, progress: bool | None = None, remote: bool = False,
          **options) -> Trajectory:
    """Locate each task's circuit at every checkpoint and measure distance, stability and conflict.

    checkpoints: `[(label, Model), ...]` in training order, all with the same architecture and tokenizer
    (the tasks' token ids are fed to every model). tasks: Tasks (or a dict name -> Task). conflicts: pairs
    of task names whose gradient cosines (of `task_loss(task, conflict_loss)`) are measured. The CKA of each
    component compares its outputs with checkpoint 0's on `cka_examples` clean prompts per task.
    `position` ("all" or "final") applies to the locator and to the faithfulness runs alike; `options` go
    to `component_scores`. Cost per checkpoint and task: one locator sweep, a few forward passes, and
    one batched faithfulness run per 16 circuits. `remote=True` runs them on NDIF; gradient conflicts are
    local only (see `gradient_conflict`), so `conflicts` must be empty then.
    """
    if conflicts:
        checks.local_only(remote, "evolution.track with conflicts", "gradient_conflict differentiates every "
                          "weight locally; drop conflicts=... to track remotely")
    if not checkpoints:
        raise ValueError("track needs at least one (label, Model) checkpoint")
    if not isinstance(tasks, dict):
        tasks = list(tasks)
        checks.unique_names([t.name for t in tasks], "the tasks")  # one name would merge two tasks
        tasks = {t.name: t for t in tasks}
    checks.nonempty(tasks, "tasks")
    checks.unique_names([label for label, _ in checkpoints], "the checkpoints")
    checks.count(cka_examples, "cka_examples", low=2)  # CKA of one example is 0/0; a negative count would slice
    for a, b in conflicts:
        if a not in tasks or b not in tasks:
            raise ValueError(f"conflict pair ({a!r}, {b!r}) names a task not in {list(tasks)}")
    labels, models = [lab for lab, _ in checkpoints], [m for _, m in checkpoints]
    components = component_names(models[0])
    checks.count(k, "k", high=len(components))  # before any sweep, not after every checkpoint
    for label, m in checkpoints:
        if component_names(m) != components or checks.shape_record(m) != checks.shape_record(models[0]):
            raise ValueError(f"checkpoint {label!r} has a different architecture from {labels[0]!r}: "
                             f"{checks.shape_record(m)} vs {checks.shape_record(models[0])}; track checkpoints "
                             "of one model (same family, width and vocabulary)")
        for task in tasks.values():
            checks.task(m, task)
    scores = {name: [] for name in tasks}
    gap = {name: [] for name in tasks}
    cka = {name: [] for name in tasks}
    cosine = {pair: [] for pair in conflicts}
    reference = {name: component_outputs(models[0], task.clean[:cka_examples], remote)
                 for name, task in tasks.items()}
    for m in bars.bar(models, progress, "checkpoints"):
        for name, task in tasks.items():
            scores[name].append(component_scores(m, task, locator, position, remote=remote, **options).values)
            gap[name].append(task.metric(m.logits(task.clean, remote=remote)).mean()
                             - task.metric(m.logits(task.corrupt, remote=remote)).mean())
            outs = component_outputs(m, task.clean[:cka_examples], remote)
            cka[name].append(torch.tensor([linear_cka(x, y) for x, y in zip(reference[name], outs)]))
        for a, b in conflicts:
            cosine[(a, b)].append(gradient_conflict(m, tasks[a], tasks[b], loss=conflict_loss).values)
    traj = Trajectory(labels, components, k, {n: torch.stack(v) for n, v in scores.items()},
                      {n: torch.stack(v).cpu() for n, v in gap.items()}, {},
                      {n: torch.stack(v) for n, v in cka.items()}, {p: torch.stack(v) for p, v in cosine.items()},
                      {"locator": locator if isinstance(locator, str) else getattr(locator, "__name__", "custom"),
                       "position": position, "conflict_loss": conflict_loss})
    for name, task in tasks.items():
        circuits = [traj.circuit(name, s) for s in range(len(labels))]
        traj.faithfulness[name] = torch.stack([node_faithfulness(m, task, circuits, position == "final",
                                                                 remote=remote) for m in models], dim=1)
    return traj
