import copy
import math
import random

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import training, updates


@pytest.fixture(scope="module")
def base():
    return il.load("interplab/tiny-base")


def tiny(family: str, tokenizer) -> il.Model:
    """Small random models of the two other families: NeoX (interleaved q/k/v) and Llama with 4 query heads
    sharing 2 key/value heads (grouped-query attention, biases on)."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                  intermediate_size=64, max_position_embeddings=32)
    if family == "neox":
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.5))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    return il.load(hf, tokenizer=tokenizer)


def head_result_grads(m: il.Model, layer: int, head: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of a random projection of head `head`'s result, `z_h @ W_O[h]` (written here from the output
    projection's input, split into heads as [n_heads, d_head]), w.r.t. the layer's attention parameters."""
    captured = {}
    o_proj = m.module(m.spec.head_values, layer=layer)
    handle = o_proj.register_forward_pre_hook(lambda mod, args: captured.setdefault("z", args[0]))
    try:
        m.hf(tokens)
    finally:
        handle.remove()
    z = captured["z"].unflatten(-1, (m.n_heads, m.d_head))[..., head, :]  # (B, T, d_head)
    w = o_proj.weight  # Conv1D [in, out], Linear [out, in]
    split = (m.n_heads, m.d_head)
    w_h = w.unflatten(0, split)[head] if m.spec.conv1d else w.unflatten(1, split)[:, head].T  # (d_head, d_model)
    result = z @ w_h  # (B, T, d_model)
    prefix = f"{m.spec.blocks}.{layer}.{m.spec.attn}."
    params = {n: p for n, p in m.hf.named_parameters() if n.startswith(prefix)}
    grads = torch.autograd.grad((result * torch.randn_like(result)).sum(), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama-gqa"])
def test_head_mask_is_exactly_the_parameters_that_move_the_head(base, family):
    m = base if family == "gpt2" else tiny(family.split("-")[0], base.tokenizer)
    tokens = torch.randint(3, len(base.tokenizer), (2, 7), generator=torch.Generator().manual_seed(1))
    for layer in range(min(m.n_layers, 2)):
        for head in range(m.n_heads):
            masks = updates.component_masks(m, [f"a{layer}.h{head}"])
            for name, grad in head_result_grads(m, layer, head, tokens).items():
                moves = grad != 0
                mask = masks.get(name, torch.zeros_like(grad)).bool()
                assert not (moves & ~mask).any(), f"{name}: gradient outside the mask of a{layer}.h{head}"
                if name.endswith("weight"):
                    assert moves[mask].all(), f"{name}: part of the mask of a{layer}.h{head} moves nothing"
                elif mask.any() and "k_proj" not in name:
                    # A key bias shifts all of a query's attention scores equally, which softmax ignores: it
                    # is the head's parameter but moves nothing (a third of a fused q/k/v bias slice).
                    moving = moves[mask].float().mean()
                    assert moving >= 2 / 3 - 1e-6, f"{name}: a{layer}.h{head}'s bias moves too little"


def test_gqa_query_heads_of_a_group_share_their_key_value_slices(base):
    m = tiny("llama", base.tokenizer)
    a, b, c = (updates.component_masks(m, [f"a0.h{h}"]) for h in (0, 1, 2))
    k = "model.layers.0.self_attn.k_proj.weight"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])  # heads 0, 1 share kv head 0
    assert not (a[q].bool() & b[q].bool()).any()


def test_mlp_mask_is_exactly_the_parameters_that_move_the_mlp(base):
    m = tiny("llama", base.tokenizer)
    for model in (base, m):
        mlp = model.module(model.spec.mlp, layer=1)
        x = torch.randn(2, 5, model.d_model)
        out = mlp(x)
        params = dict(model.hf.named_parameters())
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), list(params.values()), allow_unused=True)
        moved = {n for n, g in zip(params, grads) if g is not None and (g != 0).any()}
        masks = updates.component_masks(model, ["m1"])
        assert moved == set(masks) and all(t.bool().all() for t in masks.values())


def test_masks_union_and_bad_names(base):
    both = updates.component_masks(base, ["a1.h0", "a1.h3", "m2"])
    one = updates.component_masks(base, ["a1.h0"])
    three = updates.component_masks(base, ["a1.h3"])
    w = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(both[w], torch.maximum(one[w], three[w]))
    assert "transformer.h.1.attn.c_proj.bias" not in both  # belongs to no head
    assert both[w].sum() == 2 * 3 * base.d_model * base.d_head
    for bad in ("a9.h0", "a0.h7", "mlp1", "m"):
        with pytest.raises(ValueError, match="component|outside"):
            updates.component_masks(base, [bad])
    with pytest.raises(TypeError, match="list"):
        updates.component_masks(base, "m1")


def test_random_components_match_the_static_mix(base):
    like = ["a1.h2", "a1.h0", "a3.h1", "m2"]
    draws = updates.random_components(base, like, n_draws=25, seed=3)
    assert draws == updates.random_components(base, like, n_draws=25, seed=3)
    assert draws != updates.random_components(base, like, n_draws=25, seed=4)
    assert len({frozenset(d) for d in draws}) == 25
    for d in draws:
        layers = sorted(int(c[1]) for c in d if c.startswith("a"))
        assert layers == [1, 1, 3] and sum(c.startswith("m") for c in d) == 1 and len(set(d)) == 4
    # only 4 sets exist with one head in layer 0 and nothing else: distinct until exhausted, then repeats
    few = updates.random_components(base, ["a0.h1"], n_draws=6, seed=0)
    assert len({frozenset(d) for d in few[:4]}) == 4 and len(few) == 6
    heads_only = updates.random_components(base, like, n_draws=10, seed=0, match="heads")
    assert all("m2" in d and sorted(int(c[1]) for c in d if c.startswith("a")) == [1, 1, 3] for d in heads_only)
    kind = updates.random_components(base, like, n_draws=30, seed=0, match="kind")
    assert any(sorted(int(c[1]) for c in d if c.startswith("a")) != [1, 1, 3] for d in kind)
    with pytest.raises(ValueError, match="repeats"):
        updates.random_components(base, ["m1", "m1"], 2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        updates.random_components(base, [], 2, seed=0)


def ioi_loss(m: il.Model, n: int = 64, batch: int = 8):
    return training.answer_loss(il.tasks.make("ioi", m, n=n, seed=5), batch)


def test_batched_masked_runs_equal_sequential_runs(base):
    hf = copy.deepcopy(base.hf).double()
    m = il.load(hf, tokenizer=base.tokenizer)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    everything = {n: torch.ones_like(p) for n, p in before.items()}  # includes the tied embedding
    masks = [updates.component_masks(m, c) for c in (["a1.h2", "m3"], ["a0.h0", "a3.h3"], ["m0"])] + [everything]
    loss_fn = ioi_loss(m)
    runs = training.train_masked(hf, loss_fn, masks, steps=6, lr=1e-2, warmup=2)
    assert all(torch.equal(p, before[n]) for n, p in hf.named_parameters())  # the model itself is untouched
    assert runs.losses.shape == (6, 4)
    for k, mask in enumerate(masks):
        alone = copy.deepcopy(hf)
        losses = training.train(alone, loss_fn, steps=6, lr=1e-2, warmup=2, grad_mask=mask)
        torch.testing.assert_close(runs.losses[:, k], torch.tensor(losses, dtype=torch.float64), rtol=0, atol=1e-10)
        batched = runs.load_into(copy.deepcopy(hf), k)
        for (name, p), q in zip(alone.named_parameters(), batched.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
            frozen = mask.get(name, torch.zeros_like(p)) == 0
            assert torch.equal(q[frozen], before[name][frozen]), f"run {k} moved frozen entries of {name}"
            assert torch.equal(p[frozen], before[name][frozen])
        moved = [n for n, p in batched.named_parameters() if not torch.equal(p, before[n])]
        assert moved and set(moved) <= set(mask)


def test_train_masked_rejects_bad_masks(base):
    loss_fn = ioi_loss(base)
    with pytest.raises(ValueError, match="at least one mask"):
        training.train_masked(base.hf, loss_fn, [], steps=1, lr=1e-3)
    with pytest.raises(KeyError, match="does not have"):
        training.train_masked(base.hf, loss_fn, [{"nope": torch.ones(1)}], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="wrong shape"):
        training.train_masked(base.hf, loss_fn, [{"transformer.h.0.mlp.c_fc.bias": torch.ones(3)}], steps=1, lr=1e-3)


def test_foresight_scores_sum_gradient_times_weight_over_each_component(base):
    loss_fn = ioi_loss(base)
    scores = updates.foresight_scores(base, loss_fn, batches=2, kind="grad_x_weight")
    fisher = updates.foresight_scores(base, loss_fn, batches=2, kind="fisher")
    params = dict(base.hf.named_parameters())
    g = [dict(zip(params, torch.autograd.grad(loss_fn(base.hf, b), list(params.values())))) for b in range(2)]
    attn, mlp = "transformer.h.2.attn.", "transformer.h.2.mlp."
    d, dh = base.d_model, base.d_head
    cols = [1 * dh + i * d + j for i in range(3) for j in range(dh)]  # head 1 of [q | k | v]
    def head1(t, name):  # a2.h1's entries of parameter `name`, written out by hand
        if name.endswith("c_attn.weight"):
            return t[:, cols]
        if name.endswith("c_attn.bias"):
            return t[cols]
        return t[dh:2 * dh]  # c_proj.weight rows
    names = [attn + "c_attn.weight", attn + "c_attn.bias", attn + "c_proj.weight"]
    mean = {n: (g[0][n] + g[1][n]) / 2 for n in params}
    expect_head = sum(head1((mean[n] * params[n]).abs(), n).sum() for n in names)
    expect_mlp = sum((mean[n] * params[n]).abs().sum() for n in params if n.startswith(mlp))
    expect_fisher = sum(head1((g[0][n] ** 2 + g[1][n] ** 2) / 2, n).sum() for n in names)
    labels = scores.labels["component"]
    assert scores.dims == ("component",) and labels == updates.component_names(base)
    torch.testing.assert_close(scores.values[labels.index("a2.h1")], expect_head.detach())
    torch.testing.assert_close(scores.values[labels.index("m2")], expect_mlp.detach())
    torch.testing.assert_close(fisher.values[labels.index("a2.h1")], expect_fisher.detach())
    assert il.evolution.top_components(scores, 3) == [labels[i] for i in scores.values.abs().argsort(descending=True)[:3]]


def test_overlap_and_interval_by_hand():
    got = updates.overlap(["a", "b", "c", "d"], ["c", "d", "e"])
    assert got == {"jaccard": 2 / 5, "precision": 2 / 4, "recall": 2 / 3}
    mean, low, high = updates.t_interval([1.0, 2.0, 4.0])
    sem = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3)
    assert mean == pytest.approx(7 / 3) and high - mean == pytest.approx(4.302652729911275 * sem)  # t(0.975, 2)
    assert math.isnan(updates.t_interval([1.0])[1])


def test_update_experiment_runs_every_arm(base):
    from interplab.organisms import corpus

    target = il.tasks.make("ioi", base, n=16, seed=9)
    others = {"greater_than": il.tasks.make("greater_than", base, n=16, seed=9)}
    heldout, _ = training.pack_documents(base.tokenizer, corpus.base_documents(random.Random(7), 6), 64)
    static = ["a2.h1", "m3"]
    res = updates.update_experiment(
        base, lambda seed: ioi_loss(base, batch=4), target, others, heldout, static, foresight=["a0.h0", "m1"],
        oracle=lambda free: ["a0.h0", "m0"], steps=3, lr=1e-3, warmup=1, seeds=(0, 1), n_random=4)
    assert [r["arm"] for r in res.rows()] == list(updates.ARMS)
    assert [r["n"] for r in res.rows()] == [2, 2, 4, 2, 2]
    assert res.oracle == {0: ["a0.h0", "m0"], 1: ["a0.h0", "m0"]}
    assert res.anticipation["Static"]["jaccard"] == 0 and res.anticipation["Foresight"]["jaccard"] == 1 / 3
    assert 0 <= res.p_value <= 1 and "permutation p" in res.table()
    free, static_run = res.arm("Free")[0], res.arm("Static")[0]
    assert free.kl > 0 and static_run.kl > 0 and free.kl != static_run.kl
    assert len(res.figure().data) == 3 * 5 * 2
