"""Localized updates: component parameter masks, random matched components, a foresight locator, and the
Static / Random / Free / Oracle / Foresight update experiment.

Why: "locate-then-update" (fine-tune only the components a circuit method found) looks effective, but an
equally large *random* set of components may do as well ("Navigating by Old Maps", 2026). Testing that
needs many masked fine-tuning runs; they are trained together (`training.train_masked`), one vmapped
forward for all of them, and compared with intervals over seeds and draws.

Components are named as everywhere in interplab: heads `a{layer}.h{head}`, MLPs `m{layer}`.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import checks, training
from .model import Model
from .scores import Scores
from .tasks import Task

LossFn = Callable[[torch.nn.Module, int], torch.Tensor]
Evaluation = Task | Callable[[torch.nn.Module], float]

_NAME = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+))$")


def component_names(m: Model) -> list[str]:
    """Every component of `m`, layer by layer: `a{l}.h0 … a{l}.h{H-1}, m{l}`."""
    return [name for layer in range(m.n_layers)
            for name in [f"a{layer}.h{h}" for h in range(m.n_heads)] + [f"m{layer}"]]


def _parse(m: Model, name: str) -> tuple[int, int | None]:
    """(layer, head) of a head, (layer, None) of an MLP; a clear error for anything else."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a component name; heads are 'a{{layer}}.h{{head}}', MLPs 'm{{layer}}'")
    layer = int(match.group(1) or match.group(3))
    head = int(match.group(2)) if match.group(2) is not None else None
    if layer >= m.n_layers or (head is not None and head >= m.n_heads):
        raise ValueError(f"{name!r} is outside {m.name} ({m.n_layers} layers x {m.n_heads} heads)")
    return layer, head


def _head_features(m: Model, head: int) -> list[tuple[str, slice]]:
    """(module path in a block, output-feature slice) of the q/k/v projections that feed `head`."""
    spec, dh, nh, nkv = m.spec, m.d_head, m.n_heads, m.n_kv_heads
    block = lambda start: slice(start, start + dh)
    if spec.qkv_layout == "separate":
        kv = head // (nh // nkv)  # the key/value head this query head's group shares
        q, k, v = spec.qkv
        return [(q, block(head * dh)), (k, block(kv * dh)), (v, block(kv * dh))]
    if spec.qkv_layout == "concat" and nkv == nh:
        return [(spec.qkv[0], block(i * nh * dh + head * dh)) for i in range(3)]
    if spec.qkv_layout == "interleaved" and nkv == nh:
        return [(spec.qkv[0], slice(head * 3 * dh, (head + 1) * 3 * dh))]
    raise NotImplementedError(
        f"{spec.family} has no usable q/k/v layout (qkv={spec.qkv!r}, qkv_layout={spec.qkv_layout!r}, "
        f"n_kv_heads={nkv}). Set `qkv` and `qkv_layout` in its ArchSpec (interplab/model.py)."
    )


def _component_slices(m: Model, name: str) -> list[tuple[str, int, slice]]:
    """(parameter name, axis, slice) triples that make up a component; slice(None) on axis 0 is the whole tensor."""
    layer, head = _parse(m, name)
    prefix = f"{m.spec.blocks}.{layer}."
    params = dict(m.hf.named_parameters())
    if head is None:
        mlp = prefix + m.spec.mlp + "."
        return [(n, 0, slice(None)) for n in params if n.startswith(mlp)]
    out_axis, in_axis = (1, 0) if m.spec.conv1d else (0, 1)  # Conv1D stores [in, out], nn.Linear [out, in]
    parts = []
    for path, features in _head_features(m, head):
        parts.append((f"{prefix}{path}.weight", out_axis, features))
        if f"{prefix}{path}.bias" in params:
            parts.append((f"{prefix}{path}.bias", 0, features))
    o_rows = slice(head * m.d_head, (head + 1) * m.d_head)
    parts.append((f"{prefix}{m.spec.head_values}.weight", in_axis, o_rows))
    missing = [p for p, _, _ in parts if p not in params]
    if missing:
        raise KeyError(f"{m.name} has no parameters {missing}; check the ArchSpec paths of {m.spec.family}")
    return parts


def component_masks(m: Model, names: list[str]) -> dict[str, torch.Tensor]:
    """0/1 masks `{parameter name: tensor of the parameter's shape}` over the union of `names`' parameters.

    A head `a{l}.h{h}` owns its slices of the query, key and value projections (weights and biases: GPT-2's
    fused `c_attn` "concat" layout `[q | k | v]`, NeoX's per-head "interleaved" `[q_h | k_h | v_h]`, Llama's
    "separate" q/k/v modules) and its `d_head` input rows (Conv1D) / columns (Linear) of the output
    projection. Under grouped-query attention a key/value head is shared by a group of query heads: a
    query head's mask includes its group's whole key/value slices, so training one head of a group also
    changes the keys and values its group-mates read. A head's key bias is in its mask although softmax
    ignores it (it shifts all of a query's scores equally), so its gradient is zero up to rounding. The
    output projection's bias belongs to no head (it is added once for all heads) and is in no mask; neither
    are layer norms. An MLP `m{l}` owns every parameter
    of its block's MLP module. The result is usable as `training.train(..., grad_mask=...)` and
    `training.train_masked(..., masks=[...])`: parameters it omits stay frozen.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of component names, got the string {names!r}; wrap it: [{names!r}]")
    params = dict(m.hf.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name in names:
        for pname, axis, part in _component_slices(m, name):
            mask = masks.setdefault(pname, torch.zeros_like(params[pname]))
            mask.narrow(axis, *_span(part, mask.shape[axis])).fill_(1)
    return masks


def _span(part: slice, size: int) -> tuple[int, int]:
    start, stop, _ = part.indices(size)
    return start, stop - start


def random_components(m: Model, like: list[str], n_draws: int, seed: int, match: str = "layer") -> list[list[str]]:
    """`n_draws` random component sets matched to `like`, reproducibly from `seed`.

    match="layer": as many heads in each layer as `like` has there, and as many MLPs (over any layers:
    a layer has one MLP, so matching MLPs by layer would redraw the same ones). match="heads": heads as
    for "layer", and exactly `like`'s MLPs (only the heads are random). match="kind": as many heads and as
    many MLPs, over any layers. Draws are distinct while distinct sets remain; once every possible
    set has been drawn, further draws repeat.
    """
    if match not in ("layer", "heads", "kind"):
        raise ValueError(f"match must be 'layer' (heads matched per layer), 'heads' (also the same MLPs) or "
                         f"'kind' (only counts), got {match!r}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be at least 1, got {n_draws}")
    if not like:
        raise ValueError("`like` is empty: give the component set the random draws should match")
    parsed = [_parse(m, name) for name in like]
    if len(set(like)) != len(like):
        raise ValueError(f"`like` repeats components: {like}")
    n_mlps = sum(head is None for _, head in parsed)
    heads_per = ({layer: sum(1 for l, h in parsed if h is not None and l == layer) for layer in range(m.n_layers)}
                 if match != "kind" else {None: sum(h is not None for _, h in parsed)})
    fixed_mlps = [name for name, (_, h) in zip(like, parsed) if h is None] if match == "heads" else None
    pools = {layer: [f"a{l}.h{h}" for l in range(m.n_layers) for h in range(m.n_heads) if layer in (None, l)]
             for layer in heads_per}
    possible = math.prod(math.comb(len(pools[layer]), k) for layer, k in heads_per.items())
    possible *= 1 if fixed_mlps is not None else math.comb(m.n_layers, n_mlps)
    rng = random.Random(seed)
    draws, seen = [], set()
    while len(draws) < n_draws:
        heads = [h for layer, k in heads_per.items() for h in rng.sample(pools[layer], k)]
        mlps = fixed_mlps or [f"m{l}" for l in rng.sample(range(m.n_layers), n_mlps)]
        key = frozenset(heads + mlps)
        if key in seen and len(seen) < possible:
            continue
        seen.add(key)
        draws.append(sorted(heads + mlps, key=component_names(m).index))
    return draws


def foresight_scores(m: Model, loss_fn: LossFn, batches: int = 4, kind: str = "grad_x_weight",
                     remote: bool = False) -> Scores:
    """Predict, from the step-0 model alone, which components fine-tuning on `loss_fn` will use.

    The gradients `g_b` of `loss_fn(m.hf, b)` for the first `batches` steps of the fine-tuning data, at the
    base weights `w`, summed over each component's parameters (`component_masks`):
    kind="grad_x_weight": `|mean_b g_b| * |w|` (first-order size of the component's role in the loss);
    kind="fisher": `mean_b g_b**2` (a diagonal empirical Fisher over minibatch gradients: where the loss is
    most sensitive to the weights). Sums, not means: an MLP has more parameters than
    a head and gets more weight. Returns `Scores` with dims ("component",) labelled `component_names(m)`.
    Local only (`remote=True` raises).
    """
    checks.local_only(remote, "updates.foresight_scores", "it differentiates loss_fn(m.hf, b), a plain "
                      "forward outside nnsight, with respect to every weight")
    if kind not in ("grad_x_weight", "fisher"):
        raise ValueError(f"kind must be 'grad_x_weight' or 'fisher', got {kind!r}")
    if batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    params = dict(m.hf.named_parameters())
    mean_grad = {n: torch.zeros_like(p) for n, p in params.items()}
    mean_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(batches):
        grads = torch.autograd.grad(loss_fn(m.hf, b), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                mean_grad[n] += g / batches
                mean_sq[n] += g.pow(2) / batches
    with torch.no_grad():
        per_param = ({n: (mean_grad[n] * p).abs() for n, p in params.items()} if kind == "grad_x_weight"
                     else mean_sq)
        names = component_names(m)
        values = torch.stack([sum((mask * per_param[n]).sum() for n, mask in component_masks(m, [c]).items())
                              for c in names])
    return Scores(values, ("component",), labels={"component": names}, meta={"locator": f"foresight:{kind}"})


def overlap(predicted: list[str], oracle: list[str]) -> dict[str, float]:
    """How well `predicted` anticipates `oracle`: Jaccard `|P∩O|/|P∪O|`, precision `|P∩O|/|P|` (precision@k
    when P is a top-k list) and recall `|P∩O|/|O|`."""
    p, o = set(predicted), set(oracle)
    if not p or not o:
        raise ValueError("overlap needs two non-empty component lists")
    both = len(p & o)
    return {"jaccard": both / len(p | o), "precision": both / len(p), "recall": both / len(o)}


ARMS = ("Free", "Static", "Random", "Oracle", "Foresight")


@dataclass
class Run:
    """One fine-tuning run of the experiment and what it did to the model."""

    arm: str
    seed: int
    components: list[str]
    gain: float  # target score after - before
    retention: float  # mean over the other evaluations of (after - before); 0 = nothing lost
    kl: float  # mean KL(base || tuned) per next-token position of the held-out tokens
    others: dict[str, float] = field(default_factory=dict)  # after - before, per other evaluation


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval for the mean; (mean, nan, nan) for fewer than two values."""
    from scipy import stats

    x = torch.tensor(values, dtype=torch.float64)
    mean = x.mean().item()
    if len(values) < 2:
        return mean, math.nan, math.nan
    sem = (x.std(unbiased=True) / math.sqrt(len(values))).item()
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(level, len(values) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


@dataclass
class UpdateResult:
    """The update experiment: every run, the Static-vs-Random permutation p-value, and the oracle sets."""

    runs: list[Run]
    p_value: float  # two-sided permutation test of mean target gain, Static runs vs Random draws
    oracle: dict[int, list[str]]  # seed -> Oracle components (located on that seed's Free model)
    anticipation: dict[str, dict[str, float]]  # "Static"/"Foresight" -> mean overlap() with the Oracle sets

    def arm(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.arm == name]

    def rows(self) -> list[dict]:
        """Per arm: n and (mean, low, high) of gain, retention and KL; 95% Student-t intervals over runs."""
        out = []
        for name in ARMS:
            runs = self.arm(name)
            if runs:
                out.append({"arm": name, "n": len(runs)} | {
                    metric: t_interval([getattr(r, metric) for r in runs]) for metric in ("gain", "retention", "kl")})
        return out

    def table(self) -> str:
        """A plain-text table of `rows()`, the p-value and the anticipation scores."""
        cell = lambda t: f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"
        lines = [f"{'arm':<10}{'n':>3}  {'target gain':<26}{'retention':<26}{'KL from base':<26}"]
        for r in self.rows():
            lines.append(f"{r['arm']:<10}{r['n']:>3}  {cell(r['gain']):<26}{cell(r['retention']):<26}"
                         f"{cell(r['kl']):<26}")
        lines.append("mean [95% t-interval] over seeds (Random: over draws)")
        lines.append(f"Static vs Random, target gain: permutation p = {self.p_value:.3f}")
        for name, scores in self.anticipation.items():
            lines.append(f"{name} vs Oracle: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        return "\n".join(lines)

    def figure(self, title: str = "localized updates: Static vs Random vs Free"):
        from .viz import update_arms_figure

        return update_arms_figure(self, title=title)


def _score(evaluation: Evaluation, model: torch.nn.Module) -> float:
    if isinstance(evaluation, Task):
        with torch.no_grad():
            return evaluation.metric(model(evaluation.clean).logits).mean().item()
    return float(evaluation(model))


@torch.no_grad()
def _kl(base_logits: torch.Tensor, model: torch.nn.Module, heldout: torch.Tensor, keep: torch.Tensor) -> float:
    logp = base_logits.log_softmax(-1)  # (n, T, V)
    logq = model(heldout).logits.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)[keep].mean().item()


def update_experiment(
    m: Model,
    make_loss: Callable[[int], LossFn],
    target: Evaluation,
    others: dict[str, Evaluation],
    heldout: torch.Tensor,
    static: list[str],
    foresight: list[str],
    oracle: list[str] | Callable[[Model], list[str]],
    steps: int,
    lr: float,
    warmup: int = 20,
    seeds: tuple[int, ...] = (0, 1, 2),
    n_random: int = 20,
    draw_seed: int = 0,
    match: str = "layer",
    remote: bool = False,
) -> UpdateResult:
    """Fine-tune `m` on one target task five ways and measure what each way did.

    Arms: Free (every parameter), Static (`static`, located on the step-0 model), Random (`n_random` sets
    matched to `static` by `random_components(match=...)`, seeded by `draw_seed`), Oracle (`oracle`: a
    list, or a function that locates it on each seed's Free model, e.g. `lambda fm: evolution.top_components(scores(fm), k)`),
    Foresight (`foresight`, e.g. `evolution.top_components(foresight_scores(...), k)`). Every arm runs AdamW without weight
    decay, warmup + cosine, clipping at 1 (`training.train` / `train_masked` arithmetic), `steps` steps at
    `lr` on `make_loss(seed)`, a `loss_fn(model, step)` (called afresh for each training, so a stateful
    sampler restarts; every masked run of a batch sees the same batch at each step). Each seed
    trains Free alone, then Static, Oracle, Foresight and its share of the Random draws (draw i on seed
    `seeds[i % len(seeds)]`) together with `train_masked`.

    Measured per run: target gain (`target`'s score after minus before; a `Task` scores the mean logit
    difference on its clean prompts, a callable `(hf_model) -> float` anything), retention (mean over
    `others` of after minus before), KL(base || tuned) per next-token position of `heldout` `[n, seq]` tokens
    (padding positions left out).
    Intervals are 95% Student-t over seeds (Random: over draws); the p-value is a two-sided permutation
    test (`scipy.stats.permutation_test`, difference of means) of target gain, Static runs vs Random draws.
    Local only (`remote=True` raises).
    """
    from scipy import stats

    checks.local_only(remote, "updates.update_experiment", "it fine-tunes copies of the model's weights here "
                      "(training.train / train_masked)")

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must name at least one seed, each once; got {seeds}")
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1 (the paper's control uses at least 20), got {n_random}")
    given = [("static", static), ("foresight", foresight)] + ([] if callable(oracle) else [("oracle", oracle)])
    for what, names in given:
        if not names:
            raise ValueError(f"{what} must name at least one component")
        component_masks(m, names)  # validates the names early
    draws = random_components(m, static, n_random, seed=draw_seed, match=match)
    hf = m.hf
    if heldout.dim() != 2 or heldout.dtype != torch.long:
        raise ValueError(f"heldout must be token ids [n, seq] (LongTensor), got {heldout.dtype} {tuple(heldout.shape)}")
    pad = m.tokenizer.pad_token_id
    keep = heldout != pad if pad is not None else torch.ones_like(heldout, dtype=torch.bool)  # (n, T)
    with torch.no_grad():
        base_logits = hf(heldout).logits
    before_target = _score(target, hf)
    before_others = {name: _score(e, hf) for name, e in others.items()}

    def measure(arm, seed, components, model) -> Run:
        deltas = {name: _score(e, model) - before_others[name] for name, e in others.items()}
        retention = sum(deltas.values()) / len(deltas) if deltas else math.nan
        return Run(arm, seed, components, _score(target, model) - before_target, retention,
                   _kl(base_logits, model, heldout, keep), deltas)

    runs, oracles = [], {}
    for i, seed in enumerate(tqdm(seeds, desc="seeds")):
        free = copy.deepcopy(hf)
        training.train(free, make_loss(seed), steps, lr, warmup=warmup, weight_decay=0.0, desc=f"Free, seed {seed}")
        runs.append(measure("Free", seed, component_names(m), free))
        oracles[seed] = list(oracle(Model(free, m.tokenizer, name=f"{m.name} (Free, seed {seed})"))
                             if callable(oracle) else oracle)
        arms = [("Static", static), ("Oracle", oracles[seed]), ("Foresight", foresight)]
        arms += [("Random", d) for j, d in enumerate(draws) if j % len(seeds) == i]
        trained = training.train_masked(hf, make_loss(seed), [component_masks(m, c) for _, c in arms], steps, lr,
                                        warmup=warmup, desc=f"{len(arms)} masked runs, seed {seed}")
        tuned = copy.deepcopy(hf)
        for k, (arm, components) in enumerate(arms):
            runs.append(measure(arm, seed, list(components), trained.load_into(tuned, k)))

    gains = lambda arm: [r.gain for r in runs if r.arm == arm]
    test = stats.permutation_test((gains("Static"), gains("Random")), lambda a, b: a.mean() - b.mean(),
                                  permutation_type="independent", alternative="two-sided", n_resamples=9999,
                                  random_state=draw_seed)
    anticipation = {name: {key: sum(overlap(pred, oracles[s])[key] for s in seeds) / len(seeds)
                           for key in ("jaccard", "precision", "recall")}
                    for name, pred in (("Static", static), ("Foresight", foresight))}
    return UpdateResult(runs, float(test.pvalue), oracles, anticipation)
