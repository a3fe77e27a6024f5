"""Every family (tests/families.py) x every method, against plain Hugging Face forwards with raw PyTorch hooks.

The references read only module locations from the spec (which module, which output columns); what the
model computes comes from the Hugging Face model itself. Tolerances are float64's except for the
families whose norms Hugging Face computes in float32 (`families.tolerance`).
"""

import dataclasses

import pytest
import torch
import transformers as tf

import interplab as il
from families import FAMILIES, build, tolerance
from interplab import attribution, circuits, edgewise, lens, patching, paths, specs
from interplab.graph import Circuit, Graph
from interplab.organisms.tokenizer import build_tokenizer
from interplab.tasks import random_tokens
from raw_hooks import hf_logits

pytestmark = pytest.mark.filterwarnings("ignore:the clean-vs-corrupt gap")  # random models: no real task


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tok, device):
    m = build(request.param, tok, device)
    task = random_tokens(m, n=3, seq=8)  # 8 tokens: longer than the sliding windows (4)
    return request.param, m, task


def metric(logits, task):
    """Mean logit difference of final-position logits `[B, V]` (the task's metric, written out)."""
    rows = torch.arange(len(task))
    return (logits[rows, task.answer] - logits[rows, task.wrong]).mean().item()


def close(got, want, name, scale=1.0):
    atol = tolerance(name) * max(scale, 1.0)
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64).cpu(),
                               torch.as_tensor(want, dtype=torch.float64).cpu(), atol=atol, rtol=1e-4)


# ---- forward and spec check ----

def test_edgewise_forward_is_the_model_and_check_spec_agrees(setup):
    name, m, task = setup
    with torch.no_grad():
        mine = edgewise.run(m, edgewise.embed(m, task.clean))
    want = hf_logits(m, task.clean)
    close(mine, want, name, want.abs().max().item())
    report = il.check_spec(m)
    assert report.ok, str(report)
    assert "agrees with the model at every site" in str(report)


# ---- node level: patching sweeps against a brute-force loop of raw-hooked forwards ----

def _site(m, site, layer):
    """(module, "input"|"output", [(columns of unit u)]) for a sweep site, by the spec's module locations."""
    dh = m.d_head
    if site == "resid":
        return m.block(layer), "input", [slice(None)]
    if site == "mlp_out":
        return m.module(m.spec.mlp_out, layer), "output", [slice(None)]
    if site == "heads":
        return m.module(m.spec.head_values, layer), "input", [slice(h * dh, (h + 1) * dh) for h in range(m.n_heads)]
    columns = [m.spec.qkv_columns(site, u, m.n_heads, m.n_kv_heads, dh) for u in range(m.n_kv_heads)]
    return m.module(columns[0][0], layer), "output", [c for _, c in columns]


def _hooked(m, tokens, module, side, edit):
    """Final-position logits of `m.hf(tokens)` with `edit(act)` rewriting the module's input or output."""
    if side == "input":
        hook = (module, "pre_", lambda mod, args, kwargs: ((edit(args[0]),) + args[1:], kwargs) if args
                else (args, kwargs | {"hidden_states": edit(kwargs["hidden_states"])}))
        handle = module.register_forward_pre_hook(hook[2], with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda mod, args, out: (edit(out[0]),) + tuple(out[1:])
                                              if isinstance(out, tuple) else edit(out))
    try:
        return hf_logits(m, tokens)[:, -1]
    finally:
        handle.remove()


def brute_force(m, task, site, per_position):
    """Denoising effect `[layers, units, positions]` (raw): one hooked forward per component."""
    corrupt = metric(hf_logits(m, task.corrupt)[:, -1], task)
    seq = task.clean.shape[1]
    out = []
    for layer in range(m.n_layers):
        module, side, units = _site(m, site, layer)
        saved = []
        _hooked(m, task.clean, module, side, lambda a: saved.append(a.clone()) or a)
        rows = []
        for cols in units:
            row = []
            for p in (range(seq) if per_position else [slice(None)]):
                def edit(a, cols=cols, p=p):
                    a = a.clone()
                    a[:, p, cols] = saved[0][:, p, cols]
                    return a
                row.append(metric(_hooked(m, task.corrupt, module, side, edit), task) - corrupt)
            rows.append(row)
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("site,per_position", [("resid", True), ("heads", True), ("k", True), ("mlp_out", False)])
def test_sweeps_match_brute_force_with_and_without_reuse(setup, site, per_position):
    name, m, task = setup
    want = brute_force(m, task, site, per_position)
    for reuse in (True, False):
        got = patching.sweep(m, task, site, per_position=per_position, normalize=False, reuse_prefix=reuse,
                             reuse_positions=reuse, progress=False)
        close(got.values.double().reshape(want.shape), want, name)


def test_lens_last_layer_is_the_model_distribution(setup):
    name, m, task = setup
    scores = lens.logit_lens(m, task.clean[0])
    probs = hf_logits(m, task.clean[:1])[0].softmax(-1)  # (T, V), after any final soft-cap
    close(scores.values[-1], probs.max(-1).values, name)


def test_an_additive_edit_is_a_raw_pre_hook_on_the_head_values(setup):
    name, m, task = setup
    vec = torch.randn(m.d_head, dtype=m.dtype, generator=torch.Generator().manual_seed(1)).to(m.device)
    got = il.edits.additive(m, {(1, 1): vec}).logits(task.clean)
    cols = slice(m.d_head, 2 * m.d_head)  # head 1's values

    def add(mod, args):
        z = args[0].clone()
        z[..., cols] += vec
        return (z,) + args[1:]

    want = hf_logits(m, task.clean, [(m.module(m.spec.head_values, 1), "pre_", add)])
    assert (want - hf_logits(m, task.clean)).abs().max() > 1e-3  # the edit matters
    close(got, want, name, want.abs().max().item())


def test_a_head_mask_covers_its_values_and_output_columns(setup):
    """Zeroing what `component_masks` gives head a1.h1 zeroes the values of its key/value group (their
    `z` is 0 at the output projection), leaves every other head's `z` as it was (but where a q/k norm over
    all heads couples them), and zeroes the output projection's columns of that head."""
    name, m, task = setup
    masks = il.components.component_masks(m, ["a1.h1"])
    before = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    seen = []
    hook = [(m.module(m.spec.head_values, 1), "pre_", lambda mod, args: seen.append(args[0].clone()))]
    hf_logits(m, task.clean, hook)
    try:
        with torch.no_grad():
            for n, p in m.hf.named_parameters():
                if n in masks:
                    p.mul_(1 - masks[n])
        hf_logits(m, task.clean, hook)
    finally:
        with torch.no_grad():
            for n, p in m.hf.named_parameters():
                p.copy_(before[n])
    dh, group = m.d_head, m.n_heads // m.n_kv_heads
    z0, z1 = (z.unflatten(-1, (m.n_heads, dh)) for z in seen)  # (B, T, H, dh)
    hit = [h for h in range(m.n_heads) if h // group == 1 // group]
    assert z1[..., hit, :].abs().max() == 0 and z0[..., hit, :].abs().max() > 1e-3
    others = [h for h in range(m.n_heads) if h not in hit]
    if m.spec.qk_norm_over == "full":  # OLMo 2: the zeroed queries and keys change every head's q/k norm
        assert (z1[..., others, :] - z0[..., others, :]).abs().max() > 1e-6
    else:
        torch.testing.assert_close(z1[..., others, :], z0[..., others, :], rtol=0, atol=0)
    out = m.spec.as_linear(masks[f"{m.spec.blocks}.1.{m.spec.head_values}.weight"])  # (D, H * dh)
    assert out[:, dh:2 * dh].all() and out.sum() == out.shape[0] * dh


# ---- edge level ----

def _final_residual(m, tokens=None, embeds=None, eps=None):
    """(final-norm input `[B, T, D]`, logits) of a plain forward; `eps` is added to that input."""
    seen = []

    def pre(mod, args):
        seen.append(args[0])
        return (args[0] + eps,) if eps is not None else None

    handle = m.module(m.spec.final_norm).register_forward_pre_hook(pre)
    try:
        with torch.set_grad_enabled(eps is not None):
            logits = m.hf(tokens).logits if embeds is None else m.hf(inputs_embeds=embeds).logits
    finally:
        handle.remove()
    return seen[0], logits


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_eap_into_the_logits_is_plain_autograd(setup, method):
    """Every sender adds into the final residual, so the logits receiver's column of EAP sums to
    (clean - corrupt final residual) . d metric / d (final residual), averaged over the IG steps."""
    name, m, task = setup
    steps = 3 if method == "EAP-IG" else 1
    got = attribution.edges(m, task, method=method, steps=steps, batch_size=len(task))
    clean_in, _ = _final_residual(m, task.clean)
    corrupt_in, _ = _final_residual(m, task.corrupt)
    embed = m.module(m.spec.embed)  # what the model's own forward interpolates from (it adds positions, scales)
    clean_e, corrupt_e = embed(task.clean).detach(), embed(task.corrupt).detach()
    want = 0.0
    for k in range(1, steps + 1):
        eps = torch.zeros_like(clean_in, requires_grad=True)
        _, logits = _final_residual(m, embeds=corrupt_e + k / steps * (clean_e - corrupt_e), eps=eps)
        rows = torch.arange(len(task))
        value = (logits[rows, -1, task.answer] - logits[rows, -1, task.wrong]).sum()
        want += ((clean_in - corrupt_in).detach() * torch.autograd.grad(value, eps)[0]).sum().item()
    column = got.scores[:, got.graph.receiver_index("logits")].double().sum().item()
    assert abs(want) > 1e-3
    close(column, want / steps / len(task), name, abs(want))


def test_node_attribution_through_nnsight_is_the_eap_row_sums(setup):
    """A node's output adds into every receiver it feeds, so its nnsight attribution (a separate
    implementation, on the model's own graph) is its EAP row sum: where a sender's output is linear in
    the node (no post-norms), and for the input and the final residual in every family."""
    name, m, task = setup
    eap = attribution.edges(m, task, method="EAP", batch_size=len(task))
    nodes = attribution.nodes(m, task, batch_size=len(task))
    g, scores = eap.graph, eap.scores.double()
    resid = nodes["resid"].values.double().sum(-1)
    close(resid[0], scores[g.sender_index("input")].sum(), name, resid[0].abs().item())
    close(resid[-1], scores[:, g.receiver_index("logits")].sum(), name, resid[-1].abs().item())
    if m.spec.attn_post_norm or m.spec.mlp_post_norm:
        return
    rows = torch.tensor([[scores[g.sender_index(f"a{l}.h{h}")].sum() for h in range(m.n_heads)] + [
        scores[g.sender_index(f"m{l}")].sum()] for l in range(m.n_layers)], dtype=torch.float64)
    node = torch.cat([nodes["heads"].values.double(), nodes["mlp"].values.double()[:, None]], 1)
    close(rows, node, name, node.abs().max().item())


def test_full_and_empty_circuits_are_the_clean_and_corrupt_runs(setup):
    name, m, task = setup
    g = Graph.from_model(m)
    full, empty = Circuit.full(g), Circuit(g, torch.zeros(g.valid.shape), torch.zeros_like(g.valid))
    got = circuits.circuit_metrics(m, task, [full, empty], batch_size=3)
    want = [metric(hf_logits(m, t)[:, -1], task) for t in (task.clean, task.corrupt)]
    close(got, want, name, max(abs(w) for w in want))


def test_corrupting_every_edge_into_the_logits_is_patching_the_final_residual(setup):
    name, m, task = setup
    g = Graph.from_model(m)
    mask = g.valid.clone()
    mask[:, g.receiver_index("logits")] = False
    got = circuits.circuit_metrics(m, task, [Circuit(g, torch.zeros(g.valid.shape), mask)], batch_size=3)
    corrupt_in, _ = _final_residual(m, task.corrupt)
    swap = [(m.module(m.spec.final_norm), "pre_", lambda mod, args: (corrupt_in,))]
    want = metric(hf_logits(m, task.clean, swap)[:, -1], task)
    assert abs(want - metric(hf_logits(m, task.clean)[:, -1], task)) > 1e-3  # the swap matters
    close(got, [want], name, abs(want))


def test_path_patching_to_the_logits_freezes_every_other_head(setup):
    """Sender head h from the clean run, every other head's values held at the corrupt run's, MLPs
    recomputed: written as raw pre-hooks on every layer's output projection."""
    name, m, task = setup
    if m.spec.attn_post_norm:
        with pytest.raises(NotImplementedError, match="post-norm"):
            paths.path_patch(m, task, "logits", normalize=False)
        return
    got = paths.path_patch(m, task, "logits", normalize=False)
    values = {}
    for tokens, key in ((task.clean, "clean"), (task.corrupt, "corrupt")):
        hooks = [(m.module(m.spec.head_values, l), "pre_", lambda mod, a, l=l, key=key: values.__setitem__(
            (key, l), a[0].clone())) for l in range(m.n_layers)]
        hf_logits(m, tokens, hooks)
    corrupt = metric(hf_logits(m, task.corrupt)[:, -1], task)
    dh = m.d_head
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            def frozen(mod, args, l):
                z = values[("corrupt", l)].clone()
                if l == layer:
                    z[..., head * dh:(head + 1) * dh] = values[("clean", l)][..., head * dh:(head + 1) * dh]
                return (z,)
            hooks = [(m.module(m.spec.head_values, l), "pre_", lambda mod, a, l=l: frozen(mod, a, l))
                     for l in range(m.n_layers)]
            want = metric(hf_logits(m, task.corrupt, hooks)[:, -1], task) - corrupt
            close(got.values[layer, head], want, name)


def test_treeified_hypotheses_refuse_coupled_heads(setup):
    name, m, task = setup
    coupled = bool(m.spec.attn_post_norm) or (bool(m.spec.q_norm) and m.spec.qk_norm_over == "full")
    if not coupled:
        pytest.skip("heads are separable in this family (paths.test is tested in test_paths.py)")
    with pytest.raises(NotImplementedError, match="couples the heads"):
        paths.test(m, task, paths.Hypothesis(((("input", "a0.h0<q>", "logits"),))))


# ---- each ArchSpec field matters: without it, check_spec finds the disagreement ----

FIELD_CASES = [  # (family, field, value that ignores it)
    ("gpt2", "conv1d", False), ("llama", "attn_norm", ""), ("llama", "mlp_norm", ""),
    ("phi3", "qkv_layout", "separate"), ("neox_parallel", "parallel_flag", ""), ("phi", "parallel", False),
    ("gemma2", "attn_post_norm", ""), ("gemma2", "mlp_post_norm", ""), ("qwen3", "q_norm", ""),
    ("qwen3", "k_norm", ""), ("olmo2", "qk_norm_over", "head"), ("gptj", "rotary", "half"),
    ("llama", "rotary", "interleaved"), ("gptj", "rotary_table", "cos_sin"), ("gemma3", "rotary_by_layer_type", False),
    ("granite", "embed_scale", ""), ("granite", "residual_scale", ""), ("gemma2", "attn_softcap", ""),
    ("gemma2", "logit_softcap", ""), ("cohere", "logit_scale", ""), ("granite", "logit_divisor", ""),
    ("llama", "rotary_module", ""), ("gemma2", "mlp_norm", ""),
]


@pytest.fixture(scope="module")
def built(tok, device):
    cache = {}
    return lambda name: cache.setdefault(name, build(name, tok, device))


@pytest.mark.parametrize("name,field,ignored", FIELD_CASES, ids=[f"{c[0]}-{c[1]}" for c in FIELD_CASES])
def test_each_spec_field_matters(built, name, field, ignored):
    m = built(name)
    assert il.check_spec(m).ok
    right = m.spec
    m.spec = dataclasses.replace(right, **{field: ignored})
    try:
        report = il.check_spec(m)
        assert not report.ok, f"{name} with {field}={ignored!r} still agrees: the field is not tested"
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError, NotImplementedError):
        pass  # shapes no longer fit: ignoring the field cannot go unnoticed either
    finally:
        m.spec = right


def test_sliding_windows_bite(built):
    """The window (4) is shorter than the prompt, so the same weights without it give other logits."""
    for name in ("mistral_window", "qwen2_mixed", "gemma2", "gemma3"):
        m = built(name)
        tokens = random_tokens(m, n=2, seq=8).clean
        windowed = hf_logits(m, tokens)
        config, window = m.config, m.config.sliding_window
        config.sliding_window = None if name == "mistral_window" else 64
        try:
            assert (hf_logits(m, tokens) - windowed).abs().max() > 1e-3
        finally:
            config.sliding_window = window


# ---- refusals ----

@pytest.mark.parametrize("attribute,value,feature", [
    ("num_local_experts", 8, "mixture-of-experts"), ("kv_lora_rank", 16, "MLA"), ("alibi", True, "ALiBi"),
    ("no_rope_layers", [1, 0], "NoPE"), ("attention_chunk_size", 4, "chunked attention")])
def test_unsupported_features_are_refused_by_name(tok, attribute, value, feature):
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32)
    hf = tf.LlamaForCausalLM(config)
    setattr(hf.config, attribute, value)
    with pytest.raises(NotImplementedError, match=feature):
        il.load(hf, tokenizer=tok)


def test_norms_and_sinks_the_spec_does_not_name_are_refused(tok):
    cohere = tf.CohereForCausalLM(tf.CohereConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, use_qk_norm=True))
    with pytest.raises(NotImplementedError, match=r"norm modules \['q_norm', 'k_norm'\]"):
        il.load(cohere, tokenizer=tok)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32))
    llama.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="attention sinks"):
        specs.spec_for(llama)


def test_float16_training_is_refused_before_the_first_step(tok):
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0)).half()  # no dropout: float16 alone is wrong
    before = {n: p.clone() for n, p in hf.named_parameters()}
    calls = []
    loss = lambda model, step: calls.append(step) or model(torch.tensor([[1, 2, 3]])).logits.float().sum()  # noqa: E731
    with pytest.raises(ValueError, match="float16.*float32 or bfloat16"):
        il.training.train(hf, loss, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="float16"):
        il.training.train_masked(hf, loss, [{"transformer.wte.weight": torch.ones_like(hf.transformer.wte.weight)}], steps=1, lr=1e-3)
    assert not calls and all(torch.equal(p, before[n]) for n, p in hf.named_parameters())
