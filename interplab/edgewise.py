"""A transformer forward pass in which every receiver can get its own input.

Edge-level methods (EAP, EAP-IG, faithfulness, path patching) need two things a
Hugging Face forward hides: each head's output separately, and a separate
residual input for each head's query, key and value. So this module re-runs the
model from its own weights, read through the `ArchSpec` (interplab/specs.py):
norms, MLPs, rotary tables and the unembedding are the Hugging Face modules
themselves, and only attention is recomputed, with its projections split per
head. Everything family-specific comes from the spec: where q/k/v live (fused
`[q | k | v]`, interleaved per head, or separate; Conv1D or Linear), q/k norms,
rotary style (half-split or interleaved pairs, partial), the attention soft-cap
and sliding windows, post-norms, residual and embedding scales, parallel blocks
(where `Graph` has no edge from a layer's heads to its own MLP) and the logits'
post-processing (`Model.final_logits`).

What a sender's output is, where the model does not simply add heads:
- A post-norm on the attention output (Gemma 2/3, OLMo 2) normalizes the heads'
  sum. Head h's output is its share of the normed sum, `norm_weight * (o_h +
  b_O / H) / rms(sum)` with the rms of this run's sum, so heads still add up to
  what the block adds to the residual. Patching one head's output then keeps the
  other heads' shares as they were (the rms is not recomputed); `paths.test`
  refuses such models, since a treeified head has no sum to normalize by.
- A q/k norm over all heads together (OLMo 2) couples the heads' queries. A
  query receiver with its own input computes every head's query from that input,
  normalizes them together and keeps its own head's: exact when all inputs agree,
  and its gradients add up to the model's.
Under grouped-query attention keys and values exist once per kv head, so a key or
value receiver `a{l}.h{g}<k|v>` (g < n_kv_heads) is shared by its group's query heads.

Receivers of one layer are ordered q (n_heads), k (n_kv_heads), v (n_kv_heads),
as in `Graph`. `tests/test_families.py` checks the forward against the Hugging
Face one for every family, and `il.check_spec` does so for any model.

A `Hooks` object sees every sender output and chooses every receiver input; the
plain `Hooks` reproduces the ordinary forward. Subclasses (in attribution.py,
circuits.py, paths.py) record, freeze or replace them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Model
from .specs import softcap

LOCAL_ONLY = "edge-level methods run interplab's own forward (interplab/edgewise.py), outside nnsight"


def check_supported(m: Model) -> None:
    """Raise unless the edge-wise forward can run `m`'s attention (its q/k/v layout and rotary style)."""
    if m.spec.qkv_layout not in ("concat", "interleaved", "separate") or m.spec.rotary not in ("", "half",
                                                                                               "interleaved"):
        raise NotImplementedError(
            f"edge-level methods run their own forward, which cannot read {m.name}'s attention "
            f"(qkv_layout={m.spec.qkv_layout!r}, rotary={m.spec.rotary!r} in its ArchSpec). Use node-level "
            "patching (il.patching) for this model.")


def check_per_head(m: Model, function: str) -> None:
    """Raise where one head's output is not a function of that head's own inputs (see the module doc)."""
    coupled = [what for what, present in (
        (f"a post-norm on the attention output ({m.spec.attn_post_norm})", bool(m.spec.attn_post_norm)),
        (f"a q/k norm over all heads together ({m.spec.q_norm})", m.spec.qk_norm_over == "full"
         and bool(m.spec.q_norm))) if present]
    if coupled:
        raise NotImplementedError(
            f"{function} computes single heads on their own, but {m.spec.family} has {' and '.join(coupled)}, "
            "which couples the heads of a layer. Use circuits.faithfulness / paths.path_patch (every head "
            "computed together) for this model.")


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
        """Per-head outputs `[B, H, T, D]` (what each head adds to the residual, without the shared bias)."""
        return heads

    def mlp_input(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """The MLP's input `[B, T, D]`: the block input in parallel blocks, else the residual after attention."""
        return resid

    def mlp_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out

    def logits_input(self, resid: torch.Tensor) -> torch.Tensor:
        return resid


def _norm(m: Model, path: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The block norm at spec `path` applied to x, or x itself where the family has none there."""
    norm = m.optional(path, layer)
    return x if norm is None else norm(x)


def _split(m: Model, layer: int, which: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`which` ("q", "k" or "v") projections of `n` heads, read through the spec's layout:
    W `[n, D, dh]`, b `[n, 1, dh]` (zeros without bias)."""
    spec, dh = m.spec, m.d_head
    columns = [spec.qkv_columns(which, u, m.n_heads, m.n_kv_heads, dh) for u in range(n)]
    module = m.module(columns[0][0], layer)
    rows = torch.cat([torch.arange(c.start, c.stop) for _, c in columns]).to(module.weight.device)
    W = spec.as_linear(module.weight).index_select(0, rows).view(n, dh, -1).transpose(1, 2)
    bias = getattr(module, "bias", None)
    b = bias.index_select(0, rows).view(n, 1, dh) if bias is not None else W.new_zeros(n, 1, dh)
    return W, b


def attention_weights(m: Model, layer: int) -> dict[str, torch.Tensor]:
    """One layer's attention split per head: W_Q `[H, D, dh]`, W_K/W_V `[H_kv, D, dh]`, b_Q `[H, 1, dh]`,
    b_K/b_V `[H_kv, 1, dh]`, W_O `[H, dh, D]`, b_O `[D]` (zeros where the model has no bias)."""
    H, Hkv, dh = m.n_heads, m.n_kv_heads, m.d_head
    weights = {}
    for which, n in (("q", H), ("k", Hkv), ("v", Hkv)):
        weights[f"W_{which.upper()}"], weights[f"b_{which.upper()}"] = _split(m, layer, which, n)
    out = m.module(m.spec.head_values, layer)
    W_O = m.spec.as_linear(out.weight).T.reshape(H, dh, -1)
    b_O = out.bias if getattr(out, "bias", None) is not None else W_O.new_zeros(W_O.shape[-1])
    return weights | dict(W_O=W_O, b_O=b_O)


def attention_scale(m: Model, layer: int) -> float:
    """The factor on q . k: the attention module's own `scaling` (every supported family keeps one)."""
    attn = m.module(m.spec.attn, layer)
    if not hasattr(attn, "scaling"):
        raise NotImplementedError(f"{type(attn).__name__} keeps no `scaling`; the edge-wise forward cannot tell "
                                  "its attention scale")
    return float(attn.scaling)


def _rotary_tables(m: Model, layer: int, x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[1, 1, T, rotary_dim]` from the model's own rotary module (so its scaling variants apply)."""
    spec = m.spec
    rotary = m.module(spec.rotary_module)
    positions = torch.arange(T, device=x.device)[None]
    extra = (m.config.layer_types[layer],) if spec.rotary_by_layer_type else ()
    first, second = rotary(x, positions, *extra)
    if spec.rotary_table == "sin_cos_pairs":  # one entry per rotated pair (GPT-J)
        cos, sin = (t.repeat_interleave(2, -1) for t in (second, first))
    else:
        cos, sin = first, second
    return cos[:, None], sin[:, None]


def _rotate(m: Model, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings on q `[B, H, T, dh]` and k `[B, H_kv, T, dh]` (on the first `rotary_dim` dims)."""
    if not m.spec.rotary:
        return q, k
    cos, sin = _rotary_tables(m, layer, q, q.shape[-2])
    r = cos.shape[-1]

    def turned(x):  # the rotation's partner of each coordinate
        if m.spec.rotary == "half":
            return torch.cat((-x[..., r // 2:], x[..., :r // 2]), -1)
        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

    def apply(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + turned(x_rot) * sin, x_pass), -1)

    return apply(q), apply(k)


def mask(m: Model, layer: int, T: int, device) -> torch.Tensor:
    """Which keys each query sees `[T, T]`: causal, within the layer's sliding window if it has one."""
    query, key = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None]
    seen = key <= query
    window = m.spec.window(m.config, layer)
    return seen & (key > query - window) if window is not None else seen


def _scores(m: Model, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention pattern `[B, H, T, T]` from q `[B, H, T, dh]`, k `[B, H_kv, T, dh]` (after q/k norms, before rotary)."""
    q, k = _rotate(m, layer, q, k)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # GQA: query head h reads kv head h // group
    logits = (q @ k.transpose(-1, -2)) * attention_scale(m, layer)  # (B, H, T, T)
    logits = softcap(logits, m.spec.scale(m.config, m.spec.attn_softcap))
    seen = mask(m, layer, q.shape[-2], q.device)
    return F.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)


def _project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head projection `[B, n, T, dh]` of inputs x `[B, n | 1, T, D]` by W `[n, D, dh]`, b `[n, 1, dh]`.

    Written out rather than as `x @ W`: that broadcast matmul copies W once per example (B copies of
    the layer's weights per run: a third of an EAP run's time on the Pythia-160m shape)."""
    n, D, dh = W.shape
    if x.shape[1] == 1:  # one input for every head: a single matmul against the heads side by side
        y = x[:, 0] @ W.transpose(0, 1).reshape(D, n * dh)  # (B, T, n * dh)
        return y.unflatten(-1, (n, dh)).transpose(1, 2) + b
    return torch.einsum("bntd,nde->bnte", x, W) + b


def _queries_or_keys(m: Model, layer: int, which: str, x: torch.Tensor, W: torch.Tensor,
                     b: torch.Tensor) -> torch.Tensor:
    """Queries or keys `[B, n, T, dh]` from inputs x `[B, n | 1, T, D]`, through the spec's q/k norm."""
    y = _project(x, W, b)
    norm = m.optional(m.spec.q_norm if which == "q" else m.spec.k_norm, layer)
    if norm is None:
        return y
    n, D, dh = W.shape
    if m.spec.qk_norm_over == "head":  # over d_head, in the model's [B, T, n, dh] layout
        return norm(y.transpose(1, 2)).transpose(1, 2)
    if x.shape[1] == 1:  # over all heads together, one input for all
        return norm(y.transpose(1, 2).flatten(2)).unflatten(-1, (n, dh)).transpose(1, 2)
    # Each receiver's input through every head, normalized together; receiver i keeps head i.
    every = torch.einsum("bitd,de->bite", x, W.transpose(0, 1).reshape(D, n * dh)) + b.reshape(n * dh)
    normed = norm(every).unflatten(-1, (n, dh))  # (B, n receivers, T, n heads, dh)
    return torch.diagonal(normed, dim1=1, dim2=3).permute(0, 3, 1, 2)


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The root-mean-square an RMSNorm divides x `[..., D]` by, `[..., 1]`, with the module's own epsilon."""
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", None) if eps is None else eps
    if eps is None or getattr(norm, "bias", None) is not None:
        raise NotImplementedError(f"a post-norm must be an RMSNorm keeping `eps` or `variance_epsilon` to split "
                                  f"it over heads; got {type(norm).__name__}")
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _scaled(m: Model, x: torch.Tensor) -> torch.Tensor:
    """x times the family's residual scale (Granite's `residual_multiplier`), if any."""
    scale = m.spec.scale(m.config, m.spec.residual_scale)
    return x if scale is None else x * scale


def to_residual(m: Model, layer: int, heads: torch.Tensor, b_O: torch.Tensor) -> torch.Tensor:
    """What each head adds to the residual `[B, H, T, D]`, from its output projection `heads` `[B, H, T, D]`.

    With a post-norm the bias is shared out over the heads and each head gets its share of the normed
    sum (see the module doc); `attention_bias` is then zero."""
    post = m.optional(m.spec.attn_post_norm, layer)
    if post is not None:
        parts = heads + b_O / heads.shape[1]
        whole = parts.sum(1, keepdim=True)  # (B, 1, T, D)
        heads = post(parts) * _rms(post, parts) / _rms(post, whole)
    return _scaled(m, heads)


def attention_bias(m: Model, layer: int, w: dict) -> torch.Tensor:
    """What the attention adds to the residual besides the heads `[D]`: the output bias (0 under a post-norm)."""
    return torch.zeros_like(w["b_O"]) if m.spec.attn_post_norm else _scaled(m, w["b_O"])


def attend(m: Model, layer: int, x_qkv: torch.Tensor, w: dict | None = None) -> torch.Tensor:
    """What each head adds to the residual `[B, H, T, D]`, from per-receiver pre-norm inputs
    `x_qkv` `[B, H + 2 H_kv | 1, T, D]`."""
    w = w or attention_weights(m, layer)
    return to_residual(m, layer, _head_projections(m, layer, x_qkv, w), w["b_O"])


def attention_output(m: Model, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """The attention module's own output `[B, T, D]` (its output projection, before any post-norm or
    residual scale) from the layer's residual input `[B, T, D]`, as this forward computes it."""
    w = attention_weights(m, layer)
    return _head_projections(m, layer, resid[:, None], w).sum(1) + w["b_O"]


def _head_projections(m: Model, layer: int, x_qkv: torch.Tensor, w: dict) -> torch.Tensor:
    """Each head's output projection `[B, H, T, D]` (no bias) from per-receiver inputs `x_qkv`."""
    H, Hkv = w["W_Q"].shape[0], w["W_K"].shape[0]
    normed = _norm(m, m.spec.attn_norm, layer, x_qkv)
    q_in, k_in, v_in = (normed,) * 3 if normed.shape[1] == 1 else normed.split([H, Hkv, Hkv], 1)
    q = _queries_or_keys(m, layer, "q", q_in, w["W_Q"], w["b_Q"])  # (B, H, T, dh)
    k = _queries_or_keys(m, layer, "k", k_in, w["W_K"], w["b_K"])  # (B, H_kv, T, dh)
    v = _project(v_in, w["W_V"], w["b_V"]).repeat_interleave(H // Hkv, 1)
    return torch.einsum("bhte,hed->bhtd", _scores(m, layer, q, k) @ v, w["W_O"])  # (B, H, T, D)


def kv_head(m: Model, head: int) -> int:
    """The key/value head (and k, v receiver index) that query head `head` reads."""
    return m.spec.kv_head(head, m.n_heads, m.n_kv_heads)


def attend_head(m: Model, layer: int, head: int, x_qkv: torch.Tensor) -> torch.Tensor:
    """One head's output `[B, T, D]` from its own q, k, v inputs `x_qkv` `[B, 3, T, D]`."""
    check_per_head(m, "a single head's forward")
    w = attention_weights(m, layer)
    g = kv_head(m, head)
    one = {name: t if name == "b_O" else t[g:g + 1] if name[-1] in "KV" else t[head:head + 1]
           for name, t in w.items()}
    return attend(m, layer, x_qkv, one)[:, 0]


def pattern(m: Model, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """Attention pattern `[B, H, T, T]` of one layer given its residual input `[B, T, D]`."""
    w = attention_weights(m, layer)
    normed = _norm(m, m.spec.attn_norm, layer, resid)[:, None]  # (B, 1, T, D)
    q = _queries_or_keys(m, layer, "q", normed, w["W_Q"], w["b_Q"])
    return _scores(m, layer, q, _queries_or_keys(m, layer, "k", normed, w["W_K"], w["b_K"]))


def embed(m: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Token (+ learned position) embedding `[B, T, D]` of `tokens` `[B, T]`, times any embedding scale."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    x = m.module(m.spec.embed)(tokens)
    if m.spec.pos_embed is not None:
        x = x + m.module(m.spec.pos_embed)(torch.arange(tokens.shape[1], device=tokens.device))
    scale = m.spec.scale(m.config, m.spec.embed_scale)
    return x if scale is None else x * scale


def mlp(m: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What the MLP adds to the residual `[B, T, D]` given its pre-norm input x: through its pre- and post-norm."""
    out = m.module(m.spec.mlp, layer)(_norm(m, m.spec.mlp_norm, layer, x))
    return _scaled(m, _norm(m, m.spec.mlp_post_norm, layer, out))


def unembed(m: Model, x: torch.Tensor) -> torch.Tensor:
    """Logits from the final residual `[B, T, D]`: final norm, then `Model.final_logits`."""
    return m.final_logits(m.module(m.spec.final_norm)(x))


def run(m: Model, embeds: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
    """Logits `[B, T, d_vocab]` from embeddings `[B, T, D]` (see `embed`), under `hooks`."""
    check_supported(m)
    hooks = hooks or Hooks()
    parallel = m.spec.is_parallel(m.config)
    resid = hooks.embed_output(embeds)
    for layer in range(m.n_layers):
        w = attention_weights(m, layer)
        heads = hooks.frozen_heads(layer, resid)
        if heads is None:
            heads = attend(m, layer, hooks.qkv_input(layer, resid), w)
        attn_out = hooks.heads_output(layer, heads).sum(1) + attention_bias(m, layer, w)
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
