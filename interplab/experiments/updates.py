"""The localized-update experiment: a foresight locator and the update arms (Free, Static, Static - top,
Top alone, Dynamic, Oracle, Foresight, and four kinds of matched random sets).

Why: "locate-then-update" (fine-tune only the components a circuit method found) looks effective, but an
equally large *random* set of components may do as well ("Navigating by Old Maps", 2026). Testing that
needs many masked fine-tuning runs; they are trained together (`training.train_masked`), one vmapped
forward for all of them, and compared with intervals over seeds and draws and stated permutation tests.
The controls say *why* an arm wins: Static without its top component, that component alone, and random
sets matched four ways (`components.random_components`), split by whether they contain Static's top
component. The Dynamic arm re-locates the top-k during training and moves the mask
(`training.train_moving_mask`). `run_updates` holds the configurations and the command line.

Components are named as everywhere in interplab (`interplab.components`): heads `a{layer}.h{head}`,
MLPs `m{layer}`; their parameter masks and matched random sets live there too.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import bars, checks, figures, training
from ..components import MATCHES, component_masks, component_names, overlap, random_components
from ..metrics import position_kl
from ..model import Model
from ..scores import Scores
from ..stats import PermutationTest, permutation_test, t_interval
from ..tasks import Task

LossFn = Callable[[torch.nn.Module, int], torch.Tensor]
Evaluation = Task | Callable[[torch.nn.Module], float]
Locator = Callable[[Model], list[str]]


def foresight_scores(m: Model, loss_fn: LossFn, batches: int = 4, score: str = "grad_x_weight",
                     remote: bool = False) -> Scores:
    """Predict, from the step-0 model alone, which components fine-tuning on `loss_fn` will use.

    The gradients `g_b` of `loss_fn(m.hf, b)` for the first `batches` steps of the fine-tuning data, at the
    base weights `w`, summed over each component's parameters (`component_masks`):
    score="grad_x_weight": `|mean_b g_b| * |w|` (first-order size of the component's role in the loss);
    score="fisher": `mean_b g_b**2` (a diagonal empirical Fisher over minibatch gradients: where the loss is
    most sensitive to the weights). Sums, not means: an MLP has more parameters than
    a head and gets more weight. Returns `Scores` with dims ("component",) labelled `component_names(m)`.
    Local only (`remote=True` raises).
    """
    checks.local_only(remote, "updates.foresight_scores", "it differentiates loss_fn(m.hf, b), a plain "
                      "forward outside nnsight, with respect to every weight")
    if score not in ("grad_x_weight", "fisher"):
        raise ValueError(f"score must be 'grad_x_weight' or 'fisher', got {score!r}")
    batches = checks.count(batches, "batches")
    checks.deterministic(m.nn._module, "foresight_scores")
    params = dict(m.hf.named_parameters())
    mean_grad = {n: torch.zeros_like(p) for n, p in params.items()}
    mean_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(batches):
        loss = loss_fn(m.hf, b)
        checks.training_step(b, loss, ())  # a non-finite loss would make every score NaN
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                mean_grad[n] += g / batches
                mean_sq[n] += g.pow(2) / batches
    with torch.no_grad():
        per_param = ({n: (mean_grad[n] * p).abs() for n, p in params.items()} if score == "grad_x_weight"
                     else mean_sq)
        names = component_names(m)
        values = torch.stack([sum((mask * per_param[n]).sum() for n, mask in component_masks(m, [c]).items())
                              for c in names])
    return Scores(values, ("component",), labels={"component": names}, meta={"locator": f"foresight:{score}"})


SINGLE_SET = ("Static", "Static - top", "Top alone", "Oracle", "Foresight")


def control_name(match: str) -> str:
    """The arm name of a random control: "Random (uniform)", "Random (counts)", ..."""
    return f"Random ({match})"


def single_set_arms(static: list[str], oracle: list[str], foresight: list[str]) -> dict[str, list[str]]:
    """The arms that train one fixed component set: Static, Static without its top component (`static[0]`,
    the largest |score|), that component alone, Oracle and Foresight."""
    if len(static) < 2:
        raise ValueError(f"Static needs at least 2 components to have a 'Static - top' arm, got {static}")
    return {"Static": list(static), "Static - top": list(static[1:]), "Top alone": list(static[:1]),
            "Oracle": list(oracle), "Foresight": list(foresight)}


@dataclass
class Run:
    """One fine-tuning run of the experiment and what it did to the model."""

    arm: str
    seed: int
    components: list[str]  # Dynamic: the union over its relocations
    gain: float  # target score after - before
    accuracy: float  # target top-1 after (nan for a callable target)
    retention: float  # mean over the other evaluations of (after - before); 0 = nothing lost
    kl: float  # mean KL(base || tuned) per next-token position of the held-out tokens
    others: dict[str, float] = field(default_factory=dict)  # after - before, per other evaluation
    history: list[tuple[int, list[str]]] = field(default_factory=list)  # Dynamic: (step, located top-k)


@dataclass
class UpdateResult:
    """The update experiment: every run, the permutation tests, the located sets and the base rates."""

    runs: list[Run]
    tests: dict[str, PermutationTest]  # "<arm> vs <arm>" -> test of mean target gain
    static: list[str]
    oracle: dict[int, list[str]]  # seed -> Oracle components (located on that seed's Free model)
    anticipation: dict[str, dict[str, float]]  # "Static"/"Foresight" -> mean overlap() with the Oracle sets
    before: dict[str, float]  # the unedited model: target score and top-1 (the base rate)

    @property
    def top(self) -> str:
        return self.static[0]

    def arm(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.arm == name]

    def arms(self) -> list[str]:
        return list(dict.fromkeys(r.arm for r in self.runs))

    def rows(self) -> list[dict]:
        """Per arm: n and (mean, low, high) of gain, accuracy, retention and KL; 95% Student-t intervals
        over seeds (random controls: over draws), the accuracy's clipped to [0, 1] and KL's cut at 0."""
        rows = [{"arm": name, "n": len(self.arm(name))} | {
            metric: t_interval([getattr(r, metric) for r in self.arm(name)])
            for metric in ("gain", "accuracy", "retention", "kl")} for name in self.arms()]
        for row in rows:  # an accuracy interval stops at 0 and 1; KL is never negative
            mean, low, high = row["accuracy"]
            row["accuracy"] = (mean, max(low, 0.0), min(high, 1.0)) if low == low else (mean, low, high)
            mean, low, high = row["kl"]
            row["kl"] = (mean, max(low, 0.0), high) if low == low else (mean, low, high)
        return rows

    def split(self, arm: str) -> dict[str, list[float]]:
        """A random control's gains split by whether the draw contains Static's top component."""
        runs = self.arm(arm)
        return {"with": [r.gain for r in runs if self.top in r.components],
                "without": [r.gain for r in runs if self.top not in r.components]}

    def table(self) -> str:
        """Plain text: one row per arm (mean [95% t-interval]), random controls split by Static's top
        component, the base rate, every permutation test stated, and the anticipation of the Oracle."""
        cell = lambda t: f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]" if t[1] == t[1] else f"{t[0]:+.3f}"
        lines = [f"{'arm':<22}{'n':>4}  {'target gain':<27}{'top-1 after':<27}{'retention':<27}{'KL from base':<27}"]
        for r in self.rows():
            lines.append(f"{r['arm']:<22}{r['n']:>4}  " + "".join(f"{cell(r[k]):<27}" for k in
                                                                  ("gain", "accuracy", "retention", "kl")))
            if r["arm"].startswith("Random"):
                for part, gains in self.split(r["arm"]).items():
                    if gains:
                        lines.append(f"  {part + ' ' + self.top:<20}{len(gains):>4}  {cell(t_interval(gains)):<27}")
        lines.append(f"mean [95% Student-t interval] over seeds (random controls: over draws). Before training: "
                     f"target score {self.before['score']:+.3f}, top-1 {self.before['accuracy']:.3f} (base rate).")
        lines.append(f"Static = {self.static}; its top component {self.top}.")
        dynamic = self.arm("Dynamic")
        if dynamic:
            kept = [len(set(r.history[-1][1]) & set(self.static)) for r in dynamic]
            lines.append(f"Dynamic: relocated at steps {[step for step, _ in dynamic[0].history]}; components used "
                         f"per seed {[len(r.components) for r in dynamic]}; its last set keeps {kept} of Static's "
                         f"{len(self.static)}.")
        lines += [f"{name}: {test.describe()}" for name, test in self.tests.items()]
        for name, scores in self.anticipation.items():
            lines.append(f"{name} vs Oracle: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        return "\n".join(lines)

    def save(self, path: str | Path, **meta) -> Path:
        """Every run, test and located set as JSON (plus `meta`, e.g. the configuration)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self) | {"tests": {k: asdict(t) for k, t in self.tests.items()}, "meta": meta}
        path.write_text(json.dumps(data, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "UpdateResult":
        """The result `save` wrote (its `meta` is left out: read the JSON for it)."""
        data = json.loads(Path(path).read_text())
        runs = [Run(**(r | {"history": [(step, comps) for step, comps in r["history"]]})) for r in data["runs"]]
        return cls(runs=runs, tests={k: PermutationTest(**t) for k, t in data["tests"].items()},
                   static=data["static"], oracle={int(k): v for k, v in data["oracle"].items()},
                   anticipation=data["anticipation"], before=data["before"])

    def figure(self, title: str = "localized updates: every arm"):
        return figures.draw("update_arms", self, title=title)


def _score(evaluation: Evaluation, model: torch.nn.Module) -> tuple[float, float]:
    """(score, top-1 accuracy); a callable evaluation has no accuracy (nan)."""
    if isinstance(evaluation, Task):
        with torch.no_grad():
            logits = model(evaluation.clean).logits
        return evaluation.metric(logits).mean().item(), evaluation.accuracy(logits).float().mean().item()
    return float(evaluation(model)), math.nan


@torch.no_grad()
def _kl(base_logits: torch.Tensor, model: torch.nn.Module, heldout: torch.Tensor, keep: torch.Tensor) -> float:
    return position_kl(base_logits, model(heldout, attention_mask=keep.long()).logits)[keep].mean().item()  # [n, T]


def update_experiment(
    m: Model,
    make_loss: Callable[[int], LossFn],
    target: Evaluation,
    others: dict[str, Evaluation],
    heldout: torch.Tensor,
    locate: Locator,
    foresight: list[str],
    steps: int,
    lr: float,
    warmup: int = 20,
    seeds: tuple[int, ...] = (0, 1, 2),
    n_random: int = 20,
    controls: tuple[str, ...] = MATCHES,
    relocate_every: int = 10,
    draw_seed: int = 0,
    progress: bool | None = None,
    remote: bool = False,
) -> UpdateResult:
    """Fine-tune `m` on one target task in every arm and measure what each arm did.

    `locate(model) -> list[str]` is the locator, largest |score| first (e.g. the top-k of
    `evolution.component_scores` on the target task). Arms:
    - Free: every parameter;
    - Static: `locate(m)`, on the step-0 model; Static - top: without its first component; Top alone: that
      component by itself;
    - Oracle: `locate` on each seed's Free model after training; Foresight: `foresight` (e.g. the top-k of
      `foresight_scores`), information available before training;
    - Dynamic: starts as Static and re-locates with `locate` on the model being trained every
      `relocate_every` steps, moving the mask (`training.train_moving_mask`);
    - one random control per `controls` entry (`components.random_components(match=...)`: "uniform",
      "counts", "heads", "layer"), `n_random` distinct sets matched to Static, drawn from `draw_seed`.
    Every arm runs AdamW without weight decay, warmup + cosine, clipping at 1, `steps` steps at `lr` on
    `make_loss(seed)` (a `loss_fn(model, step)`, made afresh for each training so a stateful sampler
    restarts). Per seed: Free alone, Dynamic alone, then the single-set arms and that seed's share of every
    control (draw i on seed `seeds[i % len(seeds)]`) together with `train_masked`.

    Measured per run: target gain (score after - before; a `Task` scores its mean metric on its clean
    prompts and its top-1 accuracy, a callable `(hf_model) -> float` anything), retention (mean over
    `others` of after - before), KL(base || tuned) per next-token position of `heldout` `[n, seq]`
    (padding left out). Tests (`stats.permutation_test`, two-sided, difference of mean target gains,
    independent samples): Static vs each control, Static vs Static - top and Dynamic vs Static.
    `progress` follows `bars` (nested training loops and locator sweeps inherit it).
    Local only (`remote=True` raises).
    """
    checks.local_only(remote, "updates.update_experiment", "it fine-tunes copies of the model's weights here "
                      "(training.train / train_masked)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must name at least one seed, each once; got {seeds}")
    seeds, draw_seed = tuple(checks.seed(s, "each seed") for s in seeds), checks.seed(draw_seed, "draw_seed")
    steps, warmup = checks.count(steps, "steps"), checks.count(warmup, "warmup", low=0)
    relocate_every = checks.count(relocate_every, "relocate_every")
    lr = checks.number(lr, "lr", above=0)
    checks.count(n_random, "n_random (the paper's control uses at least 20)")
    unknown = set(controls) - set(MATCHES)
    if unknown or not controls:
        raise ValueError(f"controls must be a non-empty subset of {MATCHES}, got {controls}")
    checks.tokens(m, heldout, "heldout")
    checks.deterministic(m.nn._module, "update_experiment")
    if heldout.dim() != 2 or heldout.dtype != torch.long:
        raise ValueError(f"heldout must be token ids [n, seq] (LongTensor), got {heldout.dtype} {tuple(heldout.shape)}")
    if not foresight:
        raise ValueError("foresight must name at least one component")
    component_masks(m, foresight)  # validates the names early
    with bars.inherit(progress):
        static = list(locate(m))
    single_set_arms(static, static, foresight)  # validates Static's size
    draws = {control_name(match): random_components(m, static, n_random, seed=draw_seed, match=match)
             for match in controls}

    hf = m.hf
    pad = m.tokenizer.pad_token_id
    keep = heldout != pad if pad is not None else torch.ones_like(heldout, dtype=torch.bool)  # [n, T]
    with torch.no_grad():
        base_logits = hf(heldout, attention_mask=keep.long()).logits  # padded rows: the mask says so
    before_score, before_accuracy = _score(target, hf)
    before_others = {name: _score(e, hf)[0] for name, e in others.items()}

    def measure(arm, seed, components, model, history=()) -> Run:
        deltas = {name: _score(e, model)[0] - before_others[name] for name, e in others.items()}
        retention = sum(deltas.values()) / len(deltas) if deltas else math.nan
        score, accuracy = _score(target, model)
        return Run(arm, seed, components, score - before_score, accuracy, retention,
                   _kl(base_logits, model, heldout, keep), deltas, list(history))

    runs, oracles = [], {}
    with bars.inherit(progress):  # the locator's sweeps too
        for i, seed in enumerate(bars.bar(seeds, progress, "update experiment, seeds")):
            free = copy.deepcopy(hf)
            training.train(free, make_loss(seed), steps, lr, warmup=warmup, weight_decay=0.0,
                           desc=f"Free, seed {seed}", progress=progress)
            runs.append(measure("Free", seed, component_names(m), free))
            oracles[seed] = list(locate(Model(free, m.tokenizer, name=f"{m.name} (Free, seed {seed})")))

            dynamic, history = copy.deepcopy(hf), []

            def relocate(model, step):
                located = static if step == 0 else list(locate(Model(model, m.tokenizer,
                                                                     name=f"{m.name} (step {step})")))
                history.append((step, located))
                return component_masks(m, located)

            training.train_moving_mask(dynamic, make_loss(seed), relocate, relocate_every, steps, lr,
                                       warmup=warmup, desc=f"Dynamic, seed {seed}", progress=progress)
            union = [c for c in component_names(m) if any(c in located for _, located in history)]
            runs.append(measure("Dynamic", seed, union, dynamic, history))

            arms = list(single_set_arms(static, oracles[seed], foresight).items())
            arms += [(arm, d) for arm, sets in draws.items() for j, d in enumerate(sets) if j % len(seeds) == i]
            trained = training.train_masked(hf, make_loss(seed), [component_masks(m, c) for _, c in arms], steps,
                                            lr, warmup=warmup, desc=f"{len(arms)} masked runs, seed {seed}",
                                            progress=progress)
            tuned = copy.deepcopy(hf)
            for k, (arm, components) in enumerate(arms):
                runs.append(measure(arm, seed, list(components), trained.load_into(tuned, k)))

    gains = lambda arm: [r.gain for r in runs if r.arm == arm]
    pairs = [("Static", arm) for arm in draws] + [("Static", "Static - top"), ("Dynamic", "Static")]
    tests = {f"{a} vs {b}": permutation_test(gains(a), gains(b), seed=draw_seed) for a, b in pairs}
    anticipation = {name: {key: sum(overlap(pred, oracles[s])[key] for s in seeds) / len(seeds)
                           for key in ("jaccard", "precision", "recall")}
                    for name, pred in (("Static", static), ("Foresight", foresight))}
    return UpdateResult(runs, tests, static, oracles, anticipation,
                        {"score": before_score, "accuracy": before_accuracy})
