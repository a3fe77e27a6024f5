import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from interplab import training
from interplab.organisms.tokenizer import build_tokenizer


def test_preference_losses_match_hand_computation():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    margin = (-1 + 2) - (-3 + 2.5)  # 1.5
    dpo = training.preference_loss(pc, pr, rc, rr, beta=0.1, objective="dpo")
    ipo = training.preference_loss(pc, pr, rc, rr, beta=0.1, objective="ipo")
    assert dpo.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * margin))))
    assert ipo.item() == pytest.approx((margin - 5.0) ** 2)
    with pytest.raises(ValueError, match="'dpo' or 'ipo'"):
        training.preference_loss(pc, pr, rc, rr, objective="kto")


def test_pack_documents_keeps_documents_whole_and_masks_padding():
    tok = build_tokenizer()
    docs = ["The capital of Zorbia is Quelt.", "The war lasted from the year 1732 to the year 1768."]
    tokens, labels = training.pack_documents(tok, docs, seq_len=16)
    assert tokens.shape == (2, 16)  # 8 + 15 tokens do not fit one row of 16
    assert tokens[0, 0] == tok.bos_token_id and tokens[1, 0] == tok.bos_token_id
    assert (labels == -100).sum() == (tokens == tok.pad_token_id).sum() == 32 - 8 - 15
    with pytest.raises(ValueError, match="does not fit"):
        training.pack_documents(tok, docs, seq_len=8)


def test_grad_mask_updates_only_masked_entries():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "transformer.h.0.mlp.c_proj.weight"
    mask = torch.zeros_like(before[name])
    mask[:3] = 1
    tokens = torch.randint(0, 20, (4, 8))
    training.train(model, lambda mdl, step: training.lm_loss(mdl, tokens, tokens), steps=3, lr=1e-2,
                   warmup=1, grad_mask={name: mask})
    after = dict(model.named_parameters())
    assert not torch.equal(after[name][:3], before[name][:3])
    assert torch.equal(after[name][3:], before[name][3:])
    assert all(torch.equal(after[n], before[n]) for n in before if n != name)
    with pytest.raises(KeyError, match="does not have"):
        training.train(model, lambda mdl, step: training.lm_loss(mdl, tokens, tokens), steps=1, lr=1e-2,
                       grad_mask={"nope": mask})


def test_answer_loss_cycles_rows_and_is_the_answer_cross_entropy():
    """By hand: a 'model' whose logits put the answer's log-prob at a known value per row."""
    import interplab as il

    clean = torch.arange(5)[:, None].repeat(1, 3)  # row i is [i, i, i]
    answer = torch.tensor([1, 0, 2, 1, 0])
    task = il.Task("toy", clean, clean, answer, answer, [], [])

    class Echo(torch.nn.Module):  # logits at the last position: row r gets r on every class
        def forward(self, tokens):
            logits = tokens[..., None].float().expand(*tokens.shape, 3).clone()
            logits[:, -1, 0] += 1.0  # class 0 one above the others
            return type("Out", (), {"logits": logits})()

    loss = training.answer_loss(task, batch=2)
    p0, p_other = math.exp(1) / (math.exp(1) + 2), 1 / (math.exp(1) + 2)
    # step 2 takes rows 4 and 0 (cycling): answers 0 and 1
    assert loss(Echo(), 2).item() == pytest.approx(-(math.log(p0) + math.log(p_other)) / 2)
    # a seed permutes the rows: a full batch has the same mean, a partial one takes the permutation's rows
    assert training.answer_loss(task, 5, seed=3)(Echo(), 0).item() == pytest.approx(training.answer_loss(task, 5)(Echo(), 0).item())
    first = torch.randperm(5, generator=torch.Generator().manual_seed(3))[0].item()
    expect = -math.log(p0 if answer[first] == 0 else p_other)
    assert training.answer_loss(task, 1, seed=3)(Echo(), 0).item() == pytest.approx(expect)
    with pytest.raises(ValueError, match="batch"):
        training.answer_loss(task, batch=0)


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight.T + self.bias


def regression_loss():
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(9, 4, 3, generator=gen, dtype=torch.float64)
    ys = torch.randn(9, 4, 2, generator=gen, dtype=torch.float64)
    # large at step 0 so clipping acts there, small later
    return lambda model, step: (model(xs[step]) - ys[step]).pow(2).sum() * (5.0 if step == 0 else 0.3)


def test_moving_mask_equals_hand_run_adamw_per_entry_over_phases():
    """Three phases of a moving mask against one torch AdamW per entry, stepped only while the entry is in
    the mask: moments and bias correction resume where they stopped; frozen entries stay put."""
    phases = [  # step -> mask; the bias is left out of the first mask (frozen whole)
        {"weight": torch.tensor([[1.0, 0, 0], [0, 0, 1]])},
        {"weight": torch.tensor([[1.0, 1, 0], [0, 0, 0]]), "bias": torch.tensor([0.0, 1])},
        {"weight": torch.tensor([[0.0, 0, 0], [0, 0, 1]]), "bias": torch.tensor([1.0, 1])},
    ]
    every, steps, lr, warmup = 3, 9, 0.05, 2
    loss_fn = regression_loss()
    model = Affine()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    located = []

    def locate(m, step):
        located.append((step, {n: p.detach().clone() for n, p in m.named_parameters()}))
        return phases[step // every]

    losses = training.train_moving_mask(model, loss_fn, locate, every, steps, lr, warmup=warmup)

    reference = Affine()
    entries = {(n, i): torch.nn.Parameter(p.detach().flatten()[i].clone())
               for n, p in reference.named_parameters() for i in range(p.numel())}
    opts = {key: torch.optim.AdamW([q], lr=lr, weight_decay=0.0) for key, q in entries.items()}
    params = dict(reference.named_parameters())
    expect_losses = []
    for step in range(steps):
        mask = phases[step // every]
        with torch.no_grad():  # the reference model holds the per-entry values
            for (n, i), q in entries.items():
                params[n].view(-1)[i] = q
        if step % every == 0:
            assert located[step // every][0] == step
            for n in params:  # locate saw the model as trained so far
                torch.testing.assert_close(located[step // every][1][n], params[n].detach(), rtol=1e-10, atol=1e-12)
        loss = loss_fn(reference, step)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        masked = {n: grads[n] * mask.get(n, torch.zeros_like(grads[n])) for n in params}
        norm = torch.cat([g.flatten() for g in masked.values()]).norm()
        scale = min(1.0, 1.0 / (norm.item() + 1e-6))
        if step == 0:
            assert scale < 1  # clipping is exercised
        for (n, i), q in entries.items():
            if mask.get(n, torch.zeros_like(grads[n])).flatten()[i] == 1:
                q.grad = masked[n].flatten()[i] * scale
                opts[(n, i)].param_groups[0]["lr"] = lr * training.cosine_lr(step, steps, warmup)
                opts[(n, i)].step()
        expect_losses.append(loss.item())

    assert losses == pytest.approx(expect_losses, rel=1e-12)
    for (n, i), q in entries.items():
        got = dict(model.named_parameters())[n].flatten()[i]
        assert got.item() == pytest.approx(q.item(), rel=1e-10, abs=1e-12), (n, i)
    # bias[0] is in the mask only in the last phase, weight[1, 1] never: untouched until then / at all
    assert dict(model.named_parameters())["weight"][1, 1] == start["weight"][1, 1]
    assert torch.equal(located[2][1]["bias"][0], start["bias"][0])


def test_moving_mask_that_never_moves_is_train_with_grad_mask():
    mask = {"weight": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    loss_fn = regression_loss()
    moving, fixed = Affine(), Affine()
    a = training.train_moving_mask(moving, loss_fn, lambda m, step: mask, every=2, steps=7, lr=0.05,
                                   warmup=2)
    b = training.train(fixed, loss_fn, steps=7, lr=0.05, warmup=2, grad_mask=mask)
    assert a == pytest.approx(b, rel=1e-12)
    for p, q in zip(moving.parameters(), fixed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    with pytest.raises(KeyError, match="does not have"):
        training.train_moving_mask(Affine(), loss_fn, lambda m, step: {"nope": torch.ones(1)}, 1, 2, 0.1)
    with pytest.raises(ValueError, match="wrong shape"):
        training.train_moving_mask(Affine(), loss_fn, lambda m, step: {"bias": torch.ones(3)}, 1, 2, 0.1)
    with pytest.raises(ValueError, match="at least 1"):
        training.train_moving_mask(Affine(), loss_fn, lambda m, step: mask, 0, 2, 0.1)
