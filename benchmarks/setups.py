"""The models every benchmark runs on: tiny-base and a random GPT-2-small-shaped model.

Each setup is `(name, m, raw, task)`: the interplab `Model`, a separate plain
`transformers` copy with the same weights for the raw-PyTorch baselines, and a task.
"""

from __future__ import annotations

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab.model import ORGANISM_DIR
from interplab.organisms.tokenizer import build_tokenizer


def tiny_base(n: int):
    folder = ORGANISM_DIR / "tiny-base"
    m = il.load("interplab/tiny-base")
    raw = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return "tiny-base (IOI)", m, raw, il.tasks.make("ioi", m, n=n, seed=0)


def gpt2_small_shaped(n: int, seq: int):
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=64)
    torch.manual_seed(0)
    raw = GPT2LMHeadModel(config).eval()
    torch.manual_seed(0)
    m = il.load(GPT2LMHeadModel(config), tokenizer=build_tokenizer())  # same weights, wrapped by nnsight
    return "GPT-2-small shape (12L, 12H, 768, random)", m, raw, il.tasks.random_tokens(m, n=n, seq=seq)
