"""Tables of issue 20's edit experiment (`edit_controls`), and the command that prints them:

    python -m interplab.experiments.edit_tables [--small] [--model NAME] [--seeds 0 1 2] [--folds 0 1 2 3]
    python -m interplab.experiments.edit_tables --folds 0 --out reports/edits-fold0.pt   # one process a fold,
    python -m interplab.experiments.edit_tables --merge reports/edits-fold*.pt           # then the pooled tables

Truth is held-out preference accuracy (the share of prompts where log p(true colour) > log p(misconception)),
on three splits: `creatures` (held-out creatures, training templates), `templates` (the fit creatures,
held-out templates) and `both` (held-out creatures, held-out templates). Intervals are 95% hierarchical
bootstraps (`stats.hierarchical_ci`): training seeds, then creatures within folds, so they include seed
variance and the fact that a fold's creatures share one edit. Every table starts with the unedited model.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats

from ..components import parse
from ..stats import hierarchical_ci, hierarchical_diff_ci, standing
from .edit_controls import Config, Results, Run, run

SPLITS = ("creatures", "templates", "both")


def _truth(run: Run, split: str, config: Config) -> np.ndarray:
    """Per-creature truth `[n]` of one run on `split` (creatures in the evaluation's order)."""
    e = run.seen if split == "templates" else run.test
    keep = torch.ones_like(e.template, dtype=torch.bool) if split == "templates" else torch.isin(
        e.template, torch.tensor(config.train_templates if split == "creatures" else config.held_out_templates))
    correct = (e.margin > 0).float()
    creatures = e.creature[keep].unique()
    return np.array([correct[keep & (e.creature == c)].mean().item() for c in creatures])


def matrix(runs: list[Run], split: str, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """`(values [seeds, units], folds [units])` of the runs of one arm: each seed's per-creature truth,
    pooled over folds."""
    by_seed: dict[int, list[Run]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    if not by_seed or any(sorted(r.fold for r in rs) != sorted(config.folds) for rs in by_seed.values()):
        raise ValueError("every seed of an arm needs exactly one run per fold")
    rows, groups = [], None
    for seed in sorted(by_seed):
        parts = [_truth(r, split, config) for r in sorted(by_seed[seed], key=lambda r: r.fold)]
        rows.append(np.concatenate(parts))
        groups = np.concatenate([np.full(len(p), r.fold) for p, r in zip(parts, sorted(by_seed[seed],
                                                                                     key=lambda r: r.fold))])
    return np.stack(rows), groups


def _mean_of(matrices: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over arms (sets or heads) of their matrices, seed by seed (all have the same seeds)."""
    return np.mean([v for v, _ in matrices], axis=0), matrices[0][1]


def arm_row(name: str, values: np.ndarray, groups: np.ndarray, **extra) -> dict:
    mean, lo, hi = hierarchical_ci(values, groups)
    return dict(arm=name, seeds=values.shape[0], truth=mean, lo=lo, hi=hi, **extra)


def _sorted(head_sets) -> list[tuple]:
    """Head-name tuples in layer-major order (a2.h0 before a10.h0)."""
    return sorted(head_sets, key=lambda heads: [parse(h) for h in heads])


def _runs(results: Results, arm: str, heads=None) -> list[Run]:
    runs = results.select(arm, heads)
    if not runs:
        raise KeyError(f"no runs for arm {arm!r} heads {heads}")
    return runs


def _info(runs: list[Run]) -> dict:
    return dict(lm_delta=float(np.mean([r.test.lm_delta for r in runs])),
                kl=float(np.mean([r.test.kl for r in runs])))


def main_table(results: Results) -> list[dict]:
    """Each arm's truth on the three splits, with hierarchical intervals, α/τ as chosen on validation."""
    c = results.config
    arms = [("unedited", None), ("iti selected", None), ("iti located", None), ("ipo selected", None),
            ("ipo located", None), ("full model", None)]
    rows = []
    for arm, _ in arms:
        runs = _runs(results, arm)
        row = dict(arm=arm, param=" ".join(sorted({f"{r.param:g}" for r in runs})), **_info(runs))
        for split in SPLITS:
            v, g = matrix(runs, split, c)
            mean, lo, hi = hierarchical_ci(v, g)
            row.update({"seeds": v.shape[0], split: mean, f"{split}_lo": lo, f"{split}_hi": hi})
        rows.append(row)
    for arm, label in (("ipo single", "ipo single heads (mean)"), ("ipo set", "ipo k-head sets (mean)"),
                       ("iti set", "iti k-head sets (mean)")):
        keys = _sorted({r.heads for r in results.select(arm)})
        runs = results.select(arm)
        row = dict(arm=label, param=f"{len(keys)} x", **_info(runs))
        for split in SPLITS:
            v, g = _mean_of([matrix(_runs(results, arm, h), split, c) for h in keys])
            mean, lo, hi = hierarchical_ci(v, g)
            row.update({"seeds": v.shape[0], split: mean, f"{split}_lo": lo, f"{split}_hi": hi})
        rows.append(row)
    return rows


def single_truth(results: Results, split: str = "creatures") -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{(head,): matrix} of every single-head edit."""
    return {h: matrix(_runs(results, "ipo single", h), split, results.config)
            for h in _sorted({r.heads for r in results.select("ipo single")})}


def dominant_layer(results: Results) -> int:
    """The layer whose single-head edits have the highest mean held-out truth (creatures split)."""
    per_layer: dict[int, list[float]] = {}
    for heads, (v, _) in single_truth(results).items():
        per_layer.setdefault(parse(heads[0])[0], []).append(v.mean())
    return max(per_layer, key=lambda layer: np.mean(per_layer[layer]))


def single_table(results: Results) -> tuple[list[dict], dict]:
    """Every single head (truth with interval, probe accuracy, whether it is not significantly below the
    full model), then per-layer means and the heads outside the dominant layer; and Spearman(probe
    accuracy, truth)."""
    c = results.config
    full = matrix(_runs(results, "full model"), "creatures", c)[0]
    base = matrix(_runs(results, "unedited"), "creatures", c)
    accuracy = torch.stack([s.values for s in results.probe_accuracy.values()]).mean(0)  # [layers, heads]
    truth = single_truth(results)
    rows = [arm_row("unedited", *base), arm_row("full model", full, base[1])]
    for heads, (v, g) in truth.items():
        hi = hierarchical_diff_ci(v, full, g)[2]
        layer, head = parse(heads[0])
        rows.append(arm_row(heads[0], v, g, layer=layer, probe_accuracy=accuracy[layer, head].item(),
                            reach_full=bool(hi >= 0)))
    dominant = dominant_layer(results)
    for name, keep in ([(f"layer {layer} heads (mean)", lambda h, L=layer: parse(h[0])[0] == L)
                        for layer in range(results.n_heads[0])]
                       + [(f"heads outside layer {dominant} (mean)", lambda h: parse(h[0])[0] != dominant)]):
        chosen = [m for h, m in truth.items() if keep(h)]
        v, g = _mean_of(chosen)
        best = max(m[0].mean() for m in chosen)
        rows.append(arm_row(name, v, g, best=float(best), heads=len(chosen)))
    single_rows = [r for r in rows if "probe_accuracy" in r]
    with warnings.catch_warnings():  # constant truth (no edit flips a prompt) gives nan, reported as such
        warnings.simplefilter("ignore", scipy_stats.ConstantInputWarning)
        rho = scipy_stats.spearmanr([r["probe_accuracy"] for r in single_rows], [r["truth"] for r in single_rows])
    return rows, dict(dominant=dominant, rho=float(rho.statistic), p=float(rho.pvalue))


def sets_table(results: Results, method: str = "ipo") -> list[dict]:
    """The k-head sets (`method` "ipo" or "iti"): all of them, those touching each layer, and those without
    the dominant layer; their mean truth, 2.5-97.5 percentile range over sets, and where the selected and
    located heads stand among them (percentile, one-sided p). For IPO also the share of sets not
    significantly below the full model (first seed against every seed)."""
    c = results.config
    first = c.seeds[0]
    keys = _sorted({r.heads for r in results.select(f"{method} set")})
    sets = {h: matrix(_runs(results, f"{method} set", h), "creatures", c) for h in keys}
    reference = {where: matrix([r for r in _runs(results, f"{method} {where}") if r.seed in (first, -1)],
                               "creatures", c)[0].mean() for where in ("selected", "located")}
    full = matrix(_runs(results, "full model"), "creatures", c)[0] if method == "ipo" else None
    base = matrix(_runs(results, "unedited"), "creatures", c)
    rows = [arm_row("unedited", *base)]
    dominant = dominant_layer(results)
    groups = ([(f"all {len(keys)} sets" + ("" if results.sets_enumerated else " drawn"), lambda h: True)]
              + [(f"sets touching layer {layer}", lambda h, L=layer: any(parse(x)[0] == L for x in h))
                 for layer in range(results.n_heads[0])]
              + [(f"sets without layer {dominant}", lambda h: all(parse(x)[0] != dominant for x in h))])
    for name, keep in groups:
        chosen = [h for h in keys if keep(h)]
        if not chosen:
            rows.append(dict(arm=f"{method} {name}", sets=0))
            continue
        truth = np.array([sets[h][0].mean() for h in chosen])
        row = dict(arm=f"{method} {name}", sets=len(chosen), truth=float(truth.mean()),
                   lo=float(np.percentile(truth, 2.5)), hi=float(np.percentile(truth, 97.5)))
        for where, value in reference.items():
            row[f"{where}"], (row[f"{where}_pct"], row[f"{where}_p"]) = float(value), standing(value, truth)
        if full is not None:
            row["reach_full"] = float(np.mean([hierarchical_diff_ci(sets[h][0], full, sets[h][1])[2] >= 0
                                               for h in chosen]))
        rows.append(row)
    return rows


def format_rows(rows: list[dict], columns: list[str], digits: int = 2) -> str:
    """A plain-text table of `columns` (missing values blank)."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


class Table:
    """`format_rows` for a notebook: an HTML table there (a wide table scrolls instead of wrapping its lines),
    the same text as `format_rows` when printed."""

    def __init__(self, rows: list[dict], columns: list[str], digits: int = 2):
        self.rows, self.columns, self.digits = rows, columns, digits

    def __str__(self) -> str:
        return format_rows(self.rows, self.columns, self.digits)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cell = lambda v: f"{v:.{self.digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(cell(r.get(c, '')))}</td>" for c in self.columns) + "</tr>"
                       for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report(results: Results) -> str:
    """Every table as plain text, as `python -m interplab.experiments.edit_tables` prints it."""
    c = results.config
    singles, rho = single_table(results)
    ci = lambda s: [s, f"{s}_lo", f"{s}_hi"]  # noqa: E731
    parts = [
        str(c),
        f"heads: {results.n_heads[0]} layers x {results.n_heads[1]}; k-head sets "
        + ("all enumerated" if results.sets_enumerated else f"{c.n_draws} distinct draws"),
        "selected (probe top-k, fit creatures): " + str({f: list(v) for f, v in results.selected.items()}),
        "located (patching top-k, fit creatures): " + str({f: list(v) for f, v in results.located.items()}),
        f"alpha chosen on validation creatures: {results.alpha}; tau: {results.tau}; "
        f"full-model tau: {results.full_tau}",
        "\nTable 1: every arm, truth on held-out creatures / held-out templates / both (95% hierarchical CI)",
        format_rows(main_table(results), ["arm", "seeds", "param", *ci("creatures"), *ci("templates"),
                                          *ci("both"), "lm_delta", "kl"]),
        "\nTable 2: IPO at k-head sets (held-out creatures), by layer and without the dominant layer",
        format_rows(sets_table(results, "ipo"), ["arm", "sets", "seeds", "truth", "lo", "hi", "selected",
                                                 "selected_pct", "selected_p", "located", "located_pct",
                                                 "located_p", "reach_full"]),
        "\nTable 3: ITI at k-head sets (selected heads' alpha), same layout",
        format_rows(sets_table(results, "iti"), ["arm", "sets", "seeds", "truth", "lo", "hi", "selected",
                                                 "selected_pct", "selected_p", "located", "located_pct",
                                                 "located_p"]),
        f"\nTable 4: IPO at every single head (held-out creatures); dominant layer {rho['dominant']}",
        format_rows(singles, ["arm", "seeds", "truth", "lo", "hi", "probe_accuracy", "reach_full", "heads",
                              "best"]),
        f"Spearman(probe accuracy, single-head truth) = {rho['rho']:+.2f} (p = {rho['p']:.2f})",
    ]
    return "\n".join(parts)


def merge(parts: list[Results]) -> Results:
    """One `Results` from runs of the same configuration on different folds (separate processes)."""
    first = parts[0]
    folds = [f for p in parts for f in p.config.folds]
    if len(set(folds)) != len(folds):
        raise ValueError(f"each fold must come from one part only, got folds {folds}")
    if any(replace(p.config, folds=first.config.folds) != first.config or p.n_heads != first.n_heads
           for p in parts):
        raise ValueError("the parts differ in more than their folds; merge runs of one configuration")
    merged = Results(replace(first.config, folds=tuple(sorted(folds))), [], first.n_heads, first.sets_enumerated)
    for p in parts:
        merged.runs += p.runs
        for name in ("probe_accuracy", "patching", "selected", "located", "alpha", "tau", "full_tau"):
            getattr(merged, name).update(getattr(p, name))
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the small configuration (Config.small())")
    parser.add_argument("--model", help="the unedited organism (default: Config's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: Config's)")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to run (default: Config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="also save the results (torch.save) to this file, for --merge")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="print the pooled tables of saved results")
    args = parser.parse_args(argv)
    if args.merge:
        print(report(merge([torch.load(path, weights_only=False) for path in args.merge])))
        return
    torch.set_num_threads(args.threads)
    changes = {k: v for k, v in (("model", args.model), ("seeds", args.seeds and tuple(args.seeds)),
                                 ("folds", args.folds and tuple(args.folds))) if v}
    config = Config.small(**changes) if args.small else Config(**changes)
    start = time.perf_counter()
    results = run(config)
    print(report(results))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
