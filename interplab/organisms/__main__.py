"""`python -m interplab.organisms train base|sft|dpo|mid [--steps N] [--out DIR]`,
`python -m interplab.organisms evaluate` (the organism card's numbers),
`python -m interplab.organisms premises` (mid-base's and its series' premises, issue 20) and
`python -m interplab.organisms series [--seed S] [--ship [--ends-only]] [--steps N] [--out DIR]`
(the free-evolution checkpoint series; `--ship` rewrites the shipped one, `weights/series/seed<S>`)."""

import argparse
from pathlib import Path

from .recipes import RECIPES, WEIGHTS, save, train_stage

parser = argparse.ArgumentParser(prog="python -m interplab.organisms")
sub = parser.add_subparsers(dest="command", required=True)
train = sub.add_parser("train", help="retrain one organism stage from its recipe")
train.add_argument("stage", choices=list(RECIPES))
train.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
train.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped weights)")
sub.add_parser("evaluate", help="print the behaviour of every shipped organism")
sub.add_parser("premises", help="print the premises of mid-base and its checkpoint series (issue 20)")
series = sub.add_parser("series", help="train the free-evolution checkpoint series")
series.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
series.add_argument("--steps", type=int, default=None, help="override the series recipe's step count")
series.add_argument("--ship", action="store_true", help="write to the shipped folder weights/series/seed<S>")
series.add_argument("--ends-only", action="store_true", help="keep only the first and last checkpoints")
series.add_argument("--out", type=Path, default=None, help="output folder (default: the cache, see series.py)")
args = parser.parse_args()

if args.command == "train":
    model, tokenizer, log = train_stage(args.stage, steps=args.steps)
    out = args.out or RECIPES[args.stage].folder
    save(model, tokenizer, log, out)
    print(f"saved {RECIPES[args.stage].folder.name} to {out} in {log['seconds']} s (final loss {log['final_loss']:.3f})")
elif args.command == "series":
    from dataclasses import replace

    from .series import SeriesRecipe, shipped_folder, train as train_series

    if args.ship and args.out is not None:
        parser.error("--ship writes the shipped folder; drop --out")
    recipe = replace(SeriesRecipe(), seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
    steps = recipe.checkpoint_steps()
    keep = [steps[0], steps[-1]] if args.ends_only else steps
    out = train_series(recipe, shipped_folder(args.seed) if args.ship else args.out, keep=keep)
    print(f"saved the series (steps {keep}) to {out}")
elif args.command == "premises":
    import torch

    from .. import load
    from ..experiments import premises
    from . import series, truth

    torch.set_num_threads(1)
    print("\n".join(premises.base_report(load(truth.MODEL), series.TARGET)))
    print("\n".join(premises.series_report({s: series.load(seed=s) for s in (0, 1, 2)}, series.TARGET)))
else:
    from ..experiments.behaviour import behaviour_table, format_table

    print(format_table(behaviour_table(("base", "sft", "dpo"))))
