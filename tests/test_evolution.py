"""Free-evolution metrics against hand-computed values, direct formulas, raw PyTorch hooks and a planted
migration; the conflict tasks; the checkpoint slider (the series itself: test_series.py)."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab import evolution as ev
from interplab.organisms.tokenizer import build_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:the clean-vs-corrupt gap")  # random toy tasks have small gaps

NAMES = ["a0.h0", "a0.h1", "m0", "a1.h0", "m1"]


def _scores(values):
    return il.Scores(torch.tensor(values, dtype=torch.float), ("component",), {"component": NAMES})


# ---- distance and rank stability on hand-made vectors ----

def test_distance_on_hand_made_scores():
    a, b = _scores([3.0, -2.0, 1.0, 0.0, 0.5]), _scores([0.0, -2.0, 2.5, 3.0, 0.1])
    # top-2 by |value|: a {a0.h0, a0.h1}, b {a1.h0, m0}: disjoint
    assert ev.circuit_distance(a, b, 2) == 1.0
    # top-3: a {a0.h0, a0.h1, m0}, b {a1.h0, m0, a0.h1}: 2 shared of 4
    assert ev.circuit_distance(a, b, 3) == pytest.approx(0.5)
    assert ev.circuit_distance(a, b, 3, component="head") == pytest.approx(1 - 1 / 3)  # {a0.h0,a0.h1} vs {a1.h0,a0.h1}
    assert ev.circuit_distance(a, b, 3, component="mlp") == 0.0  # {m0} vs {m0}
    assert ev.circuit_distance(a, a, 5) == 0.0
    # min(|a|,|b|) sums to 0+2+1+0+0.1 = 3.1, max to 3+2+2.5+3+0.5 = 11
    assert ev.weighted_distance(a, b) == pytest.approx(1 - 3.1 / 11)
    assert ev.weighted_distance(a, b, component="mlp") == pytest.approx(1 - (1 + 0.1) / (2.5 + 0.5))
    assert ev.top_components(b, 3) == ["a1.h0", "m0", "a0.h1"]


def test_distance_rejects_bad_input():
    a = _scores([1.0, 2, 3, 4, 5])
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must be"):
            ev.circuit_distance(a, a, k)
    other = il.Scores(a.values, ("component",), {"component": NAMES[::-1]})
    with pytest.raises(ValueError, match="different components"):
        ev.circuit_distance(a, other, 2)
    with pytest.raises(ValueError, match="dims"):
        ev.circuit_distance(il.Scores(torch.zeros(2, 2), ("layer", "head")), a, 1)
    with pytest.raises(ValueError, match="undefined"):
        ev.weighted_distance(_scores([0.0] * 5), _scores([0.0] * 5))


def test_rank_stability_is_spearman_by_its_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, generator=g), torch.randn(5, generator=g)
    rank = lambda v: v.argsort().argsort().double()
    d = rank(x) - rank(y)
    n = len(x)
    want = 1 - 6 * (d ** 2).sum().item() / (n * (n ** 2 - 1))  # no ties in continuous draws
    assert ev.rank_stability(_scores(x.tolist()), _scores(y.tolist())) == pytest.approx(want)
    assert ev.rank_stability(_scores(x.tolist()), _scores((-x).tolist())) == pytest.approx(-1)


def test_linear_cka_is_the_centred_hsic_ratio():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    h = torch.eye(30, dtype=torch.float64) - 1 / 30  # centring matrix
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    want = (k * l_).sum() / ((k * k).sum() * (l_ * l_).sum()).sqrt()  # tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))
    assert ev.linear_cka(x, y) == pytest.approx(want.item())
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert ev.linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)  # invariant to rotation, scale, shift
    assert math.isnan(ev.linear_cka(x, torch.ones(30, 2)))


# ---- node faithfulness against raw hooks ----

@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=16, n_positions=16, initializer_range=0.3)
    m = il.load(GPT2LMHeadModel(config).double(), tokenizer=tok)
    return m, il.tasks.random_tokens(m, n=4, seq=6, seed=0)


def _raw_faithfulness(m, task, circuit, final_only=False):
    """The same definition written with plain forward hooks, one circuit at a time."""
    hf, dh = m.hf, m.d_head
    cache = {}
    hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda mod, args, i=i: cache.__setitem__(("z", i), args[0]))
             for i, blk in enumerate(hf.transformer.h)]
    hooks += [blk.mlp.c_proj.register_forward_hook(lambda mod, args, out, i=i: cache.__setitem__(("m", i), out))
              for i, blk in enumerate(hf.transformer.h)]
    with torch.no_grad():
        clean = task.metric(hf(task.clean).logits).mean()
        for h in hooks:
            h.remove()
        corrupt = task.metric(hf(task.corrupt).logits).mean()
        pos = slice(-1, None) if final_only else slice(None)

        def z_hook(mod, args, layer):
            z = args[0].clone()
            for name in circuit:
                if name.startswith(f"a{layer}."):
                    h = int(name.split(".h")[1])
                    z[:, pos, h * dh:(h + 1) * dh] = cache[("z", layer)][:, pos, h * dh:(h + 1) * dh]
            return (z,)

        def m_hook(mod, args, out, layer):
            if f"m{layer}" not in circuit:
                return out
            out = out.clone()
            out[:, pos] = cache[("m", layer)][:, pos]
            return out

        hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda mod, a, i=i: z_hook(mod, a, i))
                 for i, blk in enumerate(hf.transformer.h)]
        hooks += [blk.mlp.c_proj.register_forward_hook(lambda mod, a, o, i=i: m_hook(mod, a, o, i))
                  for i, blk in enumerate(hf.transformer.h)]
        patched = task.metric(hf(task.corrupt).logits).mean()
        for h in hooks:
            h.remove()
    return ((patched - corrupt) / (clean - corrupt)).item()


@pytest.mark.parametrize("final_only", [False, True])
def test_node_faithfulness_matches_raw_hooks(small, final_only):
    m, task = small
    circuits = [[], ["a0.h1"], ["a0.h0", "m1"], ["a0.h1", "m0", "a1.h0"], il.components.component_names(m)]
    got = ev.node_faithfulness(m, task, circuits, final_only=final_only, circuits_per_run=2)
    want = torch.tensor([_raw_faithfulness(m, task, c, final_only) for c in circuits], dtype=got.dtype)
    torch.testing.assert_close(got, want)
    assert got[0] == 0
    if not final_only:  # the final token is the same in clean and corrupt prompts
        assert got[-1].item() == pytest.approx(1.0)


def test_patching_locator_is_one_component_faithfulness(small):
    m, task = small
    names = il.components.component_names(m)
    scores = ev.component_scores(m, task)
    assert scores.labels["component"] == names
    torch.testing.assert_close(scores.values, ev.node_faithfulness(m, task, [[n] for n in names]).float())
    heads = il.patching.heads(m, task, progress=False).values
    torch.testing.assert_close(scores.values[[0, 1, 3, 4]], heads.flatten().float())
    final = ev.component_scores(m, task, position="final")
    torch.testing.assert_close(final.values, torch.tensor(
        [_raw_faithfulness(m, task, [n], final_only=True) for n in names], dtype=torch.float))
    with pytest.raises(ValueError, match="locator"):
        ev.component_scores(m, task, locator="nope")


def test_component_outputs_add_up_to_the_residual_stream(small):
    m, task = small
    outs = ev.component_outputs(m, task.clean)  # (n_comp, B*T, D)
    seen = {}
    hook = m.hf.transformer.ln_f.register_forward_pre_hook(lambda mod, args: seen.__setitem__("resid", args[0]))
    with torch.no_grad():
        m.hf(task.clean)
        embed = m.hf.transformer.wte(task.clean) + m.hf.transformer.wpe(torch.arange(task.clean.shape[1]))
    hook.remove()
    biases = sum(blk.attn.c_proj.bias for blk in m.hf.transformer.h)  # added once per layer, owned by no head
    rebuilt = embed.flatten(0, 1) + outs.sum(0) + biases
    torch.testing.assert_close(rebuilt, seen["resid"].flatten(0, 1))
    same = ev.representational_stability(m, m, task.clean)
    torch.testing.assert_close(same.values, torch.ones(6))


# ---- a planted migration ----

def _planted_series(m, steps=6):
    """Head a1.h0 alone carries the answer at step 0, head a1.h1 alone at step 5: every other component
    writes nothing (zeroed output weights), and the two heads' output rows are scaled by 1 - s/5 and s/5."""
    dh = m.d_head
    checkpoints = []
    for s in range(steps):
        hf = GPT2LMHeadModel(m.hf.config).double()
        hf.load_state_dict(m.hf.state_dict())
        with torch.no_grad():
            for blk in hf.transformer.h:
                blk.mlp.c_proj.weight.zero_()
                blk.mlp.c_proj.bias.zero_()
            hf.transformer.h[0].attn.c_proj.weight.zero_()
            w = hf.transformer.h[1].attn.c_proj.weight  # Conv1D [in = H*dh, out]
            w[:dh] *= 1 - s / (steps - 1)
            w[dh:] *= s / (steps - 1)
        checkpoints.append((f"step {s}", il.load(hf, tokenizer=m.tokenizer)))
    return checkpoints


@pytest.fixture(scope="module")
def planted(small):
    m, task = small
    return ev.track(_planted_series(m), [task], k=1, conflicts=[("random", "random")], progress=False)


def test_planted_migration_is_detected(planted, small):
    traj = planted
    assert traj.circuit("random", 0) == ["a1.h0"] and traj.circuit("random", 5) == ["a1.h1"]
    assert traj.distance("random")[-1] == 1.0 and traj.distance("random", component="mlp").abs().sum() == 0
    moved = traj.distance("random", "previous")
    assert (moved == 1).sum() == 1  # the circuit switches heads exactly once
    f = traj.faithfulness["random"]
    assert f[0, 0].item() == pytest.approx(1.0) and f[0, 5].item() == pytest.approx(0.0, abs=1e-9)
    assert f[5, 5].item() == pytest.approx(1.0)
    assert traj.lag("random")[-1].item() == pytest.approx(1.0)
    task = small[1]
    for t, (_, m) in enumerate(_planted_series(small[0])):
        want = task.metric(m.logits(task.clean)).mean() - task.metric(m.logits(task.corrupt)).mean()
        assert traj.gap["random"][t].item() == pytest.approx(want.item())
    scores = traj.scores["random"]
    other = [i for i, n in enumerate(traj.components) if n not in ("a1.h0", "a1.h1")]
    assert scores[:, other].abs().max() < 1e-6  # nothing else carries anything
    assert scores[0, traj.components.index("a1.h1")] == 0 and scores[5, traj.components.index("a1.h0")] == 0
    # a1.h1 writes nothing at step 0 (CKA undefined); a1.h0's output at step 4 is a scaled copy of step 0's
    assert math.isnan(traj.cka["random"][0, traj.components.index("a1.h1")])
    assert traj.cka["random"][4, traj.components.index("a1.h0")].item() == pytest.approx(1.0)


def test_trajectory_figures_and_table(planted):
    traj = planted
    assert "step 5" in traj.table("random")
    fig = traj.curves_figure("random")
    assert len(fig.data) == 9
    heat = traj.heatmap("random")
    assert list(heat.data[0].y) == traj.components and list(heat.data[0].x) == traj.labels
    conflict = traj.conflict_figure()
    assert conflict.data[0].y == tuple(traj.overlap("random", "random").tolist())
    assert conflict.layout.yaxis.dtick == 1  # overlaps are counts: no tick at 2.5


# ---- gradient conflict ----

def test_gradient_conflict_on_known_gradients(small):
    m, task = small
    dh = m.d_head
    q00 = lambda hf: hf.transformer.h[0].attn.c_attn.weight[:, :dh]  # head 0's query columns (GPT-2 concat layout)
    up = lambda hf: q00(hf).sum()  # gradient: all ones on a0.h0's query weights
    down = lambda hf: -q00(hf).sum()
    twice = lambda hf: 2 * q00(hf).sum()
    split = lambda hf: q00(hf)[:, : dh // 2].sum() - q00(hf)[:, dh // 2:].sum()  # orthogonal to `up`
    for other, want in ((down, -1.0), (twice, 1.0), (split, 0.0)):
        cos = ev.gradient_conflict(m, up, other)
        assert cos.values[0].item() == pytest.approx(want, abs=1e-12)
        assert torch.isnan(cos.values[1:]).all()  # no gradient on any other component
    same = ev.gradient_conflict(m, task, task, names=["a0.h1", "m1"])
    torch.testing.assert_close(same.values, torch.ones(2))
    flipped = lambda hf: -ev.task_loss(task)(hf)
    torch.testing.assert_close(ev.gradient_conflict(m, task, flipped).values, -torch.ones(6))
    # logit-diff losses of a task and of the same task with answer and wrong swapped are exact opposites
    swapped = il.Task("swapped", task.clean, task.corrupt, task.wrong, task.answer, [], [])
    torch.testing.assert_close(ev.gradient_conflict(m, task, swapped, loss="logit_diff").values, -torch.ones(6))


# ---- the conflict tasks ----

def test_conflict_tasks_differ_only_in_the_cue():
    m = il.load("interplab/tiny-base")
    to, frm = il.tasks.make("ioi_qa", m, n=8, seed=0), il.tasks.make("ioi_from", m, n=8, seed=0)
    for a, b in zip(to.clean_text, frm.clean_text):
        assert a.replace(" to whom?", " from whom?") == b
    assert torch.equal(to.answer, frm.wrong) and torch.equal(to.wrong, frm.answer)


# ---- the checkpoint slider ----

def test_checkpoint_slider_redraws(planted):
    traj = planted
    ex = il.ui.widgets.CheckpointExplorer(traj)
    assert ex.checkpoint.value == 5
    ex.checkpoint.value = 2
    left, right = ex.grids.data[0], ex.grids.data[2]
    flat = lambda z: [v for row in z for v in row]
    assert flat(right.z) == pytest.approx([traj.scores["random"][2, traj.components.index(n)].item()
                                           for n in ["a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]])
    assert flat(left.z)[3] == pytest.approx(traj.scores["random"][0, 3].item())
    assert [s.x0 for s in ex.curves.layout.shapes] == [2, 2]
    with pytest.raises(ValueError, match="not in the trajectory"):
        il.ui.widgets.CheckpointExplorer(traj, task="ioi")


def test_checkpoint_slider_is_busy_while_it_redraws(planted, monkeypatch):
    ex = il.ui.widgets.CheckpointExplorer(planted)
    seen = []
    real = il.ui.viz.trajectory_curves

    def spy(*args, **kwargs):
        seen.append((ex.busy, [c.disabled for c in ex.controls], ex.status.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(il.ui.viz, "trajectory_curves", spy)
    ex.checkpoint.value = 3
    (busy, disabled, status), = seen
    assert busy and all(disabled) and "computing" in status and planted.labels[3] in status
    assert not ex.busy and not any(c.disabled for c in ex.controls) and ex.status.value == ""
