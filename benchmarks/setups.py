"""The models the benchmarks run on: tiny-base, and randomly initialised models of other shapes and families.

Each setup is `(name, m, raw, task)`: the interplab `Model`, a separate plain
`transformers` copy with the same weights for the raw-PyTorch baselines, and a task.
The random models are built twice from the same seed (once wrapped, once raw), so the
two copies share weights without sharing modules; their task is `il.tasks.random_tokens`.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

import interplab as il
from interplab.model import ORGANISM_DIR
from interplab.organisms.tokenizer import build_tokenizer

# tiny-base's shape (4 layers, 4 heads, d_model 128, MLP 512, 64 positions) for the tiny NeoX and Llama
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  max_position_embeddings=64)


def tiny_base(n: int):
    folder = ORGANISM_DIR / "tiny-base"
    m = il.load("interplab/tiny-base")
    raw = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return "tiny-base (IOI)", m, raw, il.tasks.make("ioi", m, n=n, seed=0)


def _random_pair(build: Callable[[], torch.nn.Module]):
    """(interplab Model, raw copy) of `build()` called twice from seed 0: equal weights, separate modules."""
    torch.manual_seed(0)
    raw = build().eval()
    torch.manual_seed(0)
    m = il.load(build(), tokenizer=build_tokenizer())  # same weights, wrapped by nnsight (which sets eval mode)
    return m, raw


def gpt2_small_shaped(n: int, seq: int):
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=64)
    m, raw = _random_pair(lambda: GPT2LMHeadModel(config))
    return "GPT-2-small shape (12L, 12H, 768, random)", m, raw, il.tasks.random_tokens(m, n=n, seq=seq)


def tiny_neox(n: int, seq: int):
    """GPT-NeoX with parallel residual and partial rotary (a quarter of each head), vocabulary of the organisms."""
    config = GPTNeoXConfig(vocab_size=len(build_tokenizer()), rotary_pct=0.25, use_parallel_residual=True,
                           **TINY_SHAPE)
    m, raw = _random_pair(lambda: GPTNeoXForCausalLM(config))
    return "tiny NeoX (4L, 4H, 128, parallel, random)", m, raw, il.tasks.random_tokens(m, n=n, seq=seq)


def tiny_llama(n: int, seq: int):
    """Llama with grouped-query attention: 4 query heads over 2 key/value heads."""
    config = LlamaConfig(vocab_size=len(build_tokenizer()), num_key_value_heads=2, **TINY_SHAPE)
    m, raw = _random_pair(lambda: LlamaForCausalLM(config))
    return "tiny Llama (4L, 4H / 2 kv, 128, random)", m, raw, il.tasks.random_tokens(m, n=n, seq=seq)


def pythia_160m_shaped(n: int, seq: int):
    """Pythia-160m's shape: 12 layers, 12 heads, d_model 768, MLP 3072, vocab 50304, rotary on 25%, parallel."""
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, rotary_pct=0.25, use_parallel_residual=True,
                           max_position_embeddings=2048)
    m, raw = _random_pair(lambda: GPTNeoXForCausalLM(config))
    return "Pythia-160m shape (12L, 12H, 768, random)", m, raw, il.tasks.random_tokens(m, n=n, seq=seq)
