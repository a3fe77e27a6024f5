"""The logit lens: read every layer's residual stream through the final norm and unembedding."""

from __future__ import annotations

import torch

from . import checks
from .scores import Scores


def logit_lens(m, tokens: torch.Tensor, target: torch.Tensor | None = None, remote: bool = False) -> Scores:
    """Probability of `target` tokens at every (layer, position) of one prompt.

    tokens: `[seq]` or `[1, seq]`. target: `[seq]` token ids to follow; by
    default the model's own final-layer prediction at each position. Layer
    `n_layers - 1` reproduces the model's output distribution exactly.
    Returns Scores over (layer, pos) with `meta["top_tokens"]`, the lens's
    top-1 token string at each cell.
    """
    tokens = tokens.reshape(1, -1) if isinstance(tokens, torch.Tensor) and tokens.dim() == 1 else tokens
    checks.tokens(m, tokens)
    if tokens.shape[0] != 1:
        raise ValueError(f"logit_lens reads one prompt at a time; got a batch of {tokens.shape[0]}")
    checks.remote(m, remote)
    if target is not None and target.numel() != tokens.shape[1]:
        raise ValueError(f"target must hold one token id per position ({tokens.shape[1]}), got {target.numel()}")
    if target is not None:
        checks.tokens(m, target.reshape(1, -1), "target")
    resid = []
    with m.nn.trace(tokens, remote=remote):
        for layer in range(m.n_layers):
            resid.append(m.envoy(m.spec.blocks)[layer].output.save())
    with torch.no_grad():
        stack = torch.cat([r if r.dim() == 3 else r[0] for r in resid])  # (L, T, d_model)
        probs = m.module(m.spec.unembed)(m.module(m.spec.final_norm)(stack)).softmax(-1)  # (L, T, V)
    target = probs[-1].argmax(-1) if target is None else target.reshape(-1)
    values = probs[:, torch.arange(tokens.shape[1]), target]  # (L, T)
    top = [m.to_str_tokens(row) for row in probs.argmax(-1)]
    return Scores(
        values,
        dims=("layer", "pos"),
        labels={"layer": [str(i) for i in range(m.n_layers)], "pos": m.to_str_tokens(tokens[0])},
        meta={"title": "logit lens: p(final prediction)", "scale": "probability", "top_tokens": top, "target": m.to_str_tokens(target)},
    )
