"""Every remote entry point end to end against a localhost server that speaks NDIF's protocol
(tests/ndif_server: nnsight 0.8's unmodified RemoteBackend on the client, interplab not importable on
the server), each compared with the same call run locally; and every failure a user can act on."""

import contextlib
import importlib
import json
import linecache
import re
import socket
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import zstandard
from nnsight.intervention.backends import remote as nnsight_remote
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import interplab as il
from interplab import attribution, patching, remote
from interplab.model import ORGANISM_DIR
from ndif_server.process import ServerProcess
from remote_calls import NAMES, calls, same

pytestmark = [pytest.mark.ndif, pytest.mark.filterwarnings("ignore:the clean-vs-corrupt gap")]
KEY = "ndif-test-key-5f3a9c"
ORGANISM = "interplab/tiny-base"
FAMILIES = {  # hosted by the server under these names, built here from the same saved weights
    "test/gpt2": lambda v: GPT2LMHeadModel(GPT2Config(vocab_size=v, n_layer=2, n_head=4, n_embd=32, n_positions=32)),
    "test/neox": lambda v: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, rotary_pct=0.5)),
    "test/llama": lambda v: LlamaForCausalLM(LlamaConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The organism's folder and, for each family, random weights saved with the organism's tokenizer."""
    tokenizer = il.load(ORGANISM).tokenizer
    saved = {ORGANISM: str(ORGANISM_DIR / "tiny-base")}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name.replace("/", "-"))
        build(len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        saved[name] = str(folder)
    return saved


@pytest.fixture(scope="module")
def server(folders):
    process = ServerProcess(folders, api_key=KEY)
    with configured(host=process.url, api_key=KEY, timeout=120):
        yield process
    process.stop()


@contextlib.contextmanager
def configured(**settings):
    previous = remote.configure(**settings)
    try:
        yield
    finally:
        remote.configure(**previous)


def hosted(folders, name):
    """The model the server holds under `name`, loaded here from the same folder and named to NDIF by it."""
    return il.load(ORGANISM if name == ORGANISM else folders[name], model_key=name)


@pytest.fixture(scope="module")
def m(folders, server):
    return hosted(folders, ORGANISM)


def test_the_table_lists_every_tested_call(m):
    assert list(calls(m)) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_remote_equals_local(m, name, payloads):
    run = calls(m)[name]
    remote_result = run(True)
    assert payloads, "nothing was sent to the server"
    assert all(b"CodeType" not in blob for blob in payloads), "bytecode in a request"
    assert all(KEY.encode() not in blob for blob in payloads), "the API key inside a request"
    payloads.clear()
    same(remote_result, run(False), detached=True)
    assert not payloads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_remotely(folders, server, family):
    m = hosted(folders, family)
    task = il.tasks.make("ioi", m, n=2, seed=0)
    for run in (lambda r: m.logits(task.clean, remote=r),
                lambda r: patching.heads(m, task, remote=r, progress=False),
                lambda r: attribution.nodes(m, task, remote=r)):
        same(run(True), run(False), detached=True)


# ---- the server is NDIF-like: interplab absent, loopback only ----

def test_interplab_cannot_be_imported_on_the_server(m, server):
    assert server.process.args[1:3] == ["-I", "-S"]
    tokens = m.to_tokens("the cat")
    with pytest.raises(remote.NDIFError, match="No module named 'interplab'"):
        with m.nn.trace(tokens, remote=True):
            importlib.import_module("interplab")


def test_the_server_listens_on_loopback_only(server):
    port = int(server.url.rsplit(":", 1)[1])
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    listening = [line.split() for line in table.read_text().splitlines()[1:]]
    addresses = {fields[1].split(":")[0] for fields in listening
                 if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A"}  # 0A: LISTEN
    assert addresses == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_without_shipping_interplab_by_value_the_server_fails(m, monkeypatch):
    """The control for everything above: interplab's code in a traced block only runs there because it is shipped."""
    monkeypatch.setattr(remote, "shipped_by_value", contextlib.nullcontext)
    task = il.tasks.make("ioi", m, n=2, seed=0)
    with pytest.raises(remote.NDIFError, match="No module named 'interplab"):
        patching.heads(m, task, remote=True, progress=False)


@pytest.fixture()
def payloads(monkeypatch):
    """The request blobs sent, decompressed."""
    sent, real = [], remote.Backend._serialize

    def serialize(self, tracer):
        blob = real(self, tracer)
        sent.append(zstandard.ZstdDecompressor().decompress(blob) if self.compress else blob)
        return blob

    monkeypatch.setattr(remote.Backend, "_serialize", serialize)
    return sent


def test_no_bytecode_crosses_and_dataclasses_go_as_source(m, payloads, monkeypatch):
    task = il.tasks.make("ioi", m, n=2, seed=0)
    patching.heads(m, task, remote=True, progress=False)  # its traced block holds a `Site` dataclass
    assert payloads and all(b"CodeType" not in blob for blob in payloads)
    assert any(b"class Site" in blob for blob in payloads)
    # Control: cloudpickle's own class reduction sends the methods `dataclass` generates as bytecode.
    from cloudpickle import cloudpickle as internals
    monkeypatch.setattr(remote, "_reduce_dataclass", internals._dynamic_class_reduce)
    payloads.clear()
    patching.heads(m, task, remote=True, progress=False)
    assert any(b"CodeType" in blob for blob in payloads)


def test_a_polling_client_gets_the_same_result(m, server):
    """nnsight's non-blocking path: submit, then GET /response/{id} (at most 100 polls, 0.1 s apart)."""
    tokens = m.to_tokens("the cat sat")
    with m.nn.trace(tokens, remote=True, blocking=False) as tracer:
        logits = m.nn.output.logits.save()  # noqa: F841 (returned by the poll below)
    for _ in range(100):
        result = tracer.backend()
        if result is not None:
            break
        time.sleep(0.1)
    assert result is not None, "no result after 100 polls"
    same(result["logits"], m.logits(tokens), detached=True)


def test_a_plain_nnsight_request_names_the_model_as_nnsight_does(m, server):
    """The wire format alone: nnsight's own RemoteBackend, a block that holds nothing of interplab's."""
    tokens = m.to_tokens("the cat sat")
    backend = nnsight_remote.RemoteBackend(m.nn.to_model_key(), host=server.url, api_key=KEY)
    assert m.nn.to_model_key().startswith("nnsight.modeling.transformers.TransformersModel:")
    model = m.nn
    with remote.shipped_by_value(), model.trace(tokens, backend=backend):  # the wrapper crosses as nnsight's
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, m.logits(tokens), rtol=1e-4, atol=1e-5)


# ---- errors a user can act on: one sentence each ----

def one_sentence(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def test_unreachable_server(m):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with configured(host=f"http://127.0.0.1:{port}", timeout=10), \
            pytest.raises(remote.NDIFError, match="could not reach NDIF at http://127.0.0.1") as error:
        m.logits(m.to_tokens("the cat"), remote=True)
    assert "configure(host=" in one_sentence(error)


def test_wrong_api_key(m, server):
    with configured(api_key="not-the-key"), pytest.raises(remote.NDIFError, match="refused the API key") as error:
        m.logits(m.to_tokens("the cat"), remote=True)
    assert "NDIF_API_KEY" in one_sentence(error)


def test_nnsight_version_mismatch(m, server, monkeypatch):
    monkeypatch.setattr(nnsight_remote, "_NNSIGHT_VERSION", "0.7.2")
    with pytest.raises(remote.NDIFError, match=r"does not accept this client's nnsight \(nnsight 0.7.2 is not") as error:
        m.logits(m.to_tokens("the cat"), remote=True)
    assert "install the nnsight version" in one_sentence(error)


def test_request_too_large(m, server):
    tokens, big = m.to_tokens("the cat"), torch.randn(1_200_000)  # ~4.8 MB of incompressible floats
    with pytest.raises(remote.NDIFError, match=r"the request \([\d,]+ bytes\) is too large") as error:
        with m.nn.trace(tokens, remote=True):
            total = (m.nn.output.logits.sum() + big.sum()).save()  # noqa: F841
    assert "smaller batch_size" in one_sentence(error)


def test_model_not_hosted(server):
    m = il.load(ORGANISM, model_key="nobody/not-hosted")
    with pytest.raises(remote.NDIFError, match="does not host the model .*not-hosted is not hosted here") as error:
        m.logits(m.to_tokens("the cat"), remote=True)
    assert "model_key=" in one_sentence(error)


def test_server_side_exception_reaches_the_user(m, server):
    tokens = m.to_tokens("the cat")
    with pytest.raises(remote.NDIFError, match="failed while running the request: IndexError: .*out of bounds"):
        with m.nn.trace(tokens, remote=True):
            picked = m.nn.output.logits[:, 1000].save()  # noqa: F841 (only 3 positions)


def test_an_object_that_cannot_be_sent(m, server):
    tokens, lock = m.to_tokens("the cat"), threading.Lock()
    with pytest.raises(remote.NDIFError, match="could not be packed for NDIF .*lock") as error:
        with m.nn.trace(tokens, remote=True):
            held = lock.locked()  # noqa: F841
    assert one_sentence(error)


def test_configure_checks_its_settings():
    with pytest.raises(TypeError, match="takes host, api_key and timeout, not port"):
        remote.configure(port=1)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        remote.configure(timeout=0)


def test_without_a_model_key_the_hub_lookup_offline_says_what_to_do(m, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: fails fast
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    built = il.load(m.hf, tokenizer=m.tokenizer)  # neither an organism nor a folder: remote=True passes the checks
    with pytest.raises(remote.NDIFError, match=r"could not look up .* pass the name the server knows it by"):
        built.logits(built.to_tokens("the cat"), remote=True)


def test_a_model_key_needs_no_hub_and_refused_functions_still_refuse(m, server):
    assert '"repo_id": "interplab/tiny-base"' in m.nn.to_model_key()  # no hub lookup: this machine is offline
    task = il.tasks.make("ioi", m, n=2, seed=0)
    with pytest.raises(NotImplementedError, match="attribution.edges cannot run remotely"):
        attribution.edges(m, task, remote=True)
    with pytest.raises(ValueError, match="model_key must be the repo id"):
        il.load(ORGANISM, model_key=" ")


# ---- time limits: a second server whose one model is slow ----

@pytest.fixture(scope="module")
def slow_server(folders):
    process = ServerProcess({"test/slow": folders[ORGANISM] + "@1.5"}, api_key=KEY, time_limit=0.5)
    yield process
    process.stop()


def test_the_server_stops_a_job_past_its_time_limit(slow_server):
    m = il.load(ORGANISM, model_key="test/slow")
    with configured(host=slow_server.url, api_key=KEY, timeout=30), \
            pytest.raises(remote.NDIFError, match="TimeoutError: the job ran longer than this server's limit of 0.5 s"):
        m.logits(m.to_tokens("the cat"), remote=True)


def test_the_client_stops_waiting_after_its_timeout(slow_server):
    m = il.load(ORGANISM, model_key="test/slow")
    with configured(host=slow_server.url, api_key=KEY, timeout=0.2), \
            pytest.raises(remote.NDIFError, match=r"sent no result within 0.2 s; raise il.remote.configure\(timeout"):
        m.logits(m.to_tokens("the cat"), remote=True)


def test_notebook_00_ndif_cell_runs_against_the_server(m, server):
    """The notebook's NDIF cell (skipped offline), with its hub model swapped for the hosted organism."""
    cells = json.loads(Path("notebooks/00_quickstart.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "remote=True" in "".join(c["source"]))
    source, swapped = re.subn(r'il\.load\("[^"]+", remote=True\)', "HOSTED", source)
    assert swapped == 1
    finals = {}
    for where, code in (("remote", source), ("local", source.replace(".trace(tokens, remote=True)", ".trace(tokens)"))):
        filename = f"<notebook 00, NDIF cell, {where}>"  # nnsight reads a traced block's source from linecache
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        scope = {"il": il, "HUB": True, "HOSTED": m, "PROMPT": "the cat sat on the mat", "print": lambda *args: None}
        exec(compile(code, filename, "exec"), scope)
        finals[where] = scope["final"]
    same(finals["remote"], finals["local"], detached=True)
