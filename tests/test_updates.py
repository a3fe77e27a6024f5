import copy
import json
import math
import random

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import components, stats, training
from interplab.experiments import updates


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
            masks = components.component_masks(m, [f"a{layer}.h{head}"])
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
    a, b, c = (components.component_masks(m, [f"a0.h{h}"]) for h in (0, 1, 2))
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
        masks = components.component_masks(model, ["m1"])
        assert moved == set(masks) and all(t.bool().all() for t in masks.values())


def test_masks_union_and_bad_names(base):
    both = components.component_masks(base, ["a1.h0", "a1.h3", "m2"])
    one = components.component_masks(base, ["a1.h0"])
    three = components.component_masks(base, ["a1.h3"])
    w = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(both[w], torch.maximum(one[w], three[w]))
    assert "transformer.h.1.attn.c_proj.bias" not in both  # belongs to no head
    assert both[w].sum() == 2 * 3 * base.d_model * base.d_head
    for bad in ("a9.h0", "a0.h7", "mlp1", "m"):
        with pytest.raises(ValueError, match="component|outside"):
            components.component_masks(base, [bad])
    with pytest.raises(TypeError, match="list"):
        components.component_masks(base, "m1")


def test_random_components_match_the_static_mix_in_each_of_four_ways(base):
    like = ["a1.h2", "a1.h0", "a3.h1", "m2"]
    heads_by_layer = lambda d: sorted(components.parse(c)[0] for c in d if c.startswith("a"))
    n_mlps = lambda d: sum(c.startswith("m") for c in d)
    for match in components.MATCHES:
        draws = components.random_components(base, like, n_draws=25, seed=3, match=match)
        assert draws == components.random_components(base, like, n_draws=25, seed=3, match=match)
        assert draws != components.random_components(base, like, n_draws=25, seed=4, match=match)
        assert len({frozenset(d) for d in draws}) == 25  # without replacement
        assert all(len(set(d)) == 4 and d == sorted(d, key=components.component_names(base).index) for d in draws)
    layer = components.random_components(base, like, 25, seed=0, match="layer")
    assert all(heads_by_layer(d) == [1, 1, 3] and n_mlps(d) == 1 for d in layer)
    counts = components.random_components(base, like, 30, seed=0, match="counts")
    assert all(n_mlps(d) == 1 for d in counts) and any(heads_by_layer(d) != [1, 1, 3] for d in counts)
    heads = components.random_components(base, like, 30, seed=0, match="heads")
    assert all(n_mlps(d) == 0 for d in heads)
    uniform = components.random_components(base, like, 200, seed=0, match="uniform")
    assert len({n_mlps(d) for d in uniform}) >= 3  # the number of MLPs varies
    # counts of possible sets, by hand: 4 heads per layer, 4 MLPs, 16 heads, 20 components
    assert components.possible_sets(base, like, "layer") == math.comb(4, 2) * 4 * 4
    assert components.possible_sets(base, like, "counts") == math.comb(16, 3) * 4
    assert components.possible_sets(base, like, "heads") == math.comb(16, 4)
    assert components.possible_sets(base, like, "uniform") == math.comb(20, 4)
    # few sets: all of them, each once (the enumerating path), and no more than exist
    every = components.random_components(base, ["a0.h1", "m2"], n_draws=16, seed=0, match="layer")
    assert len({frozenset(d) for d in every}) == 16 == components.possible_sets(base, ["a0.h1", "m2"], "layer")
    with pytest.raises(ValueError, match="only 16 distinct"):
        components.random_components(base, ["a0.h1", "m2"], n_draws=17, seed=0, match="layer")
    with pytest.raises(ValueError, match="repeats"):
        components.random_components(base, ["m1", "m1"], 2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        components.random_components(base, [], 2, seed=0)
    with pytest.raises(ValueError, match="match must be"):
        components.random_components(base, like, 2, seed=0, match="same")


def ioi_loss(m: il.Model, n: int = 64, batch: int = 8):
    return training.answer_loss(il.tasks.make("ioi", m, n=n, seed=5), batch)


def test_batched_masked_runs_equal_sequential_runs(base):
    hf = copy.deepcopy(base.hf).double()
    m = il.load(hf, tokenizer=base.tokenizer)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    everything = {n: torch.ones_like(p) for n, p in before.items()}  # includes the tied embedding
    masks = [components.component_masks(m, c) for c in (["a1.h2", "m3"], ["a0.h0", "a3.h3"], ["m0"])] + [everything]
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
    scores = updates.foresight_scores(base, loss_fn, batches=2, score="grad_x_weight")
    fisher = updates.foresight_scores(base, loss_fn, batches=2, score="fisher")
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
    assert scores.dims == ("component",) and labels == components.component_names(base)
    torch.testing.assert_close(scores.values[labels.index("a2.h1")], expect_head.detach())
    torch.testing.assert_close(scores.values[labels.index("m2")], expect_mlp.detach())
    torch.testing.assert_close(fisher.values[labels.index("a2.h1")], expect_fisher.detach())
    assert il.evolution.top_components(scores, 3) == [labels[i] for i in scores.values.abs().argsort(descending=True)[:3]]


def test_overlap_and_interval_by_hand():
    got = components.overlap(["a", "b", "c", "d"], ["c", "d", "e"])
    assert got == {"jaccard": 2 / 5, "precision": 2 / 4, "recall": 2 / 3}
    mean, low, high = stats.t_interval([1.0, 2.0, 4.0])
    sem = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3)
    assert mean == pytest.approx(7 / 3) and high - mean == pytest.approx(4.302652729911275 * sem)  # t(0.975, 2)
    assert math.isnan(stats.t_interval([1.0])[1])


def test_single_set_arms_are_what_they_say():
    arms = updates.single_set_arms(["a0.h1", "m0", "a2.h0"], oracle=["m3"], foresight=["a1.h1", "m1"])
    assert arms == {"Static": ["a0.h1", "m0", "a2.h0"], "Static - top": ["m0", "a2.h0"], "Top alone": ["a0.h1"],
                    "Oracle": ["m3"], "Foresight": ["a1.h1", "m1"]}
    with pytest.raises(ValueError, match="at least 2"):
        updates.single_set_arms(["a0.h1"], ["m3"], ["m1"])


def test_update_experiment_runs_every_arm(base, monkeypatch):
    from interplab.organisms import corpus

    fed = {"masked": [], "moving": []}  # the masks each training loop was given, to check every arm's
    train_masked, train_moving_mask = training.train_masked, training.train_moving_mask

    def record_masked(model, loss_fn, masks, *args, **kw):
        fed["masked"].append(masks)
        return train_masked(model, loss_fn, masks, *args, **kw)

    def record_moving(model, loss_fn, locate, *args, **kw):
        given = []
        fed["moving"].append(given)

        def recorded(mm, step):
            given.append(locate(mm, step))
            return given[-1]

        return train_moving_mask(model, loss_fn, recorded, *args, **kw)

    monkeypatch.setattr(training, "train_masked", record_masked)
    monkeypatch.setattr(training, "train_moving_mask", record_moving)

    target = il.tasks.make("ioi", base, n=16, seed=9)
    others = {"greater_than": il.tasks.make("greater_than", base, n=16, seed=9)}
    heldout, _ = training.pack_documents(base.tokenizer, corpus.base_documents(random.Random(7), 6), 64)
    located = []

    def locate(model):  # a stand-in locator: records what it was asked about
        located.append(model.name)
        return ["a2.h1", "m3", "a0.h0"] if len(located) == 1 else ["a0.h0", "m0", "a1.h1"]

    res = updates.update_experiment(
        base, lambda seed: ioi_loss(base, batch=4), target, others, heldout, locate, foresight=["a0.h0", "m1"],
        steps=3, lr=1e-3, warmup=1, seeds=(0, 1), n_random=4, relocate_every=2)
    controls = [updates.control_name(match) for match in components.MATCHES]
    assert res.arms() == ["Free", "Dynamic", *updates.SINGLE_SET, *controls]
    assert [r["n"] for r in res.rows()] == [2] * 7 + [4] * 4
    assert res.static == ["a2.h1", "m3", "a0.h0"] and res.top == "a2.h1"
    # locate ran on the base, then per seed on the Free model (Oracle) and at step 2 of Dynamic
    assert located[0] == base.name and len(located) == 1 + 2 * 2
    assert res.oracle == {0: ["a0.h0", "m0", "a1.h1"], 1: ["a0.h0", "m0", "a1.h1"]}
    for run in res.runs:
        if run.arm in updates.SINGLE_SET:
            arms = updates.single_set_arms(res.static, res.oracle[run.seed], ["a0.h0", "m1"])
            assert run.components == arms[run.arm]
        if run.arm == "Dynamic":
            assert run.history == [(0, res.static), (2, ["a0.h0", "m0", "a1.h1"])]
            assert run.components == ["a0.h0", "m0", "a1.h1", "a2.h1", "m3"]
    for match, name in zip(components.MATCHES, controls):
        drawn = [r.components for r in res.arm(name)]
        assert sorted(drawn) == sorted(components.random_components(base, res.static, 4, seed=0, match=match))
        assert sum(len(v) for v in res.split(name).values()) == 4
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    for i, seed in enumerate((0, 1)):  # each run trained exactly its components' parameters
        masked = [r for r in res.runs if r.seed == seed and r.arm not in ("Free", "Dynamic")]
        assert len(fed["masked"][i]) == len(masked) == 5 + 4 * 2
        assert all(same(mask, components.component_masks(base, r.components))
                   for mask, r in zip(fed["masked"][i], masked))
        dynamic = next(r for r in res.runs if r.seed == seed and r.arm == "Dynamic")
        assert all(same(mask, components.component_masks(base, names))
                   for mask, (_, names) in zip(fed["moving"][i], dynamic.history, strict=True))
    assert res.anticipation["Static"]["jaccard"] == 1 / 5 and res.anticipation["Foresight"]["jaccard"] == 1 / 4
    assert set(res.tests) == {f"Static vs {c}" for c in controls} | {"Static vs Static - top", "Dynamic vs Static"}
    assert res.tests["Static vs Random (layer)"].min_p == pytest.approx(2 / math.comb(6, 2))
    table = res.table()
    assert "permutation test" in table and "base rate" in table and "with a2.h1" in table
    assert 0 <= res.before["accuracy"] <= 1
    free, static_run = res.arm("Free")[0], res.arm("Static")[0]
    assert free.kl > 0 and static_run.kl > 0 and free.kl != static_run.kl
    assert len(res.figure().data) == 3 * 11 * 2



def test_kl_interval_is_cut_at_zero_and_the_gain_interval_is_not():
    """KL is non-negative: with runs 0, 0, 0.9 the t-interval's low end (-1.04 by hand: mean 0.3, SE 0.3,
    t(0.975, 2) = 4.303) becomes 0, in the table and the figure; gain keeps its negative low end."""
    runs = [updates.Run("Random", 0, [f"a0.h{i}"], gain=g, accuracy=0.5, retention=0.0, kl=k)
            for i, (g, k) in enumerate([(0.0, 0.0), (0.0, 0.0), (0.9, 0.9)])]
    res = updates.UpdateResult(runs, tests={}, static=["a0.h0"], oracle={}, anticipation={}, before={})
    (row,) = res.rows()
    assert row["gain"][1] == pytest.approx(0.3 - 4.303 * 0.3, abs=1e-3)
    assert row["kl"] == (pytest.approx(0.3), 0.0, pytest.approx(row["gain"][2]))
    kl_mean = [t for t in res.figure().data if t.type == "scatter"][-1]
    assert kl_mean.error_y.arrayminus[0] == pytest.approx(0.3)  # down to 0, not below


def planted(tokenizer, live: str = "a1.h2") -> il.Model:
    """A Llama (no biases) in which every head but `live` and every MLP is dead: its value and output weights
    (a head) or all its weights (an MLP) are zero, so it outputs zero and every gradient through it is zero.
    Only `live` can change what the model computes, so only arms that contain it can gain."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=4, num_hidden_layers=2, intermediate_size=64,
                                      max_position_embeddings=64))
    m = il.load(hf, tokenizer=tokenizer)
    live_layer, live_head = components.parse(live)
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            for head in range(4):
                if (layer, head) != (live_layer, live_head):
                    rows = slice(head * 8, (head + 1) * 8)
                    block.self_attn.v_proj.weight[rows] = 0
                    block.self_attn.o_proj.weight[:, rows] = 0
            for proj in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                proj.weight.zero_()
    return m


def test_planted_ground_truth_is_found_and_explains_every_arm(base):
    m = planted(base.tokenizer)
    task = il.tasks.make("ioi", m, n=24, seed=3)
    loss = training.answer_loss(task, batch=8)
    score = lambda hf: -sum(loss(hf, b).item() for b in range(3)) / 3  # mean answer log-prob: the target

    def locate(model):  # |gradient x weight|: exactly zero for the dead components
        return il.evolution.top_components(updates.foresight_scores(model, loss, batches=1), 3)

    heldout = task.clean[:4]
    res = updates.update_experiment(m, lambda seed: training.answer_loss(task, 8, seed), score, {}, heldout, locate,
                                    foresight=["a0.h0", "m1"], steps=6, lr=1e-2, warmup=1, seeds=(0, 1, 2),
                                    n_random=6, relocate_every=3)
    assert res.top == "a1.h2"  # the planted component is found
    for run in res.runs:
        if run.arm == "Free":
            assert run.gain > 0
        elif "a1.h2" in run.components:
            assert run.gain > 1e-3 and run.kl > 0, run
        else:  # the mask held only dead components: nothing moved at all
            assert run.gain == 0 and run.kl == 0, run
    for seed in (0, 1, 2):
        gain = {r.arm: r.gain for r in res.runs if r.seed == seed and r.arm in ("Static", "Top alone", "Dynamic")}
        assert gain["Top alone"] == pytest.approx(gain["Static"], rel=1e-4)  # the dead extras add nothing
        assert gain["Dynamic"] == pytest.approx(gain["Static"], rel=1e-3)  # it keeps re-locating a1.h2 first
    assert all(located[0] == "a1.h2" for r in res.arm("Dynamic") for _, located in r.history)
    for name in (updates.control_name(match) for match in components.MATCHES):
        split = res.split(name)
        assert all(g > 1e-3 for g in split["with"]) and all(g == 0 for g in split["without"])
    # Static always beats Static without a1.h2: the most extreme split of 3 vs 3
    test = res.tests["Static vs Static - top"]
    assert test.p == pytest.approx(test.min_p) == pytest.approx(2 / 20)


def test_configurations_meet_the_issue_and_the_command_runs_one(base, tmp_path, monkeypatch, capsys):
    from interplab.experiments import run_updates

    full = run_updates.UpdateConfig.full()
    assert len(full.seeds) >= 5 and full.n_random >= 40 and set(full.controls) == set(components.MATCHES)
    small = run_updates.UpdateConfig.small()
    assert small.model == "interplab/tiny-base" and small.steps < full.steps
    # the command line, on a configuration small enough for a test
    tiny_config = run_updates.UpdateConfig.small(steps=2, seeds=(0, 1), n_random=2, others=("ioi",), n_train=16,
                                                 n_eval=8, heldout_docs=2, relocate_every=1, k=2)
    monkeypatch.setattr(run_updates.UpdateConfig, "small", classmethod(lambda cls, **kw: tiny_config))
    out = tmp_path / "small.json"
    result = run_updates.main(["--small", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Random (counts)" in printed and "Dynamic vs Static" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert saved["meta"]["config"]["steps"] == 2 and saved["static"] == result.static
    assert len(saved["runs"]) == len(result.runs) == 2 * 7 + 4 * 2
    dynamic = result.arm("Dynamic")[0]
    assert [step for step, _ in dynamic.history] == [0, 1]  # relocated every step
    loaded = updates.UpdateResult.load(out)  # the JSON reads back into the same result: same table, same tests
    assert loaded == result and loaded.table() == result.table()
    with pytest.raises(SystemExit):
        run_updates.main(["--small", "--full"])


def test_update_experiment_refuses_bad_input_before_any_training(base):
    task = il.tasks.make("ioi", base, n=4, seed=0)
    never = lambda seed: pytest.fail("training started")  # noqa: E731
    call = lambda **kw: updates.update_experiment(  # noqa: E731
        base, never, task, {}, kw.pop("heldout", task.clean), lambda mm: ["a0.h1", "m0"], ["m1"], **{
            "steps": 2, "lr": 1e-3, **kw})
    for kw, message in (({"controls": ("kind",)}, "controls"), ({"relocate_every": 0}, "relocate_every"),
                        ({"seeds": (0, 0)}, "each once"), ({"n_random": 0}, "n_random"),
                        ({"heldout": task.clean.float()}, "heldout")):
        with pytest.raises(ValueError, match=message):
            call(**kw)
    with pytest.raises(ValueError, match="only 6 distinct"):  # 2 of the 4 heads of layer 0: 6 sets
        updates.update_experiment(base, never, task, {}, task.clean, lambda mm: ["a0.h1", "a0.h2"], ["m1"],
                                  steps=2, lr=1e-3, n_random=7, controls=("layer",))


def test_the_shipped_full_result_is_the_full_configuration_and_its_tests_recompute():
    """Notebook 03 and README quote `results/updates-full.json`: it must be the `--full` run, with every arm's
    seeds and every control's distinct draws, and its tests must follow from its own runs."""
    from dataclasses import asdict

    from interplab.experiments import run_updates

    result, meta = run_updates.shipped("full")
    assert meta["config"] == json.loads(json.dumps(asdict(run_updates.UpdateConfig.full())))
    for arm in ("Free", "Dynamic", "Static", "Static - top", "Top alone", "Oracle", "Foresight"):
        assert sorted(r.seed for r in result.arm(arm)) == [0, 1, 2, 3, 4], arm
    for match in components.MATCHES:
        draws = result.arm(updates.control_name(match))
        assert len(draws) == 40 == len({tuple(sorted(r.components)) for r in draws}), match
    gains = lambda arm: [r.gain for r in result.arm(arm)]  # noqa: E731
    for name, test in result.tests.items():
        a, b = name.split(" vs ")
        assert stats.permutation_test(gains(a), gains(b), seed=meta["config"]["draw_seed"]) == test, name
    assert result.static[0] == result.top and all(r.components == [result.top] for r in result.arm("Top alone"))
    with pytest.raises(FileNotFoundError, match="updates-full.json"):
        run_updates.shipped("nope")
