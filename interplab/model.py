"""Loading models: `load()` and `Model`, a Hugging Face causal LM with its tokenizer, nnsight wrapper and spec.

interplab never rewrites weights into a common format. Each model family has an
`ArchSpec` (interplab/specs.py) naming where its modules live and how they are
wired; everything reads modules through `Model.module(...)` / `Model.envoy(...)`,
and logits are formed in one place, `Model.final_logits`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers.pytorch_utils import Conv1D

from . import checks
from .remote import NDIFModel, check_model_key, set_model_key
from .specs import ArchSpec, optional, spec_for  # noqa: F401 (ArchSpec: il.ArchSpec)

ORGANISM_DIR = Path(__file__).parent / "organisms" / "weights"
ORGANISMS = ("interplab/tiny-base", "interplab/tiny-sft", "interplab/tiny-dpo", "interplab/mid-base")
# The recipe stage (`python -m interplab.organisms train <stage>`) of each organism folder.
ORGANISM_STAGES = {"tiny-base": "base", "tiny-sft": "sft", "tiny-dpo": "dpo", "mid-base": "mid"}


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A module's weight in `nn.Linear` orientation `[d_out, d_in]` (Conv1D stores `[d_in, d_out]`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(module).__name__} has no 2-D `weight`; decompose works on nn.Linear, "
            "transformers Conv1D, or a module computing `x @ weight.T + bias`."
        )
    return weight.T if isinstance(module, Conv1D) else weight


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
        self._setup(NDIFModel(hf_model.eval(), tokenizer=tokenizer, task="text-generation"), tokenizer,
                    name or getattr(hf_model.config, "name_or_path", "") or type(hf_model).__name__, folder)

    @classmethod
    def lazy(cls, source: str | Path, tokenizer, name: str, revision: str | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "Model":
        """The model at `source` (hub id or folder) built from its config on the meta device; no weights are read."""
        options = {"revision": revision, "dtype": dtype}
        if torch.device(device).type != "cpu":
            options["device_map"] = str(device)  # used at dispatch; the meta build drops it
        wrapped = NDIFModel(str(source), tokenizer=tokenizer, task="text-generation",
                                    **{k: v for k, v in options.items() if v is not None})
        m = cls.__new__(cls)
        m._setup(wrapped, tokenizer, name, source if isinstance(source, Path) else None)
        return m

    def _setup(self, wrapped: NDIFModel, tokenizer, name: str, folder: Path | None) -> None:
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
    def is_organism(self) -> bool:
        """True for a shipped organism, which exists only on this machine (NDIF cannot host it)."""
        return self.name in ORGANISMS

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
        for module in self.nn._module.modules():  # not .eval(): it may re-kernelize modules nnsight has hooked
            module.training = False

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

    def optional(self, path: str, layer: int | None = None) -> torch.nn.Module | None:
        """The module at a spec path that may be empty or absent (norms, q/k norms), else None."""
        return optional(self.hf if layer is None else self.block(layer), path)

    def final_logits(self, hidden, unembed=None):
        """The model's logits from the unembedding's input `[..., d_model]` (after the final norm).

        The one place interplab forms logits: the unembedding, then the family's post-processing
        (Gemma 2's final soft-cap, Cohere's logit scale, Granite's divisor). `unembed` is the
        unembedding to call (an nnsight envoy inside a trace); by default the module itself.
        """
        unembed = unembed if unembed is not None else self.module(self.spec.unembed)
        return self.spec.post_process(self.config, unembed(hidden))

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
        unk = self.tokenizer.unk_token_id
        if unk is not None and any(unk in row for row in rows):
            words = [t for t, row in zip(texts, rows) if unk in row][:3]
            warnings.warn(f"{self.name}'s tokenizer does not know some words in {words} and read them as "
                          f"{self.tokenizer.unk_token!r}; use words from its vocabulary", stacklevel=2)
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
        checks.tokens(self, tokens)
        checks.deterministic(self.nn._module, "m.logits")
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
    model_key: str | None = None,
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
    on NDIF and refuse `remote=True`, unless `model_key` names the model the
    server holds: `model_key="org/name"` is the repo id a remote run asks the
    server for, used as it is (no hub lookup; see `interplab.remote`).
    """
    check_model_key(model_key)
    if isinstance(name_or_model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "load(model) with an already-built model needs its tokenizer: "
                "load(model, tokenizer=tok). interplab never fetches one from the hub silently."
            )
        if remote or lazy:
            raise ValueError("load(model, remote=True/lazy=True): this model is already built with its weights; "
                             "pass a hub id instead, il.load(name, remote=True), to build it without weights.")
        m = Model(name_or_model.to(device), tokenizer)
        set_model_key(m, model_key)
        return m

    name = str(name_or_model)
    if name in ORGANISMS:
        if revision is not None:
            raise ValueError(f"{name} is a shipped organism with one version; drop revision={revision!r} (the SFT "
                             "checkpoint series is rebuilt by `python -m interplab.organisms`)")
        if remote and model_key is None:
            raise ValueError(f"remote=True runs on NDIF, which hosts hub models only; {name} is a local organism. "
                             "Drop remote=True (organisms run in seconds on a CPU), or pass lazy=True to build "
                             "it without weights.")
        source = ORGANISM_DIR / name.split("/", 1)[1]
        if not lazy and not (source / "model.safetensors").exists():
            raise FileNotFoundError(
                f"the weights of {name} are missing from {source}. Rebuild them with "
                f"`python -m interplab.organisms train {ORGANISM_STAGES[source.name]}`."
            )
        dtype = torch.float32 if dtype is None else dtype  # mid-base is stored in float16 to keep it small
    elif name.startswith("interplab/"):
        raise ValueError(f"unknown organism {name!r}; the shipped organisms are {ORGANISMS}.")
    else:
        source = name
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(str(source)):
        _check_folder(local)
        source = local
        if remote and model_key is None:
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
    set_model_key(m, model_key)
    return m
