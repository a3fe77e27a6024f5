"""The update experiment's configurations and its command line.

    python -m interplab.experiments.run_updates --small    # tiny-base, 3 seeds, 12 draws per control
    python -m interplab.experiments.run_updates --full     # mid-base, 5 seeds, 40 draws per control
    python -m interplab.experiments.run_updates --full --model interplab/tiny-base --target ioi_qa

prints the table (`UpdateResult.table`) and saves every run as JSON (default `reports/updates-<config>.json`).
Notebook 03, section 4, calls `setup` and `run` with `UpdateConfig.small()`, and shows the full
configuration's shipped result (`shipped()`, the `--full` run's JSON in `experiments/results/`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import asdict, dataclass, replace

import torch

from .. import evolution, training
from ..components import MATCHES
from ..model import Model, load
from ..organisms import corpus
from ..tasks import Task, make
from .updates import Locator, LossFn, UpdateResult, foresight_scores, update_experiment


@dataclass(frozen=True)
class UpdateConfig:
    """Everything one run of the update experiment depends on.

    Fine-tuning data: `n_train` prompts of `target` (seed `train_seed`, disjoint from the evaluation seed),
    batches of `batch` in a seeded order per training seed. Evaluation: `n_eval` prompts of `target` and of
    each of `others` (seed `eval_seed`), and `heldout_docs` base documents for the KL. The locator: the
    top-`k` components by |denoising patching effect| on the target at `position`.
    """

    name: str
    model: str = "interplab/tiny-base"
    target: str = "ioi_qa"
    others: tuple[str, ...] = ("ioi", "ioi_from", "induction")
    k: int = 5
    position: str = "final"
    n_train: int = 256
    n_eval: int = 32
    heldout_docs: int = 40
    steps: int = 30
    lr: float = 3e-3
    warmup: int = 5
    batch: int = 12
    seeds: tuple[int, ...] = (0, 1, 2)
    n_random: int = 12
    controls: tuple[str, ...] = MATCHES
    relocate_every: int = 10
    train_seed: int = 100
    eval_seed: int = 1
    draw_seed: int = 0

    @classmethod
    def small(cls, **changes) -> "UpdateConfig":
        """Notebook size: 30 steps, 3 seeds per single-set arm, 12 draws per random control."""
        return replace(cls(name="small"), **changes)

    @classmethod
    def full(cls, **changes) -> "UpdateConfig":
        """mid-base; 5 seeds per single-set arm and 40 distinct draws per random control, 200 steps."""
        full = cls(name="full", model="interplab/mid-base", steps=200, batch=16, seeds=(0, 1, 2, 3, 4),
                   n_random=40, relocate_every=25)
        return replace(full, **changes)


@dataclass
class Setup:
    """What `config` prepares on a model before any training: data, evaluations, locator, foresight set."""

    make_loss: Callable[[int], LossFn]
    target: Task
    others: dict[str, Task]
    heldout: torch.Tensor  # [n, 64] base documents for the KL
    locate: Locator
    foresight: list[str]


def setup(config: UpdateConfig, m: Model) -> Setup:
    """The fine-tuning data, evaluations, locator (top-k by |patching effect| on the target) and the
    Foresight set (top-k of `foresight_scores` of the fine-tuning loss at step 0) of `config` on `m`."""
    train_task = make(config.target, m, n=config.n_train, seed=config.train_seed)
    target = make(config.target, m, n=config.n_eval, seed=config.eval_seed)
    others = {name: make(name, m, n=config.n_eval, seed=config.eval_seed) for name in config.others}
    heldout, _ = training.pack_documents(m.tokenizer, corpus.base_documents(random.Random(7), config.heldout_docs), 64)

    def make_loss(seed):
        return training.answer_loss(train_task, config.batch, seed)

    def locate(model):
        return evolution.top_components(evolution.component_scores(model, target, position=config.position), config.k)

    foresight = evolution.top_components(foresight_scores(m, make_loss(0)), config.k)
    return Setup(make_loss, target, others, heldout, locate, foresight)


def run(config: UpdateConfig, model: Model | None = None, progress: bool | None = None) -> UpdateResult:
    """Run the update experiment of `config` (on `model` if given, else `load(config.model)`)."""
    m = model if model is not None else load(config.model)
    s = setup(config, m)
    return update_experiment(m, s.make_loss, s.target, s.others, s.heldout, s.locate, s.foresight,
                             steps=config.steps, lr=config.lr, warmup=config.warmup, seeds=config.seeds,
                             n_random=config.n_random, controls=config.controls,
                             relocate_every=config.relocate_every, draw_seed=config.draw_seed, progress=progress)


RESULTS = Path(__file__).parent / "results"


def shipped(name: str = "full") -> tuple[UpdateResult, dict]:
    """The shipped result of configuration `name` and its `meta` (configuration, seconds), as `--out` wrote it."""
    path = RESULTS / f"updates-{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no shipped result {path.name}; the ones shipped: "
                                f"{sorted(p.name for p in RESULTS.glob('updates-*.json'))}")
    return UpdateResult.load(path), json.loads(path.read_text())["meta"]


def main(argv: list[str] | None = None) -> UpdateResult:
    parser = argparse.ArgumentParser(prog="python -m interplab.experiments.run_updates",
                                     description="The update experiment: every arm, every control, stated tests.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="the notebook configuration (default)")
    size.add_argument("--full", action="store_true", help="5 seeds, 40 draws per control, 200 steps")
    parser.add_argument("--model", help="organism or hub id to fine-tune (default: the configuration's)")
    parser.add_argument("--target", help="the target task's name for il.tasks.make (default: the configuration's)")
    parser.add_argument("--out", help="JSON file for every run (default reports/updates-<config>.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = UpdateConfig.full() if args.full else UpdateConfig.small()
    config = replace(config, **{key: value for key, value in (("model", args.model), ("target", args.target))
                                if value})
    print(config)
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    print(result.table())
    path = result.save(args.out or f"reports/updates-{config.name}.json", config=asdict(config), seconds=seconds)
    print(f"{seconds:.0f} s; every run saved to {path}")
    return result


if __name__ == "__main__":
    main()
