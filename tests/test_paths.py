"""Path patching against a one-sender-at-a-time raw-hook loop; hypotheses; the induction composition on tiny-base."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab import attribution, circuits, paths
from interplab.model import ORGANISM_DIR
from interplab.organisms.tokenizer import build_tokenizer
from interplab.paths import Hypothesis
from interplab.tasks import random_tokens
from raw_hooks import hf_logits

TOL = 1e-5
TINY_BASE = (ORGANISM_DIR / "tiny-base" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=3, n_head=3, n_embd=24, n_positions=32, initializer_range=0.3)
    m = il.load(GPT2LMHeadModel(config).double(), tokenizer=tok)
    return m, random_tokens(m, n=4, seq=6)


def c_proj_inputs(m, tokens):
    """Per-layer input of the attention output projection, `[B, T, H * dh]`: heads side by side."""
    z = {}
    hf_logits(m, tokens, [(m.block(l).attn.c_proj, "pre_", lambda mod, a, l=l: z.__setitem__(l, a[0]))
                       for l in range(m.n_layers)])
    return z


def brute_path_patch(m, task, sender, receiver, mode):
    """The IOI paper's two steps for one sender, written with raw hooks on the Hugging Face model."""
    base_tokens, source_tokens = (task.clean, task.corrupt) if mode == "noising" else (task.corrupt, task.clean)
    base, source = c_proj_inputs(m, base_tokens), c_proj_inputs(m, source_tokens)
    layer_s, head_s = sender
    dh = m.d_head

    def freeze(mod, args, l):
        z = base[l].clone()
        if l == layer_s:
            z[..., head_s * dh:(head_s + 1) * dh] = source[l][..., head_s * dh:(head_s + 1) * dh]
        return (z,)

    kept = {}
    steps = [(m.block(l).attn.c_proj, "pre_", lambda mod, a, l=l: freeze(mod, a, l)) for l in range(m.n_layers)]
    steps.append((m.hf.transformer.ln_f, "pre_", lambda mod, a: kept.__setitem__("logits", a[0])))
    steps += [(m.block(l).ln_1, "pre_", lambda mod, a, l=l: kept.__setitem__(l, a[0])) for l in range(m.n_layers)]
    hf_logits(m, base_tokens, steps)
    if receiver == "logits":
        final = m.hf.lm_head(m.hf.transformer.ln_f(kept["logits"]))
        return task.metric(final).mean().item()
    layer_r, head_r, slot = int(receiver[1]), int(receiver[4]), "qkv".index(receiver[6])
    block, D = m.block(layer_r), m.d_model
    cols = slice(slot * D + head_r * dh, slot * D + (head_r + 1) * dh)

    def patch(mod, args, out):
        out = out.clone()
        out[..., cols] = (block.ln_1(kept[layer_r]) @ mod.weight + mod.bias)[..., cols]
        return out

    return task.metric(hf_logits(m, base_tokens, [(block.attn.c_attn, "", patch)])).mean().item()


@pytest.mark.parametrize("mode", ["denoising", "noising"])
@pytest.mark.parametrize("receiver", ["logits", "a2.h1<k>", "a1.h0<q>"])
def test_batched_path_patching_matches_one_sender_at_a_time(setup, receiver, mode):
    m, task = setup
    scores = paths.path_patch(m, task, receiver, mode=mode, batch_size=3, senders_per_run=4)
    clean, corrupt = (task.metric(m.logits(t)).mean().item() for t in (task.clean, task.corrupt))
    for layer, head in [(0, 0), (0, 2), (1, 1), (2, 0)]:
        patched = brute_path_patch(m, task, (layer, head), receiver, mode)
        # One sign in both modes: +1 when the path carries the whole clean-vs-corrupt effect.
        expected = (patched - corrupt if mode == "denoising" else clean - patched) / (clean - corrupt)
        assert scores.values[layer, head].item() == pytest.approx(expected, abs=TOL), (layer, head)
    receiver_layer = m.n_layers if receiver == "logits" else int(receiver[1])
    assert (scores.values[receiver_layer:].abs() < TOL).all()  # no path from a later head


def test_bad_receivers_are_refused(setup):
    m, task = setup
    for bad in ["a7.h0<q>", "a0.h0<x>", "mlp3"]:
        with pytest.raises(ValueError, match="unknown receiver"):
            paths.path_patch(m, task, bad)
    with pytest.raises(ValueError, match="mode"):
        paths.path_patch(m, task, "logits", mode="sideways")


def test_a_closed_path_set_explains_what_its_circuit_does(setup):
    m, task = setup
    scored = attribution.edges(m, task, method="EAP")
    for n in (4, 25):
        circuit = scored.top(n)
        hypothesis = Hypothesis.of(circuit)
        assert paths.test(m, task, hypothesis) == pytest.approx(circuits.faithfulness(m, task, circuit), abs=TOL)


def test_one_path_against_raw_hooks(setup):
    """input -> a0.h2<v> -> logits: the head sees the clean prompt through its value only, and
    reaches the logits only directly; everything else sees the corrupt prompt."""
    m, task = setup
    head, dh = 2, m.d_head
    cols = slice(2 * m.d_model + head * dh, 2 * m.d_model + (head + 1) * dh)
    kept, z = {}, {}
    embed = lambda mod, a, o: kept.__setitem__("embed", o)  # noqa: E731
    hf_logits(m, task.clean, [(m.hf.transformer.drop, "", embed)])
    clean_embed = kept["embed"]
    final = lambda mod, a: kept.__setitem__("final", a[0])  # noqa: E731

    def zs(mod, args):
        z[len(z)] = args[0][..., head * dh:(head + 1) * dh]

    block = m.block(0)
    hf_logits(m, task.corrupt, [(m.hf.transformer.ln_f, "pre_", final), (block.attn.c_proj, "pre_", zs)])

    def value_from_clean(mod, args, out):
        out = out.clone()
        out[..., cols] = (block.ln_1(clean_embed) @ mod.weight + mod.bias)[..., cols]
        return out

    hf_logits(m, task.corrupt, [(block.attn.c_attn, "", value_from_clean), (block.attn.c_proj, "pre_", zs)])
    W_O = block.attn.c_proj.weight[head * dh:(head + 1) * dh]
    resid = kept["final"] + (z[1] - z[0]) @ W_O
    got = task.metric(m.hf.lm_head(m.hf.transformer.ln_f(resid))).mean().item()
    clean, corrupt = (task.metric(m.logits(t)).mean().item() for t in (task.clean, task.corrupt))
    hypothesis = Hypothesis((("input", f"a0.h{head}<v>", "logits"),))
    assert paths.test(m, task, hypothesis) == pytest.approx((got - corrupt) / (clean - corrupt), abs=TOL)


def test_hypothesis_paths_are_checked(setup):
    m, task = setup
    with pytest.raises(ValueError, match="from 'input' to 'logits'"):
        Hypothesis((("a0.h1<v>", "logits"),))
    with pytest.raises(ValueError, match="not upstream"):
        paths.test(m, task, Hypothesis((("input", "a1.h0<v>", "a0.h1<q>", "logits"),)))


@pytest.fixture(scope="module")
def tiny_base():
    if not TINY_BASE:
        pytest.skip("tiny-base weights are not built (python -m interplab.organisms train base)")
    return il.load("interplab/tiny-base")


def attention_to(m, tokens, offset_fn):
    """Mean attention `[L, H]` paid from each query position q > span to key offset_fn(q), by HF's eager attention."""
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            patterns = m.hf(tokens, output_attentions=True).attentions
    finally:
        m.hf.set_attn_implementation("sdpa")
    return torch.stack([offset_fn(p) for p in patterns])


def test_path_patching_finds_previous_token_head_feeding_induction_head(tiny_base):
    m = tiny_base
    task = il.tasks.make("induction", m, n=16, seed=3)
    span, T = 10, task.clean.shape[1]
    queries = torch.arange(span + 2, T)  # second-occurrence positions (BOS at 0)
    prev = attention_to(m, task.clean, lambda p: p[:, :, queries, queries - 1].mean((0, 2)))
    induction = attention_to(m, task.clean, lambda p: p[:, :, queries, queries - span + 1].mean((0, 2)))
    prev_head = divmod(int(prev.argmax()), m.n_heads)
    induction_heads = [divmod(int(i), m.n_heads) for i in (induction.flatten() > 0.5).nonzero()]
    assert induction_heads and all(prev_head[0] < layer for layer, _ in induction_heads)
    keys = [f"a{layer}.h{head}<k>" for layer, head in induction_heads]
    scores = paths.path_patch(m, task, keys, mode="noising")
    best = divmod(int(scores.values.argmax()), m.n_heads)
    assert best == prev_head, f"path patching ranked {best} first, attention says {prev_head}: {scores.values}"
    assert scores.values[best].item() > 0.2  # corrupting this one path removes a fifth of the effect or more


def test_eap_ig_ioi_circuit_is_faithful_with_five_percent_of_edges(tiny_base):
    m = tiny_base
    discover, held_out = (il.tasks.make("ioi", m, n=32, seed=s) for s in (0, 1))
    scored = attribution.edges(m, discover, method="EAP-IG", steps=5)
    budget = int(0.05 * scored.graph.n_edges)
    faithful = circuits.faithfulness(m, held_out, scored.top(budget))
    print(f"IOI EAP-IG circuit: {budget}/{scored.graph.n_edges} edges, held-out faithfulness {faithful:.3f}")
    assert faithful >= 0.8


def test_bad_input_is_refused_before_any_run(setup):
    m, task = setup
    with pytest.raises(ValueError, match="receivers is empty"):
        paths.path_patch(m, task, [])
    with pytest.raises(ValueError, match="batch_size"):
        paths.path_patch(m, task, batch_size=0)
    big = task.clean.clone()
    big[1, 2] = m.d_vocab
    with pytest.raises(ValueError, match="vocabulary"):
        paths.path_patch(m, il.Task("big", big, big, task.answer, task.wrong, [], []))
    long = torch.randint(3, m.d_vocab, (2, 40))
    with pytest.raises(ValueError, match="at most 32"):
        paths.path_patch(m, il.Task("long", long, long, task.answer[:2], task.wrong[:2], [], []))
    same = il.Task("same", task.clean, task.clean, task.answer, task.wrong, [], [])
    with pytest.raises(ValueError, match="normalized effect is undefined"):
        paths.path_patch(m, same)  # today all-NaN scores
    with pytest.raises(ValueError, match="normalized effect is undefined"):
        paths.test(m, same, Hypothesis((("input", "a0.h1<v>", "logits"),)))  # today ZeroDivisionError
    with pytest.raises(ValueError, match="faithfulness\\(\\[\\]\\)"):
        circuits.faithfulness(m, task, [])
    with pytest.raises(ValueError, match="batch_size"):
        circuits.faithfulness(m, task, circuits.Circuit.full(circuits.Graph.from_model(m)), batch_size=0)
