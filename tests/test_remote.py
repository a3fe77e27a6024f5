"""Lazy loading (no weights read) and `remote=` reaching nnsight's trace, without a network.

NDIF itself is out of reach here, so the remote tests stop at the boundary: nnsight's
`trace`/`generate` are wrapped to record the `remote` flag they receive and then run locally, and
the result must equal the plain local run's.
"""

import shutil

import huggingface_hub
import pytest
import torch
import transformers.modeling_utils
from nnsight import TransformersModel

import interplab as il
from interplab import edits, evolution, lens, patching
from interplab.experiments import updates
from interplab.model import ORGANISM_DIR
from remote_calls import NAMES, calls, same


@pytest.fixture(scope="module")
def base():
    return il.load("interplab/tiny-base")


@pytest.fixture()
def folder(tmp_path):
    """A copy of the tiny-base organism folder (config, weights, tokenizer)."""
    target = tmp_path / "tiny-base"
    shutil.copytree(ORGANISM_DIR / "tiny-base", target)
    return target


@pytest.fixture()
def weight_reads(monkeypatch):
    """Every safetensors file transformers opens to read weights."""
    opened, real = [], transformers.modeling_utils.safe_open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_open", spy)
    return opened


def _devices(m) -> set[str]:
    return {p.device.type for p in m.nn._module.parameters()} | {b.device.type for b in m.nn._module.buffers()}


# ---- lazy loading ----

def test_the_weight_spy_sees_an_eager_load(folder, weight_reads):
    """The check below can fail: an ordinary load does open the weights file."""
    il.load(folder)
    assert any(path.endswith("model.safetensors") for path in weight_reads)


def test_lazy_folder_reads_no_weights_and_stays_on_meta(folder, weight_reads, base):
    m = il.load(folder, lazy=True)
    assert weight_reads == []
    assert _devices(m) == {"meta"} and not m.dispatched
    assert (m.n_layers, m.n_heads, m.d_model, m.d_head, m.d_vocab) == (
        base.n_layers, base.n_heads, base.d_model, base.d_head, base.d_vocab)
    assert m.device == torch.device("cpu") and m.dtype == base.dtype  # inputs are built here
    tokens = m.to_tokens(["the cat", "the dog"])  # tokenizing and reading the config load nothing
    assert tokens.device.type == "cpu" and weight_reads == [] and not m.dispatched


def test_lazy_folder_without_a_weights_file_loads(folder):
    (folder / "model.safetensors").unlink()
    m = il.load(folder, lazy=True)
    assert _devices(m) == {"meta"}
    with pytest.raises(Exception):
        m.logits(m.to_tokens("the cat"))  # the first local run needs the weights that are not there


def test_a_lazy_model_loads_its_weights_on_first_local_use(folder, base):
    m = il.load(folder, lazy=True)
    task = il.tasks.make("ioi", base, n=4, seed=0)
    scores = patching.heads(m, task, progress=False)  # the first trace dispatches
    assert m.dispatched and _devices(m) == {"cpu"}
    torch.testing.assert_close(scores.values, patching.heads(base, task, progress=False).values)
    torch.testing.assert_close(m.logits(task.clean), base.logits(task.clean))


def test_an_organism_by_name_loads_lazily(weight_reads):
    m = il.load("interplab/tiny-sft", lazy=True)
    assert weight_reads == [] and _devices(m) == {"meta"}


def test_remote_load_of_organisms_folders_and_built_models_is_refused(folder, base):
    with pytest.raises(ValueError, match="local organism"):
        il.load("interplab/tiny-base", remote=True)
    with pytest.raises(ValueError, match="local folder"):
        il.load(folder, remote=True)
    with pytest.raises(ValueError, match="already built"):
        il.load(base.hf, tokenizer=base.tokenizer, lazy=True)
    folder_model = il.load(folder)
    with pytest.raises(ValueError, match="local folder"):
        lens.logit_lens(folder_model, folder_model.to_tokens("the cat"), remote=True)


def test_remote_load_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: fast, never contacts the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="network access"):
        il.load("interplab-nonexistent/model", remote=True)


# ---- remote= reaches nnsight ----

@pytest.fixture()
def hub_like(base):
    """The organism's weights as a built model: not refused like an organism or folder, so remote=True passes checks."""
    return il.load(base.hf, tokenizer=base.tokenizer)


@pytest.fixture()
def flags(monkeypatch):
    """The `remote` value every nnsight trace receives (`generate` opens one too); each then runs locally."""
    seen, real = [], TransformersModel.trace

    def trace(self, *args, **kwargs):
        seen.append(kwargs.pop("remote", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TransformersModel, "trace", trace)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_remote_flag_reaches_every_trace(hub_like, flags, name):
    run = calls(hub_like)[name]
    local = run(False)
    assert not any(flags), "a local run passes remote=False to nnsight (Model.logits runs no trace)"
    flags.clear()
    remote = run(True)
    assert flags and all(flags), f"{name}(remote=True) ran {flags.count(False)} of {len(flags)} traces locally"
    same(remote, local)


def test_functions_that_cannot_run_remotely_say_which_and_why(hub_like):
    m = hub_like
    task = il.tasks.make("ioi", m, n=4, seed=0)
    edit = edits.vector(m, [(0, 1)])
    loss = lambda hf, step: hf(task.clean).logits[:, -1].logsumexp(-1).mean()  # noqa: E731
    refused = {
        "edits.train": lambda: edits.train(m, edit, task.clean, task.clean[:, -1:], task.corrupt[:, -1:],
                                           steps=1, remote=True),
        "evolution.gradient_conflict": lambda: evolution.gradient_conflict(m, task, task, remote=True),
        "evolution.track with conflicts": lambda: evolution.track([("a", m)], [task], conflicts=[(task.name,
                                                                   task.name)], remote=True),
        "evolution.component_scores with a callable": lambda: evolution.component_scores(
            m, task, locator=lambda mm, t: None, remote=True),
        "updates.foresight_scores": lambda: updates.foresight_scores(m, loss, remote=True),
        "updates.update_experiment": lambda: updates.update_experiment(m, None, task, {}, task.clean,
                                                                       lambda mm: ["m0", "m1"], ["m0"], 1, 1e-3,
                                                                       remote=True),
    }
    for name, call in refused.items():
        function = name.split(" with")[0]
        with pytest.raises(NotImplementedError, match=rf"{function}.* cannot run remotely"):
            call()
