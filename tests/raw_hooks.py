"""A plain Hugging Face forward with raw PyTorch hooks: the independent reference that the edge-level
tests (paths, circuits, every family) check interplab's nnsight and edge-wise runs against."""

import torch


def hf_logits(m, tokens, hooks=(), grad=False):
    """Logits `[B, T, V]` of `m.hf(tokens)` with `hooks`, `(module, kind, fn)` where kind is "" (a forward
    hook) or "pre_" (a forward pre-hook), registered in order and removed afterwards."""
    handles = [getattr(module, f"register_forward_{kind}hook")(fn) for module, kind, fn in hooks]
    try:
        with torch.set_grad_enabled(grad):
            return m.hf(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
