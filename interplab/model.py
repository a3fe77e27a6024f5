"""Loading models and the architecture specs that say where things live.

interplab never rewrites weights into a common format. Instead each model
family gets a small `ArchSpec`: dotted paths, relative to the Hugging Face
model (or to one block), of the modules an analysis needs. Everything else
reads modules through `Model.module(...)` / `Model.envoy(...)`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from nnsight import TransformersModel

from . import checks

ORGANISM_DIR = Path(__file__).parent / "organisms" / "weights"
ORGANISMS = ("interplab/tiny-base", "interplab/tiny-sft", "interplab/tiny-dpo")


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps the modules interplab needs.

    Paths starting at the model root: `blocks`, `embed`, `pos_embed`,
    `final_norm`, `unembed`. Paths relative to one block: the rest.
    `head_values` is the module whose *input* is the concatenation of per-head
    attention values `[batch, seq, n_heads * d_head]` (the output projection).
    `conv1d` is True where weights are stored `[in, out]` (GPT-2's Conv1D)
    rather than `[out, in]` (`nn.Linear`).
    `qkv` are the projections whose outputs are queries, keys and values:
    one fused module or three `(q, k, v)`. `qkv_layout` says how to find head
    h's columns in them: "concat" is `[q | k | v]`, each `[n_heads * d_head]`
    (GPT-2's c_attn); "interleaved" is per head `[q_h | k_h | v_h]` (NeoX's
    query_key_value); "separate" is one module each, keys and values over
    `n_kv_heads` (Llama's grouped-query attention).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    pos_embed: str | None
    final_norm: str
    unembed: str
    attn: str
    attn_norm: str
    head_values: str
    mlp: str
    mlp_norm: str
    mlp_out: str
    conv1d: bool = False
    qkv: tuple[str, ...] = ()
    qkv_layout: str = ""


GPT2 = ArchSpec(
    family="GPT-2",
    model_types=("gpt2",),
    blocks="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    attn_norm="ln_1",
    head_values="attn.c_proj",
    mlp="mlp",
    mlp_norm="ln_2",
    mlp_out="mlp.c_proj",
    conv1d=True,
    qkv=("attn.c_attn",),
    qkv_layout="concat",
)

GPT_NEOX = ArchSpec(
    family="GPT-NeoX",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    pos_embed=None,
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    attn="attention",
    attn_norm="input_layernorm",
    head_values="attention.dense",
    mlp="mlp",
    mlp_norm="post_attention_layernorm",
    mlp_out="mlp.dense_4h_to_h",
    qkv=("attention.query_key_value",),
    qkv_layout="interleaved",
)

LLAMA = ArchSpec(
    family="Llama (Llama, Qwen2, Mistral)",
    model_types=("llama", "qwen2", "mistral"),
    blocks="model.layers",
    embed="model.embed_tokens",
    pos_embed=None,
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_norm="input_layernorm",
    head_values="self_attn.o_proj",
    mlp="mlp",
    mlp_norm="post_attention_layernorm",
    mlp_out="mlp.down_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    qkv_layout="separate",
)

SPECS: tuple[ArchSpec, ...] = (GPT2, GPT_NEOX, LLAMA)


def spec_for(hf_model: torch.nn.Module) -> ArchSpec:
    """The spec for a Hugging Face model, or an error naming the supported families."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(f"{s.family} {s.model_types}" for s in SPECS)
    raise NotImplementedError(
        f"interplab has no architecture spec for model_type={model_type!r}. "
        f"Supported: {supported}. To add one, define an `ArchSpec` in interplab/model.py "
        "with the dotted paths of its blocks, norms, attention output projection and MLP "
        "output (print(model) shows them), and append it to `SPECS`."
    )


def _get(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class Model:
    """A Hugging Face causal LM, its tokenizer, its nnsight wrapper and its spec.

    Built eagerly from a ready model (`Model(hf_model, tokenizer)`), or lazily from a hub id or
    folder (`Model.lazy`): then the modules live on the meta device (shapes, no weights) until the
    model first runs here, when nnsight loads the weights ("dispatch"). A remote run never loads them.
    """

    def __init__(self, hf_model, tokenizer, name: str | None = None, folder: Path | None = None):
        self._setup(TransformersModel(hf_model.eval(), tokenizer=tokenizer, task="text-generation"), tokenizer,
                    name or getattr(hf_model.config, "name_or_path", "") or type(hf_model).__name__, folder)

    @classmethod
    def lazy(cls, source: str | Path, tokenizer, name: str, revision: str | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "Model":
        """The model at `source` (hub id or folder) built from its config on the meta device; no weights are read."""
        options = {"revision": revision, "dtype": dtype}
        if torch.device(device).type != "cpu":
            options["device_map"] = str(device)  # used at dispatch; the meta build drops it
        wrapped = TransformersModel(str(source), tokenizer=tokenizer, task="text-generation",
                                    **{k: v for k, v in options.items() if v is not None})
        m = cls.__new__(cls)
        m._setup(wrapped, tokenizer, name, source if isinstance(source, Path) else None)
        return m

    def _setup(self, wrapped: TransformersModel, tokenizer, name: str, folder: Path | None) -> None:
        self.nn = wrapped
        self.tokenizer = tokenizer
        self.name = name
        self.folder = folder  # the local folder it came from (NDIF cannot run those), else None
        config = self.config
        self.spec = spec_for(wrapped._module)
        self.n_layers: int = len(_get(wrapped._module, self.spec.blocks))
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = config.hidden_size
        self.d_head: int = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        self.d_vocab: int = config.vocab_size

    @property
    def config(self):
        """The Hugging Face config (never loads weights)."""
        return self.nn._module.config

    @property
    def dispatched(self) -> bool:
        """False while a lazily built model has no weights here (its parameters are on the meta device)."""
        return self.nn.dispatched

    def dispatch(self) -> None:
        """Load the weights of a lazily built model (a no-op once loaded); runs here call it for you."""
        with _quiet(self.folder is not None):
            self.nn.dispatch()
        self.nn._module.eval()

    @property
    def hf(self) -> torch.nn.Module:
        """The `transformers` model. On a lazily built model, reading it loads the weights first."""
        if not self.dispatched:
            self.dispatch()
        return self.nn._module

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.spec.family!r}, n_layers={self.n_layers}, "
            f"n_heads={self.n_heads}, d_model={self.d_model}, d_head={self.d_head})"
        )

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating dtype (known before a lazily built model loads them)."""
        return next(self.nn._module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device; the CPU while a lazy model has none (inputs travel from here)."""
        device = next(self.nn._module.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    def module(self, path: str, layer: int | None = None) -> torch.nn.Module:
        """The torch module at a spec path: `m.module(m.spec.mlp_out, layer=2)`."""
        if layer is None:
            return _get(self.hf, path)
        return _get(self.block(layer), path)

    def block(self, layer: int) -> torch.nn.Module:
        return _get(self.hf, self.spec.blocks)[layer]

    def envoy(self, path: str, layer: int | None = None):
        """The nnsight envoy at a spec path, for use inside `m.nn.trace(...)`."""
        if layer is None:
            return _get(self.nn, path)
        return _get(_get(self.nn, self.spec.blocks)[layer], path)

    def to_tokens(self, texts: str | list[str], prepend_bos: bool = True) -> torch.Tensor:
        """Token ids `[batch, seq]`; all texts must have the same token length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(t, prepend_bos) for t in texts]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(
                f"texts have different token lengths {sorted(lengths)}; interplab never pads "
                "silently. Tokenize them separately or make them the same length."
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def encode(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return [bos] + ids if prepend_bos and bos is not None else ids

    def to_str_tokens(self, tokens: torch.Tensor | list[int]) -> list[str]:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.tokenizer.convert_ids_to_tokens(ids)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, remote: bool = False) -> torch.Tensor:
        """Logits `[batch, seq, d_vocab]`: a plain forward pass, or with `remote=True` one nnsight trace on NDIF."""
        if not remote:
            return self.hf(tokens.to(self.device)).logits
        checks.remote(self, remote)
        with self.nn.trace(tokens, remote=True):
            logits = self.nn.output.logits.save()
        return logits


def _check_tokenizer(tokenizer, d_vocab: int, name: str) -> None:
    """Refuse a tokenizer loaded with the model whose vocabulary does not fit the model's embedding.

    More ids than the embedding has rows index out of range; fewer than half of them means
    the tokenizer is not this model's (a folder without tokenizer files loads a stub). A tokenizer
    passed explicitly is trusted (a hand-built toy model may use a few of its ids); token ids out of
    range are still refused by every method before it runs (`checks.tokens`).
    """
    size = len(tokenizer)
    if size > d_vocab or size < d_vocab / 2:
        raise ValueError(
            f"the tokenizer has {size} tokens but {name} has a vocabulary of {d_vocab}, so it is not this model's "
            "tokenizer (a model folder without tokenizer files loads a stub). Pass the right one: "
            "il.load(path, tokenizer=tok)."
        )


def _looks_like_path(name: str) -> bool:
    """A name the hub cannot hold: absolute, relative with ./ ../ ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; il.load takes a folder in Hugging Face layout "
                                "(config.json, model.safetensors, tokenizer files), a hub id or an organism name")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a saved model; save one with "
                                "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")


@contextlib.contextmanager
def _quiet(on: bool):
    """Hide transformers' "Loading weights" bar while `on` (local weights load in milliseconds, and the bar
    would be left behind in every notebook)."""
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    if on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if on and shown:
            logging.enable_progress_bar()


def _from_pretrained(source, tokenizer, revision, dtype, quiet: bool):
    """Model and tokenizer from a folder or the hub; `quiet` hides the loading bar."""
    with _quiet(quiet):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
        return hf_model, tokenizer or transformers.AutoTokenizer.from_pretrained(source, revision=revision)


def load(
    name_or_model: str | os.PathLike | torch.nn.Module,
    tokenizer=None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    remote: bool = False,
    lazy: bool = False,
) -> Model:
    """Load a causal LM as a `Model`.

    Accepts a shipped organism name (`"interplab/tiny-base"`), a Hugging Face
    hub id (`"gpt2"`, with optional `revision="step3000"`), a local folder in
    Hugging Face layout, or an already-built `transformers` model together with
    its `tokenizer`.

    `lazy=True` builds the model from its config on the meta device and reads no
    weights (only config and tokenizer files); the weights load the first time
    the model runs here. `remote=True` (for NDIF) is `lazy=True` for a hub id, so
    `il.load("meta-llama/Llama-3.1-8B", remote=True)` downloads no weights; pass
    `remote=True` again to each function. Organisms and local folders cannot run
    on NDIF and refuse `remote=True`.
    """
    if isinstance(name_or_model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "load(model) with an already-built model needs its tokenizer: "
                "load(model, tokenizer=tok). interplab never fetches one from the hub silently."
            )
        if remote or lazy:
            raise ValueError("load(model, remote=True/lazy=True): this model is already built with its weights; "
                             "pass a hub id instead, il.load(name, remote=True), to build it without weights.")
        return Model(name_or_model.to(device), tokenizer)

    name = str(name_or_model)
    if name in ORGANISMS:
        if revision is not None:
            raise ValueError(f"{name} is a shipped organism with one version; drop revision={revision!r} (the SFT "
                             "checkpoint series is rebuilt by `python -m interplab.organisms`)")
        if remote:
            raise ValueError(f"remote=True runs on NDIF, which hosts hub models only; {name} is a local organism. "
                             "Drop remote=True (organisms run in seconds on a CPU), or pass lazy=True to build "
                             "it without weights.")
        source = ORGANISM_DIR / name.split("/", 1)[1]
        if not lazy and not (source / "model.safetensors").exists():
            raise FileNotFoundError(
                f"the weights of {name} are missing from {source}. Rebuild them with "
                f"`python -m interplab.organisms train {name.split('-', 1)[1]}`."
            )
    elif name.startswith("interplab/"):
        raise ValueError(f"unknown organism {name!r}; the shipped organisms are {ORGANISMS}.")
    else:
        source = name
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(str(source)):
        _check_folder(local)
        source = local
        if remote:
            raise ValueError(f"remote=True runs on NDIF, which hosts hub models by their hub id; {local} is a local "
                             "folder. Load the hub id with remote=True, or pass lazy=True to build the folder's "
                             "model without reading its weights.")

    try:
        if remote or lazy:
            tok = tokenizer or transformers.AutoTokenizer.from_pretrained(source, revision=revision)
            m = Model.lazy(source, tok, name, revision=revision, dtype=dtype, device=device)
        else:
            hf_model, tok = _from_pretrained(source, tokenizer, revision, dtype, quiet=local.exists())
            m = Model(hf_model.to(device), tok, name=name, folder=source if isinstance(source, Path) else None)
    except Exception as error:
        if local.exists():
            weights = sorted(p.name for p in local.glob("*.safetensors")) or ["(no *.safetensors file)"]
            raise OSError(f"could not load the model in {local}: {str(error).splitlines()[0]}. Check its weights "
                          f"file {', '.join(weights)} (truncated by an interrupted copy or download?) and "
                          "config.json.") from error
        if not isinstance(error, OSError):
            raise
        raise OSError(
            f"could not load {name!r} from the Hugging Face hub ({str(error).splitlines()[0]}). "
            "Is there network access, and is the name right? Offline, use a shipped organism such as "
            f"il.load('interplab/tiny-base') (all: {ORGANISMS}), a local folder, or "
            "il.load(hf_model, tokenizer=tok)."
        ) from error
    if tokenizer is None:
        _check_tokenizer(tok, m.config.vocab_size, name)
    return m
