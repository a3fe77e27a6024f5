"""Weight diffs and their SVD: a planted rank-1 diff must come back as the top singular pair,
oriented (u in the output space, v in the input space) for GPT-2 (Conv1D), GPT-NeoX and Llama."""

import copy

import pytest
import torch
import transformers as T

import interplab as il
import interplab.ui.viz
from interplab import weights
from interplab.organisms.tokenizer import build_tokenizer

TOK = build_tokenizer()
V = len(TOK)
CONFIGS = {
    "gpt2": lambda d=32: T.GPT2Config(vocab_size=V, n_positions=32, n_embd=d, n_layer=2, n_head=4,
                                      bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id),
    "gpt_neox": lambda d=32: T.GPTNeoXConfig(vocab_size=V, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=3 * d, max_position_embeddings=32),
    "llama": lambda d=32: T.LlamaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=3 * d, max_position_embeddings=32),
}


def tiny(arch: str, d: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return il.load(T.AutoModelForCausalLM.from_config(CONFIGS[arch](d)), tokenizer=TOK)


def planted_pair(arch: str, field: str, layer: int, seed: int = 1):
    """(a, b, u, v): b equals a except that the module computes an extra u (v · x)."""
    a = tiny(arch)
    b = il.load(copy.deepcopy(a.hf), tokenizer=TOK)
    mod_a, mod_b = a.module(getattr(a.spec, field), layer), b.module(getattr(b.spec, field), layer)
    x = torch.randn(5, _in_features(mod_a))
    d_out = mod_a(x).shape[-1]
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(d_out, generator=gen), torch.randn(x.shape[-1], generator=gen)
    with torch.no_grad():
        if isinstance(mod_b, T.pytorch_utils.Conv1D):
            mod_b.weight += torch.outer(v, u)  # Conv1D stores (in, out)
        else:
            mod_b.weight += torch.outer(u, v)
        # Independent of storage conventions: the planted change is what the module computes.
        torch.testing.assert_close(mod_b(x) - mod_a(x), (x @ v)[:, None] * u, atol=1e-4, rtol=1e-4)
    return a, b, u, v


def _in_features(mod):
    return mod.weight.shape[0] if isinstance(mod, T.pytorch_utils.Conv1D) else mod.in_features


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("field,layer", [("mlp_out", 1), ("head_values", 0)])
def test_planted_rank_one_diff_is_the_top_singular_pair(arch, field, layer):
    a, b, u, v = planted_pair(arch, field, layer)
    result = weights.diff_svd(a, b, field, layer, k=2)
    assert result.U.shape[0] == u.shape[0] and result.V.shape[0] == v.shape[0]
    cos_u = result.U[:, 0] @ u / u.norm()
    cos_v = result.V[:, 0] @ v / v.norm()
    assert abs(cos_u) > 0.999 and abs(cos_v) > 0.999
    assert cos_u * cos_v > 0  # u σ vᵀ, not -u σ vᵀ
    torch.testing.assert_close(result.S[0], u.norm() * v.norm(), rtol=1e-4, atol=1e-4)
    assert result.S[1] < 1e-3 * result.S[0]
    assert result.frobenius == pytest.approx((u.norm() * v.norm()).item(), rel=1e-4)
    # Writers' left singular vectors live in the residual stream; the planted u is found there.
    assert result.out_space == "resid"
    assert result.alignment(u, "resid")[0] == pytest.approx(1.0, abs=1e-3)
    other = "mlp_out" if field == "head_values" else "head_values"
    assert weights.diff(a, b, other, layer).abs().max() == 0


def test_diff_table_finds_the_planted_layer():
    a, b, u, _ = planted_pair("gpt2", "mlp_out", 1)
    directions = torch.randn(2, a.d_model)
    directions[1] = u
    table = weights.diff_table({"a→b": (a, b), "b→b": (b, b)}, directions)
    assert table.norm.values.shape == (2, 2, 2)
    assert table.alignment.values[0, 0, 1] == pytest.approx(1.0, abs=1e-3)
    assert table.norm.values[0].argmax().item() == 1  # module 0 (mlp_out), layer 1
    assert table.norm.values[1].abs().max() == 0
    assert table.share.values[0, 0, 1] == pytest.approx(1.0, abs=1e-5)  # the whole diff writes along u
    assert 0 < table.chance_cos < 0.2 and table.chance_share == 1 / a.d_model and "mlp_out" in str(table)
    fig = il.ui.viz.grouped_bars(table.norm, "layer")
    assert [t.name for t in fig.data] == ["a→b / mlp_out", "a→b / head_values", "b→b / mlp_out", "b→b / head_values"]
    assert fig.data[0].y == tuple(table.norm.values[0, 0].tolist())


def test_conv1d_weight_is_transposed_to_linear_orientation():
    m = tiny("gpt2")
    mod = m.module(m.spec.mlp_out, 0)
    x = torch.randn(3, _in_features(mod))
    w = weights.weight(m, "mlp_out", 0)  # [d_out, d_in]
    torch.testing.assert_close(x @ w.T + mod.bias, mod(x).detach())


def test_clear_errors():
    gpt2, llama = tiny("gpt2"), tiny("llama")
    with pytest.raises(ValueError, match="architectures differ"):
        weights.diff(gpt2, llama, "mlp_out", 0)
    with pytest.raises(ValueError, match="different shapes"):
        weights.diff(gpt2, tiny("gpt2", d=64), "mlp_out", 0)
    with pytest.raises(KeyError, match="Did you mean"):
        weights.weight(gpt2, "mlp.c_projj", 0)
    with pytest.raises(TypeError, match="not a linear map"):
        weights.weight(gpt2, "ln_1", 0)
    with pytest.raises(ValueError, match="all zero"):  # a zero diff's singular vectors would be arbitrary
        weights.diff_svd(gpt2, gpt2, "mlp_out", 0, k=1)
    result = weights.svd(weights.weight(gpt2, "mlp_out", 0), 1, "mlp_out", *weights.spaces(gpt2, "mlp_out", 0))
    with pytest.raises(ValueError, match="no side lives in"):
        result.alignment(torch.randn(gpt2.d_model), "vocab")
    with pytest.raises(ValueError, match="dimension"):
        result.alignment(torch.randn(7), "resid")
    with pytest.raises(ValueError, match="k must be"):
        weights.svd(torch.randn(3, 4), k=5)


def test_spaces_of_readers_and_writers():
    m = tiny("llama")
    assert weights.spaces(m, "head_values", 0) == ("resid", "heads")
    assert weights.spaces(m, "mlp_out", 1) == ("resid", "mlp")
    out_space, in_space = weights.spaces(m, "mlp.up_proj", 0)
    assert in_space == "resid" and out_space.endswith("up_proj:out")


def test_chance_cosine_matches_sampling():
    d = 128
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20000, d, generator=gen), torch.randn(20000, d, generator=gen)
    sampled = torch.nn.functional.cosine_similarity(x, y).abs().mean().item()
    assert weights._random_abs_cos(d) == pytest.approx(sampled, abs=3e-3)
