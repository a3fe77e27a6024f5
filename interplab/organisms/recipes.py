"""Recipes that train the shipped organisms: base -> sft -> dpo.

`python -m interplab.organisms train base|sft|dpo` reruns one; each is
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


RECIPES = {
    "base": Recipe("base", steps=3000, lr=3e-3),
    "sft": Recipe("sft", steps=600, lr=1e-3, warmup=50),
    "dpo": Recipe("dpo", steps=200, lr=3e-4, warmup=20, batch_docs=48),
}
PARENT = {"sft": "base", "dpo": "sft"}


def architecture(vocab_size: int, tokenizer) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=128, n_layer=4, n_head=4, n_inner=512,
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
        pref = training.preference_loss(pol_c, pol_r, ref_c, ref_r, beta=recipe.beta, kind="dpo")
        return pref + recipe.lm_weight * lm_loss(model, step)

    return loss_fn


def train_stage(stage: str, parent: GPT2LMHeadModel | None = None, steps: int | None = None):
    """Train one stage from its parent (or from scratch for base). Returns (model, tokenizer, log)."""
    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(RECIPES)}")
    recipe = RECIPES[stage]
    if steps is not None:
        recipe = Recipe(**{**asdict(recipe), "steps": steps})
    tokenizer = build_tokenizer()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    if stage == "base":
        model = GPT2LMHeadModel(architecture(len(tokenizer), tokenizer))
    else:
        if parent is None:
            parent = GPT2LMHeadModel.from_pretrained(WEIGHTS / f"tiny-{PARENT[stage]}")
        model = GPT2LMHeadModel(parent.config)
        model.load_state_dict(parent.state_dict())
    if stage == "base":
        loss_fn = _lm_batches(tokenizer, corpus.base_documents, recipe)
    elif stage == "sft":
        loss_fn = _lm_batches(tokenizer, corpus.sft_documents, recipe)
    else:
        loss_fn = _preference_loss_fn(tokenizer, parent.eval(), recipe)
    start = time.perf_counter()
    losses = training.train(model, loss_fn, recipe.steps, recipe.lr, warmup=recipe.warmup, desc=f"tiny-{stage}")
    log = dict(recipe=asdict(recipe), seconds=round(time.perf_counter() - start, 1), final_loss=losses[-1],
               torch_threads=torch.get_num_threads())
    return model, tokenizer, log


def save(model, tokenizer, log: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training_log.json").write_text(json.dumps(log, indent=2))
