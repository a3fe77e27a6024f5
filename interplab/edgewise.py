"""A GPT-2-family forward pass in which every receiver can get its own input.

Edge-level methods (EAP, EAP-IG, faithfulness, path patching) need two things a
Hugging Face forward hides: each head's output separately, and a separate
residual input for each head's query, key and value. So this module re-runs the
model from its own weights, read through the `ArchSpec`: layer norms, MLPs and
the unembedding are the Hugging Face modules themselves, and only attention is
recomputed, with `c_attn`/`c_proj` split per head. `tests/test_circuits.py`
checks it against the Hugging Face forward.

A `Hooks` object sees every sender output and chooses every receiver input; the
plain `Hooks` reproduces the ordinary forward. Subclasses (in attribution.py,
circuits.py, paths.py) record, freeze or replace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import Model


def check_supported(m: Model) -> None:
    """Raise unless `m` is a GPT-2-family model, the family the edge-wise forward implements."""
    if not m.spec.conv1d or m.spec.pos_embed is None:
        raise NotImplementedError(
            f"edge-level methods run their own forward, implemented for the GPT-2 family only; "
            f"{m.name} is {m.spec.family}. Use node-level patching (il.patching) for this model, "
            "or add its attention (rotary, parallel blocks) to interplab/edgewise.py."
        )


class Hooks:
    """Identity hooks: the ordinary forward. Receivers' inputs are pre-layer-norm residuals."""

    def embed_output(self, x: torch.Tensor) -> torch.Tensor:
        """Token + position embedding `[B, T, D]` (the "input" sender)."""
        return x

    def qkv_input(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Input of each head's q, k, v: `[B, 3, H, T, D]` or broadcastable, e.g. `[B, 1, 1, T, D]`."""
        return resid[:, None, None]

    def frozen_heads(self, layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        """Head outputs `[B, H, T, D]` to use instead of computing attention, or None.

        `resid` `[B, T, D]` is the layer's residual input, which path patching records."""
        return None

    def heads_output(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Per-head outputs `[B, H, T, D]` (without the shared output bias)."""
        return heads

    def mlp_input(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        return resid

    def mlp_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out

    def logits_input(self, resid: torch.Tensor) -> torch.Tensor:
        return resid


def attention_weights(m: Model, layer: int) -> dict[str, torch.Tensor]:
    """`c_attn`/`c_proj` of one layer split per head: W_Q/W_K/W_V `[H, D, dh]`, b_* `[H, 1, dh]`,
    W_O `[H, dh, D]`, b_O `[D]`."""
    attn = m.module(m.spec.attn, layer)
    H, D, dh = m.n_heads, m.d_model, m.d_head
    W = attn.c_attn.weight.view(D, 3, H, dh).permute(1, 2, 0, 3)  # (3, H, D, dh)
    b = attn.c_attn.bias.view(3, H, 1, dh)
    return dict(W_Q=W[0], W_K=W[1], W_V=W[2], b_Q=b[0], b_K=b[1], b_V=b[2],
                W_O=attn.c_proj.weight.view(H, dh, D), b_O=attn.c_proj.bias)


def attention_scale(m: Model, layer: int) -> float:
    config = m.hf.config
    scale = 1 / math.sqrt(m.d_head) if config.scale_attn_weights else 1.0
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


def attend(m: Model, layer: int, x_qkv: torch.Tensor, w: dict | None = None) -> torch.Tensor:
    """Per-head outputs `[B, H, T, D]` from per-head pre-norm inputs `x_qkv` `[B, 3|1, H|1, T, D]`."""
    w = w or attention_weights(m, layer)
    normed = m.module(m.spec.attn_norm, layer)(x_qkv)
    q_in, k_in, v_in = normed.unbind(1) if normed.shape[1] == 3 else (normed[:, 0],) * 3
    q = q_in @ w["W_Q"] + w["b_Q"]  # (B, H, T, dh)
    k = k_in @ w["W_K"] + w["b_K"]
    v = v_in @ w["W_V"] + w["b_V"]
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logits = (q @ k.transpose(-1, -2)) * attention_scale(m, layer)  # (B, H, T, T)
    pattern = F.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return (pattern @ v) @ w["W_O"]  # (B, H, T, D)


def attend_head(m: Model, layer: int, head: int, x_qkv: torch.Tensor) -> torch.Tensor:
    """One head's output `[B, T, D]` from its own q, k, v inputs `x_qkv` `[B, 3, T, D]`."""
    w = attention_weights(m, layer)
    one = {name: (t if name == "b_O" else t[head:head + 1]) for name, t in w.items()}
    return attend(m, layer, x_qkv[:, :, None], one)[:, 0]


def pattern(m: Model, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """Attention pattern `[B, H, T, T]` of one layer given its residual input `[B, T, D]`."""
    w = attention_weights(m, layer)
    normed = m.module(m.spec.attn_norm, layer)(resid)[:, None]
    q, k = normed @ w["W_Q"] + w["b_Q"], normed @ w["W_K"] + w["b_K"]
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)) * attention_scale(m, layer)
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def embed(m: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Token + position embedding `[B, T, D]` of `tokens` `[B, T]`."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return m.module(m.spec.embed)(tokens) + m.module(m.spec.pos_embed)(positions)


def mlp(m: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    return m.module(m.spec.mlp, layer)(m.module(m.spec.mlp_norm, layer)(x))


def unembed(m: Model, x: torch.Tensor) -> torch.Tensor:
    return m.module(m.spec.unembed)(m.module(m.spec.final_norm)(x))


def run(m: Model, embeds: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
    """Logits `[B, T, d_vocab]` from embeddings `[B, T, D]` (see `embed`), under `hooks`."""
    check_supported(m)
    hooks = hooks or Hooks()
    resid = hooks.embed_output(embeds)
    for layer in range(m.n_layers):
        w = attention_weights(m, layer)
        heads = hooks.frozen_heads(layer, resid)
        if heads is None:
            heads = attend(m, layer, hooks.qkv_input(layer, resid), w)
        heads = hooks.heads_output(layer, heads)
        resid = resid + heads.sum(1) + w["b_O"]
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
        return resid[:, None, None]

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
