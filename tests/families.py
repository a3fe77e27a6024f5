"""Tiny random-weight models of every supported family, built from `transformers` configs.

Hidden size 64, 2 layers, 4 query heads over 2 key/value heads where the family allows, float64, and
every norm weight and bias random (a method ignoring one of them fails). Sliding windows (4) are
shorter than the 8-token prompts the tests use, soft-caps small enough to bite, and scales far from 1,
so ignoring any `ArchSpec` field changes the numbers.
"""

import torch
import transformers as tf

import interplab as il

WINDOW = 4
_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=64, initializer_range=0.25)
_GQA = dict(_COMMON, num_key_value_heads=2)
_ROPE_HALF = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))

# name -> (config class, keyword arguments)
CONFIGS = {
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.25)),
    "neox_parallel": (tf.GPTNeoXConfig, dict(_COMMON, rotary_pct=0.5, use_parallel_residual=True)),
    "neox_sequential": (tf.GPTNeoXConfig, dict(_COMMON, rotary_pct=0.5, use_parallel_residual=False)),
    "llama": (tf.LlamaConfig, dict(_GQA, attention_bias=True, head_dim=8)),
    "mistral_window": (tf.MistralConfig, dict(_GQA, sliding_window=WINDOW)),
    "qwen2_mixed": (tf.Qwen2Config, dict(_GQA, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, dict(_GQA, head_dim=16)),
    "gemma": (tf.GemmaConfig, dict(_GQA, head_dim=16)),
    "gemma2": (tf.Gemma2Config, dict(_GQA, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                     attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
    "gemma3": (tf.Gemma3TextConfig, dict(_GQA, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
                                         query_pre_attn_scalar=8, final_logit_softcapping=2.0)),
    "olmo2": (tf.Olmo2Config, dict(_GQA)),
    "phi3": (tf.Phi3Config, dict(_GQA, pad_token_id=0, **_ROPE_HALF)),
    "phi": (tf.PhiConfig, dict(_COMMON, qk_layernorm=True, **_ROPE_HALF)),
    "gptj": (tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                 initializer_range=0.25)),
    "cohere": (tf.CohereConfig, dict(_GQA, logit_scale=0.5)),
    "granite": (tf.GraniteConfig, dict(_GQA, embedding_multiplier=3.0, residual_multiplier=0.5,
                                       attention_multiplier=0.2, logits_scaling=2.0)),
}
FAMILIES = list(CONFIGS)
# Scaled-dot-product attention has no soft-cap (transformers drops it), so Gemma 2 runs eager attention,
# as its model card asks; eager softmax is float32.
EAGER = {"gemma2"}
# HF computes these families' norms in float32 even in a float64 model (Gemma's and OLMo 2's RMSNorms and
# Cohere's LayerNorm upcast), so where interplab splits a norm over heads (post-norms) or HF runs eager
# attention, they agree with float64 references to float32 precision only.
FLOAT32_NORMS = {"gemma", "gemma2", "gemma3", "olmo2", "cohere"}


def tolerance(name: str) -> float:
    return 1e-5 if name in FLOAT32_NORMS else 1e-9


def randomize(hf: torch.nn.Module) -> torch.nn.Module:
    """Float64, with every norm weight and every bias random."""
    hf = hf.double()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return hf


def build(name: str, tokenizer, device="cpu", seed: int = 0) -> il.Model:
    """The tiny random model `name` (see `CONFIGS`) as an interplab Model on `device`."""
    torch.manual_seed(seed)
    config_class, options = CONFIGS[name]
    config = config_class(vocab_size=len(tokenizer), **options)
    if name in EAGER:
        config._attn_implementation = "eager"
    hf = randomize(tf.AutoModelForCausalLM.from_config(config))
    return il.load(hf.to(device), tokenizer=tokenizer)
