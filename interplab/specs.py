"""Architecture specs: everything interplab needs to know about one model family, in one record.

interplab never rewrites weights into a common format. Each family gets an `ArchSpec`: dotted paths,
relative to the Hugging Face model (or to one block), of the modules an analysis reads, and the
fields that say how those modules are wired (norm placement, q/k norms, rotary style, parallel
blocks, soft-caps, logit post-processing, sliding windows). Patching, masks, edits and the edge-wise
forward read the spec; none of them branches on a family name. A new family is one new spec
appended to `SPECS`; `il.check_spec(m)` then compares interplab's forward with the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps the modules interplab needs, and how they are wired.

    Paths starting at the model root: `blocks`, `embed`, `pos_embed`, `final_norm`, `unembed`,
    `rotary_module`. Paths relative to one block: the rest. A norm path that is "" means no such norm.

    - `head_values`: the module whose *input* is the per-head values `[batch, seq, n_heads * d_head]`.
    - `conv1d`: weights stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]` (`nn.Linear`).
    - `qkv`, `qkv_layout`: one fused module or three `(q, k, v)`; "concat" is `[q | k | v]` (GPT-2,
      Phi-3; keys and values over `n_kv_heads`), "interleaved" per head `[q_h | k_h | v_h]` (NeoX),
      "separate" one module each.
    - Norms: `attn_norm`/`mlp_norm` read the residual (pre-norms; "" where absent, as in OLMo 2);
      `attn_post_norm`/`mlp_post_norm` act on the attention/MLP output before it joins the residual
      (Gemma 2/3, OLMo 2); `q_norm`/`k_norm` act on queries/keys after projection, over one head's
      `d_head` ("head": Qwen3, Gemma 3, Phi) or over all heads together ("full": OLMo 2), per
      `qk_norm_over`. A q/k norm path the block lacks (a config option) is skipped.
    - `parallel`: the MLP always reads the block input (GPT-J, Phi-2, Cohere); `parallel_flag`: a
      config attribute that makes it so (NeoX's `use_parallel_residual`).
    - Rotary: `rotary` is "" (none), "half" (rotate the two halves: NeoX, Llama) or "interleaved"
      (rotate adjacent pairs: GPT-J, Cohere); `rotary_module` returns the tables, in the order
      `rotary_table` says: "cos_sin" full width, or "sin_cos_pairs" one entry per pair (GPT-J);
      `rotary_by_layer_type` passes the layer's type (Gemma 3's local/global bases).
    - Scales read from the config (attribute names, "" for none): `embed_scale` multiplies the
      embedding (Granite; Gemma scales inside its embedding module), `residual_scale` each block's
      attention and MLP output (Granite), `attn_softcap` the attention logits as `c * tanh(x / c)`
      (Gemma 2), and the final logits: `logit_softcap` (Gemma 2), `logit_scale` (Cohere),
      `logit_divisor` (Granite).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    pos_embed: str | None
    final_norm: str
    unembed: str
    attn: str
    attn_norm: str
    head_values: str
    mlp: str
    mlp_norm: str
    mlp_out: str
    conv1d: bool = False
    qkv: tuple[str, ...] = ()
    qkv_layout: str = ""
    parallel: bool = False
    parallel_flag: str = ""
    attn_post_norm: str = ""
    mlp_post_norm: str = ""
    q_norm: str = ""
    k_norm: str = ""
    qk_norm_over: str = "head"
    rotary: str = "half"
    rotary_module: str = ""
    rotary_table: str = "cos_sin"
    rotary_by_layer_type: bool = False
    embed_scale: str = ""
    residual_scale: str = ""
    attn_softcap: str = ""
    logit_softcap: str = ""
    logit_scale: str = ""
    logit_divisor: str = ""

    # ---- layout questions: every module asks the spec, none decodes the layout itself ----

    def qkv_columns(self, which: str, unit: int, n_heads: int, n_kv_heads: int,
                    d_head: int) -> tuple[str, slice]:
        """(module path in a block, output features) of `which` ("q", "k" or "v") of head `unit`.

        `unit` is a query head for "q" and a key/value head (`kv_head`) for "k" and "v".
        """
        i = "qkv".index(which)
        span = lambda start: slice(start, start + d_head)  # noqa: E731
        if self.qkv_layout == "separate":
            return self.qkv[i], span(unit * d_head)
        if self.qkv_layout == "concat":
            offset = (0, n_heads, n_heads + n_kv_heads)[i]
            return self.qkv[0], span((offset + unit) * d_head)
        if self.qkv_layout == "interleaved" and n_kv_heads == n_heads:
            return self.qkv[0], span(unit * 3 * d_head + i * d_head)
        raise NotImplementedError(
            f"{self.family} has no usable q/k/v layout (qkv={self.qkv!r}, qkv_layout={self.qkv_layout!r}, "
            f"n_kv_heads={n_kv_heads}). Set `qkv` and `qkv_layout` in its ArchSpec (interplab/specs.py)."
        )

    def qkv_width(self, which: str, n_heads: int, n_kv_heads: int, d_head: int) -> int:
        """Output features of the projection that holds `which`: its own module, or the fused q/k/v one."""
        if self.qkv_layout == "separate":
            return (n_heads if which == "q" else n_kv_heads) * d_head
        return (n_heads + 2 * n_kv_heads) * d_head

    @staticmethod
    def kv_head(head: int, n_heads: int, n_kv_heads: int) -> int:
        """The key/value head that query head `head` reads (its group's, under grouped-query attention)."""
        return head // (n_heads // n_kv_heads)

    def weight_axes(self) -> tuple[int, int]:
        """(output axis, input axis) of a stored weight: Conv1D stores `[in, out]`, nn.Linear `[out, in]`."""
        return (1, 0) if self.conv1d else (0, 1)

    def as_linear(self, weight):
        """A stored weight (tensor or nnsight proxy) in nn.Linear orientation `[out, in]`."""
        return weight.T if self.conv1d else weight

    def is_parallel(self, config) -> bool:
        """True where the MLP reads the block input rather than the attention's output (parallel blocks)."""
        return self.parallel or (bool(self.parallel_flag) and bool(getattr(config, self.parallel_flag, False)))

    # ---- config-dependent numbers ----

    @staticmethod
    def scale(config, attribute: str) -> float | None:
        """The config's number named by a spec field (None when the field is "" or the config has none)."""
        value = getattr(config, attribute, None) if attribute else None
        return None if value is None else float(value)

    @staticmethod
    def window(config, layer: int) -> int | None:
        """The sliding window of `layer` (keys within `window` positions, itself included), or None."""
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return None
        types = getattr(config, "layer_types", None)
        if types is not None and types[layer] != "sliding_attention":
            return None
        return int(window)

    def post_process(self, config, logits):
        """The model's own final logits from the unembedding's output (tensor or nnsight proxy)."""
        scale, divisor, cap = (self.scale(config, a) for a in (self.logit_scale, self.logit_divisor,
                                                                  self.logit_softcap))
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        return softcap(logits, cap)


_LLAMA_LIKE = dict(blocks="model.layers", embed="model.embed_tokens", pos_embed=None, final_norm="model.norm",
                   unembed="lm_head", attn="self_attn", attn_norm="input_layernorm", head_values="self_attn.o_proj",
                   mlp="mlp", mlp_norm="post_attention_layernorm", mlp_out="mlp.down_proj",
                   qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv_layout="separate",
                   rotary_module="model.rotary_emb")
_GEMMA2_NORMS = dict(mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
                     mlp_post_norm="post_feedforward_layernorm")

GPT2 = ArchSpec(
    family="GPT-2", model_types=("gpt2",), blocks="transformer.h", embed="transformer.wte",
    pos_embed="transformer.wpe", final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_norm="ln_1",
    head_values="attn.c_proj", mlp="mlp", mlp_norm="ln_2", mlp_out="mlp.c_proj", conv1d=True,
    qkv=("attn.c_attn",), qkv_layout="concat", rotary="")
GPT_NEOX = ArchSpec(
    family="GPT-NeoX", model_types=("gpt_neox",), blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
    pos_embed=None, final_norm="gpt_neox.final_layer_norm", unembed="lm_head", attn="attention",
    attn_norm="input_layernorm", head_values="attention.dense", mlp="mlp", mlp_norm="post_attention_layernorm",
    mlp_out="mlp.dense_4h_to_h", qkv=("attention.query_key_value",), qkv_layout="interleaved",
    parallel_flag="use_parallel_residual", rotary_module="gpt_neox.rotary_emb")
LLAMA = ArchSpec(family="Llama (Llama, Qwen2, Mistral)", model_types=("llama", "qwen2", "mistral"), **_LLAMA_LIKE)
QWEN3 = ArchSpec(family="Qwen3", model_types=("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                 **_LLAMA_LIKE)
GEMMA = ArchSpec(family="Gemma", model_types=("gemma",), **_LLAMA_LIKE)
GEMMA2 = ArchSpec(family="Gemma 2", model_types=("gemma2",), attn_softcap="attn_logit_softcapping",
                  logit_softcap="final_logit_softcapping", **(_LLAMA_LIKE | _GEMMA2_NORMS))
GEMMA3 = ArchSpec(family="Gemma 3 (text)", model_types=("gemma3_text",), q_norm="self_attn.q_norm",
                  k_norm="self_attn.k_norm", rotary_by_layer_type=True, logit_softcap="final_logit_softcapping",
                  **(_LLAMA_LIKE | _GEMMA2_NORMS))  # its attention ignores the config's attn_logit_softcapping
OLMO2 = ArchSpec(family="OLMo 2", model_types=("olmo2",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                 qk_norm_over="full",
                 **(_LLAMA_LIKE | dict(attn_norm="", mlp_norm="", attn_post_norm="post_attention_layernorm",
                                       mlp_post_norm="post_feedforward_layernorm")))
PHI3 = ArchSpec(family="Phi-3", model_types=("phi3",),
                **(_LLAMA_LIKE | dict(qkv=("self_attn.qkv_proj",), qkv_layout="concat")))
PHI = ArchSpec(family="Phi (Phi-1, Phi-2)", model_types=("phi",), parallel=True, q_norm="self_attn.q_layernorm",
               k_norm="self_attn.k_layernorm",
               **(_LLAMA_LIKE | dict(final_norm="model.final_layernorm", head_values="self_attn.dense",
                                     mlp_norm="input_layernorm", mlp_out="mlp.fc2")))
GPTJ = ArchSpec(
    family="GPT-J", model_types=("gptj",), blocks="transformer.h", embed="transformer.wte", pos_embed=None,
    final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_norm="ln_1", head_values="attn.out_proj",
    mlp="mlp", mlp_norm="ln_1", mlp_out="mlp.fc_out", qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    qkv_layout="separate", parallel=True, rotary="interleaved", rotary_module="transformer.rotary_emb",
    rotary_table="sin_cos_pairs")
COHERE = ArchSpec(family="Cohere", model_types=("cohere",), parallel=True, rotary="interleaved",
                  logit_scale="logit_scale", **(_LLAMA_LIKE | dict(mlp_norm="input_layernorm")))
GRANITE = ArchSpec(family="Granite", model_types=("granite",), embed_scale="embedding_multiplier",
                   residual_scale="residual_multiplier", logit_divisor="logits_scaling", **_LLAMA_LIKE)

SPECS: list[ArchSpec] = [GPT2, GPT_NEOX, LLAMA, QWEN3, GEMMA, GEMMA2, GEMMA3, OLMO2, PHI3, PHI, GPTJ, COHERE,
                         GRANITE]

# Config features with no exact treatment here: (what it is, test on the config).
_UNSUPPORTED = (
    ("mixture-of-experts routing", lambda c: any((getattr(c, a, 0) or 0) > 1 for a in
                                                  ("num_experts", "num_local_experts", "n_routed_experts"))),
    ("multi-head latent attention (MLA)", lambda c: getattr(c, "kv_lora_rank", None) is not None),
    ("ALiBi position biases", lambda c: bool(getattr(c, "alibi", False))
     or getattr(c, "position_embedding_type", None) == "alibi"),
    ("layers without rotary embeddings (NoPE)", lambda c: getattr(c, "no_rope_layers", None) is not None
     and not all(getattr(c, "no_rope_layers"))),
    ("chunked attention", lambda c: getattr(c, "attention_chunk_size", None) is not None),
)


def spec_for(hf_model: torch.nn.Module) -> ArchSpec:
    """The spec for a Hugging Face model, or an error naming the supported families or the unsupported feature."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = next((s for s in SPECS if model_type in s.model_types), None)
    if spec is None:
        supported = ", ".join(f"{s.family} {s.model_types}" for s in SPECS)
        raise NotImplementedError(
            f"interplab has no architecture spec for model_type={model_type!r}. "
            f"Supported: {supported}. To add one, define an `ArchSpec` in interplab/specs.py "
            "with the dotted paths of its blocks, norms, attention output projection and MLP "
            "output (print(model) shows them) and the fields saying how they are wired, append it to `SPECS`, "
            "and run il.check_spec(model) to see whether interplab's forward agrees with the model's."
        )
    for feature, present in _UNSUPPORTED:
        if present(config):
            raise NotImplementedError(f"{model_type} uses {feature}, which interplab cannot treat exactly; "
                                      "refused rather than giving approximate numbers.")
    _check_attention_norms(hf_model, spec)
    return spec


def _check_attention_norms(hf_model, spec: ArchSpec) -> None:
    """Refuse attention sinks, and an attention module holding a norm the spec does not name (a config option such as Cohere's
    `use_qk_norm`): the edge-wise forward would skip it silently."""
    blocks = hf_model.get_submodule(spec.blocks)
    if len(blocks) == 0:
        return
    attn = blocks[0].get_submodule(spec.attn)
    if any(name.split(".")[-1] == "sinks" for name, _ in attn.named_parameters()):
        raise NotImplementedError(f"{spec.family}'s attention has learned attention sinks, which interplab's "
                                  "forward does not model; refused rather than giving approximate numbers.")
    named = {path.split(".")[-1] for path in (spec.q_norm, spec.k_norm) if path}
    unnamed = [name for name, _ in attn.named_children() if "norm" in name.lower() and name not in named]
    if unnamed:
        raise NotImplementedError(
            f"{spec.family}'s attention here has norm modules {unnamed} that its ArchSpec does not name "
            "(q_norm/k_norm); interplab would skip them. Add them to the spec (interplab/specs.py).")


def optional(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at `path` under `root`, or None for an empty path or one this model lacks."""
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(x / cap)`, or x unchanged without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap
