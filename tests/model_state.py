"""A snapshot of everything a call must leave as it found it on a torch module: parameter values, each
submodule's training flag, every `.grad`, the hooks, and the forward nnsight installed on each submodule.

`assert_unchanged(module, call)` runs `call()` (letting an expected exception through to the caller)
and compares the snapshots taken before and after, successful or interrupted.
"""

from __future__ import annotations

import torch

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(module: torch.nn.Module, parameters: bool = True) -> dict:
    return {
        "parameters": {n: p.detach().clone() for n, p in module.named_parameters()} if parameters else {},
        "modes": {n: sub.training for n, sub in module.named_modules()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "hooks": {n: tuple(len(getattr(sub, d, {})) for d in HOOK_DICTS) for n, sub in module.named_modules()},
        "forwards": {n: id(sub.__dict__.get("forward")) for n, sub in module.named_modules()},
    }


def differences(before: dict, after: dict) -> list[str]:
    """What changed, one line per kind (empty when nothing did)."""
    out = []
    changed = [n for n, p in before["parameters"].items() if not torch.equal(p, after["parameters"][n])]
    if changed:
        out.append(f"parameters changed: {changed[:3]}")
    for kind in ("modes", "requires_grad", "hooks", "forwards"):
        diff = [n for n in before[kind] if before[kind][n] != after[kind].get(n)]
        if diff:
            out.append(f"{kind} changed: {diff[:3]}")
    grads = [n for n, g in before["grads"].items()
             if (g is None) != (after["grads"][n] is None) or (g is not None and not torch.equal(g, after["grads"][n]))]
    if grads:
        out.append(f".grad changed: {grads[:3]}")
    return out


def assert_unchanged(module: torch.nn.Module, call, parameters: bool = True):
    """Run `call()` and assert the module is as it was, whether the call returned or raised (re-raised)."""
    before = snapshot(module, parameters)
    try:
        return call()
    finally:
        problems = differences(before, snapshot(module, parameters))
        assert not problems, "; ".join(problems)
