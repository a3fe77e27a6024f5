"""The free-evolution checkpoint series: tiny-base fine-tuned on a new format, checkpoints kept on the way.

Fine-tuning documents (`corpus.series_documents`): IOI sentences turned into
questions, "... to whom? A: <indirect object>" (a task whose format changes:
plain IOI becomes Q/A) and "... from whom? A: <subject>" (the planted conflict:
the same components must copy the other name when one cue word changes), and
base documents so plain IOI and induction stay there to track.

`python -m interplab.organisms series` trains it into a cache folder, one
subfolder per checkpoint in Hugging Face layout; `load()` returns
`[(label, Model), ...]`, training first if the cache is empty. Seeded, on one
thread, and in a fresh process whose kernels are pinned to AVX2 (`PINNED_NUMERICS`),
so the same recipe gives bit-identical checkpoints on any x86 machine with AVX2:
left to choose, torch and MKL use AVX-512 where the CPU has it, and 400 steps
of training amplify the last-bit differences into different checkpoints.
The cache is `$INTERPLAB_CACHE/series/<recipe hash>` (default
`~/.cache/interplab`): nothing is written into the package at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GPT2LMHeadModel

from .. import training
from . import corpus
from .recipes import WEIGHTS
from .tokenizer import build_tokenizer

if TYPE_CHECKING:
    from ..model import Model


@dataclass(frozen=True)
class SeriesRecipe:
    """How the series is trained. `n_checkpoints` log-spaced steps, always including 0 and `steps`."""

    parent: str = "base"
    steps: int = 400
    lr: float = 3e-3
    batch_docs: int = 32  # documents per step, packed into rows of seq_len
    seq_len: int = 64
    warmup: int = 20
    seed: int = 0
    n_checkpoints: int = 12
    threads: int = 1  # one thread: bit-identical results whatever the machine's core count

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


def _label(step: int) -> str:
    return f"step {step}"


# Read by torch, MKL and oneDNN when they start, hence the fresh process in `train`.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def train(recipe: SeriesRecipe = SeriesRecipe(), out: Path | None = None) -> Path:
    """Fine-tune `tiny-<parent>` by `recipe`, saving each checkpoint to `out/step_XXXXX`. Returns `out`.

    Runs in a fresh Python process with `PINNED_NUMERICS` set, so that the checkpoints do not depend
    on which vector instructions this machine has.
    """
    out = Path(out) if out is not None else folder_for(recipe)
    code = ("import json, sys; from interplab.organisms.series import SeriesRecipe, train_here; "
            "train_here(SeriesRecipe(**json.loads(sys.argv[1])), sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(recipe)), str(out)],
                          env={**os.environ, **PINNED_NUMERICS})
    if done.returncode != 0:
        raise RuntimeError(f"training the series into {out} failed (exit status {done.returncode}); "
                           "its error is printed above")
    return out


def train_here(recipe: SeriesRecipe, out: Path | str) -> None:
    """`train`'s body, in this process: bit-identical to `train` only if `PINNED_NUMERICS` were set at start."""
    out = Path(out)
    tokenizer = build_tokenizer()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    model = GPT2LMHeadModel.from_pretrained(WEIGHTS / f"tiny-{recipe.parent}")
    keep = recipe.checkpoint_steps()
    rng = random.Random(recipe.seed)

    def loss_fn(model, step):
        tokens, labels = training.pack_documents(tokenizer, corpus.series_documents(rng, recipe.batch_docs),
                                                 recipe.seq_len)
        return training.lm_loss(model, tokens, labels)

    def save(step: int):
        folder = out / f"step_{step:05d}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save(0)
    start = time.perf_counter()
    losses = training.train(model, loss_fn, recipe.steps, recipe.lr, warmup=recipe.warmup, desc="series",
                            on_step=lambda step, loss: save(step + 1) if step + 1 in keep else None)
    log = dict(recipe=asdict(recipe), steps=keep, seconds=round(time.perf_counter() - start, 1),
               losses=[round(x, 4) for x in losses], torch_threads=torch.get_num_threads(),
               cpu_capability=torch.backends.cpu.get_cpu_capability())
    (out / "series.json").write_text(json.dumps(log, indent=1))  # written last: marks the series complete


def load(recipe: SeriesRecipe | None = None, folder: Path | None = None, train_missing: bool = True,
         **overrides) -> list[tuple[str, Model]]:
    """The series as `[("step 0", Model), ..., ("step N", Model)]`, training it first if not cached.

    `overrides` replace recipe fields (`load(steps=100)`); `folder` reads a series trained elsewhere.
    """
    from ..model import load as load_model

    recipe = replace(recipe or SeriesRecipe(), **overrides)
    folder = Path(folder) if folder is not None else folder_for(recipe)
    if not (folder / "series.json").exists():
        if not train_missing:
            raise FileNotFoundError(f"no complete series in {folder}; train it with "
                                    "`python -m interplab.organisms series` or call load(train_missing=True)")
        train(recipe, folder)
    steps = json.loads((folder / "series.json").read_text())["steps"]
    return [(_label(s), load_model(folder / f"step_{s:05d}")) for s in steps]
