"""Edge-level methods on GPT-NeoX (parallel and sequential blocks, partial rotary) and on a Llama with
grouped-query attention (4 query heads over 2 kv heads), each against raw Hugging Face forward hooks."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import attribution, circuits, edgewise, paths
from interplab.graph import Circuit, Graph
from interplab.organisms.tokenizer import build_tokenizer
from interplab.tasks import random_tokens
from families import randomize  # float64, random norms and biases: the matrix's own builder
from raw_hooks import hf_logits

TOL = 1e-6
L, H, H_KV = 2, 4, 2
pytestmark = pytest.mark.filterwarnings("ignore:the clean-vs-corrupt gap")  # random models: no real task


def build(kind, tok):
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=L, num_attention_heads=H,
                  intermediate_size=48, max_position_embeddings=32, initializer_range=0.3)
    if kind == "llama-gqa":
        hf = LlamaForCausalLM(LlamaConfig(num_key_value_heads=H_KV, attention_bias=True, **common))
    else:
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=kind == "neox-parallel",
                                              **common))
    return il.load(randomize(hf), tokenizer=tok)


@pytest.fixture(scope="module", params=["neox-parallel", "neox-sequential", "llama-gqa"])
def setup(request):
    m = build(request.param, build_tokenizer())
    return m, random_tokens(m, n=3, seq=6)


# --- raw Hugging Face hooks, written without edgewise ------------------------------------------------------

def norms(m, layer):
    block = m.block(layer)
    return (block.input_layernorm, block.post_attention_layernorm)


def projection(m, layer, slot, head):
    """(module, output columns) holding one head's q, k or v (head: a kv head for k and v)."""
    dh, block = m.d_head, m.block(layer)
    if m.spec.family == "GPT-NeoX":  # per head [q_h | k_h | v_h]
        start = (3 * head + "qkv".index(slot)) * dh
        return block.attention.query_key_value, slice(start, start + dh)
    return getattr(block.self_attn, f"{slot}_proj"), slice(head * dh, (head + 1) * dh)


def final_norm(m):
    return m.module(m.spec.final_norm)


def receiver_hooks(m, receiver, new_input):
    """Raw `(module, kind, fn)` hooks making `receiver`'s input (before its norm) `new_input(x)`, x its input in this run."""
    if receiver == "logits":
        return [(final_norm(m), "pre_", lambda mod, args: (new_input(args[0]),))]
    if receiver.startswith("m"):
        norm = norms(m, int(receiver[1:]))[1]
        return [(norm, "pre_", lambda mod, args: (new_input(args[0]),))]
    layer, head, slot = int(receiver[1]), int(receiver[4]), receiver[6]
    norm = norms(m, layer)[0]
    module, cols = projection(m, layer, slot, head)
    seen = {}

    def moved(mod, args, out):
        out = out.clone()
        normed = norm.forward(new_input(seen["x"]))  # .forward: calling norm() would re-run the pre-hooks
        out[..., cols] = torch.nn.functional.linear(normed, mod.weight, mod.bias)[..., cols]
        return out

    return [(norm, "pre_", lambda mod, args: seen.__setitem__("x", args[0])), (module, "", moved)]


def out_proj(m, layer):
    block = m.block(layer)
    return block.attention.dense if m.spec.family == "GPT-NeoX" else block.self_attn.o_proj


def hf_record(m, tokens):
    """Sender outputs {"input", "a{l}.h{h}", "m{l}": [B, T, D]} and receiver inputs {receiver: [B, T, D]}."""
    senders, inputs, hooks = {}, {}, []
    hooks.append((m.module(m.spec.embed), "", lambda mod, a, o: senders.__setitem__("input", o)))
    for l in range(L):
        def per_head(mod, args, l=l):
            z = args[0].view(*args[0].shape[:2], H, m.d_head)  # (B, T, H, dh)
            for h in range(H):
                senders[f"a{l}.h{h}"] = z[:, :, h] @ mod.weight[:, h * m.d_head:(h + 1) * m.d_head].T

        attn_norm, mlp_norm = norms(m, l)
        hooks += [(out_proj(m, l), "pre_", per_head),
                  (m.block(l).mlp, "", lambda mod, a, o, l=l: senders.__setitem__(f"m{l}", o)),
                  (attn_norm, "pre_", lambda mod, a, l=l: inputs.__setitem__(l, a[0])),
                  (mlp_norm, "pre_", lambda mod, a, l=l: inputs.__setitem__(f"m{l}", a[0]))]
    hooks.append((final_norm(m), "pre_", lambda mod, a: inputs.__setitem__("logits", a[0])))
    hf_logits(m, tokens, hooks)
    return senders, inputs


def recorded_input(inputs, receiver):
    return inputs[receiver] if receiver == "logits" or receiver.startswith("m") else inputs[int(receiver[1])]


# --- tests -------------------------------------------------------------------------------------------------

def test_edgewise_forward_with_no_patches_is_the_hugging_face_forward(setup):
    m, task = setup
    with torch.no_grad():
        mine = edgewise.run(m, edgewise.embed(m, task.clean))
    assert torch.allclose(mine, hf_logits(m, task.clean), atol=TOL, rtol=0)


def test_graph_counts_nodes_and_edges_by_hand(setup):
    m, _ = setup
    g = Graph.from_model(m)
    kv = H_KV if "Llama" in m.spec.family else H
    parallel = bool(getattr(m.hf.config, "use_parallel_residual", False))
    assert (g.n_heads, g.n_kv_heads, g.parallel) == (H, kv, parallel)
    assert len(g.senders) == 1 + L * (H + 1) and len(g.receivers) == L * (H + 2 * kv + 1) + 1
    upstream = lambda l: 1 + l * (H + 1)  # noqa: E731  senders before block l
    expected = sum((H + 2 * kv) * upstream(l) + upstream(l) + (0 if parallel else H) for l in range(L))
    assert g.n_edges == expected + len(g.senders)
    assert bool(g.valid[g.sender_index("a1.h0"), g.receiver_index("m1")]) != parallel
    assert g.valid[g.sender_index("m0"), g.receiver_index(f"a1.h{kv - 1}<k>")]
    with pytest.raises(KeyError):
        g.receiver_index(f"a0.h{kv}<v>")


def eap_reference(m, task):
    """EAP scores `[S, R]` by plain autograd on the Hugging Face model: (clean - corrupt sender output)
    . d metric / d (receiver input), one zero perturbation per receiver added by raw hooks."""
    g = Graph.from_model(m)
    clean, _ = hf_record(m, task.clean)
    corrupt, _ = hf_record(m, task.corrupt)
    eps = {r: torch.zeros(task.clean.shape + (m.d_model,), dtype=torch.float64, requires_grad=True)
           for r in g.receivers}
    hooks = [hook for r in g.receivers for hook in receiver_hooks(m, r, lambda x, r=r: x + eps[r])]
    value = task.metric(hf_logits(m, task.clean, hooks, grad=True)).sum()
    grads = dict(zip(g.receivers, torch.autograd.grad(value, list(eps.values()))))
    expected = torch.zeros(g.valid.shape, dtype=torch.float64)
    for s, sender in enumerate(g.senders):
        for r, receiver in enumerate(g.receivers):
            if g.valid[s, r]:
                expected[s, r] = ((clean[sender] - corrupt[sender]) * grads[receiver]).sum() / len(task)
    return expected


def test_eap_equals_plain_autograd(setup):
    m, task = setup
    expected = eap_reference(m, task)
    got = attribution.edges(m, task, method="EAP", batch_size=len(task))
    assert expected.abs().max() > 1e-2  # the check has something to compare
    assert torch.allclose(got.scores.double(), expected, atol=1e-5, rtol=1e-4)


def test_node_attribution_through_nnsight_sums_the_autograd_edges(setup):
    """A node's gradient is the sum of its outgoing edges' (its output adds into each receiver), so its
    attribution is the row sum of the EAP reference; resid before block 0 is the input's row, and before
    the final norm the logits' column."""
    m, task = setup
    expected = eap_reference(m, task)
    g = Graph.from_model(m)
    nodes = attribution.nodes(m, task, batch_size=2)
    row = lambda name: expected[g.sender_index(name)].sum().item()  # noqa: E731
    for l in range(L):
        assert nodes["mlp"].values[l].item() == pytest.approx(row(f"m{l}"), abs=1e-5)
        for h in range(H):
            assert nodes["heads"].values[l, h].item() == pytest.approx(row(f"a{l}.h{h}"), abs=1e-5)
    resid = nodes["resid"].values.sum(-1)
    assert resid[0].item() == pytest.approx(row("input"), abs=1e-5)
    assert resid[L].item() == pytest.approx(expected[:, g.receiver_index("logits")].sum().item(), abs=1e-5)


def test_full_graph_is_the_clean_run_and_empty_circuit_the_corrupt_run(setup):
    m, task = setup
    g = Graph.from_model(m)
    full, empty = Circuit.full(g), Circuit(g, torch.zeros(g.valid.shape), torch.zeros_like(g.valid))
    values = circuits.circuit_metrics(m, task, [full, empty], batch_size=2)
    assert values.tolist() == pytest.approx([task.metric(hf_logits(m, task.clean)).mean().item(),
                                             task.metric(hf_logits(m, task.corrupt)).mean().item()], abs=1e-5)
    assert circuits.faithfulness(m, task, [full, empty]).tolist() == pytest.approx([1, 0], abs=1e-5)


@pytest.mark.parametrize("receiver", ["a0.h1<q>", "a1.h3<q>", "a1.h1<k>", "a0.h0<v>", "m0", "m1", "logits"])
def test_corrupting_every_edge_into_a_receiver_is_patching_its_input(setup, receiver):
    m, task = setup
    g = Graph.from_model(m)
    mask = g.valid.clone()
    mask[:, g.receiver_index(receiver)] = False
    got = circuits.circuit_metrics(m, task, [Circuit(g, mask.float(), mask)])[0].item()
    _, corrupt = hf_record(m, task.corrupt)
    patched = hf_logits(m, task.clean, receiver_hooks(m, receiver, lambda x: recorded_input(corrupt, receiver)))
    assert got == pytest.approx(task.metric(patched).mean().item(), abs=1e-5)


def brute_force_path_patch(m, task, sender, receivers):
    """Denoising path patching by raw hooks, raw effect m_patched - m_corrupt: (1) the corrupt run with every
    head's output frozen to its corrupt value but `sender` (l, h) from the clean run, recording the
    receivers' inputs; (2) the corrupt run with only those inputs replaced."""
    def z_of(tokens):
        zs = {}
        hooks = [(out_proj(m, l), "pre_", lambda mod, a, l=l: zs.__setitem__(l, a[0].clone())) for l in range(L)]
        hf_logits(m, tokens, hooks)
        return zs

    z_base, z_source = z_of(task.corrupt), z_of(task.clean)
    layer, head = sender
    cols = slice(head * m.d_head, (head + 1) * m.d_head)

    def freeze(l):
        z = z_base[l].clone()
        if l == layer:
            z[..., cols] = z_source[l][..., cols]
        return (out_proj(m, l), "pre_", lambda mod, a: (z,))

    recorded = {}
    record = [(final_norm(m), "pre_", lambda mod, a: recorded.__setitem__("logits", a[0]))]
    for l in range(L):
        attn_norm, mlp_norm = norms(m, l)
        record += [freeze(l),
                   (attn_norm, "pre_", lambda mod, a, l=l: recorded.__setitem__(l, a[0])),
                   (mlp_norm, "pre_", lambda mod, a, l=l: recorded.__setitem__(f"m{l}", a[0]))]
    hf_logits(m, task.corrupt, record)
    replace = [hook for r in receivers for hook in receiver_hooks(m, r, lambda x, r=r: recorded_input(recorded, r))]
    patched = task.metric(hf_logits(m, task.corrupt, replace)).mean().item()
    return patched - task.metric(hf_logits(m, task.corrupt)).mean().item()


@pytest.mark.parametrize("receivers", [["logits"], ["m1"], ["a1.h1<k>", "a1.h2<q>"]])
def test_path_patching_equals_a_raw_hook_reference(setup, receivers):
    m, task = setup
    got = paths.path_patch(m, task, receivers, normalize=False, batch_size=2, senders_per_run=3)
    for sender in [(0, 0), (0, 3), (1, 2)]:
        expected = brute_force_path_patch(m, task, sender, receivers)
        assert got.values[sender].item() == pytest.approx(expected, abs=1e-5)


def test_a_bare_head_receiver_reads_its_group_key_and_value(setup):
    m, task = setup
    group_kv = edgewise.kv_head(m, 3)
    explicit = ["a1.h3<q>", f"a1.h{group_kv}<k>", f"a1.h{group_kv}<v>"]
    bare = paths.path_patch(m, task, "a1.h3", normalize=False)
    assert torch.allclose(bare.values, paths.path_patch(m, task, explicit, normalize=False).values, atol=1e-9)


def test_path_hypotheses_treeify_or_refuse_grouped_query_attention(setup):
    """Every path of the full graph, each run treeified (every head recomputed from its own q, k, v
    inputs along each path), is the clean run: 1. Under GQA a k/v receiver feeds several heads: refused."""
    m, task = setup
    g = Graph.from_model(m)
    if m.n_kv_heads == m.n_heads:
        assert paths.test(m, task, paths.Hypothesis.of(Circuit.full(g))) == pytest.approx(1, abs=1e-6)
    else:
        with pytest.raises(NotImplementedError, match="grouped-query"):
            paths.test(m, task, paths.Hypothesis((("input", "a0.h0<v>", "logits"),)))
        with pytest.raises(NotImplementedError, match="grouped-query"):
            paths.Hypothesis.of(Circuit.full(g))


def test_edge_level_methods_refuse_remote_with_a_clear_error(setup):
    m, task = setup
    g = Graph.from_model(m)
    calls = [lambda: attribution.edges(m, task, remote=True),
             lambda: circuits.faithfulness(m, task, Circuit.full(g), remote=True),
             lambda: circuits.circuit_metrics(m, task, [Circuit.full(g)], remote=True),
             lambda: circuits.faithfulness_curve(m, task, Circuit.full(g), remote=True),
             lambda: circuits.edge_patching(m, task, remote=True),
             lambda: paths.path_patch(m, task, remote=True),
             lambda: paths.test(m, task, Circuit.full(g), remote=True)]
    for call in calls:
        with pytest.raises(NotImplementedError, match="cannot run remotely.*outside nnsight"):
            call()
