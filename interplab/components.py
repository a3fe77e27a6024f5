"""Components: the one naming, parsing and parameter-ownership of heads and MLPs.

Heads are `a{layer}.h{head}`, MLPs `m{layer}`, everywhere in interplab (graphs, evolution, updates,
edits). `component_masks` says which parameters a component owns; `random_components` draws matched
random sets, the control that every "this location matters" claim is compared with.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import torch

from .model import Model

_NAME = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+))$")
_SLOT = re.compile(r"^(.*)<([qkv])>$")
TYPES = ("head", "mlp")


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def parse(name: str) -> tuple[int, int | None]:
    """(layer, head) of a head name, (layer, None) of an MLP name; a clear error for anything else."""
    match = _NAME.match(name) if isinstance(name, str) else None
    if not match:
        raise ValueError(f"{name!r} is not a component name; heads are 'a{{layer}}.h{{head}}', MLPs 'm{{layer}}'")
    layer = int(match.group(1) or match.group(3))
    return layer, int(match.group(2)) if match.group(2) is not None else None


def split_slot(name: str) -> tuple[str, str | None]:
    """A graph node's component and the input it reads: "a1.h2<k>" -> ("a1.h2", "k"); "m0" -> ("m0", None)."""
    slot = _SLOT.match(name)
    return (slot[1], slot[2]) if slot else (name, None)


def parse_in(m: Model, name: str) -> tuple[int, int | None]:
    """`parse`, and an error when the component is outside `m`."""
    layer, head = parse(name)
    if layer >= m.n_layers or (head is not None and head >= m.n_heads):
        raise ValueError(f"{name!r} is outside {m.name} ({m.n_layers} layers x {m.n_heads} heads)")
    return layer, head


def component_type(name: str) -> str:
    """"head" for `a{l}.h{h}`, "mlp" for `m{l}`."""
    return "mlp" if parse(name)[1] is None else "head"


def of_type(names: list[str], component: str | None) -> list[str]:
    """The names of one component type ("head" or "mlp"); all of them for None."""
    if component not in (None, *TYPES):
        raise ValueError(f"component must be None, 'head' or 'mlp', got {component!r}")
    return [n for n in names if component is None or component_type(n) == component]


def component_names(m: Model) -> list[str]:
    """Every component of `m`, layer by layer: `a{l}.h0 … a{l}.h{H-1}, m{l}`."""
    return [name for layer in range(m.n_layers)
            for name in [head_name(layer, h) for h in range(m.n_heads)] + [mlp_name(layer)]]


def _component_slices(m: Model, name: str) -> list[tuple[str, int, slice]]:
    """(parameter name, axis, slice) triples that make up a component; slice(None) on axis 0 is the whole tensor."""
    layer, head = parse_in(m, name)
    prefix = f"{m.spec.blocks}.{layer}."
    params = dict(m.hf.named_parameters())
    if head is None:
        mlp = prefix + m.spec.mlp + "."
        return [(n, 0, slice(None)) for n in params if n.startswith(mlp)]
    out_axis, in_axis = m.spec.weight_axes()
    kv = m.spec.kv_head(head, m.n_heads, m.n_kv_heads)
    parts = []
    for which, unit in (("q", head), ("k", kv), ("v", kv)):
        path, features = m.spec.qkv_columns(which, unit, m.n_heads, m.n_kv_heads, m.d_head)
        parts.append((f"{prefix}{path}.weight", out_axis, features))
        if f"{prefix}{path}.bias" in params:
            parts.append((f"{prefix}{path}.bias", 0, features))
    o_rows = slice(head * m.d_head, (head + 1) * m.d_head)
    parts.append((f"{prefix}{m.spec.head_values}.weight", in_axis, o_rows))
    missing = [p for p, _, _ in parts if p not in params]
    if missing:
        raise KeyError(f"{m.name} has no parameters {missing}; check the ArchSpec paths of {m.spec.family}")
    return parts


def component_masks(m: Model, names: list[str]) -> dict[str, torch.Tensor]:
    """0/1 masks `{parameter name: tensor of the parameter's shape}` over the union of `names`' parameters.

    A head `a{l}.h{h}` owns its slices of the query, key and value projections (weights and biases, where
    `ArchSpec.qkv_columns` puts them) and its `d_head` input rows (Conv1D) / columns (Linear) of the output
    projection. Under grouped-query attention a key/value head is shared by a group of query heads: a
    query head's mask includes its group's whole key/value slices, so training one head of a group also
    changes the keys and values its group-mates read. A head's key bias is in its mask although softmax
    ignores it (it shifts all of a query's scores equally), so its gradient is zero up to rounding. The
    output projection's bias belongs to no head (it is added once for all heads) and is in no mask; neither
    are layer norms. An MLP `m{l}` owns every parameter of its block's MLP module. The result is usable as
    `training.train(..., grad_mask=...)` and `training.train_masked(..., masks=[...])`: parameters it omits
    stay frozen.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of component names, got the string {names!r}; wrap it: [{names!r}]")
    params = dict(m.hf.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name in names:
        for pname, axis, part in _component_slices(m, name):
            mask = masks.setdefault(pname, torch.zeros_like(params[pname]))
            start, stop, _ = part.indices(mask.shape[axis])
            mask.narrow(axis, start, stop - start).fill_(1)
    return masks


MATCHES = ("uniform", "counts", "heads", "layer")


def _draw_slots(m: Model, like: list[str], match: str) -> list[tuple[list[str], int]]:
    """The (pool, count) pairs a matched random set is made of: one combination from each pool."""
    parsed = [parse_in(m, name) for name in like]
    names = component_names(m)
    heads, mlps = of_type(names, "head"), of_type(names, "mlp")
    n_mlps = sum(head is None for _, head in parsed)
    if match == "uniform":
        return [(names, len(like))]
    if match == "heads":
        return [(heads, len(like))]
    if match == "counts":
        return [(heads, len(like) - n_mlps), (mlps, n_mlps)]
    per_layer = [([head_name(layer, h) for h in range(m.n_heads)],
                  sum(1 for l, h in parsed if h is not None and l == layer)) for layer in range(m.n_layers)]
    return per_layer + [(mlps, n_mlps)]


def possible_sets(m: Model, like: list[str], match: str = "layer") -> int:
    """How many distinct sets `random_components(m, like, ..., match=match)` can draw."""
    return math.prod(math.comb(len(pool), k) for pool, k in _draw_slots(m, like, match))


def random_components(m: Model, like: list[str], n_draws: int, seed: int, match: str = "layer") -> list[list[str]]:
    """`n_draws` distinct random component sets matched to `like`, reproducibly from `seed`.

    match="uniform": as many components as `like`, from all heads and MLPs. "counts": as many heads and as
    many MLPs as `like`, over any layers. "heads": as many components as `like`, all heads (no MLP). "layer":
    as many heads in each layer as `like` has there, and as many MLPs over any layers (a layer has one
    MLP, so matching MLPs by layer would redraw the same ones). Draws are without replacement: no set
    repeats, and asking for more sets than exist (`possible_sets`) is an error. Each set is in
    `component_names` order.
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES} (uniform: any components; counts: same numbers of heads "
                         f"and MLPs; heads: heads only; layer: heads matched per layer), got {match!r}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be at least 1, got {n_draws}")
    if not like:
        raise ValueError("`like` is empty: give the component set the random draws should match")
    if len(set(like)) != len(like):
        raise ValueError(f"`like` repeats components: {like}")
    slots = _draw_slots(m, like, match)
    possible = possible_sets(m, like, match)
    if n_draws > possible:
        raise ValueError(f"only {possible} distinct {match}-matched sets like {like} exist in {m.name}; "
                         f"ask for at most {possible} draws")
    rng = random.Random(seed)
    order = {name: i for i, name in enumerate(component_names(m))}
    if possible <= 4 * n_draws:  # few sets: enumerate them and sample, so rejection never stalls
        every = [sum(parts, ()) for parts in itertools.product(*(itertools.combinations(pool, k) for pool, k in slots))]
        chosen = rng.sample(every, n_draws)
    else:
        chosen, seen = [], set()
        while len(chosen) < n_draws:
            draw = tuple(c for pool, k in slots for c in rng.sample(pool, k))
            if frozenset(draw) not in seen:
                seen.add(frozenset(draw))
                chosen.append(draw)
    return [sorted(draw, key=order.__getitem__) for draw in chosen]


def overlap(predicted: list[str], oracle: list[str]) -> dict[str, float]:
    """How well `predicted` anticipates `oracle`: Jaccard `|P∩O|/|P∪O|`, precision `|P∩O|/|P|` (precision@k
    when P is a top-k list) and recall `|P∩O|/|O|`."""
    p, o = set(predicted), set(oracle)
    if not p or not o:
        raise ValueError("overlap needs two non-empty component lists")
    both = len(p & o)
    return {"jaccard": both / len(p | o), "precision": both / len(p), "recall": both / len(o)}
