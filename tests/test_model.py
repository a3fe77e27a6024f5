"""Architecture specs: tiny random models of each family, checked against raw PyTorch hooks."""

import copy

import huggingface_hub.constants
import pytest
import torch
import transformers

import interplab as il
from interplab.model import _get
from interplab.organisms.tokenizer import build_tokenizer

N_LAYERS, N_HEADS, D_MODEL = 3, 4, 32
PROMPTS = ["When Mary and John went to the store , John gave a book to",
           "When Alice and Bob went to the park , Alice gave a ring to"]
SOURCE = ["When Sarah and Tom went to the beach , Anna gave a pen to",
          "When Lucy and Paul went to the river , Kate gave a hat to"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _configs(vocab: int) -> dict:
    """Tiny configs of each supported family; the Llama family uses grouped-query attention."""
    llama_like = dict(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                        n_positions=64),
        "gpt_neox": transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=64,
                                               num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                               max_position_embeddings=64),
        "llama": transformers.LlamaConfig(**llama_like),
        # head_dim set apart from d_model / n_heads: d_head must come from the config.
        "llama_wide_heads": transformers.LlamaConfig(**llama_like, head_dim=16),
        "qwen2": transformers.Qwen2Config(**llama_like),
        "mistral": transformers.MistralConfig(**llama_like),
    }


FAMILIES = list(_configs(1))
EXPECTED = {"gpt2": ("GPT-2", 4, 8), "gpt_neox": ("GPT-NeoX", 4, 8), "llama": ("Llama", 2, 8),
            "llama_wide_heads": ("Llama", 2, 16), "qwen2": ("Llama", 2, 8), "mistral": ("Llama", 2, 8)}


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tok):
    torch.manual_seed(0)
    config = _configs(len(tok))[request.param]
    hf = transformers.AutoModelForCausalLM.from_config(config)
    return request.param, il.load(hf, tokenizer=tok)


def test_dimensions(model):
    family, m = model
    spec_family, n_kv_heads, d_head = EXPECTED[family]
    assert m.spec.family.startswith(spec_family)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head) == (N_LAYERS, N_HEADS, n_kv_heads,
                                                                          D_MODEL, d_head)
    assert m.d_vocab == len(m.tokenizer)
    # Every spec path resolves to a module of this model.
    for path in (m.spec.embed, m.spec.final_norm, m.spec.unembed):
        assert isinstance(m.module(path), torch.nn.Module)
    for path in (m.spec.attn, m.spec.attn_norm, m.spec.head_values, m.spec.mlp, m.spec.mlp_norm, m.spec.mlp_out):
        assert isinstance(m.module(path, layer=N_LAYERS - 1), torch.nn.Module)


def _captured_input(m, tokens, layer) -> torch.Tensor:
    """The head-values input at `layer`, captured with a plain PyTorch pre-hook: `[B, T, nh*dh]`."""
    seen = []
    handle = m.module(m.spec.head_values, layer).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        m.logits(tokens)
    finally:
        handle.remove()
    return seen[0].detach().clone()


def _captured_output(m, path, layer, tokens) -> torch.Tensor:
    """The output of the module at `path` in `layer`, captured with a plain forward hook."""
    seen = []
    handle = m.module(path, layer).register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    try:
        m.logits(tokens)
    finally:
        handle.remove()
    return seen[0]


def test_head_values_shape(model):
    _, m = model
    tokens = m.to_tokens(PROMPTS)
    B, T = tokens.shape
    with m.nn.trace(tokens):
        values = m.envoy(m.spec.head_values, 1).input.save()
    per_head = values.view(B, T, m.n_heads, m.d_head)  # (B, T, nh, hs)
    assert per_head.shape == (B, T, m.n_heads, m.d_head)
    torch.testing.assert_close(values, _captured_input(m, tokens, 1), rtol=0, atol=0)


@pytest.mark.parametrize("layer,head", [(0, 3), (2, 1)])
def test_one_head_patch_matches_raw_hook(model, layer, head):
    _, m = model
    tokens, source = m.to_tokens(PROMPTS), m.to_tokens(SOURCE)
    B, T = tokens.shape
    nh, hs = m.n_heads, m.d_head
    source_head = _captured_input(m, source, layer).view(B, T, nh, hs)[:, :, head]  # (B, T, hs)

    def patch(module, args):
        x = args[0].clone().view(B, T, nh, hs)
        x[:, :, head] = source_head
        return (x.view(B, T, nh * hs),) + args[1:]

    handle = m.module(m.spec.head_values, layer).register_forward_pre_hook(patch)
    try:
        expected = m.logits(tokens)
    finally:
        handle.remove()

    with m.nn.trace(tokens):
        values = m.envoy(m.spec.head_values, layer).input
        values.view(B, T, nh, hs)[:, :, head] = source_head
        patched = m.envoy(m.spec.unembed).output.save()

    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)
    assert (m.logits(tokens) - expected).abs().max() > 1e-4  # the patch changed something


def test_unsupported_architecture_names_families_and_fix(tok):
    config = transformers.BloomConfig(vocab_size=len(tok), hidden_size=16, n_layer=1, n_head=2)
    with pytest.raises(NotImplementedError) as error:
        il.load(transformers.BloomForCausalLM(config), tokenizer=tok)
    message = str(error.value)
    for needed in ("bloom", "GPT-2", "GPT-NeoX", "Llama", "ArchSpec", "SPECS"):
        assert needed in message


def test_hub_id_offline_points_to_organisms(monkeypatch):
    # Offline as on a machine without network: the hub is never contacted, so this is fast and deterministic.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"(?s)hub.*network.*interplab/tiny-base"):
        il.load("interplab-tests/no-such-model-anywhere")


def test_unknown_organism():
    with pytest.raises(ValueError, match=r"unknown organism 'interplab/tiny-huge'.*interplab/tiny-base"):
        il.load("interplab/tiny-huge")


def test_built_model_needs_tokenizer(tok):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="tokenizer=tok"):
        il.load(hf)


def test_to_tokens_unequal_lengths(model):
    _, m = model
    with pytest.raises(ValueError, match=r"different token lengths \[\d+, \d+\]"):
        m.to_tokens(["When Mary and John went to the store", "When Mary went"])


def test_to_tokens_and_back(model):
    _, m = model
    tokens = m.to_tokens(PROMPTS[0])
    assert tokens.shape == (1, len(PROMPTS[0].split()) + 1)  # word-level vocabulary, plus BOS
    assert m.to_str_tokens(tokens[0]) == ["<bos>"] + PROMPTS[0].split()


def _qkv_rows(m, which: str, unit: int) -> tuple[str, slice]:
    """Spec path and output features of `which` (q, k or v) for head `unit` (a kv head for k and v)."""
    i, hs = "qkv".index(which), m.d_head
    if m.spec.qkv_layout == "separate":
        return m.spec.qkv[i], slice(unit * hs, (unit + 1) * hs)
    start = {"concat": i * m.n_heads * hs + unit * hs, "interleaved": unit * 3 * hs + i * hs}[m.spec.qkv_layout]
    return m.spec.qkv[0], slice(start, start + hs)


def _zeroed_copy(m, which: str, unit: int, layer: int):
    """A copy of `m` whose `which` projection of head `unit` at `layer` outputs zeros (weights and bias)."""
    hf = copy.deepcopy(m.hf)
    path, rows = _qkv_rows(m, which, unit)
    module = _get(hf, m.spec.blocks)[layer]
    proj = _get(module, path)
    with torch.no_grad():
        (proj.weight[:, rows] if m.spec.conv1d else proj.weight[rows]).zero_()
        if proj.bias is not None:
            proj.bias[rows] = 0
    return il.load(hf, tokenizer=m.tokenizer)


def _per_head(m, tokens, layer) -> torch.Tensor:
    B, T = tokens.shape
    return _captured_input(m, tokens, layer).view(B, T, m.n_heads, m.d_head)  # (B, T, nh, hs)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_qkv_layout_planted_zero_head(model, which):
    """Zero one head's q, k or v rows as the spec's layout places them; check only that head changes, as predicted.

    Zero values give a zero head output; zero queries or keys give uniform attention, so the head's
    output is the running mean of its values (read from the projection through the same layout).
    """
    _, m = model
    layer, unit = 1, 1
    tokens = m.to_tokens(PROMPTS)
    B, T = tokens.shape
    group = m.n_heads // m.n_kv_heads
    hit = [unit] if which == "q" else list(range(unit * group, (unit + 1) * group))
    edited = _zeroed_copy(m, which, unit, layer)
    before, after = _per_head(m, tokens, layer), _per_head(edited, tokens, layer)

    others = [h for h in range(m.n_heads) if h not in hit]
    torch.testing.assert_close(after[:, :, others], before[:, :, others], rtol=0, atol=1e-6)
    for head in hit:
        if which == "v":
            expected = torch.zeros(B, T, m.d_head)
        else:
            path, rows = _qkv_rows(m, "v", head // group)
            values = _captured_output(edited, path, layer, tokens)[..., rows]  # (B, T, hs)
            expected = values.cumsum(1) / torch.arange(1, T + 1)[:, None]
        torch.testing.assert_close(after[:, :, head], expected, rtol=0, atol=1e-5)
        assert (before[:, :, head] - expected).abs().max() > 1e-3  # the edit mattered


def _saved(tmp_path, tok, with_tokenizer):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    folder = tmp_path / "saved"
    hf.save_pretrained(folder)
    if with_tokenizer:
        tok.save_pretrained(folder)
    return folder


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tok):
    folder = _saved(tmp_path, tok, with_tokenizer=False)
    with pytest.raises(ValueError, match=r"tokenizer has 1 tokens.*tokenizer=tok"):
        il.load(folder)  # today: a 1-token tokenizer, and m.to_tokens(text) == [[0]]
    m = il.load(folder, tokenizer=tok)
    assert m.to_tokens("When Mary").tolist() == [[tok.bos_token_id] + tok.encode("When Mary", add_special_tokens=False)]


def test_missing_empty_and_truncated_folders_say_what_is_wrong(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        il.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        il.load(tmp_path / "empty")
    folder = _saved(tmp_path, tok, with_tokenizer=True)
    assert il.load(folder).n_layers == 1
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"model\.safetensors \(truncated"):
        il.load(folder)


def test_revision_and_remote_on_an_organism_are_refused():
    with pytest.raises(ValueError, match="drop revision"):
        il.load("interplab/tiny-base", revision="step3000")
    m = il.load("interplab/tiny-base")
    task = il.tasks.make("ioi", m, n=2, seed=0)
    with pytest.raises(ValueError, match="local organism"):
        il.probes.collect(m, task.clean, remote=True)
    with pytest.raises(ValueError, match="local organism"):
        il.lens.logit_lens(m, task.clean[0], remote=True)
