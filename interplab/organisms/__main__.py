"""`python -m interplab.organisms train base|sft|dpo [--steps N] [--out DIR]`
and `python -m interplab.organisms evaluate` (the organism card's numbers)."""

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
args = parser.parse_args()

if args.command == "train":
    model, tokenizer, log = train_stage(args.stage, steps=args.steps)
    out = args.out or WEIGHTS / f"tiny-{args.stage}"
    save(model, tokenizer, log, out)
    print(f"saved tiny-{args.stage} to {out} in {log['seconds']} s (final loss {log['final_loss']:.3f})")
else:
    from .evaluate import behaviour_table, format_table

    print(format_table(behaviour_table(tuple(RECIPES))))
