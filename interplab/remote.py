"""Running interplab's traces on NDIF: the one place remote requests are configured, built and sent.

Every `Model` wraps its transformers model in `NDIFModel`, nnsight's `TransformersModel` whose
`remote=True` runs go through `Backend` here:

- **interplab's own code travels with the request.** nnsight ships a traced block as source text plus
  the objects it references; functions and classes of installed packages go by reference and are
  imported on the server, where interplab is not installed. While a request is serialized, interplab is
  registered for pickling by value, so its functions and classes are rebuilt from source server-side.
  cloudpickle would send the methods a dataclass generates as bytecode (they have no source), which
  only loads on the client's exact Python version; those classes are sent as their source instead and
  re-decorated on the server, so no bytecode crosses.
- **Offline model keys.** nnsight names a model to the server by a key built from its hub id, which
  it canonicalizes with a hub lookup; `il.load(..., model_key="org/name")` names it without one (and
  lets a model loaded from a folder or an organism run on a server that hosts it under that name).
- **Host, API key and time limit**: `configure(host=..., api_key=..., timeout=...)`, else nnsight's
  `NDIF_HOST` / `NDIF_API_KEY` (read when nnsight is imported).
- **Results come back detached**, and every failure is one `NDIFError` sentence: server unreachable,
  API key refused, nnsight version refused, request too large, model not hosted, the server's own
  exception, no answer in time.
"""

from __future__ import annotations

import ast
import contextlib
import copyreg
import dataclasses
import inspect
import json
import pickle
import sys
import textwrap
import time
import types

import torch
import websocket
from nnsight import TransformersModel
from nnsight.intervention.backends.remote import _CONNECT_TIMEOUT, RemoteBackend, RemoteError
from nnsight.schema.config import CONFIG
from nnsight.schema.response import Status


class _Settings:
    """Where remote runs go and how long to wait. Pickles as the defaults, so the API key never travels
    inside a request (interplab's code, which reaches these, is shipped with each one)."""

    def __init__(self):
        self.host, self.api_key, self.timeout = None, None, 600.0

    def __reduce__(self):
        return _Settings, ()


_SETTINGS = _Settings()


class NDIFError(RuntimeError):
    """A remote run failed; the message says why and what to do."""


def configure(**settings) -> dict:
    """Set where remote runs go, `host` (e.g. "https://api.ndif.us"), the `api_key`, and how long to wait for
    a result, `timeout` seconds (default 600); settings not passed stay as they are, and `None` restores the
    default (host and key: nnsight's `NDIF_HOST` / `NDIF_API_KEY`). Returns the previous settings, so
    `configure(**previous)` restores them."""
    defaults = vars(_Settings())
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"configure() takes host, api_key and timeout, not {', '.join(sorted(unknown))}")
    timeout = settings.get("timeout")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    previous = dict(vars(_SETTINGS))
    for name, value in settings.items():
        setattr(_SETTINGS, name, defaults[name] if value is None else value)
    return previous


def _host() -> str:
    return (_SETTINGS.host or CONFIG.API.HOST).rstrip("/")


class NDIFModel(TransformersModel):
    """nnsight's `TransformersModel`, with its remote runs sent through interplab's `Backend`.

    To the server it is a plain `TransformersModel`: its model key names that class, and a request carries
    it as one (`shipped_by_value`).
    """

    model_key: str | None = None  # the repo id the server knows this model by, if set explicitly

    def _remoteable_class(self) -> type:
        return TransformersModel

    def _remoteable_model_key(self) -> str:
        if self.model_key is None:
            try:
                return super()._remoteable_model_key()
            except Exception as error:
                raise NDIFError(f"could not look up {self.repo_id!r} on the Hugging Face hub to name it to NDIF "
                                f"({error}); pass the name the server knows it by, il.load(..., "
                                "model_key='org/name'), to skip the lookup.") from error
        return json.dumps({"repo_id": self.model_key, "revision": self.revision})

    def _remote_backend(self, remote, blocking: bool, job_id, verbose: bool):
        if remote == "local":  # nnsight's in-process simulation
            return super()._remote_backend(remote, blocking, job_id, verbose)
        # The tokenizer is the server's own: referenced by id, also where interplab's Model holds it.
        if self.tokenizer is not None:
            self.tokenizer._persistent_id = "Tokenizer"
        return Backend(self.to_model_key(), host=_host(), api_key=_SETTINGS.api_key,
                       env=self._remoteable_get_env(), blocking=blocking, job_id=job_id, verbose=verbose)


def check_model_key(model_key) -> None:
    if model_key is not None and (not isinstance(model_key, str) or not model_key.strip()):
        raise ValueError(f"model_key must be the repo id the server knows the model by, e.g. 'org/name'; "
                         f"got {model_key!r}")


def set_model_key(m, model_key: str | None) -> None:
    """Name `m` to NDIF as `model_key` (a repo id), without a hub lookup."""
    check_model_key(model_key)
    m.nn.model_key = model_key


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class Backend(RemoteBackend):
    """nnsight's blocking `RemoteBackend`, shipping interplab by value, bounded in time, with clear errors."""

    def __call__(self, tracer=None):
        try:
            return super().__call__(tracer)
        except NDIFError:
            raise
        except RemoteError as error:  # refused over HTTP (the status is on its cause), or failed on the server
            status = getattr(getattr(error.__cause__, "response", None), "status_code", None)
            raise _explain(status, str(error).removeprefix("Failed to send request: "), self) from error
        except websocket.WebSocketBadStatusException as error:  # refused when subscribing
            detail = (error.resp_body or b"").decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except (ValueError, AttributeError):
                pass
            raise _explain(error.status_code, detail, self) from error
        except Exception as error:
            if _is_connection_error(error):
                raise NDIFError(f"could not reach NDIF at {self.host} ({type(error).__name__}: {error}); check the "
                                "host (il.remote.configure(host=...) or NDIF_HOST) and the network.") from error
            raise

    def _serialize(self, tracer) -> bytes:
        try:
            with shipped_by_value():
                blob = super()._serialize(tracer)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise NDIFError(f"the traced block could not be packed for NDIF ({type(error).__name__}: {error}); "
                            "it refers to an object that cannot be sent: build it inside the block, or pass "
                            "plain tensors and numbers.") from error
        self.sent_bytes = len(blob)
        return blob

    def finalize(self, content: bytes):
        return _detached(super().finalize(content))

    def request(self, request, tracer):
        """nnsight's websocket loop, with a deadline: subscribe, post, then read status frames until done
        (`timeout` seconds after the post at most)."""
        blob = self._serialize(tracer)
        headers = {"ndif-api-key": self.api_key} if self.api_key else None
        connection = websocket.create_connection(f"{self.ws_host}/subscribe", header=headers,
                                                 timeout=_CONNECT_TIMEOUT)
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, blob)
            timeout = _SETTINGS.timeout
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NDIFError(f"NDIF at {self.host} sent no result within {timeout:g} s; raise "
                                    "il.remote.configure(timeout=...) or send a smaller request.")
                connection.settimeout(left)
                try:
                    response = self.parse(connection.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        finally:
            connection.close()


def _is_connection_error(error: Exception) -> bool:
    return isinstance(error, (ConnectionError, OSError, websocket.WebSocketException))


def _explain(status: int | None, detail: str, backend: Backend) -> NDIFError:
    """One sentence for a refused request (by its HTTP `status`) or a failed one (`status` None)."""
    where = f"NDIF at {backend.host}"
    if status in (401, 403):
        return NDIFError(f"{where} refused the API key ({detail}); set it with il.remote.configure(api_key=...) "
                         "or NDIF_API_KEY.")
    if status == 413:
        size = getattr(backend, "sent_bytes", 0)
        return NDIFError(f"the request ({size:,} bytes) is too large for {where} ({detail}); send fewer examples "
                         "per call (a smaller batch_size) or fewer, smaller tensors.")
    if status == 426 or (status == 400 and "version" in detail.lower()):
        return NDIFError(f"{where} does not accept this client's nnsight ({detail}); install the nnsight version "
                         "the server runs.")
    if status == 404:
        return NDIFError(f"{where} does not host the model {backend.model_key} ({detail}); check its name, or pass "
                         "the name the server uses: il.load(..., model_key='org/name').")
    if status is not None:
        return NDIFError(f"{where} refused the request (HTTP {status}: {detail}).")
    last = detail.strip().splitlines()[-1] if detail.strip() else "no reason given"
    return NDIFError(f"{where} failed while running the request: {last}")


# ---- shipping interplab by value ----

def _as_transformers_model(model: NDIFModel):
    return copyreg._reconstructor, (TransformersModel, object, None), model.__getstate__()


def _dataclass_from_source(source: str, scope: dict, name: str, module: str) -> type:
    """Server side: the dataclass `name`, rebuilt by running its source (decorator included).

    `dataclass` reads the class's module from `sys.modules` to resolve text annotations, so a stand-in
    module holds the run and is listed there meanwhile (interplab's own modules do not exist there).
    """
    stand_in = types.ModuleType(module)
    vars(stand_in).update(scope)
    listed = sys.modules.setdefault(module, stand_in) is stand_in
    try:
        exec(compile(source, f"<{module}.{name}>", "exec"), vars(stand_in))
    finally:
        if listed:
            del sys.modules[module]
    return getattr(stand_in, name)


def _reduce_dataclass(cls: type):
    source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(source)
    for node in ast.walk(tree):  # annotations stay text (`from __future__ import annotations`): ship no names for them
        if isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            for argument in ast.walk(node.args):
                if isinstance(argument, ast.arg):
                    argument.annotation = None
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    module = vars(sys.modules[cls.__module__])
    scope = {name: module[name] for name in names if name in module}
    return _dataclass_from_source, ("from __future__ import annotations\n" + source, scope, cls.__name__,
                                    cls.__module__)


@contextlib.contextmanager
def shipped_by_value():
    """While a request is serialized: interplab pickled by value, its dataclasses as their source, and this
    module's client-side classes as the nnsight classes they stand for (the server needs nothing else of them)."""
    import cloudpickle
    from cloudpickle import cloudpickle as internals

    package = __name__.partition(".")[0]
    interplab = sys.modules[package]  # the package itself, already imported (this module is part of it)
    class_reduce = internals._class_reduce

    stand_ins = {NDIFModel: TransformersModel, Backend: RemoteBackend}

    def reduce_class(cls):
        if cls in stand_ins:
            stand_in = stand_ins[cls]
            return getattr, (sys.modules[stand_in.__module__], stand_in.__qualname__)
        if dataclasses.is_dataclass(cls) and cls.__module__.partition(".")[0] == package:
            return _reduce_dataclass(cls)
        return class_reduce(cls)

    registered = package in internals._PICKLE_BY_VALUE_MODULES
    cloudpickle.register_pickle_by_value(interplab)
    internals._class_reduce = reduce_class
    copyreg.dispatch_table[NDIFModel] = _as_transformers_model  # the instance (the class: `stand_ins`)
    try:
        yield
    finally:
        del copyreg.dispatch_table[NDIFModel]
        internals._class_reduce = class_reduce
        if not registered:
            cloudpickle.unregister_pickle_by_value(interplab)


