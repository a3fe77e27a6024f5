"""A transformer forward pass in which every receiver can get its own input.

Edge-level methods (EAP, EAP-IG, faithfulness, path patching) need two things a
Hugging Face forward hides: each head's output separately, and a separate
residual input for each head's query, key and value. So this module re-runs the
model from its own weights, read through the `ArchSpec`: layer norms (LayerNorm
or RMSNorm), MLPs (plain or gated), rotary embeddings and the unembedding are the
Hugging Face modules themselves, and only attention is recomputed, with its
projections split per head. Families:

- GPT-2: fused `c_attn` `[q | k | v]` in Conv1D orientation, learned positions.
- GPT-NeoX: fused `query_key_value` interleaved per head `[q_h | k_h | v_h]`,
  partial rotary, and (with `use_parallel_residual`) parallel blocks, where the
  MLP reads the block input, not the attention output: `Graph` has no edge from
  a layer's heads to its own MLP then.
- Llama family (Llama, Qwen2, Mistral): separate q/k/v projections, rotary, and
  grouped-query attention: keys and values exist once per kv head, so a key or
  value receiver `a{l}.h{g}<k|v>` (g < n_kv_heads) is shared by the query heads
  `g * n_heads // n_kv_heads ...` of its group.

Receivers of one layer are ordered q (n_heads), k (n_kv_heads), v (n_kv_heads),
as in `Graph`. `tests/test_circuits.py` and `tests/test_edgewise_families.py`
check the forward against the Hugging Face one.

A `Hooks` object sees every sender output and chooses every receiver input; the
plain `Hooks` reproduces the ordinary forward. Subclasses (in attribution.py,
circuits.py, paths.py) record, freeze or replace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import GPT2, GPT_NEOX, LLAMA, Model

SUPPORTED = (GPT2, GPT_NEOX, LLAMA)


LOCAL_ONLY = "edge-level methods run interplab's own forward (interplab/edgewise.py), outside nnsight"


def check_supported(m: Model) -> None:
    """Raise unless `m`'s family is one the edge-wise forward implements."""
    if m.spec not in SUPPORTED:
        raise NotImplementedError(
            f"edge-level methods run their own forward, implemented for "
            f"{', '.join(s.family for s in SUPPORTED)}; {m.name} is {m.spec.family}. Use node-level "
            "patching (il.patching) for this model, or add its attention to interplab/edgewise.py."
        )


def is_parallel(m: Model) -> bool:
    """True where the MLP reads the block input (GPT-NeoX's `use_parallel_residual`)."""
    return m.spec is GPT_NEOX and bool(getattr(m.config, "use_parallel_residual", False))


def qkv_receivers(m: Model) -> int:
    """Receivers of one layer's attention: n_heads queries, n_kv_heads keys, n_kv_heads values."""
    return m.n_heads + 2 * m.n_kv_heads


class Hooks:
    """Identity hooks: the ordinary forward. Receivers' inputs are pre-layer-norm residuals."""

    def embed_output(self, x: torch.Tensor) -> torch.Tensor:
        """Token (+ position) embedding `[B, T, D]` (the "input" sender)."""
        return x

    def qkv_input(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Input of each q, k, v receiver: `[B, H + 2 * H_kv, T, D]`, or `[B, 1, T, D]` for all alike."""
        return resid[:, None]

    def frozen_heads(self, layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        """Head outputs `[B, H, T, D]` to use instead of computing attention, or None.

        `resid` `[B, T, D]` is the layer's residual input, which path patching records."""
        return None

    def heads_output(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Per-head outputs `[B, H, T, D]` (without the shared output bias)."""
        return heads

    def mlp_input(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """The MLP's input `[B, T, D]`: the block input in parallel blocks, else the residual after attention."""
        return resid

    def mlp_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out

    def logits_input(self, resid: torch.Tensor) -> torch.Tensor:
        return resid


def _linear_heads(linear: torch.nn.Module, n: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An `nn.Linear` producing `n` heads, split: W `[n, D, dh]`, b `[n, 1, dh]` (zeros without bias)."""
    W = linear.weight.view(n, d_head, -1).transpose(1, 2)
    b = linear.bias.view(n, 1, d_head) if linear.bias is not None else W.new_zeros(n, 1, d_head)
    return W, b


def attention_weights(m: Model, layer: int) -> dict[str, torch.Tensor]:
    """One layer's attention split per head: W_Q `[H, D, dh]`, W_K/W_V `[H_kv, D, dh]`, b_Q `[H, 1, dh]`,
    b_K/b_V `[H_kv, 1, dh]`, W_O `[H, dh, D]`, b_O `[D]` (zeros where the model has no bias)."""
    attn = m.module(m.spec.attn, layer)
    H, Hkv, D, dh = m.n_heads, m.n_kv_heads, m.d_model, m.d_head
    if m.spec is GPT2:  # Conv1D: weights [in, out], out = [q | k | v]
        W = attn.c_attn.weight.view(D, 3, H, dh).permute(1, 2, 0, 3)  # (3, H, D, dh)
        b = attn.c_attn.bias.view(3, H, 1, dh)
        return dict(W_Q=W[0], W_K=W[1], W_V=W[2], b_Q=b[0], b_K=b[1], b_V=b[2],
                    W_O=attn.c_proj.weight.view(H, dh, D), b_O=attn.c_proj.bias)
    if m.spec is GPT_NEOX:  # out = per head [q_h | k_h | v_h]
        fused = attn.query_key_value
        W = fused.weight.view(H, 3, dh, D).transpose(-1, -2)  # (H, 3, D, dh)
        b = fused.bias.view(H, 3, 1, dh) if fused.bias is not None else W.new_zeros(H, 3, 1, dh)
        weights = dict(W_Q=W[:, 0], W_K=W[:, 1], W_V=W[:, 2], b_Q=b[:, 0], b_K=b[:, 1], b_V=b[:, 2])
        out = attn.dense
    else:
        W_Q, b_Q = _linear_heads(attn.q_proj, H, dh)
        W_K, b_K = _linear_heads(attn.k_proj, Hkv, dh)
        W_V, b_V = _linear_heads(attn.v_proj, Hkv, dh)
        weights = dict(W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V)
        out = attn.o_proj
    W_O = out.weight.T.reshape(H, dh, D)
    b_O = out.bias if out.bias is not None else W_O.new_zeros(D)
    return weights | dict(W_O=W_O, b_O=b_O)


def attention_scale(m: Model, layer: int) -> float:
    """The factor on q . k: GPT-2's config flags, else the attention module's own `scaling`."""
    if m.spec is not GPT2:
        return getattr(m.module(m.spec.attn, layer), "scaling", None) or 1 / math.sqrt(m.d_head)
    config = m.hf.config
    scale = 1 / math.sqrt(m.d_head) if config.scale_attn_weights else 1.0
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


def _rotate(m: Model, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings on q `[B, H, T, dh]` and k `[B, H_kv, T, dh]` (the first `rotary_dim` dims),
    with cos/sin from the model's own rotary module (so its scaling variants apply). GPT-2: unchanged."""
    if m.spec is GPT2:
        return q, k
    T = q.shape[-2]
    check_window(m, T)
    rotary = m.module(m.spec.blocks.rsplit(".", 1)[0] + ".rotary_emb")
    positions = torch.arange(T, device=q.device)[None]
    cos, sin = (t[:, None] for t in rotary(q, positions))  # (1, 1, T, rotary_dim)
    r = cos.shape[-1]

    def apply(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = torch.cat((-x_rot[..., r // 2:], x_rot[..., :r // 2]), -1)
        return torch.cat((x_rot * cos + half * sin, x_pass), -1)

    return apply(q), apply(k)


def check_window(m: Model, T: int) -> None:
    """Sliding-window attention (Mistral) is not implemented: refuse prompts longer than the window."""
    window = getattr(m.hf.config, "sliding_window", None)
    if window and getattr(m.hf.config, "use_sliding_window", True) and T > window:
        raise NotImplementedError(f"prompts of {T} tokens exceed {m.name}'s sliding window ({window}); the "
                                  "edge-wise forward implements full causal attention only")


def _scores(m: Model, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention pattern `[B, H, T, T]` from q `[B, H, T, dh]`, k `[B, H_kv, T, dh]` (pre-rotary)."""
    q, k = _rotate(m, q, k)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # GQA: query head h reads kv head h // group
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logits = (q @ k.transpose(-1, -2)) * attention_scale(m, layer)  # (B, H, T, T)
    return F.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def _project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head projection `[B, n, T, dh]` of inputs x `[B, n | 1, T, D]` by W `[n, D, dh]`, b `[n, 1, dh]`.

    Written out rather than as `x @ W`: that broadcast matmul copies W once per example (B copies of
    the layer's weights per run: a third of an EAP run's time on the Pythia-160m shape)."""
    n, D, dh = W.shape
    if x.shape[1] == 1:  # one input for every head: a single matmul against the heads side by side
        y = x[:, 0] @ W.transpose(0, 1).reshape(D, n * dh)  # (B, T, n * dh)
        return y.unflatten(-1, (n, dh)).transpose(1, 2) + b
    return torch.einsum("bntd,nde->bnte", x, W) + b


def attend(m: Model, layer: int, x_qkv: torch.Tensor, w: dict | None = None) -> torch.Tensor:
    """Per-head outputs `[B, H, T, D]` from per-receiver pre-norm inputs `x_qkv` `[B, H + 2 H_kv | 1, T, D]`."""
    w = w or attention_weights(m, layer)
    H, Hkv = w["W_Q"].shape[0], w["W_K"].shape[0]
    normed = m.module(m.spec.attn_norm, layer)(x_qkv)
    q_in, k_in, v_in = (normed,) * 3 if normed.shape[1] == 1 else normed.split([H, Hkv, Hkv], 1)
    q = _project(q_in, w["W_Q"], w["b_Q"])  # (B, H, T, dh)
    k = _project(k_in, w["W_K"], w["b_K"])  # (B, H_kv, T, dh)
    v = _project(v_in, w["W_V"], w["b_V"]).repeat_interleave(H // Hkv, 1)
    return torch.einsum("bhte,hed->bhtd", _scores(m, layer, q, k) @ v, w["W_O"])  # (B, H, T, D)


def kv_head(m: Model, head: int) -> int:
    """The key/value head (and k, v receiver index) that query head `head` reads."""
    return head // (m.n_heads // m.n_kv_heads)


def attend_head(m: Model, layer: int, head: int, x_qkv: torch.Tensor) -> torch.Tensor:
    """One head's output `[B, T, D]` from its own q, k, v inputs `x_qkv` `[B, 3, T, D]`."""
    w = attention_weights(m, layer)
    g = kv_head(m, head)
    one = {name: t if name == "b_O" else t[g:g + 1] if name[-1] in "KV" else t[head:head + 1]
           for name, t in w.items()}
    return attend(m, layer, x_qkv, one)[:, 0]


def pattern(m: Model, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """Attention pattern `[B, H, T, T]` of one layer given its residual input `[B, T, D]`."""
    w = attention_weights(m, layer)
    normed = m.module(m.spec.attn_norm, layer)(resid)[:, None]  # (B, 1, T, D)
    return _scores(m, layer, _project(normed, w["W_Q"], w["b_Q"]), _project(normed, w["W_K"], w["b_K"]))


def embed(m: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Token (+ learned position) embedding `[B, T, D]` of `tokens` `[B, T]`."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    x = m.module(m.spec.embed)(tokens)
    if m.spec.pos_embed is None:
        return x
    return x + m.module(m.spec.pos_embed)(torch.arange(tokens.shape[1], device=tokens.device))


def mlp(m: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    return m.module(m.spec.mlp, layer)(m.module(m.spec.mlp_norm, layer)(x))


def unembed(m: Model, x: torch.Tensor) -> torch.Tensor:
    return m.module(m.spec.unembed)(m.module(m.spec.final_norm)(x))


def run(m: Model, embeds: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
    """Logits `[B, T, d_vocab]` from embeddings `[B, T, D]` (see `embed`), under `hooks`."""
    check_supported(m)
    hooks = hooks or Hooks()
    parallel = is_parallel(m)
    resid = hooks.embed_output(embeds)
    for layer in range(m.n_layers):
        w = attention_weights(m, layer)
        heads = hooks.frozen_heads(layer, resid)
        if heads is None:
            heads = attend(m, layer, hooks.qkv_input(layer, resid), w)
        attn_out = hooks.heads_output(layer, heads).sum(1) + w["b_O"]
        if parallel:
            out = hooks.mlp_output(layer, mlp(m, layer, hooks.mlp_input(layer, resid)))
            resid = resid + attn_out + out
        else:
            resid = resid + attn_out
            resid = resid + hooks.mlp_output(layer, mlp(m, layer, hooks.mlp_input(layer, resid)))
    return unembed(m, hooks.logits_input(resid))


class Record(Hooks):
    """Keeps every sender output, stacked by `senders()` in the Graph's order."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.resid_pre: list[torch.Tensor] = []
        self.mlp_in: list[torch.Tensor] = []

    def embed_output(self, x):
        self.outputs.append(x[None])
        return x

    def qkv_input(self, layer, resid):
        self.resid_pre.append(resid)
        return resid[:, None]

    def heads_output(self, layer, heads):
        self.outputs.append(heads.transpose(0, 1))
        return heads

    def mlp_input(self, layer, resid):
        self.mlp_in.append(resid)
        return resid

    def mlp_output(self, layer, out):
        self.outputs.append(out[None])
        return out

    def logits_input(self, resid):
        self.resid_pre.append(resid)
        return resid

    def senders(self) -> torch.Tensor:
        """Sender outputs `[S, B, T, D]`: input, then per layer its heads and its MLP."""
        return torch.cat(self.outputs)


@torch.no_grad()
def record(m: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, Record]:
    """One plain run without gradients: logits `[B, T, V]` and what `Record` kept."""
    rec = Record()
    return run(m, embed(m, tokens), rec), rec
