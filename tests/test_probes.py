"""Probes: planted directions in synthetic activations, collection against raw hooks, and the
register feature on the shipped organisms."""

import math

import pytest
import torch
import transformers as T

import interplab as il
from interplab import probes
from interplab.organisms.tokenizer import build_tokenizer

TOK = build_tokenizer()


def gaussian_classes(n: int, d: int, separation: float, noise_scales: torch.Tensor | None = None, seed: int = 0):
    """Two Gaussian classes whose means differ by `separation` along a random unit `direction`."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = torch.arange(n) % 2 == 0
    scales = torch.ones(d) if noise_scales is None else noise_scales
    x = torch.randn(n, d, generator=gen) * scales + 3.0 + y[:, None] * separation * direction
    return x, y, direction


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("kind", probes.PROBES)
def test_planted_direction_and_bayes_accuracy(kind):
    # Isotropic unit noise, means `s` apart: the best possible accuracy is Φ(s/2).
    separation = 2.0
    x, y, direction = gaussian_classes(6000, 32, separation)
    probe = probes.fit(x, y, probe=kind, test_fraction=0.5, seed=0)
    assert probe.direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert probe.direction @ direction > 0.97
    assert probe.test_accuracy == pytest.approx(normal_cdf(separation / 2), abs=0.02)


def test_logistic_finds_the_whitened_direction_in_the_original_space():
    # With anisotropic noise Σ the optimal direction is Σ⁻¹Δμ, not Δμ; it must come back
    # in the activations' own coordinates (no per-feature rescaling left in it).
    d = 16
    scales = torch.linspace(0.3, 3.0, d)
    x, y, direction = gaussian_classes(8000, d, 2.0, noise_scales=scales)
    optimal = torch.nn.functional.normalize(direction / scales.square(), dim=0)
    logistic = probes.fit(x, y, probe="logistic", test_fraction=0.5)
    mass_mean = probes.fit(x, y, probe="mass_mean", test_fraction=0.5)
    assert logistic.direction @ optimal > 0.98
    assert mass_mean.direction @ direction > 0.98
    assert logistic.test_accuracy > mass_mean.test_accuracy


def test_sweep_finds_the_layer_and_head_with_the_signal():
    n, d = 400, 8
    torch.manual_seed(0)  # not the global state other tests leave behind
    x_resid = torch.randn(n, 3, d)
    x_heads = torch.randn(n, 3, 2, d)
    y = torch.arange(n) % 2 == 0
    x_resid[:, 1, 0] += 6 * y  # Bayes accuracy Phi(3) = 0.999, so 0.95 holds for any seed
    x_heads[:, 2, 1, 3] += 4 * y
    acc, directions = probes.sweep(x_resid, y)
    assert acc.dims == ("layer",) and acc.values.argmax().item() == 1 and acc.values[1] > 0.95
    assert directions[1, 0] > 0.9 and acc.values[[0, 2]].max() < 0.7
    acc, directions = probes.sweep(x_heads, y, probe="logistic")
    assert acc.dims == ("layer", "head") and acc.top(1)[0][0] == (2, 1) and directions[2, 1, 3] > 0.9


def test_groups_keep_twins_in_one_split():
    groups = torch.arange(50).repeat(2)
    train, test = probes.split(100, 0.3, seed=3, groups=groups)
    assert not (set(groups[train].tolist()) & set(groups[test].tolist()))
    assert test.sum() == 30


def test_clear_errors():
    x, y, _ = gaussian_classes(20, 4, 1.0)
    with pytest.raises(ValueError, match="unknown probe"):
        probes.fit(x, y, probe="svm")
    with pytest.raises(ValueError, match="labels must have shape"):
        probes.fit(x, y[:5])
    with pytest.raises(ValueError, match="bool or 0/1"):
        probes.fit(x, torch.arange(20))
    with pytest.raises(ValueError, match="test_fraction"):
        probes.fit(x, y, test_fraction=1.5)


def tiny(config):
    torch.manual_seed(0)
    return il.load(T.AutoModelForCausalLM.from_config(config), tokenizer=TOK)


@pytest.mark.parametrize("config", [
    T.GPT2Config(vocab_size=len(TOK), n_positions=32, n_embd=32, n_layer=3, n_head=4),
    T.LlamaConfig(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32),
], ids=["gpt2", "llama"])
def test_collect_matches_raw_forward_hooks(config):
    m = tiny(config)
    tokens = torch.randint(3, len(TOK), (10, 7))
    resid, head_in = [], []
    hooks = [m.block(l).register_forward_hook(lambda mod, args, out: resid.append(out[0] if isinstance(out, tuple) else out))
             for l in range(m.n_layers)]
    hooks += [m.module(m.spec.head_values, l).register_forward_pre_hook(lambda mod, args: head_in.append(args[0]))
              for l in range(m.n_layers)]
    with torch.no_grad():
        m.hf(tokens)
    for h in hooks:
        h.remove()
    expected_resid = torch.stack([r[:, -2] for r in resid], 1)  # (n, L, d)
    expected_heads = torch.stack([h[:, -2] for h in head_in], 1).view(10, m.n_layers, m.n_heads, m.d_head)
    torch.testing.assert_close(probes.collect(m, tokens, "resid", pos=-2, batch_size=4), expected_resid)
    torch.testing.assert_close(probes.collect(m, tokens, "heads", pos=-2, batch_size=3), expected_heads)
    with pytest.raises(ValueError, match="outside prompts"):
        probes.collect(m, tokens, pos=7)


@pytest.fixture(scope="module")
def register_probes():
    """Per organism: held-out accuracy per layer of both probe kinds (clean = cue vs corrupt),
    |class-mean difference| per layer, and the cue's effect on the formal-vs-plain logit diff."""
    out = {}
    for name in ("base", "sft"):
        m = il.load(f"interplab/tiny-{name}")
        task = il.tasks.make("register", m, n=128, seed=0)
        x, y, groups = probes.task_activations(m, task)
        out[name] = {kind: probes.sweep(x, y, kind, groups=groups)[0].values for kind in probes.PROBES}
        out[name]["mean_gap"] = (x[y].mean(0) - x[~y].mean(0)).norm(dim=-1)  # (L,)
        out[name]["behaviour"] = (task.metric(m.logits(task.clean)) - task.metric(m.logits(task.corrupt))).mean()
    return out


def test_register_probe_separates_on_sft_but_base_only_decodes_the_cue_token(register_probes):
    # Measured on the shipped organisms (n=128, seed 0, 30% of examples held out):
    # sft mass-mean [0.58, 1, 1, 1]; base mass-mean [0.55, 0.57, 0.74, 0.71];
    # base logistic [0.65, 0.75, 0.92, 0.99]. The cue token differs between clean and
    # corrupt prompts, so a flexible probe can read *which word was there* even in base.
    # What SFT adds is a large class-mean difference: the register direction.
    sft, base = register_probes["sft"], register_probes["base"]
    assert sft["mass_mean"].max() >= 0.95
    assert base["mass_mean"].max() < 0.85
    assert base["logistic"][-1] > 0.9
    assert (sft["mean_gap"][1:] > 10 * base["mean_gap"][1:]).all()


def test_register_behaviour_exists_only_after_sft(register_probes):
    # The answer behaviour: formal-minus-plain logit difference, cue vs no cue.
    assert register_probes["sft"]["behaviour"] > 5
    assert abs(register_probes["base"]["behaviour"]) < 1


def test_non_finite_activations_are_refused():
    x, y, _ = gaussian_classes(40, 4, 3.0)
    x[3, 1] = float("nan")
    for kind in probes.PROBES:
        with pytest.raises(ValueError, match="NaN or inf"):
            probes.fit(x, y, probe=kind)
    with pytest.raises(ValueError, match="NaN or inf"):
        probes.logistic(x, y)
    layers = torch.stack([gaussian_classes(40, 4, 3.0)[0]] * 3, dim=1)  # (n, L, d)
    layers[5, 2, 0] = float("inf")  # today layer 2 can come out as the best layer
    with pytest.raises(ValueError, match="NaN or inf"):
        probes.sweep(layers, y)


def test_repeated_rows_stay_on_one_side_of_the_split():
    x, y, _ = gaussian_classes(12, 4, 3.0)
    x = torch.cat([x, x[:6]])  # rows 12..17 repeat rows 0..5
    y = torch.cat([y, y[:6]])
    groups = probes.split_groups(x, y, None)
    for seed in range(5):
        train, test = probes.split(len(y), 0.3, seed=seed, groups=groups)
        for i in range(6):
            assert train[i] == train[12 + i], (seed, i)


def test_a_task_with_repeated_prompts_keeps_them_in_one_split():
    class Fake:
        d_vocab, name = 50, "fake"
    tokens = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    # Row 0's clean prompt is row 1's corrupt prompt: the two pairs must share a split.
    clean, corrupt = tokens[[0, 1, 2, 3]], tokens[[1, 0, 3, 2]]
    same = torch.unique(torch.cat([clean, corrupt]), dim=0, return_inverse=True)[1]
    groups = probes.connected(torch.arange(4).repeat(2), same)
    assert groups[0] == groups[1] == groups[4] == groups[5] and groups[2] == groups[3] != groups[0]


def test_collect_refuses_bad_batch_size_and_token_ids():
    m = tiny(T.GPT2Config(vocab_size=len(TOK), n_positions=32, n_embd=32, n_layer=2, n_head=4))
    tokens = torch.randint(3, len(TOK), (4, 5))
    with pytest.raises(ValueError, match="batch_size"):
        probes.collect(m, tokens, batch_size=0)
    with pytest.raises(ValueError, match="vocabulary"):
        probes.collect(m, tokens + len(TOK))


def test_identical_rows_with_opposite_labels_are_warned_about():
    x, y, _ = gaussian_classes(20, 4, 3.0)
    x[1] = x[0]  # rows 0 and 1: the same activations, labels True and False
    assert y[0] != y[1]
    with pytest.warns(UserWarning, match="2 rows have the same activations as a row of the other label"):
        probes.fit(x, y)
