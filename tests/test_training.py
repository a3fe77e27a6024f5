import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from interplab import training
from interplab.organisms.tokenizer import build_tokenizer


def test_preference_losses_match_hand_computation():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    margin = (-1 + 2) - (-3 + 2.5)  # 1.5
    dpo = training.preference_loss(pc, pr, rc, rr, beta=0.1, kind="dpo")
    ipo = training.preference_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert dpo.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * margin))))
    assert ipo.item() == pytest.approx((margin - 5.0) ** 2)
    with pytest.raises(ValueError, match="'dpo' or 'ipo'"):
        training.preference_loss(pc, pr, rc, rr, kind="kto")


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
