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
