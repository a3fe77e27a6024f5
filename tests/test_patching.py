"""Patching sweeps against a brute-force loop: one raw-PyTorch-hooked forward per component."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import patching
from interplab.model import ORGANISM_DIR
from interplab.organisms.tokenizer import build_tokenizer
from interplab.tasks import Task, random_tokens

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _random_model(family, tok):
    common = dict(vocab_size=len(tok), initializer_range=0.3)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, **common)
        hf = GPT2LMHeadModel(config)
    elif family == "neox":
        config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               rotary_pct=0.5, max_position_embeddings=32, **common)
        hf = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=32, **common)
        hf = LlamaForCausalLM(config)
    return il.load(hf.double(), tokenizer=tok)


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def setup(request, tok):
    torch.manual_seed(0)
    if request.param == "gpt2" and (ORGANISM_DIR / "tiny-base" / "model.safetensors").exists():
        m = il.load("interplab/tiny-base", dtype=torch.float64)
        return m, il.tasks.make("induction", m, n=2, seed=1, span=4, predict=2)  # short prompts keep it fast
    m = _random_model(request.param, tok)
    return m, random_tokens(m)


# ---- the brute-force reference: module and per-unit view of its activation, per family ----

def _site(hf, kind, layer):
    """(module, "input"|"output", split) where split(act) is a view [B, T, units, size] of the activation."""
    config = hf.config
    nh, d = config.num_attention_heads, config.hidden_size
    dh = d // nh
    whole = lambda a: a.view(*a.shape[:2], 1, a.shape[-1])  # noqa: E731
    heads = lambda a: a.view(*a.shape[:2], -1, dh)  # noqa: E731
    qkv = "qkv".index(kind) if kind in ("q", "k", "v") else None
    if config.model_type == "gpt2":
        block = hf.transformer.h[layer]
        table = dict(attn_out=(block.attn.c_proj, "output", whole), mlp_out=(block.mlp.c_proj, "output", whole),
                     heads=(block.attn.c_proj, "input", heads))
        fused = lambda a: a.view(*a.shape[:2], 3, nh, dh)[:, :, qkv]  # noqa: E731
        qkv_site = (block.attn.c_attn, "output", fused)
    elif config.model_type == "gpt_neox":
        block = hf.gpt_neox.layers[layer]
        table = dict(attn_out=(block.attention.dense, "output", whole),
                     mlp_out=(block.mlp.dense_4h_to_h, "output", whole),
                     heads=(block.attention.dense, "input", heads))
        fused = lambda a: a.view(*a.shape[:2], nh, 3, dh)[:, :, :, qkv]  # noqa: E731
        qkv_site = (block.attention.query_key_value, "output", fused)
    else:
        block = hf.model.layers[layer]
        attn = block.self_attn
        table = dict(attn_out=(attn.o_proj, "output", whole), mlp_out=(block.mlp.down_proj, "output", whole),
                     heads=(attn.o_proj, "input", heads))
        qkv_site = ((attn.q_proj, attn.k_proj, attn.v_proj)[qkv] if qkv is not None else None, "output", heads)
    table["resid"] = (block, "input", whole)
    return qkv_site if qkv is not None else table[kind]


def _hooked_forward(hf, tokens, module, side, edit):
    """Final logits of a plain forward where `edit(act) -> act` rewrites the module's input or output."""
    if side == "input":
        handle = module.register_forward_pre_hook(lambda mod, args: (edit(args[0]),) + args[1:])
    else:
        handle = module.register_forward_hook(lambda mod, args, out: edit(out))
    try:
        with torch.no_grad():
            return hf(tokens).logits[:, -1]
    finally:
        handle.remove()


def _logit_diff(logits, task):
    rows = torch.arange(len(task))
    return (logits[rows, task.answer] - logits[rows, task.wrong]).mean().item()


def brute_force(m, task, kind, per_position, mode):
    """Mean metric [layers, units, positions], one hooked forward per component; and the clean, corrupt means."""
    hf = m.hf
    base, source = (task.corrupt, task.clean) if mode == "denoising" else (task.clean, task.corrupt)
    with torch.no_grad():
        clean, corrupt = (_logit_diff(hf(t).logits[:, -1], task) for t in (task.clean, task.corrupt))
    seq = base.shape[1]
    out = []
    for layer in range(m.n_layers):
        module, side, split = _site(hf, kind, layer)
        saved = []

        def keep(a):
            saved.append(a.clone())
            return a

        _hooked_forward(hf, source, module, side, keep)
        src = split(saved[0])
        n_units = src.shape[2]
        per_layer = torch.zeros(n_units, seq if per_position else 1)
        for unit in range(n_units):
            for p in range(seq if per_position else 1):
                pos = p if per_position else slice(None)

                def edit(a, unit=unit, pos=pos):
                    a = a.clone()
                    split(a)[:, pos, unit] = src[:, pos, unit]
                    return a

                per_layer[unit, p] = _logit_diff(_hooked_forward(hf, base, module, side, edit), task)
        out.append(per_layer)
    return torch.stack(out), clean, corrupt


CASES = [("resid", True), ("attn_out", True), ("attn_out", False), ("mlp_out", True), ("mlp_out", False),
         ("heads", False), ("heads", True), ("q", False), ("k", True), ("v", False)]


@pytest.mark.parametrize("mode", ["denoising", "noising"])
@pytest.mark.parametrize("kind,per_position", CASES)
def test_sweep_matches_brute_force(setup, kind, per_position, mode):
    m, task = setup
    raw, clean, corrupt = brute_force(m, task, kind, per_position, mode)
    # Normalized with every reuse in one big batch; raw without reuse in small batches that split layers'
    # rows; cached keys/values without the prefix skip, and the prefix skip alone.
    runs = [(True, True, True, 256), (False, False, False, 7 if not per_position else 29), (True, False, True, 5),
            (True, True, False, 256)]
    for normalize, prefix, positions, batch_size in runs:
        got = patching.sweep(m, task, kind, per_position=per_position, mode=mode, normalize=normalize,
                             reuse_prefix=prefix, reuse_positions=positions, batch_size=batch_size, progress=False)
        # One sign in both modes: +1 (normalized) when the component carries the whole effect.
        signed = raw - corrupt if mode == "denoising" else clean - raw
        want = signed / (clean - corrupt) if normalize else signed
        assert got.values.numel() == want.numel()
        torch.testing.assert_close(got.values.double(), want.view(got.shape).double(), atol=TOL, rtol=TOL)
        assert got.dims[0] == "layer" and got.shape[0] == m.n_layers
        assert ("pos" in got.dims) == per_position


def test_named_sweeps_have_contract_dims(setup):
    m, task = setup
    seq = task.clean.shape[1]
    h = patching.heads(m, task, progress=False)
    assert h.dims == ("layer", "head") and h.shape == (m.n_layers, m.n_heads)
    hp = patching.heads(m, task, per_position=True, progress=False)
    assert hp.dims == ("layer", "head", "pos") and hp.shape == (m.n_layers, m.n_heads, seq)
    r = patching.resid(m, task, progress=False)
    assert r.dims == ("layer", "pos") and r.labels["pos"] == m.to_str_tokens(task.clean[0])
    k = patching.head_inputs(m, task, which="k", progress=False)
    assert k.shape == (m.n_layers, m.n_kv_heads)
    assert k.dims[1] == ("head" if m.n_kv_heads == m.n_heads else "kv_head")
    assert torch.isfinite(hp.values).all()
    fig = hp.plot()
    assert len(fig.data) == m.n_layers


def test_planted_zeros(setup):
    """Known results: a block-0 resid patch where clean and corrupt tokens agree changes nothing, and a
    last-layer head patched at a non-final position cannot reach the final position's logits."""
    m, task = setup
    r = patching.resid(m, task, progress=False)
    same = (task.clean == task.corrupt).all(0)
    assert same.any() and r.values[0][same].abs().max() < TOL
    hp = patching.heads(m, task, per_position=True, progress=False)
    assert hp.values[-1, :, :-1].abs().max() < TOL
    assert hp.values[:, :, -1].abs().max() > 1e-3  # while the final position does matter somewhere


def test_one_forward_per_batch(tok):
    m = _random_model("gpt2", tok)
    task = random_tokens(m, n=3)
    calls = []
    handle = m.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        patching.heads(m, task, batch_size=5, progress=False)
    finally:
        handle.remove()
    rows_per_layer = m.n_heads * len(task)
    assert len(calls) == 2 * 1 + m.n_layers * math.ceil(rows_per_layer / 5)


def test_clear_errors(tok):
    m = _random_model("gpt2", tok)
    task = random_tokens(m)
    with pytest.raises(ValueError, match="mode must be"):
        patching.heads(m, task, mode="patching", progress=False)
    with pytest.raises(ValueError, match="unknown sweep site"):
        patching.sweep(m, task, "embed", progress=False)
    with pytest.raises(ValueError, match="which must be"):
        patching.head_inputs(m, task, which="o", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        patching.heads(m, task, batch_size=0, progress=False)
    short = Task("bad", task.clean, task.corrupt[:, :-1], task.answer, task.wrong, [], [])
    with pytest.raises(ValueError, match="differ in shape"):
        patching.heads(m, short, progress=False)
    fewer = Task("bad", task.clean, task.corrupt, task.answer[:-1], task.wrong, [], [])
    with pytest.raises(ValueError, match="one answer and one wrong"):
        patching.heads(m, fewer, progress=False)
    long = torch.randint(3, m.d_vocab, (2, 40))
    with pytest.raises(ValueError, match="at most 32"):
        patching.resid(m, Task("long", long, long, task.answer[:2], task.wrong[:2], [], []), progress=False)
    same = Task("same", task.clean, task.clean, task.answer, task.wrong, [], [])
    with pytest.raises(ValueError, match="normalized effect is undefined"):
        patching.heads(m, same, progress=False)
    assert patching.heads(m, same, normalize=False, progress=False).shape == (m.n_layers, m.n_heads)


def test_a_metric_must_return_one_value_per_row(tok):
    m = _random_model("gpt2", tok)
    task = random_tokens(m)
    mean_diff = lambda logits, ex: il.metrics.logit_diff(logits, task.answer[ex], task.wrong[ex]).mean()[None]  # noqa: E731
    with pytest.raises(ValueError, match="one value per row"):
        patching.heads(m, task, metric=mean_diff, progress=False)
    per_row = lambda logits, ex: il.metrics.logit_diff(logits, task.answer[ex], task.wrong[ex])  # noqa: E731
    torch.testing.assert_close(patching.heads(m, task, metric=per_row, progress=False).values,
                               patching.heads(m, task, progress=False).values)


def test_zero_gap_is_refused_before_the_sweep_and_a_tiny_gap_warns(tok):
    m = _random_model("gpt2", tok)
    task = random_tokens(m, n=6)
    same = Task("same", task.clean, task.clean, task.answer, task.wrong, [], [])
    calls = []
    handle = m.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="normalized effect is undefined"):
            patching.heads(m, same, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # the two unpatched runs, and no sweep
    # A gap far inside its spread: half the pairs swapped, so per-example differences cancel.
    swapped = torch.arange(6) % 2 == 1
    clean = torch.where(swapped[:, None], task.corrupt, task.clean)
    corrupt = torch.where(swapped[:, None], task.clean, task.corrupt)
    noisy = Task("noisy", clean, corrupt, task.answer, task.wrong, [], [])
    with pytest.warns(UserWarning, match="within two standard errors"):
        patching.heads(m, noisy, progress=False)


def test_bad_token_ids_and_remote_organisms_are_refused_before_running(tok):
    m = _random_model("gpt2", tok)
    task = random_tokens(m)
    big = task.clean.clone()
    big[0, 0] = m.d_vocab
    with pytest.raises(ValueError, match="vocabulary of"):
        patching.heads(m, Task("big", big, big, task.answer, task.wrong, [], []), progress=False)
    with pytest.raises(ValueError, match="vocabulary of"):
        patching.heads(m, Task("ans", task.clean, task.corrupt, task.answer + m.d_vocab, task.wrong, [], []),
                       progress=False)
    if (ORGANISM_DIR / "tiny-base" / "model.safetensors").exists():
        organism = il.load("interplab/tiny-base")
        with pytest.raises(ValueError, match="local organism"):
            patching.heads(organism, random_tokens(organism), remote=True, progress=False)
