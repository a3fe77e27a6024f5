"""Recipes that train the shipped organisms: base -> sft -> dpo (`tiny-*`), and mid (`mid-base`).

`python -m interplab.organisms train base|sft|dpo|mid` reruns one; each is
seeded and deterministic on CPU, and writes a Hugging Face folder.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .. import training
from . import corpus
from .tokenizer import build_tokenizer

WEIGHTS = Path(__file__).parent / "weights"


@dataclass
class Recipe:
    stage: str
    steps: int
    lr: float
    batch_docs: int = 96  # documents per step, packed into rows of seq_len
    seq_len: int = 64
    warmup: int = 100
    seed: int = 0
    beta: float = 0.1  # preference tuning only
    lm_weight: float = 1.0  # preference tuning: weight of the SFT language-model loss kept alongside
    threads: int = 1  # one thread: bit-identical results whatever the machine's core count
    organism: str = ""  # its folder under weights/; "" means tiny-<stage>
    n_layer: int = 4
    n_head: int = 4
    stored_dtype: str = "float32"

    @property
    def folder(self) -> Path:
        return WEIGHTS / (self.organism or f"tiny-{self.stage}")


RECIPES = {
    "base": Recipe("base", steps=3000, lr=3e-3),
    "sft": Recipe("sft", steps=600, lr=1e-3, warmup=50),
    "dpo": Recipe("dpo", steps=200, lr=3e-4, warmup=20, batch_docs=48),
    # 6 layers x 8 heads of width 16: many heads, so that no one head can carry a behaviour alone.
    "mid": Recipe("mid", steps=4000, lr=3e-3, organism="mid-base", n_layer=6, n_head=8, stored_dtype="float16"),
}
PARENT = {"sft": "base", "dpo": "sft"}

# mid-base's checkpoint series (issue 20), as fields of `series.SeriesRecipe`, trained on
# `corpus.SERIES_DOCUMENTS["mid-base"]`: the target, the planted conflict and the retained control are
# the tasks below. 15 log-spaced checkpoints resolve how the target is learnt (no interval may carry
# more than half of the gain); at lr 1e-4 or 3e-4 some seeds ended below 0.9 top-1 after 400 steps.
MID_SERIES = dict(parent="mid-base", steps=400, lr=5e-4, batch_docs=32, seq_len=64, warmup=20, n_checkpoints=15)
SERIES_TARGET, SERIES_CONFLICT, SERIES_CONTROL = "ioi_qa", "ioi_from", "ioi"
FROM_SCRATCH = {"base": corpus.base_documents, "mid": corpus.mid_base_documents}


def architecture(vocab_size: int, tokenizer, n_layer: int = 4, n_head: int = 4) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=128, n_layer=n_layer, n_head=n_head, n_inner=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lm_batches(tokenizer, documents, recipe: Recipe):
    rng = random.Random(recipe.seed)

    def loss_fn(model, step):
        tokens, labels = training.pack_documents(tokenizer, documents(rng, recipe.batch_docs), recipe.seq_len)
        return training.lm_loss(model, tokens, labels)

    return loss_fn


def _preference_loss_fn(tokenizer, reference, recipe: Recipe):
    pairs = corpus.preference_pairs("train")
    encode = lambda texts: torch.tensor([tokenizer.encode(t, add_special_tokens=False) for t in texts])
    prompts = torch.cat([torch.full((len(pairs), 1), tokenizer.bos_token_id), encode([p for p, _, _ in pairs])], 1)
    chosen, rejected = encode([c for _, c, _ in pairs]), encode([r for _, _, r in pairs])
    with torch.no_grad():
        ref_c = training.sequence_logprob(reference, prompts, chosen)
        ref_r = training.sequence_logprob(reference, prompts, rejected)
    lm_loss = _lm_batches(tokenizer, corpus.sft_documents, recipe)

    def loss_fn(model, step):
        pol_c = training.sequence_logprob(model, prompts, chosen)
        pol_r = training.sequence_logprob(model, prompts, rejected)
        pref = training.preference_loss(pol_c, pol_r, ref_c, ref_r, beta=recipe.beta, objective="dpo")
        return pref + recipe.lm_weight * lm_loss(model, step)

    return loss_fn


def train_stage(stage: str, parent: GPT2LMHeadModel | None = None, steps: int | None = None, on_step=None):
    """Train one stage from its parent (or from scratch for base and mid). Returns (model, tokenizer, log).

    `on_step(step, loss)` is passed to `training.train` (e.g. to keep snapshots); it must not draw random numbers.
    """
    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(RECIPES)}")
    recipe = RECIPES[stage]
    if steps is not None:
        recipe = Recipe(**{**asdict(recipe), "steps": steps})
    tokenizer = build_tokenizer()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    if stage in FROM_SCRATCH:
        model = GPT2LMHeadModel(architecture(len(tokenizer), tokenizer, recipe.n_layer, recipe.n_head))
    else:
        if parent is None:
            parent = GPT2LMHeadModel.from_pretrained(RECIPES[PARENT[stage]].folder)
        model = GPT2LMHeadModel(parent.config)
        model.load_state_dict(parent.state_dict())
    if stage in FROM_SCRATCH:
        loss_fn = _lm_batches(tokenizer, FROM_SCRATCH[stage], recipe)
    elif stage == "sft":
        loss_fn = _lm_batches(tokenizer, corpus.sft_documents, recipe)
    else:
        loss_fn = _preference_loss_fn(tokenizer, parent.eval(), recipe)
    start = time.perf_counter()
    losses = training.train(model, loss_fn, recipe.steps, recipe.lr, warmup=recipe.warmup, desc=recipe.folder.name,
                            on_step=on_step)
    log = dict(recipe=asdict(recipe), seconds=round(time.perf_counter() - start, 1), final_loss=losses[-1],
               torch_threads=torch.get_num_threads())
    return model, tokenizer, log


def save(model, tokenizer, log: dict, folder: Path) -> None:
    """Write the model in its recipe's stored dtype (float16 for mid-base; `il.load` reads it back in float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, log["recipe"]["stored_dtype"])).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training_log.json").write_text(json.dumps(log, indent=2))
