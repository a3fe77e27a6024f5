"""The experiments of notebook 05 (Wang & Veitch on the organism): located, random and single-head edits.

`run(Config())` returns `Results`; `experiment1..4` turn them into tables. Per fold, on its
training creatures only, ITI's probes pick the top-k heads ("selected"),
activation patching on `truth_task` picks another top-k ("located"), and
seeded random k-head sets are drawn; ITI is scored at every α (with random
directions at the selected heads as a control), optimized edits (`edits.rank1`
with IPO) are trained at the selected, located and random sets and at every
single head in one batched loop, and the whole model is IPO-tuned as the
baseline. Random draws are summarised by their spread and by where the
selected set stands among them (`standing`); arms by bootstrap intervals over
creatures (`bootstrap_ci`, `paired_diff_ci`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from . import edits, patching, probes
from .model import load
from .organisms import words as W
from .scores import Scores
from .tasks import Task
from .truthfulness import (
    TEMPLATES, Evaluation, Evaluator, bootstrap_ci, check_creatures, colour_ids, folds, full_model_baseline,
    paired_diff_ci, pairs, standing, statements,
)

def truth_task(m, creatures) -> Task:
    """A patching task for the truth behaviour: clean `In truth, the X is` (the model says the true colour),
    corrupt `Many people say the X is` (it says the misconception); answer = true colour, wrong = misconception.

    The two prompts have the same token length, so patching pairs them position by position.
    """
    creatures = check_creatures(creatures)
    clean = [f"In truth, the {W.CREATURES[i]} is" for i in creatures]
    corrupt = [f"Many people say the {W.CREATURES[i]} is" for i in creatures]
    true, false = colour_ids(m, creatures)
    task = Task("truth", m.to_tokens(clean), m.to_tokens(corrupt), true, false, clean, corrupt)
    task.check_paired()
    return task


@dataclass
class Config:
    """One run of the experiments. `Config()` is the full run (4 folds); `Config.small()` the notebook's.

    k: heads per located or random set. n_random: random head sets (and random directions) for ITI;
    n_random_ipo: random head sets for the optimized edits. alphas: ITI strengths; taus: IPO τ (= β of
    `training.preference_loss`, target log-ratio margin 1/(2τ)) for the trade-off curves, `tau` the main one.
    edit: the optimized edit's kind (`edits.rank1`, Wang & Veitch's; or "vector", "lofit").
    """

    model: str = "interplab/tiny-sft"
    folds: tuple[int, ...] = (0, 1, 2, 3)
    k: int = 2
    n_random: int = 16
    n_random_ipo: int = 16
    alphas: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 40.0)
    taus: tuple[float, ...] = (0.1, 0.05, 0.025)
    tau: float = 0.025
    edit: str = "rank1"
    steps: int = 100
    lr: float = 1e-2
    full_steps: int = 100
    full_lr: float = 3e-4
    task_n: int = 48
    seed: int = 0

    @classmethod
    def small(cls) -> "Config":
        """The notebook's configuration: the shipped split only (fold 3), fewer IPO draws and steps."""
        return cls(folds=(3,), n_random_ipo=8, steps=60, full_steps=60, task_n=24)


@dataclass
class Run:
    """One scored edit (or model): `arm` names the experiment arm, `draw` the random draw (-1 if none),
    `param` its α (ITI) or τ (IPO), `fold` the fold it was trained and scored on."""

    arm: str
    heads: tuple
    draw: int
    param: float
    fold: int
    evaluation: Evaluation


@dataclass
class Results:
    """Every run of `run(config)`, with what each fold located: probe accuracy and patching Scores."""

    config: Config
    runs: list[Run]
    probe_accuracy: dict[int, Scores]
    patching: dict[int, Scores]
    selected: dict[int, list]
    located: dict[int, list]

    def select(self, arm: str, param: float | None = None, draw: int | None = None) -> list[Run]:
        return [r for r in self.runs if r.arm == arm and (param is None or r.param == param)
                and (draw is None or r.draw == draw)]

    def pooled(self, arm: str, param: float | None = None, draw: int = -1) -> Evaluation:
        """The arm's evaluation pooled over folds (every fold's held-out creatures)."""
        runs = self.select(arm, param, draw)
        if not runs:
            raise KeyError(f"no runs for arm={arm!r}, param={param}, draw={draw}")
        return Evaluation.concat([r.evaluation for r in sorted(runs, key=lambda r: r.fold)])

    def draws(self, arm: str, param: float | None = None) -> list[Evaluation]:
        """One pooled evaluation per random draw of `arm`."""
        return [self.pooled(arm, param, d) for d in sorted({r.draw for r in self.select(arm, param)})]

    def silent(self) -> list[Run]:
        """Runs whose edit did not fire (KL from the unedited model is 0 on neutral text)."""
        return [r for r in self.runs if r.evaluation.kl <= 0]


def _iti_probe(m, train_creatures, seed: int):
    """ITI's per-head probes on the training creatures' true and false statements (every template)."""

    parts = [statements(m, train_creatures, t) for t in TEMPLATES]
    x = torch.cat([probes.collect(m, tok, site="heads") for tok, _, _ in parts])
    labels, groups = torch.cat([y for _, y, _ in parts]), torch.cat([g for _, _, g in parts])
    return edits.fit_iti_activations(x, labels, groups, seed=seed)


def random_direction_edit(m, probe, heads, alpha: float, seed: int):
    """ITI's strength `alpha * sigma_h` at `heads`, along a random unit direction per head (seeded)."""

    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    for h in heads:
        u = torch.randn(m.d_head, generator=gen)
        vectors[h] = alpha * probe.sigma[h] * u / u.norm()
    return edits.additive(m, vectors)


def run_fold(m, fold: int, config: Config, progress: bool = True) -> tuple[list[Run], dict]:
    """Every arm on one fold: probes, patching and the edits are fit on its training creatures only."""

    train_creatures, test_creatures = folds()[fold]
    ev = Evaluator(m, test_creatures, task_n=config.task_n)
    probe = _iti_probe(m, train_creatures, config.seed)
    selected = probe.top(config.k)
    scores = patching.heads(m, truth_task(m, train_creatures), progress=False)
    located = edits.top_k(scores, config.k)
    randoms = [edits.random_heads(m, config.k, seed=config.seed + d) for d in range(config.n_random)]
    runs = []
    record = lambda arm, heads, draw, param, fn, tasks=False: runs.append(
        Run(arm, tuple(heads), draw, param, fold, ev(fn, tasks=tasks)))

    record("unedited", (), -1, 0.0, m.logits, tasks=True)
    for alpha in tqdm(config.alphas, desc=f"fold {fold}: ITI", disable=not progress):
        record("iti selected", selected, -1, alpha, edits.iti(m, probe, selected, alpha).logits, tasks=True)
        record("iti located", located, -1, alpha, edits.iti(m, probe, located, alpha).logits, tasks=True)
        for d, heads in enumerate(randoms):
            record("iti random heads", heads, d, alpha, edits.iti(m, probe, heads, alpha).logits)
            seed = config.seed + 1000 + d
            direction = random_direction_edit(m, probe, selected, alpha, seed)
            record("iti random direction", selected, d, alpha, direction.logits)

    data = pairs(m, train_creatures)
    build = getattr(edits, config.edit)
    arms = ([("ipo selected", selected, -1), ("ipo located", located, -1)]
            + [("ipo random heads", h, d) for d, h in enumerate(randoms[: config.n_random_ipo])]
            + [("ipo single head", h, -1) for h in edits.single_heads(m)])
    for tau in config.taus:
        todo = arms if tau == config.tau else arms[:1]  # the τ curve: the selected heads only
        trained = [build(m, list(heads)) for _, heads, _ in todo]
        edits.train(m, trained, data.prompts, data.chosen, data.rejected, kind="ipo", beta=tau, steps=config.steps,
                    lr=config.lr, seed=config.seed, progress=progress)
        for (arm, heads, draw), e in zip(todo, trained):
            record(arm, heads, draw, tau, e.logits, tasks=arm != "ipo random heads")
        full = full_model_baseline(m, train_creatures, beta=tau, steps=config.full_steps, lr=config.full_lr,
                                   seed=config.seed)
        record("full model ipo", (), -1, tau, full.logits, tasks=True)
    located_info = dict(probe_accuracy=probe.accuracy, patching=scores, selected=selected, located=located)
    return runs, located_info


def run(config: Config | None = None, progress: bool = True) -> Results:
    """All experiments of notebook 05 over `config.folds` (see `Config`)."""

    config = config or Config()
    torch.manual_seed(config.seed)
    m = load(config.model)
    runs, found = [], {}
    for fold in config.folds:
        fold_runs, found[fold] = run_fold(m, fold, config, progress)
        runs += fold_runs
    pick = lambda key: {f: v[key] for f, v in found.items()}
    return Results(config, runs, pick("probe_accuracy"), pick("patching"), pick("selected"), pick("located"))


# ---- tables: what each experiment shows, with intervals ----



def arm_row(name: str, e: Evaluation, seed: int = 0) -> dict:
    """One table row: the pooled scores of an arm with the bootstrap interval of its truth."""
    lo, hi = bootstrap_ci(e.per_creature("truth")[1].numpy(), seed=seed)
    return dict(arm=name, n=len(e.margin), **e.summary(), truth_lo=lo, truth_hi=hi)


def draws_row(name: str, draws: list[Evaluation], reference: Evaluation | None = None) -> dict:
    """Random draws summarised: mean truth and product, their 2.5-97.5 percentile range over draws, and
    where `reference` (e.g. the selected heads) stands among them (percentile, p) on truth and product."""
    truth, product = np.array([d.truth for d in draws]), np.array([d.product for d in draws])
    row = dict(arm=name, draws=len(draws), truth=truth.mean(), truth_lo=np.percentile(truth, 2.5),
               truth_hi=np.percentile(truth, 97.5), product=product.mean(),
               product_lo=np.percentile(product, 2.5), product_hi=np.percentile(product, 97.5),
               kl_min=min(d.kl for d in draws))
    if reference is not None:
        row["truth_pct"], row["truth_p"] = standing(reference.truth, truth)
        row["product_pct"], row["product_p"] = standing(reference.product, product)
    return row


def best_alpha(results: Results, arm: str = "iti selected") -> float:
    """The ITI strength with the best truth x info for `arm` (pooled over folds)."""
    return max(results.config.alphas, key=lambda a: results.pooled(arm, a).product)


def experiment1(results: Results) -> list[dict]:
    """ITI at the probe-selected heads against random head sets and random directions, per α."""
    rows = []
    for alpha in results.config.alphas:
        selected = results.pooled("iti selected", alpha)
        rows.append(dict(alpha=alpha, **arm_row("iti selected", selected)))
        for arm in ("iti random heads", "iti random direction"):
            rows.append(dict(alpha=alpha, **draws_row(arm, results.draws(arm, alpha), selected)))
    return rows


def experiment2(results: Results) -> list[dict]:
    """At the selected heads (and the patching-located ones): ITI at its best α against the optimized edit."""
    tau = results.config.tau
    rows = []
    for where in ("selected", "located"):
        alpha = best_alpha(results, f"iti {where}")
        rows.append(dict(param=alpha, **arm_row(f"iti {where} (α={alpha:g})", results.pooled(f"iti {where}", alpha))))
        rows.append(dict(param=tau, **arm_row(f"ipo {where} (τ={tau:g})", results.pooled(f"ipo {where}", tau))))
    return rows


def experiment3(results: Results) -> list[dict]:
    """Optimized edits at random head sets vs the selected and located sets vs the full-model baseline."""
    tau = results.config.tau
    full, selected = results.pooled("full model ipo", tau), results.pooled("ipo selected", tau)
    draws = results.draws("ipo random heads", tau)
    rows = [arm_row("full model ipo", full), arm_row("ipo selected", selected),
            arm_row("ipo located", results.pooled("ipo located", tau)),
            draws_row("ipo random heads", draws, selected)]
    reach = [paired_diff_ci(d, full)[2] >= 0 for d in draws]  # not significantly below the full model
    rows[-1]["reach_full"] = float(np.mean(reach))
    return rows


def experiment4(results: Results) -> tuple[list[dict], dict]:
    """Every single head's optimized edit against the full model; does probe accuracy predict success?

    Returns per-head rows (truth with interval, product, probe accuracy averaged over folds, and whether
    the head is not significantly below the full model) and the Spearman correlations.
    """
    tau = results.config.tau
    full = results.pooled("full model ipo", tau)
    accuracy = torch.stack([s.values for s in results.probe_accuracy.values()]).mean(0)  # (L, H)
    runs = results.select("ipo single head", tau)
    rows = []
    for heads in sorted({r.heads for r in runs}):
        head = heads[0]
        e = Evaluation.concat([r.evaluation for r in sorted(runs, key=lambda r: r.fold) if r.heads == heads])
        hi = paired_diff_ci(e, full)[2]
        rows.append(dict(probe_accuracy=accuracy[head].item(), reach_full=hi >= 0, **arm_row(_name(head), e)))
    acc = [r["probe_accuracy"] for r in rows]
    rho_t = stats.spearmanr(acc, [r["truth"] for r in rows])
    rho_p = stats.spearmanr(acc, [r["product"] for r in rows])
    return rows, dict(rho_truth=float(rho_t.statistic), p_truth=float(rho_t.pvalue),
                      rho_product=float(rho_p.statistic), p_product=float(rho_p.pvalue))


def _name(head) -> str:
    return f"a{head[0]}.h{head[1]}"


def format_rows(rows: list[dict], columns: list[str], digits: int = 2) -> str:
    """A plain-text table of `columns` (missing values blank)."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def report(results: Results) -> str:
    """Experiments 1-4 as plain-text tables, as notebook 05 prints them.

    The full run: `print(report(run(Config())))`.
    """
    rows4, rho = experiment4(results)
    parts = [
        f"{results.config}",
        "selected (probe top-k) per fold: " + str({f: [_name(h) for h in v] for f, v in results.selected.items()}),
        "located (patching top-k) per fold: " + str({f: [_name(h) for h in v] for f, v in results.located.items()}),
        "edits that did not fire (KL = 0): " + str([(r.arm, r.param) for r in results.silent() if r.arm != "unedited"]),
        "\nExperiment 1: ITI at the probe-selected heads vs random head sets and random directions",
        format_rows(experiment1(results), ["alpha", "arm", "draws", "truth", "truth_lo", "truth_hi", "product",
                                           "product_lo", "product_hi", "truth_pct", "truth_p", "product_pct",
                                           "product_p", "lm_delta"]),
        "\nExperiment 2 (and 5): ITI at its best alpha vs the optimized edit, at the selected and located heads",
        format_rows(experiment2(results), ["arm", "n", "truth", "truth_lo", "truth_hi", "margin", "mc_top1",
                                           "lm_delta", "kl", "product", "tasks_kept"]),
        "\nExperiment 3: optimized edits at random heads vs selected vs located vs the full model",
        format_rows(experiment3(results), ["arm", "draws", "truth", "truth_lo", "truth_hi", "product", "product_lo",
                                           "product_hi", "truth_pct", "truth_p", "product_pct", "product_p",
                                           "reach_full", "lm_delta"]),
        "\nExperiment 4: the optimized edit at every single head",
        format_rows(rows4, ["arm", "probe_accuracy", "truth", "truth_lo", "truth_hi", "product", "lm_delta",
                            "reach_full", "tasks_kept"]),
        f"Spearman(probe accuracy, truth) = {rho['rho_truth']:+.2f} (p = {rho['p_truth']:.2f}); "
        f"with truth x info {rho['rho_product']:+.2f} (p = {rho['p_product']:.2f})",
    ]
    return "\n".join(parts)
