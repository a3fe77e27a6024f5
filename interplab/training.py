"""Training loops: language-model fine-tuning and preference tuning (DPO / IPO).

Used by the organism recipes and by localized (masked) updates: `train(grad_mask=...)` for one run,
`train_masked` for K masked runs trained together (one vmapped forward over stacked parameters).
Every loop is seeded and deterministic on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import bars, checks


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
    """Mean next-token cross-entropy of `model` on `tokens`; labels of -100 are ignored."""
    return next_token_loss(model(tokens).logits, labels)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits `[B, T, V]` on labels `[B, T]` (-100 ignored)."""
    logits = logits[:, :-1]  # (B, T-1, V): position t predicts label t+1
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


@contextlib.contextmanager
def training_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in training mode for the block, then each back to its own mode.

    Flips the `training` flags instead of calling `model.train()` / `model.eval()`: on a transformers
    model those may re-kernelize modules (GPT-2's `mlp.act` gets a new `forward`), which silently removes
    the hooks nnsight put there when it wrapped the model.
    """
    before = {module: module.training for module in model.modules()}
    for module in before:
        module.training = True
    try:
        yield
    finally:
        for module, flag in before.items():
            module.training = flag


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def refuse_float16(params: list[torch.Tensor], function: str) -> None:
    """Refuse float16 weights before the first step: AdamW's state in float16 underflows (its eps, 1e-8, is
    0 there), so one step turns weights to NaN."""
    if any(p.dtype == torch.float16 for p in params):
        raise ValueError(f"{function} got float16 weights, which AdamW turns to NaN in one step (its eps and "
                         "second moments underflow in float16). Train in float32 or bfloat16: "
                         "model.float(), or il.load(..., dtype=torch.float32).")


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
    seed: int | None = None,
    progress: bool | None = None,
) -> list[float]:
    """AdamW with warmup and cosine decay. `loss_fn(model, step)` returns the loss.

    `grad_mask` maps parameter names to 0/1 tensors of the parameter's shape;
    parameters it names are updated only where the mask is 1, parameters it
    omits are frozen. `seed` fixes what the model's dropout draws (see `dropout_seed`). Returns the loss
    per step.
    """
    steps, warmup = checks.count(steps, "steps"), checks.count(warmup, "warmup", low=0)
    lr, weight_decay = checks.number(lr, "lr", low=0), checks.number(weight_decay, "weight_decay", low=0)
    seed = None if seed is None else checks.seed(seed)
    params = dict(model.named_parameters())
    if grad_mask is not None:
        _check_masks([grad_mask], params, "grad_mask")
    trainable = [p for n, p in params.items() if grad_mask is None or n in grad_mask]
    refuse_float16(trainable, "train")
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay if grad_mask is None else 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    losses = []
    with training_mode(model), checks.kept_grads(model), dropout_seed(seed):  # restored even if a step fails
        for step in (bar := bars.bar(range(steps), progress, desc)):
            loss = loss_fn(model, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_mask is not None:
                for name, mask in grad_mask.items():
                    params[name].grad.mul_(mask)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            checks.training_step(step, loss, trainable)
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step, losses[-1])
    return losses


def _check_masks(masks: list[dict[str, torch.Tensor]], params: dict[str, torch.Tensor], what: str) -> None:
    """Each mask names parameters the model has, with a 0/1 tensor of the parameter's exact shape."""
    for k, mask in enumerate(masks):
        label = what if len(masks) == 1 else f"{what} {k}"
        unknown = set(mask) - set(params)
        if unknown:
            raise KeyError(f"{label} names parameters the model does not have: {sorted(unknown)[:5]}")
        checks.nonempty(mask, label)
        for name, value in mask.items():
            checks.mask(value, params[name].shape, f"{label}[{name!r}]")


@contextlib.contextmanager
def dropout_seed(seed: int | None):
    """Inside, torch's global generator starts from `seed`; outside, it is as it was.

    Why: `nn.Dropout` takes no generator, it draws from the global one. A fork seeded here makes training
    reproducible without seeding the caller's generator. None leaves the generator alone.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def sequence_logprob(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """Sum of log p(completion | prompt) per row; prompts `[B, P]`, completions `[B, C]`."""
    tokens = torch.cat([prompt_ids, completion_ids], dim=1)
    return completion_logprob(model(tokens).logits, prompt_ids.shape[1], completion_ids)


def completion_logprob(logits: torch.Tensor, prompt_len: int, completions: torch.Tensor) -> torch.Tensor:
    """Sum of log p(completion | prompt) per row, from the logits `[B, P + C, V]` of prompt + completion."""
    logits = logits[:, prompt_len - 1 : -1]  # (B, C, V): the positions that predict the completion
    return logits.log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1).sum(-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    objective: str = "dpo",
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss on sequence log-probs `[B]`."""
    checks.number(beta, "beta", above=0)  # β = 0 divides by zero in IPO; β < 0 reverses the preference
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if objective == "dpo":
        return -F.logsigmoid(beta * margin).mean()
    if objective == "ipo":
        return ((margin - 1 / (2 * beta)) ** 2).mean()
    raise ValueError(f"objective must be 'dpo' or 'ipo', not {objective!r}")


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
    progress: bool | None = None,
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
    steps, warmup = checks.count(steps, "steps"), checks.count(warmup, "warmup", low=0)
    lr = checks.number(lr, "lr", low=0)
    named = dict(model.named_parameters())
    _check_masks(masks, named, "mask")
    checks.deterministic(model, "train_masked (all runs share one forward)", training=True)
    names = [n for n in named if any(n in mask for mask in masks)]
    refuse_float16([named[n] for n in names], "train_masked")
    K = len(masks)
    stacked = {n: named[n].detach().unsqueeze(0).repeat(K, *[1] * named[n].dim()).requires_grad_() for n in names}
    gate = {n: torch.stack([mask[n].to(named[n]) if n in mask else torch.zeros_like(named[n]) for mask in masks])
            for n in names}  # (K, *shape)
    frozen = {n: p.detach() for n, p in named.items() if n not in stacked}

    # fused: one kernel per tensor instead of ~10 passes over K copies (same formula as `train`'s AdamW)
    opt = torch.optim.AdamW(list(stacked.values()), lr=lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    losses = []
    with training_mode(model):
        for step in (bar := bars.bar(range(steps), progress, desc)):
            losses.append(_masked_step(model, loss_fn, step, stacked, gate, frozen, opt))
            sched.step()
            checks.training_step(step, losses[-1], stacked.values())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1].mean().item():.3f}")
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


def train_moving_mask(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    locate: Callable[[torch.nn.Module, int], dict[str, torch.Tensor]],
    every: int,
    steps: int,
    lr: float,
    warmup: int = 100,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    desc: str = "moving mask",
    progress: bool | None = None,
) -> list[float]:
    """Masked fine-tuning whose mask moves: `locate(model, step)` gives a new 0/1 mask every `every` steps.

    At steps 0, every, 2·every, … `locate` is called on the model as trained so far, in the mode the model
    was given in (the loss runs in training mode, as in `train`), and returns `{parameter name: 0/1 tensor}` as for
    `train(grad_mask=...)`; parameters it omits are frozen until the next relocation. Each step is
    `train`'s masked step (gradient times mask, clipped to norm 1 over the masked gradient, warmup +
    cosine schedule, no weight decay), with AdamW kept **per entry**: every entry has its own first and
    second moments and its own step count, and they advance only on steps where the entry is in the mask.
    While out of the mask an entry is frozen, and so is its optimizer state (no moment decay), so an entry
    that re-enters resumes where it left off, with its own bias correction; the learning rate follows the
    global step. With a mask that never moves this is `train(grad_mask=mask)`. Trains `model` in place and
    returns the loss per step.
    """
    if every < 1 or steps < 1:
        raise ValueError(f"every and steps must be at least 1 (relocate every `every` steps), got {every}, {steps}")
    params = dict(model.named_parameters())
    beta1, beta2 = betas
    state: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # name -> (m, v, count), per entry
    losses, mask = [], {}
    for step in (bar := bars.bar(range(steps), progress, desc)):
        if step % every == 0:  # `locate` sees the model in the mode it was given in
            mask = locate(model, step)
            _check_masks([mask], params, f"locate(model, step={step})")
            mask = {n: t.to(params[n]) for n, t in mask.items()}
        with training_mode(model):
            loss = loss_fn(model, step)
        checks.training_step(step, loss, ())
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])) * keep
                 for n, keep in mask.items()}
        norm = torch.stack([g.norm() for g in grads.values()]).norm() if grads else torch.tensor(0.0)
        scale = (1.0 / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_(max_norm=1)
        step_lr = lr * cosine_lr(step, steps, warmup)
        with torch.no_grad():
            for name, keep in mask.items():
                m, v, count = state.setdefault(name, tuple(torch.zeros_like(params[name]) for _ in range(3)))
                on = keep.bool()
                g = grads[name] * scale
                count += on
                m.copy_(torch.where(on, m.lerp(g, 1 - beta1), m))
                v.copy_(torch.where(on, v * beta2 + (1 - beta2) * g * g, v))
                done = count.clamp(min=1)  # entries never in the mask have count 0 and move nowhere
                denom = (v.sqrt() / (1 - beta2 ** done).sqrt()).add_(eps)
                update = step_lr / (1 - beta1 ** done) * m / denom
                params[name].sub_(torch.where(on, update, torch.zeros_like(update)))
        checks.training_step(step, loss, [params[name] for name in mask])
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.zero_grad(set_to_none=True)
    return losses

