import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab.lens import logit_lens
from interplab.organisms.tokenizer import build_tokenizer


def tiny_gpt2():
    tok = build_tokenizer()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=3, n_head=4))
    return il.load(hf, tokenizer=tok)


def test_last_layer_of_the_lens_is_the_model_output():
    m = tiny_gpt2()
    tokens = m.to_tokens("When Mary and John went to the store, John gave a drink to")
    lens = logit_lens(m, tokens)
    probs = m.logits(tokens)[0].softmax(-1)  # (T, V)
    expected = probs[torch.arange(tokens.shape[1]), probs.argmax(-1)]
    torch.testing.assert_close(lens.values[-1], expected, atol=1e-6, rtol=1e-5)
    assert lens.dims == ("layer", "pos") and lens.shape == (3, tokens.shape[1])


def test_middle_layer_matches_a_raw_forward_hook():
    m = tiny_gpt2()
    tokens = m.to_tokens("The capital of Zorbia is")
    target = tokens[0].roll(-1)
    seen = {}
    handle = m.hf.transformer.h[1].register_forward_hook(lambda mod, args, out: seen.update(h=out))
    m.logits(tokens)
    handle.remove()
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    probs = m.hf.lm_head(m.hf.transformer.ln_f(h))[0].softmax(-1)
    expected = probs[torch.arange(tokens.shape[1]), target]
    torch.testing.assert_close(logit_lens(m, tokens, target=target).values[1], expected, atol=1e-6, rtol=1e-5)


def test_bad_tokens_are_refused_in_one_line():
    m = il.load("interplab/tiny-base")
    with pytest.raises(ValueError, match="vocabulary of 385"):
        logit_lens(m, torch.tensor([2, 5, 385]))  # today an IndexError deep inside the embedding
    with pytest.raises(ValueError, match="at most 64"):
        logit_lens(m, torch.full((65,), 5))
