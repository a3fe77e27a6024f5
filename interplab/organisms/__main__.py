"""`python -m interplab.organisms train base|sft|dpo [--steps N] [--out DIR]`,
`python -m interplab.organisms evaluate` (the organism card's numbers) and
`python -m interplab.organisms series [--steps N] [--out DIR]` (the free-evolution checkpoint series)."""

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
series = sub.add_parser("series", help="train the free-evolution checkpoint series into its cache folder")
series.add_argument("--steps", type=int, default=None, help="override the series recipe's step count")
series.add_argument("--out", type=Path, default=None, help="output folder (default: the cache, see series.py)")
args = parser.parse_args()

if args.command == "train":
    model, tokenizer, log = train_stage(args.stage, steps=args.steps)
    out = args.out or WEIGHTS / f"tiny-{args.stage}"
    save(model, tokenizer, log, out)
    print(f"saved tiny-{args.stage} to {out} in {log['seconds']} s (final loss {log['final_loss']:.3f})")
elif args.command == "series":
    from dataclasses import replace

    from .series import SeriesRecipe, train as train_series

    recipe = SeriesRecipe() if args.steps is None else replace(SeriesRecipe(), steps=args.steps)
    out = train_series(recipe, args.out)
    print(f"saved the series (steps {recipe.checkpoint_steps()}) to {out}")
else:
    from ..behaviour import behaviour_table, format_table

    print(format_table(behaviour_table(tuple(RECIPES))))
