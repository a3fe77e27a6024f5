"""Issue 20's edit experiment: ITI and optimized edits at located, random and single heads, with controls.

Per fold (`truthfulness.folds`), on that fold's training creatures only:
- the training creatures are split (seeded) into *fit* creatures, which probes, patching and edits
  see, and *validation* creatures, on which ITI's α and IPO's τ are chosen; held-out creatures are
  never used for a choice;
- ITI's probes on the fit creatures pick the top-k heads ("selected"), activation patching on
  `truth_task` picks another top-k ("located");
- every k-head set is trained when there are at most `Config.max_sets` of them, otherwise
  `Config.n_draws` distinct sets drawn without replacement ("sets"), with one training seed;
- the selected, located, every single head and the full model are trained with every seed of
  `Config.seeds`. A seed changes the minibatch order (`Config.batch_size` pairs per step, drawn from the
  seed) and, for the rank-1 edit, the random init of its read-out vector `a`; without minibatches the
  full model's training would have no randomness at all.

Every run is scored on the held-out creatures with every template (the training templates and the
held-out ones) and on the fit creatures with the held-out templates only, so the tables report truth on
held-out creatures, on held-out templates, and on both. `edit_tables` turns `Results` into tables;
`python -m interplab.experiments.edit_tables [--small]` prints them.

The organism is one parameter, `Config.model`: everything about the creatures goes through
`truthfulness` (pairs, statements, colours, `Evaluator`) and `truth_task`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import torch
from .. import bars, checks, edits, patching, probes
from ..components import head_name, parse
from ..model import load
from ..scores import Scores
from .truthfulness import (
    MODEL, N_CREATURES, TEMPLATES, Evaluation, Evaluator, folds, full_model_baseline, pairs, statements, truth_task,
)


@dataclass
class Config:
    """One run. `Config()` is the full configuration (4 folds, 3 seeds); `Config.small()` the tests' and
    notebook's (one fold, fewer steps and sets).

    k: heads per set. max_sets: enumerate every k-head set up to this many, else draw `n_draws` distinct
    ones (seed `seed`). seeds: training seeds of the seeded arms. n_val: validation creatures drawn
    (seed `seed` + fold) from each fold's training creatures. train_templates: indices into
    `truthfulness.TEMPLATES` the probes and edits see; the others are held out. alphas, taus: the ITI
    strengths and IPO τ to choose from on validation (by truth x info; ties go to the first listed).
    batch_size: pairs per training step. n_docs: neutral documents for ΔLM and KL.
    """

    model: str = MODEL
    folds: tuple[int, ...] = (0, 1, 2, 3)
    k: int = 2
    max_sets: int = 500
    n_draws: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    n_val: int = 6
    train_templates: tuple[int, ...] = (0,)
    alphas: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 40.0)
    taus: tuple[float, ...] = (0.1, 0.05, 0.025)
    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 8
    full_steps: int = 100
    full_lr: float = 3e-4
    n_docs: int = 96

    @classmethod
    def small(cls, **changes) -> "Config":
        """One fold (the shipped split), 16 drawn sets, 40 steps, 32 neutral documents: a few minutes on 2 cores."""
        return cls(**{**dict(folds=(3,), max_sets=0, n_draws=16, alphas=(5.0, 20.0),
                             taus=(0.1, 0.025), steps=40, full_steps=40, n_docs=32), **changes})

    def __post_init__(self):  # checked here, not minutes into a run or at report time
        for name in ("k", "n_draws", "n_val", "steps", "full_steps", "batch_size", "n_docs"):
            checks.count(getattr(self, name), name)
        checks.count(self.max_sets, "max_sets", low=0)
        checks.seed(self.seed)
        for value in self.seeds:
            checks.seed(value, "each of seeds")
        for name in ("lr", "full_lr"):
            checks.number(getattr(self, name), name, above=0)
        for value in self.alphas:
            checks.number(value, "each alpha")
        for value in self.taus:
            checks.number(value, "each tau (IPO's beta)", above=0)
        checks.indices(self.folds, "folds", 4)
        n_templates = len(TEMPLATES)
        problems = []
        if not self.folds or any(not 0 <= f < 4 for f in self.folds):
            problems.append(f"folds must be indices 0..3 of truthfulness.folds(), got {self.folds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.k < 1 or self.n_draws < 1 or self.max_sets < 0:
            problems.append(f"need k >= 1, n_draws >= 1, max_sets >= 0; got {self.k}, {self.n_draws}, "
                            f"{self.max_sets}")
        held_out = set(range(n_templates)) - set(self.train_templates)
        if not set(self.train_templates) <= set(range(n_templates)) or not self.train_templates or not held_out:
            problems.append(f"train_templates must be a non-empty proper subset of 0..{n_templates - 1}, "
                            f"got {self.train_templates}")
        if (not self.alphas or not self.taus or self.steps < 1 or self.full_steps < 1 or self.batch_size < 1
                or self.n_docs < 1):
            problems.append("alphas and taus must be non-empty and steps, full_steps, batch_size, n_docs >= 1")
        n_train = N_CREATURES - N_CREATURES // 4
        if not 2 <= self.n_val <= n_train - 4:
            problems.append(f"n_val must be at least 2 and leave at least 4 of a fold's {n_train} training "
                            f"creatures to fit on, got {self.n_val}")
        if problems:
            raise ValueError("bad edit-experiment Config: " + "; ".join(problems))

    @property
    def held_out_templates(self) -> tuple[int, ...]:
        return tuple(t for t in range(len(TEMPLATES)) if t not in self.train_templates)


@dataclass
class Run:
    """One scored model or edit. arm: "unedited", "iti selected", "iti located", "iti set", "ipo selected",
    "ipo located", "ipo single", "ipo set" or "full model". `test`: held-out creatures x every template;
    `seen`: the fold's fit creatures x the held-out templates. `param`: α or τ (0 for unedited)."""

    arm: str
    heads: tuple
    seed: int
    fold: int
    param: float
    test: Evaluation
    seen: Evaluation


@dataclass
class Results:
    config: Config
    runs: list[Run]
    n_heads: tuple[int, int]  # (layers, heads per layer)
    sets_enumerated: bool  # every k-head set was trained (else `config.n_draws` draws)
    probe_accuracy: dict[int, Scores] = field(default_factory=dict)
    patching: dict[int, Scores] = field(default_factory=dict)
    selected: dict[int, tuple] = field(default_factory=dict)
    located: dict[int, tuple] = field(default_factory=dict)
    alpha: dict[tuple[int, str], float] = field(default_factory=dict)  # (fold, arm) -> α chosen on validation
    tau: dict[int, float] = field(default_factory=dict)  # fold -> τ for the edits, chosen on validation
    full_tau: dict[int, float] = field(default_factory=dict)  # fold -> τ for the full model

    def select(self, arm: str, heads: tuple | None = None, seed: int | None = None) -> list[Run]:
        return [r for r in self.runs if r.arm == arm and (heads is None or r.heads == heads)
                and (seed is None or r.seed == seed)]


def head_sets(n_layers: int, n_heads: int, k: int, max_sets: int, n_draws: int, seed: int) -> tuple[list, bool]:
    """`(sets, enumerated)`: every k-head set (tuples of head names, layer-major) if there are at most
    `max_sets`, else `n_draws` distinct sets drawn uniformly without replacement with `seed`."""
    heads = [head_name(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    if not 1 <= k <= len(heads):
        raise ValueError(f"k must be in 1..{len(heads)} (the model's heads), got {k}")
    total = math.comb(len(heads), k)
    if total <= max_sets:
        return [tuple(s) for s in itertools.combinations(heads, k)], True
    if n_draws > total:
        raise ValueError(f"n_draws={n_draws} exceeds the {total} distinct {k}-head sets")
    rng, drawn = random.Random(seed), {}
    while len(drawn) < n_draws:
        s = tuple(sorted(rng.sample(heads, k), key=parse))
        drawn.setdefault(s, None)
    return list(drawn), False


def split_validation(train_creatures, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """`(fit, validation)` creatures: `n_val` of `train_creatures` drawn with `seed`, in index order."""
    val = set(random.Random(seed).sample(sorted(train_creatures), n_val))
    return [c for c in train_creatures if c not in val], sorted(val)


def iti_probe(m, creatures, templates, seed: int) -> edits.ITIProbe:
    """ITI's per-head probes on `creatures`' true and false statements with `templates` (indices into
    `TEMPLATES`): the probe every ITI arm of a fold uses (its fit creatures and training templates)."""
    parts = [statements(m, creatures, TEMPLATES[t]) for t in templates]
    x = torch.cat([probes.collect(m, tok, site="heads") for tok, _, _ in parts])  # (n, L, H, d_head)
    labels, groups = torch.cat([y for _, y, _ in parts]), torch.cat([g for _, _, g in parts])
    return edits.fit_iti_activations(x, labels, groups, seed=seed)


def _pairs(m, creatures, templates):
    parts = [pairs(m, creatures, TEMPLATES[t]) for t in templates]
    if len({p.prompts.shape[1] for p in parts}) != 1:
        raise ValueError("the training templates must tokenize to prompts of one length")
    return tuple(torch.cat([getattr(p, name) for p in parts]) for name in ("prompts", "chosen", "rejected"))


def run_fold(m, fold: int, config: Config, results: Results, progress: bool | None = None) -> None:
    """Every arm on one fold, appended to `results`."""
    train_c, test_c = folds()[fold]
    fit_c, val_c = split_validation(train_c, config.n_val, config.seed + fold)
    train_t = [TEMPLATES[t] for t in config.train_templates]
    held_t = [TEMPLATES[t] for t in config.held_out_templates]
    validate = Evaluator(m, val_c, templates=train_t, n_docs=config.n_docs, tasks=())
    test = Evaluator(m, test_c, templates=TEMPLATES, n_docs=config.n_docs, tasks=())
    seen = Evaluator(m, fit_c, templates=held_t, n_docs=0, tasks=())  # the text scores are `test`'s

    def record(arm, heads, seed, param, logits):
        results.runs.append(Run(arm, tuple(heads), seed, fold, param, test(logits, tasks=False),
                                seen(logits, tasks=False)))

    probe = iti_probe(m, fit_c, config.train_templates, config.seed)
    selected = tuple(probe.top(config.k))
    scores = patching.heads(m, truth_task(m, fit_c), progress=False)
    located = tuple(edits.top_k(scores, config.k))
    results.probe_accuracy[fold], results.patching[fold] = probe.accuracy, scores
    results.selected[fold], results.located[fold] = selected, located
    record("unedited", (), -1, 0.0, m.logits)

    for where, heads in (("selected", selected), ("located", located)):
        alpha = max(config.alphas, key=lambda a: validate(edits.iti(m, probe, heads, a).logits, False).product)
        results.alpha[fold, where] = alpha
        record(f"iti {where}", heads, -1, alpha, edits.iti(m, probe, heads, alpha).logits)
    sets, _ = head_sets(m.n_layers, m.n_heads, config.k, config.max_sets, config.n_draws, config.seed)
    alpha = results.alpha[fold, "selected"]  # random sets get the selected heads' strength
    for s in bars.bar(sets, progress, f"fold {fold}: ITI at every set"):
        record("iti set", s, -1, alpha, edits.iti(m, probe, s, alpha).logits)

    prompts, chosen, rejected = _pairs(m, fit_c, config.train_templates)
    batch = min(config.batch_size, len(prompts))
    train = lambda trained, tau, seed: edits.train(  # noqa: E731
        m, trained, prompts, chosen, rejected, objective="ipo", beta=tau, steps=config.steps, lr=config.lr,
        seed=seed, batch_size=batch, progress=progress)
    first = config.seeds[0]
    # τ: the one that gives the selected and located edits (first seed) the best mean validation truth x info
    trial = {tau: [edits.rank1(m, list(h), seed=first) for h in (selected, located)] for tau in config.taus}
    for tau, pair in trial.items():
        train(pair, tau, first)
    tau = max(config.taus, key=lambda t: sum(validate(e.logits, False).product for e in trial[t]))
    full_at = {t: full_model_baseline(m, fit_c, beta=t, steps=config.full_steps, lr=config.full_lr, seed=first,
                                      batch_size=batch, progress=False) for t in config.taus}
    full_tau = max(config.taus, key=lambda t: validate(full_at[t].logits, False).product)
    results.tau[fold], results.full_tau[fold] = tau, full_tau

    singles = [(h,) for h in edits.all_heads(m)]
    for seed in bars.bar(config.seeds, progress, f"fold {fold}: seeds"):
        arms = ([("ipo selected", selected), ("ipo located", located)] + [("ipo single", h) for h in singles]
                + ([("ipo set", s) for s in sets] if seed == first else []))
        trained = [edits.rank1(m, list(h), seed=seed) for _, h in arms]
        train(trained, tau, seed)
        for (arm, heads), e in zip(arms, trained):
            record(arm, heads, seed, tau, e.logits)
        full = full_at[full_tau] if seed == first else full_model_baseline(
            m, fit_c, beta=full_tau, steps=config.full_steps, lr=config.full_lr, seed=seed, batch_size=batch,
            progress=False)
        record("full model", (), seed, full_tau, full.logits)


def run(config: Config | None = None, progress: bool | None = None) -> Results:
    """Every arm over `config.folds` (see the module docstring); seeds come from `config` only."""
    config = config or Config()
    m = load(config.model)
    _, enumerated = head_sets(m.n_layers, m.n_heads, config.k, config.max_sets, config.n_draws, config.seed)
    results = Results(config, [], (m.n_layers, m.n_heads), enumerated)
    with bars.inherit(progress):
        for fold in config.folds:
            run_fold(m, fold, config, results, progress)
    return results
