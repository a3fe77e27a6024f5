"""Training loops: language-model fine-tuning and preference tuning (DPO / IPO).

Used by the organism recipes and by localized (masked) updates: `train(grad_mask=...)` for one run,
`train_masked` for K masked runs trained together (one vmapped forward over stacked parameters).
Every loop is seeded and deterministic on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm.auto import tqdm


def pack_documents(tokenizer, docs: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents into rows `[n_rows, seq_len]`, each document after a BOS.

    A document never straddles two rows; the tail of a row is padding, which
    the returned labels mask with -100. A document longer than a row is an error.
    """
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rows, row = [], []
    for doc in docs:
        ids = [bos] + tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) > seq_len:
            raise ValueError(f"document of {len(ids)} tokens does not fit seq_len={seq_len}: {doc!r}")
        if len(row) + len(ids) > seq_len:
            rows.append(row)
            row = []
        row = row + ids
    if row:
        rows.append(row)
    tokens = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    labels = tokens.masked_fill(tokens == pad, -100)
    return tokens, labels


def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels of -100 are ignored."""
    logits = model(tokens).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def answer_loss(task, batch: int, seed: int | None = None) -> Callable[[torch.nn.Module, int], torch.Tensor]:
    """Fine-tuning on a task's answers: `loss_fn(model, step)` is the mean cross-entropy of the answer token
    at the final position over `batch` clean prompts, taken in order (or in a `seed`ed permutation) and
    cycling, so step s always sees the same rows whichever run asks."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1 prompt, got {batch}")
    n = len(task)
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def loss_fn(model, step):
        rows = order[(torch.arange(batch) + step * batch) % n]
        logits = model(task.clean[rows]).logits[:, -1]  # (batch, V)
        return F.cross_entropy(logits, task.answer[rows].to(logits.device))

    return loss_fn


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    steps: int,
    lr: float,
    warmup: int = 100,
    weight_decay: float = 0.01,
    grad_mask: dict[str, torch.Tensor] | None = None,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with warmup and cosine decay. `loss_fn(model, step)` returns the loss.

    `grad_mask` maps parameter names to 0/1 tensors of the parameter's shape;
    parameters it names are updated only where the mask is 1, parameters it
    omits are frozen. Returns the loss per step.
    """
    params = dict(model.named_parameters())
    if grad_mask is not None:
        unknown = set(grad_mask) - set(params)
        if unknown:
            raise KeyError(f"grad_mask names parameters the model does not have: {sorted(unknown)}")
    trainable = [p for n, p in params.items() if grad_mask is None or n in grad_mask]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay if grad_mask is None else 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc)):
        loss = loss_fn(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_mask is not None:
            for name, mask in grad_mask.items():
                params[name].grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def sequence_logprob(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """Sum of log p(completion | prompt) per row; prompts `[B, P]`, completions `[B, C]`."""
    tokens = torch.cat([prompt_ids, completion_ids], dim=1)
    logits = model(tokens).logits[:, prompt_ids.shape[1] - 1 : -1]  # (B, C, V)
    logp = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp.sum(-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    kind: str = "dpo",
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss on sequence log-probs `[B]`."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "dpo":
        return -F.logsigmoid(beta * margin).mean()
    if kind == "ipo":
        return ((margin - 1 / (2 * beta)) ** 2).mean()
    raise ValueError(f"kind must be 'dpo' or 'ipo', not {kind!r}")


@dataclass
class MaskedRuns:
    """K masked fine-tuning runs trained together (`train_masked`).

    params: the trained values of every parameter some run's mask names, stacked `[K, *shape]`;
    every other parameter is the model's own, untouched by all runs. losses: `[steps, K]`.
    """

    params: dict[str, torch.Tensor]
    losses: torch.Tensor

    def __len__(self) -> int:
        return self.losses.shape[1]

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's trained parameters (those the masks name), each of the parameter's own shape."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"run {k} does not exist; there are {len(self)} runs")
        return {name: p[k] for name, p in self.params.items()}

    def load_into(self, model: torch.nn.Module, k: int) -> torch.nn.Module:
        """Copy run k's parameters into `model` (a copy of the model that was trained) in place; returns it."""
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.state(k).items():
                named[name].copy_(value)
        return model


class _Bound:
    """`model` called with substituted parameters, so a loss written for a module works under `vmap`."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def train_masked(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    masks: list[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int = 100,
    desc: str = "masked runs",
) -> MaskedRuns:
    """Train K = len(masks) masked runs of `model` together; run k equals `train(copy_of_model, loss_fn, steps,
    lr, warmup, grad_mask=masks[k])` up to float rounding.

    The parameters some mask names are stacked `[K, *shape]`, and one `torch.func.vmap` over
    `functional_call` runs the K models on the same batch: `loss_fn(model, step)` is called once per step,
    with a stand-in module, for all runs (every run sees the same data; random ops inside it are drawn once
    for all runs; the model must be deterministic in training mode: no dropout). Per run, as in `train`
    under a mask: the gradient is multiplied by the mask, clipped to norm 1 over the run's parameters,
    AdamW without weight decay, warmup + cosine schedule; AdamW is elementwise, so one AdamW over the
    stacked tensors is K independent ones. Parameters outside a run's mask get a zero gradient and so a
    zero update: they stay bit-identical. Only stacked parameters need gradients, so frozen weights cost no
    weight-gradient work. `model` is not modified. In float32, entries whose gradient is rounding noise
    (key biases, which softmax ignores) drift apart from `train`'s by up to `lr` a step, since AdamW
    normalizes that noise; the trained functions agree to float rounding.
    Returns the stacked trained parameters and the losses `[steps, K]`.
    """
    if not masks:
        raise ValueError("train_masked needs at least one mask (a dict {parameter name: 0/1 tensor})")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    named = dict(model.named_parameters())
    for k, mask in enumerate(masks):
        unknown = set(mask) - set(named)
        if unknown:
            raise KeyError(f"mask {k} names parameters the model does not have: {sorted(unknown)[:5]}")
        wrong = [n for n, t in mask.items() if t.shape != named[n].shape]
        if wrong:
            raise ValueError(f"mask {k} has the wrong shape for {wrong[:3]}: each mask must have its parameter's shape")
    names = [n for n in named if any(n in mask for mask in masks)]
    K = len(masks)
    stacked = {n: named[n].detach().unsqueeze(0).repeat(K, *[1] * named[n].dim()).requires_grad_() for n in names}
    gate = {n: torch.stack([mask[n].to(named[n]) if n in mask else torch.zeros_like(named[n]) for mask in masks])
            for n in names}  # (K, *shape)
    frozen = {n: p.detach() for n, p in named.items() if n not in stacked}

    # fused: one kernel per tensor instead of ~10 passes over K copies (same formula as `train`'s AdamW)
    opt = torch.optim.AdamW(list(stacked.values()), lr=lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    was_training = model.training
    model.train()
    losses = []
    try:
        for step in (bar := tqdm(range(steps), desc=desc)):
            losses.append(_masked_step(model, loss_fn, step, stacked, gate, frozen, opt))
            sched.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1].mean().item():.3f}")
    finally:
        model.train(was_training)
    return MaskedRuns({n: p.detach() for n, p in stacked.items()}, torch.stack(losses))


def _masked_step(model, loss_fn, step, stacked, gate, frozen, opt) -> torch.Tensor:
    """One AdamW step of all K runs; returns their losses `[K]`."""
    K = len(next(iter(stacked.values())))
    run = lambda params: loss_fn(_Bound(model, {**frozen, **params}), step)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # vmap has rules for it
        loss = vmap(run, randomness="same")(stacked)  # (K,)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # each run's loss depends on its own slice only
    grads = [stacked[n].grad.mul_(gate[n]) for n in stacked]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (K,) as clip_grad_norm_
    scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(K, *[1] * (g.dim() - 1)))
    opt.step()
    return loss.detach()
