"""`check_spec(m)`: does interplab's reading of a model (its `ArchSpec`) agree with the model's own forward?

Runs the Hugging Face model once on random tokens with raw PyTorch hooks, and interplab's edge-wise
forward (interplab/edgewise.py), which rebuilds the model from the spec alone, and compares them site
by site: the embedding, each layer's attention output computed from the model's own layer input, each
block's output, the logits from the model's own final residual (`Model.final_logits`), and the whole
forward's logits. Each row names the spec fields that decide it, so a disagreement says where to look.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import edgewise
from .model import Model

_FIELDS = {
    "embedding": "embed, pos_embed, embed_scale",
    "attention": "qkv, qkv_layout, conv1d, attn_norm, q_norm, k_norm, qk_norm_over, rotary, rotary_module, "
                 "rotary_table, rotary_by_layer_type, attn_softcap, sliding window (config), head_values",
    "block": "parallel, parallel_flag, mlp_norm, attn_post_norm, mlp_post_norm, residual_scale, mlp",
    "logits": "final_norm, unembed, logit_scale, logit_divisor, logit_softcap",
}


@dataclass
class Row:
    site: str
    decided_by: str
    max_diff: float  # max |interplab - model|
    scale: float  # max |model|

    @property
    def relative(self) -> float:
        return self.max_diff / max(self.scale, 1e-12)


@dataclass
class SpecCheck:
    """Rows of site comparisons; `ok` when every relative difference is within `tolerance`."""

    model: str
    family: str
    rows: list[Row]
    tolerance: float

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.relative <= self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        head = (f"{self.model} read as {self.family}: "
                + ("agrees with the model at every site" if self.ok else
                   f"DISAGREES at {len(self.failures)} of {len(self.rows)} sites (first: {self.failures[0].site})"))
        lines = [head, f"  (relative difference, tolerance {self.tolerance:.0e})"]
        for r in self.rows:
            mark = "ok " if r.relative <= self.tolerance else "BAD"
            lines.append(f"  {mark} {r.site:55s} {r.relative:.1e}" + ("" if mark == "ok " else
                                                                        f"   spec fields: {r.decided_by}"))
        return "\n".join(lines)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def check_spec(m: Model, n: int = 2, seq: int = 8, seed: int = 0, tolerance: float | None = None) -> SpecCheck:
    """Compare interplab's forward with `m`'s own on `n` random prompts of `seq` tokens; see the module doc.

    `tolerance` (relative to each site's largest value) defaults to 1e-4 in float32/float64 and 2e-2 in
    half precision. Use `print(il.check_spec(m))` after writing a new `ArchSpec`; `.ok` says whether all agree.
    """
    if n < 1 or seq < 1:
        raise ValueError(f"n and seq must be at least 1, got n={n}, seq={seq}")
    limit = getattr(m.config, "max_position_embeddings", None) or getattr(m.config, "n_positions", None)
    if limit is not None and seq > limit:
        raise ValueError(f"seq={seq} exceeds {m.name}'s {limit} positions")
    if tolerance is None:
        tolerance = 2e-2 if m.dtype in (torch.float16, torch.bfloat16) else 1e-4
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.d_vocab, (n, seq), generator=g).to(m.device)

    layer_in, attn_out, final_in = {}, {}, []
    hooks = []
    for layer in range(m.n_layers):
        hooks.append(m.block(layer).register_forward_pre_hook(
            lambda mod, args, kwargs, layer=layer: layer_in.__setitem__(
                layer, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        hooks.append(m.module(m.spec.attn, layer).register_forward_hook(
            lambda mod, args, out, layer=layer: attn_out.__setitem__(layer, _first(out))))
    hooks.append(m.module(m.spec.final_norm).register_forward_pre_hook(lambda mod, args: final_in.append(args[0])))
    try:
        logits = m.hf(tokens).logits
    finally:
        for handle in hooks:
            handle.remove()

    rows = []

    def compare(site, part, ours, theirs):
        rows.append(Row(site, _FIELDS[part], (ours - theirs).abs().max().item(), theirs.abs().max().item()))

    record = edgewise.Record()
    ours = edgewise.run(m, edgewise.embed(m, tokens), record)
    compare("embedding", "embedding", edgewise.embed(m, tokens), layer_in[0])
    for layer in range(m.n_layers):
        compare(f"layer {layer} attention output, from the model's layer input", "attention",
                edgewise.attention_output(m, layer, layer_in[layer]), attn_out[layer])
        after = layer_in[layer + 1] if layer + 1 < m.n_layers else final_in[0]
        compare(f"layer {layer} block output", "block", record.resid_pre[layer + 1], after)
    compare("logits from the model's final residual", "logits", edgewise.unembed(m, final_in[0]), logits)
    compare("logits of interplab's whole forward", "logits", ours, logits)
    return SpecCheck(m.name, m.spec.family, rows, tolerance)
