"""Edits against raw PyTorch hooks written here, hand-computed losses and steering, and a planted ITI head."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import edits, metrics
from interplab.components import parse
from interplab.organisms import corpus
from interplab.organisms.tokenizer import build_tokenizer

TOK = build_tokenizer()


def _random_model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=len(TOK), initializer_range=0.3)
    if family == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, **common))
    elif family == "neox":
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, rotary_pct=0.5, max_position_embeddings=32,
                                              **common))
    else:  # Llama with grouped-query attention: 4 query heads over 2 key/value heads
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                          **common))
    return il.load(hf.double(), tokenizer=TOK)


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def model(request):
    return _random_model(request.param)


@pytest.fixture(scope="module")
def sft():
    return il.load("interplab/tiny-sft")


def _tokens(m, n=3, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, m.d_vocab, (n, seq), generator=g)


def _hooked(m, tokens, changes: dict[int, callable], generate: int = 0):
    """Logits (or greedy ids) of a plain forward where `changes[layer](values)` rewrites the output projection's
    input, through raw `register_forward_pre_hook`s."""
    handles = [m.module(m.spec.head_values, layer).register_forward_pre_hook(
        lambda mod, args, f=f: (f(args[0]),) + args[1:]) for layer, f in changes.items()]
    try:
        with torch.no_grad():
            if generate:
                return m.hf.generate(tokens, max_new_tokens=generate, do_sample=False,
                                     pad_token_id=TOK.pad_token_id)
            return m.hf(tokens).logits
    finally:
        for h in handles:
            h.remove()


def _add_at(m, head, vec, last=False, start=-1):
    """values -> values with `vec` added to head `head`'s columns (all positions, or positions >= start)."""
    def f(values):
        values = values.clone()
        cols = slice(head * m.d_head, (head + 1) * m.d_head)
        pos = slice(start, None) if last else slice(None)
        values[:, pos, cols] += vec.to(values.dtype)
        return values
    return f


# ---- applying edits: against raw hooks on three families ----

@pytest.mark.parametrize("positions", ["all", "last"])
def test_additive_matches_raw_prehook(model, positions):
    m = model
    tokens = _tokens(m)
    vec = torch.randn(m.d_head, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e = edits.additive(m, {(1, 2): vec}, positions=positions)
    want = _hooked(m, tokens, {1: _add_at(m, 2, vec, last=positions == "last")})
    got = e.logits(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unedited = m.logits(tokens)
    moved = (got - unedited).abs().amax(-1)  # (B, T)
    assert moved.min() > 1e-4 if positions == "all" else (moved[:, :-1].max() == 0 and moved[:, -1].min() > 1e-4)


def test_every_kind_matches_its_formula(model):
    """LoFiT, rank-1 and a composite, with random parameters, against the formulas written as raw hooks."""
    m = model
    tokens = _tokens(m)
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    dh, width = m.d_head, m.n_heads * m.d_head
    lo = edits.lofit(m, [(0, 1), (1, 3)])
    lo.params.update(scale=rnd(2, dh), shift=rnd(2, dh))
    r1 = edits.rank1(m, [(0, 0), (0, 2), (1, 1)], positions="last")
    r1.params.update(a=rnd(2, width), b=rnd(3, dh))

    def lofit_f(values, layer):
        v = values.clone().view(*values.shape[:2], m.n_heads, dh)
        for i, (l, h) in enumerate(map(parse, lo.heads)):
            if l == layer:
                v[:, :, h] = (1 + lo.params["scale"][i]) * v[:, :, h] + lo.params["shift"][i]
        return v.view(values.shape)

    def rank1_f(values, layer):
        b = torch.zeros(m.n_heads, dh, dtype=values.dtype)
        for i, (l, h) in enumerate(map(parse, r1.heads)):
            if l == layer:
                b[h] = r1.params["b"][i]
        out = values.clone()
        out[:, -1] += (values[:, -1] @ r1.params["a"][layer])[:, None] * b.flatten()
        return out

    for e, f in [(lo, lofit_f), (r1, rank1_f)]:
        want = _hooked(m, tokens, {layer: (lambda v, layer=layer: f(v, layer)) for layer in range(m.n_layers)})
        torch.testing.assert_close(e.logits(tokens), want, atol=1e-5, rtol=1e-5)
    # a composite sums the changes, each computed from the values the layer receives
    both = lo + r1
    want = _hooked(m, tokens, {layer: (lambda v, layer=layer: lofit_f(v, layer) + rank1_f(v, layer) - v)
                               for layer in range(m.n_layers)})
    torch.testing.assert_close(both.logits(tokens), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((r1 + lo).logits(tokens), want, atol=1e-5, rtol=1e-5)


def test_generation_matches_raw_prehook(model):
    m = model
    tokens = _tokens(m, n=2, seq=4)
    vec = torch.randn(m.d_head, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    for positions in ("all", "last"):
        e = edits.additive(m, {(0, 1): vec}, positions=positions)
        want = _hooked(m, tokens, {0: _add_at(m, 1, vec, last=positions == "last")}, generate=5)
        assert torch.equal(e.generate(tokens, max_new_tokens=5), want)


def test_last_edit_scores_what_generation_touches(model):
    """A "last" edit's log-prob of its own greedy continuation (scored in one forward by `edited_logprobs`)
    equals the sum of the step-by-step log-probs of generation under the same edit (raw hook, KV cache)."""
    m = model
    prompts = _tokens(m, n=2, seq=4, seed=4)
    vec = torch.randn(m.d_head, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    e = edits.additive(m, {(1, 2): vec}, positions="last")
    handle = m.module(m.spec.head_values, 1).register_forward_pre_hook(
        lambda mod, args: (_add_at(m, 2, vec, last=True)(args[0]),) + args[1:])
    try:
        with torch.no_grad():
            out = m.hf.generate(prompts, max_new_tokens=3, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=TOK.pad_token_id)
    finally:
        handle.remove()
    new = out.sequences[:, prompts.shape[1]:]
    steps = torch.stack([s.log_softmax(-1).gather(1, new[:, i : i + 1])[:, 0] for i, s in enumerate(out.scores)])
    with torch.no_grad():
        got = edits.edited_logprobs(m, [e], prompts, new)[0]
    torch.testing.assert_close(got, steps.sum(0).double(), atol=1e-5, rtol=1e-5)  # generate keeps float32 scores
    assert not torch.allclose(got, edits.edited_logprobs(m, [edits.vector(m, [(1, 2)])], prompts, new)[0].detach())


def test_apply_inside_own_trace(model):
    m = model
    tokens = _tokens(m)
    e = edits.additive(m, {(0, 3): torch.ones(m.d_head)}) + edits.additive(m, {(1, 0): -torch.ones(m.d_head)})
    with m.nn.trace(tokens):
        e.apply()
        out = m.nn.output.logits.save()
    torch.testing.assert_close(out, e.logits(tokens), atol=0, rtol=0)


# ---- zero edits, KL, saving ----

def test_zero_edits_are_bit_identical(sft):
    m = sft
    tokens = torch.cat([m.to_tokens(["The glimmet is"]), _tokens(m, n=2, seq=4)])
    ref = m.logits(tokens)
    zero = [edits.vector(m, edits.all_heads(m)), edits.lofit(m, [(0, 0), (3, 3)]),
            edits.rank1(m, [(1, 1), (2, 0)], seed=4), edits.additive(m, {(2, 2): torch.zeros(m.d_head)}, "last")]
    for e in zero + [edits.compose(zero)]:
        assert torch.equal(e.logits(tokens), ref), e


def test_an_edit_that_fires_has_positive_kl(sft):
    m = sft
    tokens = m.to_tokens(["The glimmet is"])
    e = edits.additive(m, {(3, 1): torch.full((m.d_head,), 2.0)})
    kl = metrics.kl_divergence(e.logits(tokens), m.logits(tokens))
    assert kl.min() > 1e-3
    zero = edits.vector(m, [(3, 1)])
    assert metrics.kl_divergence(zero.logits(tokens), m.logits(tokens)).abs().max() == 0


def test_save_load_roundtrip(sft, tmp_path):
    m = sft
    tokens = m.to_tokens(["The glimmet is"])
    e = edits.additive(m, {(1, 2): torch.randn(m.d_head)}, "last") + edits.rank1(m, [(2, 1)], seed=5)
    e.parts[1].params["b"] += 0.3
    e.save(tmp_path / "e")
    back = edits.load(m, tmp_path / "e")
    assert back.config() == e.config()
    assert torch.equal(back.logits(tokens), e.logits(tokens))
    assert not torch.equal(back.logits(tokens), m.logits(tokens))


# ---- head selection ----

def test_head_selection(sft):
    m = sft
    assert len(edits.all_heads(m)) == 16 and edits.single_heads(m)[5] == ["a1.h1"]
    draw = edits.random_heads(m, 5, seed=3)
    assert draw == edits.random_heads(m, 5, seed=3) and len(set(draw)) == 5
    # uniform: over many seeds every head is drawn about k/16 of the time (binomial sd ~ 0.011 at 2,000 draws)
    counts = torch.zeros(16)
    for seed in range(2000):
        for l, h in map(parse, edits.random_heads(m, 4, seed=seed)):
            counts[l * 4 + h] += 1
    assert (counts / 2000 - 4 / 16).abs().max() < 0.05
    scores = il.Scores(torch.tensor([[0.1, 0.9], [0.5, -2.0]]), ("layer", "head"))
    assert edits.top_k(scores, 3) == ["a0.h1", "a1.h0", "a0.h0"]
    assert edits.head_name((3, 1)) == "a3.h1" and edits.head_name("a3.h1") == "a3.h1"
    # heads given as pairs or as names make the same edit, named the project's way
    assert edits.vector(m, [(1, 2), "a0.h3"]).heads == ("a1.h2", "a0.h3")


def test_clear_errors(sft):
    m = sft
    with pytest.raises(ValueError, match="d_head"):
        edits.additive(m, {(0, 0): torch.zeros(5)})
    with pytest.raises(ValueError, match="outside the model"):
        edits.vector(m, [(4, 0)])
    with pytest.raises(ValueError, match="repeat"):
        edits.lofit(m, [(1, 1), (1, 1)])
    with pytest.raises(ValueError, match="repeat"):
        edits.lofit(m, [(1, 1), "a1.h1"])  # one head, named two ways
    with pytest.raises(ValueError, match="is an MLP"):
        edits.vector(m, ["m1"])
    with pytest.raises(ValueError, match="positions"):
        edits.additive(m, {(0, 0): torch.zeros(m.d_head)}, positions="first")
    with pytest.raises(ValueError, match="k must be"):
        edits.random_heads(m, 17, seed=0)
    with pytest.raises(ValueError, match="one of each"):
        edits.train(m, [edits.vector(m, [(0, 0)])], ["The glimmet is"] * 2, [" red ."], [" blue ."] * 2)
    with pytest.raises(ValueError, match="dpo"):
        edits.train(m, [edits.vector(m, [(0, 0)])], ["The glimmet is"], [" red ."], [" blue ."], objective="kto",
                    steps=1, progress=False)


# ---- training ----

def _pairs(n):
    pairs = corpus.preference_pairs("train")[:n]
    return [p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs]


def _hand_logprob(m, tokens, prompt_len, changes):
    """Sum of log p(completion) from a raw-hooked forward, with autograd."""
    handles = [m.module(m.spec.head_values, layer).register_forward_pre_hook(
        lambda mod, args, f=f: (f(args[0]),) + args[1:]) for layer, f in changes.items()]
    try:
        logits = m.hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    logp = logits[:, prompt_len - 1 : -1].log_softmax(-1)
    return logp.gather(-1, tokens[:, prompt_len:, None])[..., 0].sum(-1)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("kind", ["ipo", "dpo"])
def test_loss_and_first_step_match_hand_computation(sft, kind, positions):
    """The loss of a nonzero edit and Adam's first update (lr * g / (|g| + eps)), all from a raw hook here.

    In training, "last" edits the prompt's last position and every completion position (what generation
    under the edit touches)."""
    m, beta, lr = sft, 0.3, 0.05
    prompts, chosen, rejected = _pairs(6)
    p, c, r = m.to_tokens(prompts), m.to_tokens(chosen, prepend_bos=False), m.to_tokens(rejected, prepend_bos=False)
    start = torch.randn(m.d_head, generator=torch.Generator().manual_seed(6))
    e = edits.additive(m, {(2, 3): start}, positions=positions)
    losses = edits.train(m, [e], prompts, chosen, rejected, objective=kind, beta=beta, steps=1, lr=lr, progress=False)

    vec = start.clone().requires_grad_(True)
    change = {2: _add_at(m, 3, vec, last=positions == "last", start=p.shape[1] - 1)}
    with torch.no_grad():
        ref_c, ref_r = (_hand_logprob(m, torch.cat([p, x], 1), p.shape[1], {}) for x in (c, r))
    margin = (_hand_logprob(m, torch.cat([p, c], 1), p.shape[1], change) - ref_c) - (
        _hand_logprob(m, torch.cat([p, r], 1), p.shape[1], change) - ref_r)
    if kind == "ipo":
        loss = ((margin - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = torch.log1p(torch.exp(-beta * margin)).mean()
    (grad,) = torch.autograd.grad(loss, [vec])  # not backward(): that would leave .grad on the model's weights
    assert losses[0, 0].item() == pytest.approx(loss.item(), rel=1e-5)
    want = start - lr * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(e.params["vector"][0], want, atol=1e-5, rtol=1e-4)


def test_training_loss_on_every_family(model):
    """Step-0 IPO loss of a nonzero edit at layer 1 (so blocks below are skipped with their cached output)
    against raw hooks, for GPT-2, GPT-NeoX and Llama with GQA."""
    m, beta = model, 0.2
    g = torch.Generator().manual_seed(8)
    p = torch.randint(3, m.d_vocab, (5, 4), generator=g)
    c, r = torch.randint(3, m.d_vocab, (2, 5, 2), generator=g)
    vec = torch.randn(m.d_head, generator=g, dtype=torch.float64)
    e = edits.additive(m, {(1, 1): vec})
    losses = edits.train(m, [e, edits.vector(m, [(0, 3)])], p, c, r, objective="ipo", beta=beta, steps=1, lr=0.0,
                         progress=False)
    with torch.no_grad():
        ref_c, ref_r = (_hand_logprob(m, torch.cat([p, x], 1), 4, {}) for x in (c, r))
        pol_c, pol_r = (_hand_logprob(m, torch.cat([p, x], 1), 4, {1: _add_at(m, 1, vec)}) for x in (c, r))
    want = (((pol_c - ref_c) - (pol_r - ref_r) - 1 / (2 * beta)) ** 2).mean()
    assert losses[0, 0].item() == pytest.approx(want.item(), rel=1e-9)
    assert losses[0, 1].item() == pytest.approx(1 / (2 * beta) ** 2, rel=1e-9)  # a zero edit: margin 0


def test_training_leaves_the_model_unchanged(sft):
    m = sft
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    flags = [p.requires_grad for p in m.hf.parameters()]
    es = [edits.vector(m, [(1, 1)]), edits.lofit(m, [(2, 0)]), edits.rank1(m, [(3, 2)])]
    edits.train(m, es, *_pairs(4), steps=3, lr=0.05, progress=False)
    after = m.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in m.hf.parameters())
    assert [p.requires_grad for p in m.hf.parameters()] == flags  # frozen only while training
    assert all(e.params[next(iter(e.params))].abs().sum() > 0 for e in es)  # the edits did move


def test_batched_training_equals_one_by_one(sft):
    m = sft
    make = lambda: [edits.vector(m, [(0, 2)]), edits.vector(m, [(3, 1), (1, 0)], positions="last"),  # noqa: E731
                    edits.lofit(m, [(2, 2)]), edits.rank1(m, [(1, 3), (2, 1)], seed=7)]
    together, alone = make(), make()
    pairs = _pairs(8)
    got = edits.train(m, together, *pairs, steps=4, lr=0.05, batch_size=5, seed=1, progress=False)
    want = torch.cat([edits.train(m, [e], *pairs, steps=4, lr=0.05, batch_size=5, seed=1, progress=False)
                      for e in alone], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(together, alone):
        for name in a.params:
            torch.testing.assert_close(a.params[name], b.params[name], atol=1e-5, rtol=1e-5)
    assert (got[-1] < got[0]).all()  # and each one learned


# ---- a planted head: ITI finds it, steering it moves the output as computed by hand ----

TRUE_WORDS, FALSE_WORDS = ["red", "blue", "green"], ["big", "small", "fast"]


def _planted_model():
    """A 2-layer, 2-head GPT-2 (d_model 8, d_head 4) where only head a1.h0 sees the label.

    Embedding dims 0 and 1 hold (+s, -s) for "true" words and (-s, +s) for "false" ones (0 for the rest),
    so the layer norm's mean and variance do not depend on the label; dims 2-7 are label-free noise.
    Label words share their noise dims. Queries and keys are zero (uniform attention), MLPs are zero. Every
    head's value reads the noise dims, except a1.h0's value dimension 0, which reads only dim 0; the output
    projection writes it back to dim 0.
    """
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(TOK), n_layer=2, n_head=2, n_embd=8, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    hf = GPT2LMHeadModel(config).double()
    g = torch.Generator().manual_seed(0)
    s = 3.0
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for block in hf.transformer.h:
            block.ln_1.weight.fill_(1), block.ln_2.weight.fill_(1)
        hf.transformer.ln_f.weight.fill_(1)
        wte = hf.transformer.wte.weight
        wte[:, 2:] = torch.randn(len(TOK), 6, generator=g, dtype=torch.float64)
        common = torch.randn(6, generator=g, dtype=torch.float64)  # label words differ only in dims 0-1
        for word, sign in [(w, 1) for w in TRUE_WORDS] + [(w, -1) for w in FALSE_WORDS]:
            wte[TOK.convert_tokens_to_ids(word)] = torch.cat([torch.tensor([sign * s, -sign * s]), common])
        for block in hf.transformer.h:
            v = block.attn.c_attn.weight[:, 16:]  # Conv1D [in 8, out 3*8]: values, [in, n_heads*d_head]
            v[2:] = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.5
            block.attn.c_proj.weight[:, 2:] = torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.5
        last = hf.transformer.h[1].attn
        last.c_attn.weight[:, 16] = 0.0
        last.c_attn.weight[0, 16] = 1.0  # a1.h0 value dim 0 reads only residual dim 0
        last.c_proj.weight[0, 0] = 1.0  # and writes it back to residual dim 0
    return il.load(hf, tokenizer=TOK)


def _planted_data(m, n=120):
    g = torch.Generator().manual_seed(1)
    neutral = [TOK.convert_tokens_to_ids(w) for w in ["lamp", "fox", "park", "the", "happy", "spoon"]]
    words = TRUE_WORDS + FALSE_WORDS
    last = torch.tensor([TOK.convert_tokens_to_ids(words[i]) for i in torch.randint(0, 6, (n,), generator=g)])
    middle = torch.tensor(neutral)[torch.randint(0, len(neutral), (n, 3), generator=g)]
    tokens = torch.cat([torch.full((n, 1), TOK.bos_token_id), middle, last[:, None]], 1)
    labels = torch.isin(last, torch.tensor([TOK.convert_tokens_to_ids(w) for w in TRUE_WORDS]))
    return tokens, labels


def test_planted_head_iti():
    m = _planted_model()
    tokens, labels = _planted_data(m)
    probe = edits.fit_iti(m, tokens, labels, test_fraction=0.3, seed=0)
    acc = probe.accuracy.values
    assert probe.top(1) == ["a1.h0"]
    others = torch.cat([acc[0], acc[1, 1:]])
    assert acc[1, 0] > 0.95 and others.max() < 0.8  # the other heads carry no label

    # theta and sigma by hand: mass-mean (true - false) and std along it, training rows only
    x = il.probes.collect(m, tokens, site="heads")[:, 1, 0].double()  # (n, d_head)
    xt, yt = x[probe.train], labels[probe.train]
    theta = xt[yt].mean(0) - xt[~yt].mean(0)
    theta = theta / theta.norm()
    sigma = (xt @ theta).std(correction=0)
    torch.testing.assert_close(probe.theta[1, 0].double(), theta, atol=1e-5, rtol=1e-5)
    assert probe.sigma[1, 0].item() == pytest.approx(sigma.item(), rel=1e-5)

    # steering a1.h0 by alpha*sigma*theta adds W_O,h0 (alpha*sigma*theta) to the residual before ln_f
    alpha = 4.0
    e = edits.iti(m, probe, [(1, 0)], alpha=alpha)
    hf = m.hf
    resid = []
    handle = hf.transformer.ln_f.register_forward_pre_hook(lambda mod, args: resid.append(args[0]))
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    vec = alpha * probe.sigma[1, 0].double() * probe.theta[1, 0].double()  # checked against the hand values above
    shift = vec @ hf.transformer.h[1].attn.c_proj.weight[0:4]  # (d_model,)
    r = resid[0] + shift
    ln = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, correction=0, keepdim=True) + 1e-5)
    want = ln @ hf.transformer.wte.weight.T
    got = e.logits(tokens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # the probe is float32

    true_ids = [TOK.convert_tokens_to_ids(w) for w in TRUE_WORDS]
    false_ids = [TOK.convert_tokens_to_ids(w) for w in FALSE_WORDS]
    gap = lambda logits: (logits[:, -1, true_ids].mean(-1) - logits[:, -1, false_ids].mean(-1))  # noqa: E731
    # on "false" prompts, steering toward "true" raises the true words (on "true" ones the final layer norm
    # saturates: the hand computation above is the check there)
    assert (gap(got) > gap(m.logits(tokens)))[~labels].all()
    assert math.isclose(float(theta[0]), 1.0, abs_tol=0.3)  # theta points along the planted value dimension
