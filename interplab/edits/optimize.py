"""Training edits: K edits fitted together with the IPO or DPO loss against the unedited model.

Why batched training works: an edit is data, not a hook, so one trace can give
each group of rows its own edit (the parameters of K edits are stacked and
gathered per row). `train` fits K edits in one loop that way, against the
unedited model as the preference-loss reference. The model is frozen, so the
blocks below an edit's first layer always compute the same thing: their output
is cached once and those blocks are skipped (as the patching sweeps do).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import bars, checks, training
from .edit import Edit, _Batch, _edited_logits


def train(
    m,
    edits: Edit | list[Edit],
    prompts: torch.Tensor | list[str],
    chosen: torch.Tensor | list[str],
    rejected: torch.Tensor | list[str],
    objective: str = "ipo",
    beta: float = 0.1,
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    progress: bool | None = None,
    remote: bool = False,
) -> torch.Tensor:
    """Train the edits' parameters (in place) with the IPO or DPO loss; the model's weights never change.

    prompts `[N, P]`, chosen/rejected completions `[N, C]` (token ids, or strings: prompts get a BOS,
    completions none). The reference is the unedited model, its log-probs computed once. All K edits
    train together: a forward runs K groups of rows, group k carrying edit k, and the loss is the sum
    of the groups' mean losses, so each edit gets exactly the gradient it would get alone (Adam,
    constant `lr`, no clipping or decay). `beta` is IPO's τ (target margin 1/(2τ)) or
    DPO's β. `batch_size` pairs per step are drawn with `seed` (the same rows for every group); None
    uses all N. With `reuse_prefix` the edits that start at layer l share a forward that skips blocks
    < l (their unedited output is cached once), one forward per distinct first layer: less arithmetic,
    more forwards (worth it unless the batch is tiny). Returns the losses `[steps, K]`. Local only
    (`remote=True` raises).
    """
    checks.local_only(remote, "edits.train", "it steps torch.optim on the edits' parameters here, with "
                      "gradients from a local backward pass at every step")
    if objective not in ("ipo", "dpo"):
        raise ValueError(f"objective must be 'ipo' or 'dpo', not {objective!r}")
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    if not edits or any(e.model is not m for e in edits):
        raise ValueError("train needs a non-empty list of edits built on this model `m`")
    beta, lr = checks.number(beta, "beta", above=0), checks.number(lr, "lr", low=0)
    steps, seed = checks.count(steps, "steps"), checks.seed(seed)
    checks.deterministic(m.nn._module, "edits.train")
    prompts, chosen, rejected = _pairs(m, prompts, chosen, rejected)
    n, k = len(prompts), len(edits)
    if batch_size is not None:
        batch_size = checks.count(batch_size, "batch_size", high=n)
    params = [p.requires_grad_(True) for e in edits for p in e.parameters()]
    if not params or len({id(p) for p in params}) != len(params):
        raise ValueError("the edits must have parameters to train, and no tensor may belong to two of them "
                         "(pass each edit once)")
    with torch.no_grad():
        ref_c, ref_r = (training.sequence_logprob(m.hf, prompts, c) for c in (chosen, rejected))
    # Edits whose first layer is l share one forward per step that starts at block l, fed the unedited
    # output of block l-1 (cached once: the model is frozen, so it never changes).
    by_first: dict[int, list[int]] = {}
    for i, e in enumerate(edits):
        by_first.setdefault(e.layers[0] if reuse_prefix else 0, []).append(i)
    before = sorted(first - 1 for first in by_first if first > 0)
    cache_c, cache_r = (_block_outputs(m, torch.cat([prompts, c], 1), before) for c in (chosen, rejected))

    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = torch.zeros(steps, k, dtype=torch.float64)
    with _frozen(m.hf):
        for step in bars.bar(range(steps), progress, f"train {k} edit(s)"):
            rows = torch.arange(n) if batch_size is None else torch.randperm(n, generator=gen)[:batch_size]
            per_edit = [None] * k
            for first, group in by_first.items():
                prefix = (cache_c[first - 1][rows], cache_r[first - 1][rows]) if first > 0 else None
                pol_c, pol_r = _policy_logprobs(m, [edits[i] for i in group], prompts[rows], chosen[rows],
                                                rejected[rows], first, prefix)  # (K_group, b) each
                for j, i in enumerate(group):
                    per_edit[i] = training.preference_loss(pol_c[j], pol_r[j], ref_c[rows], ref_r[rows],
                                                           beta=beta, objective=objective)
            per_edit = torch.stack(per_edit)
            for p, g in zip(params, torch.autograd.grad(per_edit.sum(), params)):
                p.grad = g
            opt.step()
            checks.training_step(step, per_edit, params)
            losses[step] = per_edit.detach()
    for p in params:
        p.requires_grad_(False)
    return losses


def edited_logprobs(m, edits: list[Edit], prompts: torch.Tensor, completions: torch.Tensor,
                    remote: bool = False) -> torch.Tensor:
    """log p(completion | prompt) under each edit, one forward for all: `[K, N]` (differentiable when local).

    prompts `[N, P]`, completions `[N, C]`. "last" edits act from the prompt's last position on.
    """
    checks.remote(m, remote)
    return _logprobs(m, edits, prompts, completions, remote=remote)


def _logprobs(m, edits, prompts, completions, first: int = 0, prefix=None, remote: bool = False) -> torch.Tensor:
    """`edited_logprobs`; with `prefix` `[N, P+C, d_model]` (block first-1's unedited output) blocks < first
    are skipped."""
    k, n = len(edits), len(prompts)
    tokens = torch.cat([prompts, completions], 1).repeat(k, 1)  # (K*N, P+C), group-major
    batch = _Batch(edits, torch.arange(k).repeat_interleave(n))
    skip = (first, prefix.repeat(k, 1, 1)) if prefix is not None else None
    logits = _edited_logits(m, batch, tokens, start=prompts.shape[1] - 1, skip=skip,  # "last": what generation edits
                            remote=remote)
    return training.completion_logprob(logits, prompts.shape[1], completions.repeat(k, 1)).view(k, n)


def _policy_logprobs(m, edits, prompts, chosen, rejected, first: int = 0, prefix=None):
    """(log p(chosen), log p(rejected)) `[K, N]` each; one forward for both when they have the same length."""
    pre_c, pre_r = prefix if prefix is not None else (None, None)
    if chosen.shape == rejected.shape:
        both = _logprobs(m, edits, torch.cat([prompts, prompts]), torch.cat([chosen, rejected]), first,
                         torch.cat([pre_c, pre_r]) if prefix is not None else None)
        return both.split(len(prompts), dim=1)
    return _logprobs(m, edits, prompts, chosen, first, pre_c), _logprobs(m, edits, prompts, rejected, first, pre_r)


def _block_outputs(m, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Unedited outputs of blocks `layers` for `tokens` `[N, T]`: {layer: `[N, T, d_model]`}."""
    if not layers:
        return {}
    blocks, saved = m.envoy(m.spec.blocks), []
    with torch.no_grad(), m.nn.trace(tokens):
        for layer in layers:
            saved.append(blocks[layer].output.save())
    return dict(zip(layers, saved))


@contextmanager
def _frozen(module: torch.nn.Module):
    """Weights without requires_grad inside (no graph below the first edit), restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _pairs(m, prompts, chosen, rejected):
    """Token tensors (prompts `[N, P]`, completions `[N, C]`) from ids or strings, with shape checks."""
    as_ids = lambda x, bos: m.to_tokens(x, prepend_bos=bos) if isinstance(x, list | tuple) else x  # noqa: E731
    prompts, chosen, rejected = as_ids(prompts, True), as_ids(chosen, False), as_ids(rejected, False)
    for name, t in (("prompts", prompts), ("chosen", chosen), ("rejected", rejected)):
        checks.tokens(m, t, name)
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(f"{n} prompts but {len(chosen)} chosen and {len(rejected)} rejected completions; "
                         "give one of each per prompt")
    for name, c in (("prompts + chosen", chosen), ("prompts + rejected", rejected)):
        checks.tokens(m, torch.cat([prompts, c], 1), name)  # the sequences scored: within the context length
    return prompts.to(m.device), chosen.to(m.device), rejected.to(m.device)
