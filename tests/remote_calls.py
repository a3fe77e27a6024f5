"""Every call that takes `remote=`, run on one model: the table both remote test files go through.

`tests/test_remote.py` checks that `remote=True` reaches every nnsight trace of each call; `tests/test_ndif.py`
runs each against the local NDIF server and compares with the local result. One table, so a call added here is
tested both ways.
"""

import torch

import interplab as il
from interplab import attribution, edits, evolution, lens, patching, probes


def calls(m) -> dict:
    """name -> `run(remote)` for every remote-capable call, on a 4-prompt IOI task of `m`."""
    task = il.tasks.make("ioi", m, n=4, seed=0)
    edit = edits.additive(m, {(1, 2): torch.randn(m.d_head, generator=torch.Generator().manual_seed(0))})
    labels = torch.tensor([True, False] * 4)
    prompts, completions = task.clean[:, :-1], task.clean[:, -1:]
    tokens = torch.cat([task.clean, task.corrupt])
    return {
        "Model.logits": lambda r: m.logits(task.clean, remote=r),
        "patching.heads": lambda r: patching.heads(m, task, remote=r, progress=False),
        "patching.heads per position": lambda r: patching.heads(m, task, per_position=True, remote=r,
                                                                progress=False),
        "patching.resid": lambda r: patching.resid(m, task, remote=r, progress=False),
        "patching.attn_out": lambda r: patching.attn_out(m, task, remote=r, progress=False),
        "patching.mlp_out": lambda r: patching.mlp_out(m, task, mode="noising", remote=r, progress=False),
        "patching.head_inputs": lambda r: patching.head_inputs(m, task, "v", remote=r, progress=False),
        "probes.collect": lambda r: probes.collect(m, task.clean, site="heads", remote=r),
        "probes.task_activations": lambda r: probes.task_activations(m, task, remote=r),
        "lens.logit_lens": lambda r: lens.logit_lens(m, task.clean[0], remote=r),
        "attribution.nodes": lambda r: attribution.nodes(m, task, per_position=True, remote=r),
        "Edit.logits": lambda r: edit.logits(task.clean, remote=r),
        "Edit.generate": lambda r: edit.generate(task.clean[:2], max_new_tokens=2, remote=r),
        "edits.edited_logprobs": lambda r: edits.edited_logprobs(m, [edit], prompts, completions, remote=r),
        "edits.fit_iti": lambda r: edits.fit_iti(m, tokens, labels, remote=r),
        "evolution.component_scores": lambda r: evolution.component_scores(m, task, remote=r),
        "evolution.component_scores final": lambda r: evolution.component_scores(m, task, position="final",
                                                                                  remote=r),
        "evolution.component_scores attribution": lambda r: evolution.component_scores(
            m, task, locator="attribution", remote=r),
        "evolution.node_faithfulness": lambda r: evolution.node_faithfulness(m, task, [["a0.h0", "m1"]], remote=r),
        "evolution.component_outputs": lambda r: evolution.component_outputs(m, task.clean, remote=r),
        "evolution.representational_stability": lambda r: evolution.representational_stability(
            m, m, task.clean, remote=r),
        "evolution.track": lambda r: evolution.track([("a", m)], [task], k=2, cka_examples=4, progress=False,
                                                     remote=r).faithfulness[task.name],
    }


# The table's names, for parametrize (which needs them before any model exists); a test checks they match.
NAMES = ["Model.logits", "patching.heads", "patching.heads per position", "patching.resid", "patching.attn_out",
         "patching.mlp_out", "patching.head_inputs", "probes.collect", "probes.task_activations", "lens.logit_lens",
         "attribution.nodes", "Edit.logits", "Edit.generate", "edits.edited_logprobs", "edits.fit_iti",
         "evolution.component_scores", "evolution.component_scores final", "evolution.component_scores attribution",
         "evolution.node_faithfulness", "evolution.component_outputs", "evolution.representational_stability",
         "evolution.track"]


def same(a, b, detached: bool = False) -> None:
    """`a` and `b` are the same result: tensors, Scores, ITI probes, and tuples, lists and dicts of them.
    `detached`: also require every tensor of `a` to come back detached (a remote result)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y, detached)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            same(a[key], b[key], detached)
    elif hasattr(a, "values") and hasattr(a, "dims"):  # Scores
        assert type(a) is type(b) and a.dims == b.dims
        same(a.values, b.values, detached)
    elif hasattr(a, "theta"):  # ITIProbe
        same(a.theta, b.theta, detached)
        same(a.sigma, b.sigma, detached)
    else:
        assert isinstance(a, torch.Tensor)
        assert not detached or (not a.requires_grad and a.grad_fn is None), "results come back detached"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
