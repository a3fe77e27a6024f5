"""The free-evolution checkpoint series: mid-base fine-tuned towards a task it does partly, checkpoints kept.

Fine-tuning documents (`corpus.SERIES_DOCUMENTS["mid-base"]`): IOI questions
"... to whom? A: <indirect object>" (the target, `TARGET`, which mid-base
answers about half the time), "... from whom? A: <subject>" (the planted
conflict: the same components must copy the other name when one cue word
changes), and mid-base documents so plain IOI stays there as the control.

The series ships as package data, `weights/series/seed<S>/`: `series.json`
(the recipe, its parent organism, the steps, the losses) and one float16
`step_XXXXX.safetensors` per checkpoint. Step 0 is the parent organism itself,
read from its own folder (`weights/<parent>`), not stored again. `load(seed=S)`
reads a shipped series without training and writes nothing.

Training is seeded and on one thread, but not bit-identical across CPUs (AVX2
and AVX-512 kernels round differently, and 400 steps amplify that): which is
why notebook 03 reads the shipped weights. `python -m interplab.organisms series
--seed S --ship` regenerates a shipped series; a recipe that is not shipped is
trained on first `load` into `$INTERPLAB_CACHE/series/<recipe hash>` (default
`~/.cache/interplab`), in the same format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import load_file, save_file

from .. import training
from . import corpus
from .recipes import MID_SERIES, SERIES_TARGET, WEIGHTS

if TYPE_CHECKING:
    from ..model import Model

SHIPPED = WEIGHTS / "series"
STORED_DTYPE = torch.float16  # 2.5 MB per mid-base checkpoint; the checked figures are measured on these
TARGET = SERIES_TARGET  # the task the series is fine-tuned towards, a name for `il.tasks.make`


@dataclass(frozen=True)
class SeriesRecipe:
    """How a series is trained. `parent` is an organism folder under `organisms/weights/`;
    `n_checkpoints` log-spaced steps, always including 0 and `steps`. The defaults are the shipped
    series' recipe, `recipes.MID_SERIES`."""

    parent: str = MID_SERIES["parent"]
    steps: int = MID_SERIES["steps"]
    lr: float = MID_SERIES["lr"]
    batch_docs: int = MID_SERIES["batch_docs"]  # documents per step, packed into rows of seq_len
    seq_len: int = MID_SERIES["seq_len"]
    warmup: int = MID_SERIES["warmup"]
    seed: int = 0
    n_checkpoints: int = MID_SERIES["n_checkpoints"]
    threads: int = 1  # one thread: results do not depend on the machine's core count

    def checkpoint_steps(self) -> list[int]:
        """Log-spaced steps from 0 to `steps` (distinct integers, so sometimes fewer than `n_checkpoints`)."""
        if self.steps < 1 or self.n_checkpoints < 2:
            raise ValueError(f"a series needs steps >= 1 and n_checkpoints >= 2, got {self.steps}, "
                             f"{self.n_checkpoints}")
        points = [round(math.exp(i * math.log(self.steps + 1) / (self.n_checkpoints - 1))) - 1
                  for i in range(self.n_checkpoints)]
        return sorted(set(points) | {0, self.steps})

    def key(self) -> str:
        """A short hash of the recipe: its cache folder's name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """`$INTERPLAB_CACHE/series`, default `~/.cache/interplab/series`."""
    return Path(os.environ.get("INTERPLAB_CACHE", Path.home() / ".cache" / "interplab")) / "series"


def folder_for(recipe: SeriesRecipe) -> Path:
    return cache_root() / recipe.key()


def shipped_folder(seed: int) -> Path:
    return SHIPPED / f"seed{seed}"


def _label(step: int) -> str:
    return f"step {step}"


def _checkpoint_file(folder: Path, step: int) -> Path:
    return folder / f"step_{step:05d}.safetensors"


def _parent_folder(parent: str) -> Path:
    folder = WEIGHTS / parent
    if not (folder / "config.json").exists():
        known = sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").exists())
        raise FileNotFoundError(f"series parent {parent!r} is not an organism folder under {WEIGHTS}; "
                                f"known: {known}")
    return folder


def train(recipe: SeriesRecipe = SeriesRecipe(), out: Path | None = None, keep: list[int] | None = None) -> Path:
    """Fine-tune `recipe.parent` by `recipe` and write the series to `out` (default: its cache folder).

    Saves the checkpoints at `keep` (default: all of `recipe.checkpoint_steps()`) except step 0, which is
    the parent. Returns `out`.
    """
    out = Path(out) if out is not None else folder_for(recipe)
    steps = recipe.checkpoint_steps()
    keep = steps if keep is None else keep
    if not set(keep) <= set(steps) or 0 not in keep:
        raise ValueError(f"keep={keep} must include 0 and be among the recipe's checkpoint steps {steps}")
    parent = _parent_folder(recipe.parent)
    if recipe.parent not in corpus.SERIES_DOCUMENTS:
        raise ValueError(f"no fine-tuning documents for a series from {recipe.parent!r}; "
                         f"corpus.SERIES_DOCUMENTS has {sorted(corpus.SERIES_DOCUMENTS)}")
    documents = corpus.SERIES_DOCUMENTS[recipe.parent]
    tokenizer = transformers.AutoTokenizer.from_pretrained(parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)  # mid-base is stored float16
    rng = random.Random(recipe.seed)
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def loss_fn(model, step):
        tokens, labels = training.pack_documents(tokenizer, documents(rng, recipe.batch_docs), recipe.seq_len)
        return training.lm_loss(model, tokens, labels)

    def on_step(step: int, loss: float):
        if step + 1 in keep:  # named_parameters lists a tied weight once
            saved[step + 1] = {n: p.detach().to(STORED_DTYPE).clone() for n, p in model.named_parameters()}

    start = time.perf_counter()
    try:
        losses = training.train(model, loss_fn, recipe.steps, recipe.lr, warmup=recipe.warmup, desc="series",
                                on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    for step, tensors in saved.items():
        save_file(tensors, _checkpoint_file(out, step))
    log = dict(recipe=asdict(recipe), parent=recipe.parent, steps=sorted(keep), dtype=str(STORED_DTYPE),
               seconds=round(time.perf_counter() - start, 1), losses=[round(x, 4) for x in losses],
               torch=torch.__version__, transformers=transformers.__version__,
               cpu_capability=torch.backends.cpu.get_cpu_capability())
    (out / "series.json").write_text(json.dumps(log, indent=1))  # written last: marks the series complete
    return out


def read(folder: Path) -> list[tuple[str, Model]]:
    """A series written by `train`: `[("step 0", parent), ("step s", Model), ...]`, float16 weights cast
    to the parent's dtype. The parent is read once and copied per checkpoint."""
    from ..model import Model, _quiet

    folder = Path(folder)
    log = json.loads((folder / "series.json").read_text())
    parent = _parent_folder(log["parent"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(parent)
    with _quiet(True):  # no "Loading weights" bar per checkpoint
        parent_model = transformers.AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    series = []
    for step in log["steps"]:
        hf = copy.deepcopy(parent_model)  # a tied weight stays tied in the copy
        if step != 0:
            tensors = load_file(_checkpoint_file(folder, step))
            own = dict(hf.named_parameters())
            if set(tensors) != set(own):
                raise ValueError(f"{_checkpoint_file(folder, step)} does not hold {log['parent']}'s parameters "
                                 f"(differs in {sorted(set(tensors) ^ set(own))[:4]}); regenerate it with "
                                 "`python -m interplab.organisms series`")
            with torch.no_grad():
                for name, param in own.items():
                    param.copy_(tensors[name].to(param.dtype))
        name = f"{log['parent']} series seed {log['recipe']['seed']}, {_label(step)}"
        series.append((_label(step), Model(hf, tokenizer, name=name, folder=parent)))
    return series


def shipped_recipe(seed: int) -> SeriesRecipe | None:
    """The recipe of the shipped series of this seed, or None if none is shipped."""
    path = shipped_folder(seed) / "series.json"
    if not path.exists():
        return None
    recipe = json.loads(path.read_text())["recipe"]
    return SeriesRecipe(**{f.name: recipe[f.name] for f in fields(SeriesRecipe) if f.name in recipe})


def load(recipe: SeriesRecipe | None = None, folder: Path | None = None, train_missing: bool = True,
         **overrides) -> list[tuple[str, Model]]:
    """The series as `[("step 0", Model), ..., ("step N", Model)]`.

    `load()` and `load(seed=S)` read the shipped series of that seed (no training, nothing written).
    Other recipes (`load(steps=100)`: `overrides` replace recipe fields) are trained into the cache on
    first use, unless `train_missing=False`; `folder` reads a series written elsewhere by `train`.
    """
    if folder is not None:
        return read(folder)
    seed = overrides.get("seed", recipe.seed if recipe else SeriesRecipe.seed)
    shipped = shipped_recipe(seed)
    recipe = replace(recipe or shipped or SeriesRecipe(), **overrides)
    if recipe == shipped:
        return read(shipped_folder(seed))
    folder = folder_for(recipe)
    if not (folder / "series.json").exists():
        if not train_missing:
            raise FileNotFoundError(f"no complete series in {folder}; train it with "
                                    "`python -m interplab.organisms series` or call load(train_missing=True)")
        train(recipe, folder)
    return read(folder)
