"""EAP, EAP-IG and node attribution against plain autograd on a Hugging Face model, and a planted circuit."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab import attribution, circuits
from interplab.circuits import Circuit, Graph
from interplab.organisms.tokenizer import build_tokenizer
from interplab.tasks import Task, random_tokens

TOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=32, n_positions=32, initializer_range=0.3)
    hf = GPT2LMHeadModel(config).double()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    m = il.load(hf, tokenizer=tok)
    return m, random_tokens(m, n=3, seq=6)


def hf_senders(m, tokens):
    """Sender outputs by raw hooks: {"input": [B,T,D], "a{l}.h{h}": [B,T,D], "m{l}": [B,T,D]}."""
    out, handles = {}, []
    handles.append(m.hf.transformer.drop.register_forward_hook(lambda mod, a, o: out.__setitem__("input", o)))
    for l in range(m.n_layers):
        block = m.block(l)

        def per_head(mod, args, l=l):
            z = args[0].view(*args[0].shape[:2], m.n_heads, m.d_head)  # (B, T, H, dh)
            W_O = mod.weight.view(m.n_heads, m.d_head, m.d_model)
            for h in range(m.n_heads):
                out[f"a{l}.h{h}"] = z[:, :, h] @ W_O[h]

        handles.append(block.attn.c_proj.register_forward_pre_hook(per_head))
        handles.append(block.mlp.register_forward_hook(lambda mod, a, o, l=l: out.__setitem__(f"m{l}", o)))
    with torch.no_grad():
        m.hf(tokens)
    for h in handles:
        h.remove()
    return out


def hf_edge_derivative(m, task, sender, receiver, alpha=1.0):
    """d/d eps of the mean metric when only `receiver`'s input (before its norm) moves by eps * delta(sender),
    delta = clean - corrupt output of the sender, on the run whose input embeddings are
    corrupt + alpha * (clean - corrupt) (alpha = 1: the clean run)."""
    delta = hf_senders(m, task.clean)[sender] - hf_senders(m, task.corrupt)[sender]
    embed_clean, embed_corrupt = hf_senders(m, task.clean)["input"], hf_senders(m, task.corrupt)["input"]
    mixed = embed_corrupt + alpha * (embed_clean - embed_corrupt)
    interpolate = m.hf.transformer.drop.register_forward_hook(lambda mod, a, o: mixed)
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    shift = lambda mod, args: (args[0] + eps * delta,)  # noqa: E731
    if receiver == "logits":
        handle = m.hf.transformer.ln_f.register_forward_pre_hook(shift)
    elif receiver.startswith("m"):
        handle = m.block(int(receiver[1:])).ln_2.register_forward_pre_hook(shift)
    else:
        layer, head, slot = int(receiver[1]), int(receiver[4]), "qkv".index(receiver[6])
        block, D, dh = m.block(layer), m.d_model, m.d_head
        cols = slice(slot * D + head * dh, slot * D + (head + 1) * dh)
        resid = {}
        keep = block.ln_1.register_forward_pre_hook(lambda mod, args: resid.__setitem__("x", args[0]))

        def moved(mod, args, out):
            normed = block.ln_1(resid["x"] + eps * delta)
            out = out.clone()
            out[..., cols] = (normed @ mod.weight + mod.bias)[..., cols]
            return out

        handle = block.attn.c_attn.register_forward_hook(moved)
    try:
        metric = task.metric(m.hf(task.clean).logits).mean()
        (grad,) = torch.autograd.grad(metric, eps)
    finally:
        handle.remove()
        interpolate.remove()
        if not receiver.startswith(("m", "logits")):
            keep.remove()
    return grad.item()


EDGES = [("input", "a0.h1<q>"), ("input", "a1.h2<k>"), ("a0.h3", "a1.h0<v>"), ("a0.h0", "a1.h1<q>"),
         ("m0", "a1.h3<k>"), ("a1.h2", "m1"), ("a0.h2", "m0"), ("input", "m0"), ("a1.h1", "logits"),
         ("m1", "logits"), ("input", "logits")]


def test_eap_scores_are_delta_times_gradient_by_plain_autograd(setup):
    m, task = setup
    scored = attribution.edges(m, task, method="EAP", batch_size=2)
    g = scored.graph
    for sender, receiver in EDGES:
        got = scored.scores[g.sender_index(sender), g.receiver_index(receiver)].item()
        assert got == pytest.approx(hf_edge_derivative(m, task, sender, receiver), abs=TOL), (sender, receiver)
    assert (scored.scores[~g.valid] == 0).all()


IG_EDGES = [("input", "a1.h2<k>"), ("a0.h3", "a1.h0<v>"), ("m0", "logits"), ("a0.h2", "m0"), ("input", "logits")]


def test_eap_ig_is_the_right_riemann_sum_of_an_independent_path_integral(setup):
    """EAP-IG with m steps averages the gradient at alpha = k/m, k = 1..m (the paper's endpoints), and
    converges to the integral over alpha in [0, 1], here a 64-interval trapezoid rule of raw-hook gradients."""
    m, task = setup
    steps, fine = 4, 64
    ig = attribution.edges(m, task, method="EAP-IG", steps=steps)
    many = attribution.edges(m, task, method="EAP-IG", steps=256)
    eap = attribution.edges(m, task, method="EAP")
    g = ig.graph
    far, gaps = [], []
    for sender, receiver in IG_EDGES:
        at = [hf_edge_derivative(m, task, sender, receiver, alpha=a / fine) for a in range(fine + 1)]
        integral = (sum(at) - (at[0] + at[-1]) / 2) / fine  # trapezoid rule
        right = sum(at[k * fine // steps] for k in range(1, steps + 1)) / steps  # alpha = 1/4, ..., 1
        left = sum(at[k * fine // steps] for k in range(steps)) / steps  # alpha = 0, ..., 3/4 (hannamw/EAP-IG)
        s, r = g.sender_index(sender), g.receiver_index(receiver)
        assert ig.scores[s, r].item() == pytest.approx(right, abs=TOL), (sender, receiver)
        assert many.scores[s, r].item() == pytest.approx(integral, abs=2e-3 * max(1.0, abs(integral)))
        gaps.append(abs(right - left))
        far.append(abs(eap.scores[s, r].item() - integral))
        print(sender, receiver, f"right {right:+.4f} left {left:+.4f} integral {integral:+.4f}")
    assert max(gaps) > 1e-3  # the endpoint convention is visible, so the first check can fail
    assert max(far) > 0.05  # EAP (one step) is not the integral on this model, so the last check can fail


def test_node_attribution_matches_autograd_and_sums_the_edges(setup):
    m, task = setup
    nodes = attribution.nodes(m, task, batch_size=2)
    edges = attribution.edges(m, task, method="EAP").scores
    g = Graph.from_model(m)
    # A sender's node score is the sum of its outgoing edge scores: its gradient is the sum of theirs.
    for l in range(m.n_layers):
        for h in range(m.n_heads):
            outgoing = edges[g.sender_index(f"a{l}.h{h}")].sum().item()
            assert nodes["heads"].values[l, h].item() == pytest.approx(outgoing, abs=TOL)
        assert nodes["mlp"].values[l].item() == pytest.approx(edges[g.sender_index(f"m{l}")].sum().item(), abs=TOL)
    # Independent: (z_clean - z_corrupt) . dm/dz on the per-head input of c_proj in the Hugging Face model.
    z = {}
    hooks = [m.block(l).attn.c_proj.register_forward_pre_hook(lambda mod, a, l=l: z.__setitem__(l, a[0]))
             for l in range(m.n_layers)]
    with torch.no_grad():
        m.hf(task.corrupt)
        z_corrupt = dict(z)
    metric = task.metric(m.hf(task.clean).logits).mean()
    grads = torch.autograd.grad(metric, [z[l] for l in range(m.n_layers)])
    for h in hooks:
        h.remove()
    for l in range(m.n_layers):
        per_head = ((z[l].detach() - z_corrupt[l]) * grads[l]).view(*grads[l].shape[:2], m.n_heads, -1).sum((0, 1, 3))
        assert torch.allclose(nodes["heads"].values[l].double(), per_head, atol=TOL)


def planted_model():
    """Two layers, two heads, hand-set weights: the first token is copied to the logits by
    input -> a0.h1 (value) -> a1.h0 (value) -> logits, and by nothing else."""
    tok = build_tokenizer()
    V, D, dh = 4, 16, 8
    config = GPT2Config(vocab_size=V, n_layer=2, n_head=2, n_embd=D, n_inner=8, n_positions=8,
                        tie_word_embeddings=False)
    hf = GPT2LMHeadModel(config).double()
    eye = torch.eye(V, dtype=torch.float64)
    A, B, C, CONST = slice(0, V), slice(V, 2 * V), slice(2 * V, 3 * V), 3 * V
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.fill_(1.0 if ("ln" in name and name.endswith("weight")) else 0.0)
        t = hf.transformer
        t.wte.weight[:, A] = eye  # token identity in A
        t.wpe.weight[:, CONST] = 4.0  # a large constant keeps the norms' scale nearly fixed
        # a0.h1 (uniform attention: zero queries and keys) reads A into its value, writes B.
        t.h[0].attn.c_attn.weight[A, 2 * D + dh: 2 * D + dh + V] = eye
        t.h[0].attn.c_proj.weight[dh: dh + V, B] = eye
        # a1.h0 reads B into its value, writes C; the unembedding reads C.
        t.h[1].attn.c_attn.weight[B, 2 * D: 2 * D + V] = eye
        t.h[1].attn.c_proj.weight[0:V, C] = eye
        hf.lm_head.weight[:, C] = eye
    return il.load(hf, tokenizer=tok)


def planted_task():
    rows = [(a, b) for a in range(3) for b in range(3) if a != b]
    clean = torch.tensor([[a, 3, 3, 3] for a, _ in rows])
    corrupt = torch.tensor([[b, 3, 3, 3] for _, b in rows])
    answer, wrong = clean[:, 0].clone(), corrupt[:, 0].clone()
    return Task("planted", clean, corrupt, answer, wrong, [""] * len(rows), [""] * len(rows))


PLANTED = {("input", "a0.h1<v>"), ("a0.h1", "a1.h0<v>"), ("a1.h0", "logits")}


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_discovery_ranks_the_planted_circuit_on_top(method):
    m, task = planted_model(), planted_task()
    clean = task.metric(m.logits(task.clean))
    assert (clean > 0).all()  # the model does solve the task
    scored = attribution.edges(m, task, method=method, steps=10)
    assert {(s, r) for s, r, _ in scored.top(3).edges()} == PLANTED
    planted = Circuit.from_edges(scored.graph, sorted(PLANTED))
    assert circuits.faithfulness(m, task, planted) > 0.99


@pytest.mark.parametrize("receiver", ["logits", "m1", "m0"])
def test_exact_edge_patching_matches_raw_hooks(setup, receiver):
    m, task = setup
    g = Graph.from_model(m)
    senders = [s for s in ("input", "a0.h1", "m0", "a1.h3") if g.valid[g.sender_index(s), g.receiver_index(receiver)]]
    among = Circuit.from_edges(g, [(s, receiver) for s in senders])
    exact = circuits.edge_patching(m, task, among, circuits_per_run=2)
    clean_run, corrupt_run = hf_senders(m, task.clean), hf_senders(m, task.corrupt)
    module = m.hf.transformer.ln_f if receiver == "logits" else m.block(int(receiver[1:])).ln_2
    for s in senders:
        shift = corrupt_run[s] - clean_run[s]  # corrupt this one edge
        handle = module.register_forward_pre_hook(lambda mod, args: (args[0] + shift,))
        with torch.no_grad():
            patched = task.metric(m.hf(task.clean).logits).mean().item()
        handle.remove()
        clean = task.metric(m.logits(task.clean)).mean().item()
        got = exact.scores[g.sender_index(s), g.receiver_index(receiver)].item()
        assert got == pytest.approx(clean - patched, abs=1e-5), s  # noising sign: +1 = carries the effect


def test_normalized_attribution_divides_by_the_gap_and_a_metric_is_accepted(setup):
    m, task = setup
    clean, corrupt = (task.metric(m.logits(t)).mean().item() for t in (task.clean, task.corrupt))
    raw = attribution.edges(m, task, method="EAP")
    normalized = attribution.edges(m, task, method="EAP", normalize=True)
    torch.testing.assert_close(normalized.scores, raw.scores / (clean - corrupt), atol=1e-6, rtol=1e-5)
    # A custom metric with the one signature every method takes: (final logits [B, V], examples [B]) -> [B].
    twice = lambda logits, ex: 2 * il.metrics.logit_diff(logits, task.answer[ex], task.wrong[ex])  # noqa: E731
    torch.testing.assert_close(attribution.edges(m, task, method="EAP", metric=twice).scores, 2 * raw.scores,
                               atol=1e-6, rtol=1e-5)
    nodes = attribution.nodes(m, task, metric=twice)
    torch.testing.assert_close(nodes["heads"].values, 2 * attribution.nodes(m, task)["heads"].values,
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one value per row"):
        attribution.edges(m, task, method="EAP", metric=lambda logits, ex: twice(logits, ex).sum())


def test_attribution_refuses_bad_input_before_running(setup):
    m, task = setup
    with pytest.raises(ValueError, match="batch_size"):
        attribution.edges(m, task, batch_size=0)
    with pytest.raises(ValueError, match="steps"):
        attribution.edges(m, task, steps=0)
    big = task.clean.clone()
    big[0, 1] = m.d_vocab + 5
    with pytest.raises(ValueError, match="vocabulary"):
        attribution.edges(m, Task("big", big, big, task.answer, task.wrong, [], []))
    long = torch.randint(3, m.d_vocab, (2, 40))
    with pytest.raises(ValueError, match="at most 32"):
        attribution.edges(m, Task("long", long, long, task.answer[:2], task.wrong[:2], [], []))
    same = Task("same", task.clean, task.clean, task.answer, task.wrong, [], [])
    with pytest.raises(ValueError, match="normalized effect is undefined"):
        attribution.edges(m, same, normalize=True)
