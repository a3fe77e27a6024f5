"""The edge-wise forward, Graph, Circuit selection and faithfulness, against raw Hugging Face hooks."""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import interplab as il
from interplab import circuits, edgewise
from interplab.circuits import Circuit, Graph
from interplab.organisms.tokenizer import build_tokenizer
from interplab.scores import Scores
from interplab.tasks import random_tokens
from raw_hooks import hf_logits

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def random_gpt2(tok, seed=0, **config):
    """A float64 GPT-2 whose every parameter, norms and biases included, is random."""
    torch.manual_seed(seed)
    options = dict(n_layer=3, n_head=4, n_embd=32, n_positions=32, initializer_range=0.3) | config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **options)).double()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif ".ln_" in name or "ln_f" in name:
                p.normal_(1, 0.2)
    return il.load(hf, tokenizer=tok)


@pytest.fixture(scope="module")
def setup(tok):
    m = random_gpt2(tok)
    return m, random_tokens(m)


def hf_metric(m, tokens, task, hooks=()):
    """Mean task metric of a plain Hugging Face forward with raw `(module, kind, fn)` hooks."""
    return task.metric(hf_logits(m, tokens, hooks)).mean().item()


def hf_corrupt_receiver(m, task, receiver):
    """Mean metric of the clean run with one receiver's input (before its norm) taken from the corrupt run."""
    block = lambda l: m.block(l)  # noqa: E731
    kept = {}
    keep = lambda key: (lambda mod, args: kept.__setitem__(key, args[0]))  # noqa: E731
    record = [(block(l).ln_1, "pre_", keep(("ln_1", l))) for l in range(m.n_layers)]
    record += [(block(l).ln_2, "pre_", keep(("ln_2", l))) for l in range(m.n_layers)]
    record += [(m.hf.transformer.ln_f, "pre_", keep(("ln_f", 0)))]
    hf_metric(m, task.corrupt, task, record)
    if receiver == "logits":
        hook = (m.hf.transformer.ln_f, "pre_", lambda mod, args: (kept[("ln_f", 0)],))
    elif receiver.startswith("m"):
        layer = int(receiver[1:])
        hook = (block(layer).ln_2, "pre_", lambda mod, args: (kept[("ln_2", layer)],))
    else:
        layer, head, slot = int(receiver[1]), int(receiver[4]), "qkv".index(receiver[6])
        attn = block(layer).attn
        cols = slice(slot * m.d_model + head * m.d_head, slot * m.d_model + (head + 1) * m.d_head)

        def hook_fn(mod, args, out):
            out = out.clone()
            # Conv1D by hand: calling attn.c_attn here would re-enter this hook.
            normed = block(layer).ln_1(kept[("ln_1", layer)])
            out[..., cols] = (normed @ attn.c_attn.weight + attn.c_attn.bias)[..., cols]
            return out

        hook = (attn.c_attn, "", hook_fn)
    return hf_metric(m, task.clean, task, [hook])


@pytest.mark.parametrize("inverse_layer_scale", [False, True])
def test_edgewise_forward_matches_hugging_face(tok, inverse_layer_scale):
    m = random_gpt2(tok, scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    tokens = random_tokens(m).clean
    with torch.no_grad():
        mine = edgewise.run(m, edgewise.embed(m, tokens))
    assert torch.allclose(mine, m.logits(tokens), atol=TOL, rtol=0)


def test_graph_enumerates_every_gpt2_edge():
    L, H = 3, 4
    g = Graph(L, H)
    assert len(g.senders) == 1 + L * (H + 1) and len(g.receivers) == L * (3 * H + 1) + 1
    upstream = lambda layer: 1 + layer * (H + 1)  # noqa: E731  senders before block `layer`
    expected = sum(3 * H * upstream(l) + upstream(l) + H for l in range(L)) + len(g.senders)
    assert g.n_edges == expected
    assert g.valid[g.sender_index("a1.h2"), g.receiver_index("m1")]
    assert not g.valid[g.sender_index("a1.h2"), g.receiver_index("a1.h0<q>")]
    with pytest.raises(ValueError, match="not upstream"):
        g.edge_mask([("m2", "a1.h0<k>")])
    with pytest.raises(KeyError, match="no receiver"):
        g.receiver_index("a9.h0<x>")


def test_graph_of_parallel_blocks_and_unsupported_forward(tok):
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=len(tok), max_position_embeddings=32))
    m = il.load(hf, tokenizer=tok)
    g = Graph.from_model(m)
    assert g.parallel and not g.valid[g.sender_index("a1.h0"), g.receiver_index("m1")]
    m.spec = dataclasses.replace(m.spec, rotary="other")  # a rotary style the edge-wise forward does not know
    with pytest.raises(NotImplementedError, match="cannot read .*rotary='other'"):
        circuits.faithfulness(m, random_tokens(m), Circuit.full(g))


def test_full_graph_is_the_clean_run_and_empty_circuit_the_corrupt_run(setup):
    m, task = setup
    g = Graph.from_model(m)
    full, empty = Circuit.full(g), Circuit(g, torch.zeros(g.valid.shape), torch.zeros_like(g.valid))
    metrics = circuits.circuit_metrics(m, task, [full, empty], batch_size=3)
    assert metrics[0].item() == pytest.approx(hf_metric(m, task.clean, task), abs=TOL)
    assert metrics[1].item() == pytest.approx(hf_metric(m, task.corrupt, task), abs=TOL)
    assert circuits.faithfulness(m, task, [full, empty]).tolist() == pytest.approx([1, 0], abs=TOL)


@pytest.mark.parametrize("receiver", ["a1.h2<k>", "a2.h0<q>", "a2.h3<v>", "a0.h1<v>", "m0", "m2", "logits"])
def test_corrupting_every_edge_into_a_receiver_is_patching_its_input(setup, receiver):
    m, task = setup
    g = Graph.from_model(m)
    mask = g.valid.clone()
    mask[:, g.receiver_index(receiver)] = False
    got = circuits.circuit_metrics(m, task, [Circuit(g, mask.float(), mask)])[0].item()
    assert got == pytest.approx(hf_corrupt_receiver(m, task, receiver), abs=TOL)


def test_selection_by_top_n_and_threshold():
    g = Graph(2, 2)
    scores = torch.randn(g.valid.shape, generator=torch.Generator().manual_seed(0))
    full = Circuit.full(g, scores)
    magnitudes = sorted((scores * g.valid).abs()[g.valid].tolist(), reverse=True)
    top = full.top(7)
    assert top.n_edges == 7 and min(abs(v) for _, _, v in top.edges()) == pytest.approx(magnitudes[6])
    assert [abs(v) for *_, v in top.edges()] == pytest.approx(magnitudes[:7])
    assert full.threshold(magnitudes[4]).n_edges == 5
    assert full.top(0).n_edges == 0 and full.top(g.n_edges).n_edges == g.n_edges
    with pytest.raises(ValueError, match="between 0 and"):
        full.top(g.n_edges + 1)


def test_faithfulness_curve_runs_from_empty_to_full(setup):
    m, task = setup
    g = Graph.from_model(m)
    scored = Circuit.full(g, torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(1)))
    curve = circuits.faithfulness_curve(m, task, scored, ns=[0, 10, g.n_edges])
    assert curve.dims == ("n_edges",) and curve.values[[0, 2]].tolist() == pytest.approx([0, 1], abs=TOL)


def test_circuit_and_curve_figures_draw_what_they_are_given():
    from interplab.ui import viz

    g = Graph(2, 2)
    scores = torch.linspace(-1, 1, g.valid.numel()).view(g.valid.shape)
    circuit = Circuit.full(g, scores).top(5)
    fig = viz.circuit_figure(circuit)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 5
    widths = sorted(t.line.width for t in lines)
    assert widths[-1] == pytest.approx(6.5) and widths[0] < widths[-1]  # width grows with |score|
    named = {t.text.split(":")[0] for t in lines}
    assert named == {f"{s} → {r}" for s, r, _ in circuit.edges()}
    curve = Scores(torch.tensor([0.0, 0.5, 1.0]), ("n_edges",), meta={"n_edges": [0, 3, 9]})
    fig = viz.faithfulness_curve_figure({"EAP": curve})
    assert list(fig.data[0].x) == [0, 3, 9] and list(fig.data[0].y) == [0.0, 0.5, 1.0]
