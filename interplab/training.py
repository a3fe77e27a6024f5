"""Training loops: language-model fine-tuning and preference tuning (DPO / IPO).

Used by the organism recipes and, later, by localized (masked) updates.
Every loop is seeded and deterministic on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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

