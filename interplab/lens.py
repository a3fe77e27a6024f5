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
    top-1 token string at each cell. With `remote=True` the whole lens runs on NDIF
    and only the `[layer, pos]` results come back.
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
    n_pos = tokens.shape[1]
    blocks, norm, unembed = m.envoy(m.spec.blocks), m.envoy(m.spec.final_norm), m.envoy(m.spec.unembed)
    # Unembedded inside the trace, so a remote run sends back [L, T] numbers, not [L, T, d_vocab] (or the weights).
    with torch.no_grad(), m.nn.trace(tokens, remote=remote):
        probs = []
        for layer in range(m.n_layers):
            resid = blocks[layer].output
            resid = resid if resid.dim() == 3 else resid[0]  # (1, T, d_model)
            probs.append(m.final_logits(norm(resid), unembed)[0].softmax(-1))  # (T, V)
        probs = torch.stack(probs)  # (L, T, V)
        wanted = probs[-1].argmax(-1) if target is None else target.reshape(-1).to(probs.device)
        values = probs[:, torch.arange(n_pos), wanted].cpu().save()  # (L, T)
        top_ids = probs.argmax(-1).cpu().save()  # (L, T)
        wanted = wanted.cpu().save()
    target = wanted
    top = [m.to_str_tokens(row) for row in top_ids]
    return Scores(
        values,
        dims=("layer", "pos"),
        labels={"layer": [str(i) for i in range(m.n_layers)], "pos": m.to_str_tokens(tokens[0])},
        meta={"title": "logit lens: p(final prediction)", "scale": "probability", "top_tokens": top, "target": m.to_str_tokens(target)},
    )
