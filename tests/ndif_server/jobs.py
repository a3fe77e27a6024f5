"""Running one request the way NDIF's model actor does, on nnsight's own request and response types.

NDIF deserializes the request against the live model's persistent objects (`RequestModel.deserialize`),
runs the traced block (`tracer.execute`), keeps the values the block saved, and returns them
`torch.save`d (zstd-compressed when the request was). The model's parameters are frozen there, so a
gradient reaches only what the block itself makes require one.
"""

import io
import json
import time
import traceback
from dataclasses import dataclass, field

import torch
import transformers
from nnsight import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import _saves, dec, inc

# The wrapper classes a client may name in its model key (`LanguageModel` is TransformersModel's alias).
WRAPPERS = ("nnsight.modeling.transformers.TransformersModel", "nnsight.modeling.language.LanguageModel")


class NotHosted(LookupError):
    """The request names a model this server does not hold."""


@dataclass
class Hosted:
    """One model the server holds, built from a Hugging Face folder on first use.

    `delay` seconds are spent before each run: a stand-in for a long job, for the time-limit test.
    """

    folder: str
    delay: float = 0.0
    _model: TransformersModel | None = field(default=None, repr=False)

    def model(self) -> TransformersModel:
        if self._model is None:
            hf = transformers.AutoModelForCausalLM.from_pretrained(self.folder).eval()
            hf.requires_grad_(False)  # as on NDIF
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
            self._model = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
        return self._model


def repo_id(model_key: str) -> str:
    """The repo id in an nnsight model key `"import.path.Class:{json}"`."""
    wrapper, _, suffix = model_key.partition(":")
    if wrapper not in WRAPPERS:
        raise NotHosted(f"this server runs {', '.join(WRAPPERS)} models, not {wrapper}")
    try:
        return json.loads(suffix)["repo_id"]
    except (ValueError, KeyError, TypeError):
        raise NotHosted(f"the model key {model_key!r} names no repo_id") from None


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def execute(hosted: Hosted, blob: bytes, request: RequestModel) -> bytes:
    """Run one request; returns the result blob the client's `RemoteBackend.finalize` loads."""
    model = hosted.model()
    model._remoteable_set_env(request.env)
    tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), request.compress)
    time.sleep(hosted.delay)
    inc()
    try:
        tracer.execute(tracer.info.code)
        saves = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in _saves()}
    finally:
        dec()
    buffer = io.BytesIO()
    torch.save(_detached(saves), buffer)
    data = buffer.getvalue()
    if request.compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=6).compress(data)
    return data


def describe(error: BaseException) -> str:
    """What the client is told about a failed run: the traceback, its last line being the error itself."""
    return "".join(traceback.format_exception(error)).strip()
