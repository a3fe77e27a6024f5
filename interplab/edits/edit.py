"""The Edit: an intervention on chosen heads' values, built, composed, saved, and applied through nnsight.

Every edit acts on one place: the per-head values that enter each layer's
attention output projection (`spec.head_values`, `[batch, seq, n_heads * d_head]`,
head h = columns `h*d_head:(h+1)*d_head`). At a layer it changes those values by

    o  <-  o + Δ(o),    Δ(o) = o ⊙ scale + shift + (o · a) b

at the edit's positions ("all", or the "last" position of each forward: in
generation every new token; when `train` scores prompt + completion, the
prompt's last position and every completion position, which is what
generation under the edit would touch), with `scale`, `shift`, `a`, `b`
dense over the layer's values and zero outside the chosen heads (except `a`).
The forms are special cases:

- `additive` / `vector` / `iti`: `shift` only (a vector added to each chosen head).
- `lofit`: LoFiT's per-head scale-and-shift, `o_h <- (1 + scale_h) ⊙ o_h + shift_h`.
- `rank1`: Wang & Veitch's reparameterized rank-1 LoRA on the output projection,
  per layer `r <- r + ⟨a, o⟩ Σ_h W_O,h b_h`. As in their ICLR 2025 blog post
  (the summary in ../shared/papers is silent on it): `o` is the layer's
  concatenated head outputs at that position (all heads, `[n_heads * d_head]`),
  `a` a learned vector over all of it, and `b_h` (`[d_head]`) learned and
  nonzero only at the chosen heads. Adding `⟨a, o⟩ b` to the values before
  W_O is exactly that residual update; like a weight edit it acts at every
  position by default.

Composing edits (`e1 + e2`, `compose`) sums their changes, each computed from
the values the layer receives, so composition is order-free. A zero edit adds
exact zeros, so its logits are bit-identical to the unedited model's.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checks, components
from ..scores import Scores

Head = str | tuple[int, int]  # "a{layer}.h{head}"; a (layer, head) pair is accepted on input
POSITIONS = ("all", "last")
FORMS = ("additive", "lofit", "rank1", "composite")
PARAMS = {"additive": ("vector",), "lofit": ("scale", "shift"), "rank1": ("a", "b"), "composite": ()}


def head_name(head: Head) -> str:
    """The project's name `"a{layer}.h{head}"` of a head given by name or as a `(layer, head)` pair."""
    if isinstance(head, str):
        if components.component_type(head) != "head":
            raise ValueError(f"{head!r} is an MLP; edits act on attention heads ('a{{layer}}.h{{head}}')")
        return head
    if not (isinstance(head, tuple | list) and len(head) == 2):
        raise ValueError(f"heads are names 'a{{layer}}.h{{head}}' or (layer, head) pairs, got {head!r}")
    if not all(checks.is_int(i) for i in head):  # int() would quietly truncate 1.7 to head 1
        raise TypeError(f"heads are (layer, head) pairs of ints, got {head!r}")
    return components.head_name(int(head[0]), int(head[1]))


def _at(head: str) -> tuple[int, int]:
    """(layer, head) of a head name."""
    return components.parse(head)


# ---- the change at one layer ----

@dataclass
class Term:
    """One edit's change at one layer, `Δ(o) = o ⊙ scale + shift + (o · a) b` at `positions`.

    Tensors are `[W]` (one edit) or `[B, W]` (one row each), `W = n_heads * d_head`; None means absent.
    `last` is None for "all" positions, True for the last only, or a bool `[B]` per row ("last" means
    positions >= `start`, the final position when `start` is None).
    """

    last: bool | torch.Tensor | None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


def _delta(o: torch.Tensor, t: Term, start: int | None = None) -> torch.Tensor:
    """Δ(o) for values `o` `[B, T, W]`; per-row term tensors `[B, W]` broadcast over positions."""
    row = lambda x: (x if x.dim() == 1 else x[:, None, :]).to(o.dtype)  # noqa: E731  [W] or (B, 1, W)
    delta = torch.zeros_like(o)
    if t.scale is not None:
        delta = delta + o * row(t.scale)
    if t.shift is not None:
        delta = delta + row(t.shift)
    if t.a is not None:
        delta = delta + (o * row(t.a)).sum(-1, keepdim=True) * row(t.b)  # (B, T, 1) * (B|1, 1, W)
    if t.last is None:
        return delta
    at_last = torch.arange(o.shape[1], device=o.device) >= (o.shape[1] - 1 if start is None else start)  # (T,)
    mask = at_last[None, :] if t.last is True else (at_last[None, :] | ~t.last.to(o.device)[:, None])  # (B|1, T)
    return torch.where(mask[..., None], delta, torch.zeros((), dtype=o.dtype, device=o.device))


def apply_terms(o: torch.Tensor, terms: list[Term], start: int | None = None) -> torch.Tensor:
    """`o + Σ Δ_t(o)`, every Δ computed from the same `o` `[B, T, W]` (so the order of terms is irrelevant).

    "last" terms act at positions >= `start` (default: the final position only).
    """
    if not terms:
        return o
    return o + sum(_delta(o, t, start) for t in terms)


# ---- the Edit object ----

@dataclass(eq=False)
class Edit:
    """An intervention on chosen heads' values, for one model. See the module docstring for the formula.

    form: "additive" (params `vector [n, d_head]`), "lofit" (`scale`, `shift` `[n, d_head]`),
    "rank1" (`a [n_layers_used, n_heads * d_head]`, one per layer in `layers`; `b [n, d_head]`)
    or "composite" (`parts`). Row i of a per-head parameter belongs to `heads[i]`.
    positions: "all" or "last" (the final position of every forward; each new token in generation;
    the prompt's last and every completion position in `train`).
    """

    model: object = field(repr=False)
    form: str
    heads: tuple[str, ...]
    params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    positions: str = "all"
    parts: tuple[Edit, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"unknown edit form {self.form!r}; choose one of {FORMS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        self.heads = tuple(head_name(h) for h in self.heads)

    def __repr__(self) -> str:
        names = ", ".join(self.heads[:8]) + (" ..." if len(self.heads) > 8 else "")
        return f"Edit({self.form}, heads=[{names}], positions={self.positions!r})"

    @property
    def layers(self) -> list[int]:
        """The layers this edit touches, in execution order."""
        return sorted({_at(h)[0] for h in self.heads} | {l for p in self.parts for l in p.layers})

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (a composite's: its parts')."""
        return [t for p in self.parts for t in p.parameters()] + list(self.params.values())

    def terms(self, layer: int) -> list[Term]:
        """The changes this edit makes at `layer` (dense over the layer's values, differentiable)."""
        if self.form == "composite":
            return [t for p in self.parts for t in p.terms(layer)]
        rows = [i for i, h in enumerate(self.heads) if _at(h)[0] == layer]
        if not rows:
            return []
        last = True if self.positions == "last" else None
        at = torch.tensor([_at(self.heads[i])[1] for i in rows])
        dense = lambda p: _dense(p[rows], at, self.model.n_heads)  # noqa: E731
        if self.form == "additive":
            return [Term(last, shift=dense(self.params["vector"]))]
        if self.form == "lofit":
            return [Term(last, scale=dense(self.params["scale"]), shift=dense(self.params["shift"]))]
        return [Term(last, a=self.params["a"][self.layers.index(layer)], b=dense(self.params["b"]))]

    def fn(self, layer: int, values: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The edited head values at `layer`: `values` `[B, T, n_heads * d_head]` -> same shape.

        Use inside your own trace: `env = m.envoy(m.spec.head_values, l); env.input = e.fn(l, env.input)`
        for each `l` in `e.layers`, in order (or call `e.apply()`). `start`: see `apply_terms`.
        """
        return apply_terms(values, self.terms(layer), start)

    def apply(self, start: int | None = None) -> None:
        """Apply the edit inside an open `m.nn.trace(...)`/`generate` (call it before touching later layers)."""
        _intervene(self.model, {layer: self.terms(layer) for layer in self.layers}, start)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, batch_size: int = 256, remote: bool = False) -> torch.Tensor:
        """Like `m.logits(tokens)` with the edit applied: tokens `[B, T]` -> `[B, T, d_vocab]`."""
        tokens = checks.tokens(self.model, tokens).to(self.model.device)
        checks.remote(self.model, remote)
        batch_size = checks.count(batch_size, "batch_size")
        return checks.result(torch.cat([_edited_logits(self.model, self, chunk, remote=remote)
                                        for chunk in tokens.split(batch_size)]), "the edited logits")

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int = 8, remote: bool = False,
                 **kwargs) -> torch.Tensor:
        """Greedy generation (unless kwargs say otherwise) with the edit at every step: `[B, T + new]` ids."""
        m = self.model
        tokens = checks.tokens(m, tokens).to(m.device)
        checks.remote(m, remote)
        kwargs = {"do_sample": False, "pad_token_id": m.tokenizer.pad_token_id, **kwargs}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")  # open loop ends with the run
            with m.nn.generate(max_new_tokens=max_new_tokens, remote=remote, **kwargs) as tracer:
                with tracer.invoke(tokens):
                    for _ in tracer.all():
                        self.apply()
                with tracer.invoke():
                    out = tracer.result.save()
        return out

    def __add__(self, other: Edit) -> Edit:
        return compose([self, other])

    # ---- saving ----

    def config(self) -> dict:
        """The JSON-able description: form, heads, positions (and parts)."""
        return dict(form=self.form, heads=list(self.heads), positions=self.positions,
                    parts=[p.config() for p in self.parts])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter tensors by name (`parts.{i}.{name}` inside a composite), detached copies."""
        out = {f"parts.{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.state_dict().items()}
        return out | {k: v.detach().clone() for k, v in self.params.items()}

    def save(self, folder: str | Path) -> None:
        """Write `edit.json` (config) and `edit.pt` (state_dict) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = self.config() | {"model": checks.shape_record(self.model)}  # refused on another architecture
        (folder / "edit.json").write_text(json.dumps(record, indent=1))
        torch.save(self.state_dict(), folder / "edit.pt")


def load(m, folder: str | Path) -> Edit:
    """An edit saved with `Edit.save(folder)`, for model `m`."""
    folder = Path(folder)
    if not (folder / "edit.json").exists():
        raise FileNotFoundError(f"{folder} has no edit.json; save an edit there with `edit.save(folder)`")
    config = json.loads((folder / "edit.json").read_text())
    checks.same_shape_family(config.pop("model", {}), m)
    state = torch.load(folder / "edit.pt", weights_only=True)
    return from_config(m, config, state)


def from_config(m, config: dict, state: dict[str, torch.Tensor]) -> Edit:
    """Rebuild an edit from `Edit.config()` and `Edit.state_dict()`."""
    parts = tuple(from_config(m, c, {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"parts.{i}.")})
                  for i, c in enumerate(config["parts"]))
    params = {k: v.clone() for k, v in state.items() if not k.startswith("parts.")}
    return _checked(Edit(m, config["form"], tuple(config["heads"]), params, config["positions"], parts))


def compose(edits: list[Edit]) -> Edit:
    """One edit whose change is the sum of the edits' changes (all on the same model)."""
    edits = list(edits)
    if not edits:
        raise ValueError("compose needs at least one edit")
    if any(e.model is not edits[0].model for e in edits):
        raise ValueError("compose: the edits belong to different models; build them all on one Model")
    parts = tuple(p for e in edits for p in (e.parts if e.form == "composite" else (e,)))
    heads = tuple(dict.fromkeys(h for p in parts for h in p.heads))
    return Edit(edits[0].model, "composite", heads, {}, "all", parts)


# ---- building edits ----

def additive(m, vectors: dict[Head, torch.Tensor], positions: str = "all") -> Edit:
    """Add `vectors[(layer, head)]` (`[d_head]`) to that head's values at `positions` ("all" or "last")."""
    heads = _check_heads(m, tuple(vectors))
    vectors = dict(zip(heads, vectors.values()))  # keyed by name, whichever way the heads were given
    shapes = {h: tuple(torch.as_tensor(v).shape) for h, v in vectors.items()}
    wrong = {h: shape for h, shape in shapes.items() if shape != (m.d_head,)}
    if wrong:
        raise ValueError(f"each vector must have shape [d_head={m.d_head}], got {wrong}")
    stacked = torch.stack([torch.as_tensor(vectors[h]).detach().to(_dtype(m)).clone() for h in heads])
    return _checked(Edit(m, "additive", heads, {"vector": stacked}, positions))


def vector(m, heads: list[Head], positions: str = "all") -> Edit:
    """A learned vector per head (`[d_head]`, starts at zero): an additive edit to train with `train`."""
    _check_heads(m, heads)
    return additive(m, {h: torch.zeros(m.d_head, dtype=_dtype(m)) for h in heads}, positions)


def lofit(m, heads: list[Head], positions: str = "all") -> Edit:
    """LoFiT-style per-head scale-and-shift `o_h <- (1 + scale_h) ⊙ o_h + shift_h`, starting at identity."""
    heads = _check_heads(m, heads)
    zeros = lambda: torch.zeros(len(heads), m.d_head, dtype=_dtype(m))  # noqa: E731
    return _checked(Edit(m, "lofit", heads, {"scale": zeros(), "shift": zeros()}, positions))


def rank1(m, heads: list[Head], positions: str = "all", seed: int = 0, init_scale: float = 1.0) -> Edit:
    """Wang & Veitch's rank-1 edit per layer `r <- r + ⟨a, o⟩ Σ_h W_O,h b_h` (module docstring).

    Starts as a zero edit: `b = 0` and `a` random (seeded, norm about `init_scale`), so gradients reach `b`.
    """
    heads = _check_heads(m, heads)
    init_scale = checks.number(init_scale, "init_scale", above=0)  # a = 0 would keep b's gradient at zero
    n_layers = len({_at(h)[0] for h in heads})
    gen = torch.Generator().manual_seed(checks.seed(seed))
    width = m.n_heads * m.d_head
    a = (torch.randn(n_layers, width, generator=gen) * init_scale / width**0.5).to(_dtype(m))
    b = torch.zeros(len(heads), m.d_head, dtype=_dtype(m))
    return _checked(Edit(m, "rank1", heads, {"a": a, "b": b}, positions))


# ---- choosing heads ----

def all_heads(m) -> list[str]:
    """Every head's name, layer-major."""
    return [components.head_name(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]


def single_heads(m) -> list[list[str]]:
    """Each head alone: `[["a0.h0"], ["a0.h1"], ...]`."""
    return [[h] for h in all_heads(m)]


def top_k(scores: Scores, k: int) -> list[str]:
    """The k heads with the highest values of a Scores over (layer, head)."""
    if scores.dims != ("layer", "head"):
        raise ValueError(f"top_k needs Scores over ('layer', 'head'), got dims {scores.dims}")
    _check_k(k, scores.values.numel())
    return [head_name(idx) for idx, _ in scores.top(k, by_abs=False)]


def random_heads(m, k: int, seed: int) -> list[str]:
    """k heads drawn uniformly without replacement (seeded), in layer-major order."""
    _check_k(k, m.n_layers * m.n_heads)
    gen = torch.Generator().manual_seed(checks.seed(seed))
    pick = torch.randperm(m.n_layers * m.n_heads, generator=gen)[:k].sort().values
    return [head_name(divmod(int(i), m.n_heads)) for i in pick]


# ---- applying through nnsight ----

@dataclass
class _Batch:
    """K edits in one forward: row r carries edit `group[r]`. Their terms are stacked and gathered per row."""

    edits: list[Edit]
    group: torch.Tensor  # (B,) long

    @property
    def layers(self) -> list[int]:
        return sorted({l for e in self.edits for l in e.layers})

    def terms(self, layer: int) -> list[Term]:
        per_edit = [e.terms(layer) for e in self.edits]
        slots = max(len(ts) for ts in per_edit)
        return [self._stack([ts[s] if s < len(ts) else None for ts in per_edit]) for s in range(slots)]

    def _stack(self, terms: list[Term | None]) -> Term:
        first = next(t for t in terms if t is not None)
        like = next(x for x in (first.shift, first.scale, first.b) if x is not None)
        last = torch.tensor([t is not None and t.last is True for t in terms])[self.group]

        def stacked(name):
            got = [getattr(t, name) if t is not None else None for t in terms]
            if all(x is None for x in got):
                return None
            return torch.stack([x if x is not None else torch.zeros_like(like) for x in got])[self.group]  # (B, W)

        b = stacked("b")
        a = stacked("a") if b is not None else None
        return Term(last if last.any() else None, stacked("scale"), stacked("shift"), a, b)


def _intervene(m, terms_at: dict[int, list[Term]], start: int | None = None) -> None:
    """Inside a trace: rewrite the input of each layer's head-value module (layers in order)."""
    for layer in sorted(terms_at):
        if terms_at[layer]:
            env = m.envoy(m.spec.head_values, layer)
            env.input = apply_terms(env.input, terms_at[layer], start)


def _edited_logits(m, edit: Edit | _Batch, tokens: torch.Tensor, start: int | None = None,
                   skip: tuple[int, torch.Tensor] | None = None, remote: bool = False) -> torch.Tensor:
    """Logits `[B, T, V]` with the edit; `skip=(first, prefix)` replaces blocks < first by their known output."""
    terms_at = {layer: edit.terms(layer) for layer in edit.layers}
    blocks = m.envoy(m.spec.blocks)
    with m.nn.trace(tokens, remote=remote):
        if skip is not None:
            for layer in range(skip[0]):  # exact: rotary tables and masks are built outside the blocks
                blocks[layer].skip(skip[1])
        _intervene(m, terms_at, start)
        logits = m.nn.output.logits.save()
    return logits


# ---- checks ----

def _dtype(m) -> torch.dtype:
    """Edit parameters live in the model's floating dtype (float64 models get float64 edits)."""
    return m.dtype  # read without loading a lazily built model's weights


def _dense(rows: torch.Tensor, heads: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head rows `[n, d_head]` placed at `heads` `[n]` in a zero `[n_heads * d_head]` (differentiable)."""
    return torch.zeros(n_heads, rows.shape[1], dtype=rows.dtype).index_copy(0, heads, rows).flatten()


def _check_heads(m, heads) -> tuple[str, ...]:
    """The heads' names, after checking each is a head of `m` and none repeats."""
    if isinstance(heads, str):
        raise TypeError(f"heads must be a list of heads, got the string {heads!r}; wrap it: [{heads!r}]")
    names = tuple(head_name(h) for h in heads)
    if not names:
        raise ValueError("an edit needs at least one head ('a{layer}.h{head}' or (layer, head))")
    for name in names:
        l, h = _at(name)
        if not (0 <= l < m.n_layers and 0 <= h < m.n_heads):
            raise ValueError(f"head {name} is outside the model ({m.n_layers} layers x {m.n_heads} heads)")
    if len(set(names)) != len(names):
        raise ValueError(f"heads repeat: {list(names)}; name each head once")
    return names


def _check_k(k: int, total: int) -> None:
    checks.count(k, "k", high=total)  # heads


def _checked(e: Edit) -> Edit:
    """Validate an edit's parameter names and shapes against its form and model."""
    m = e.model
    if e.form == "composite":
        return e
    _check_heads(m, e.heads)
    n_layers = len({_at(h)[0] for h in e.heads})
    shapes = {"vector": (len(e.heads), m.d_head), "scale": (len(e.heads), m.d_head),
              "shift": (len(e.heads), m.d_head), "b": (len(e.heads), m.d_head),
              "a": (n_layers, m.n_heads * m.d_head)}
    if set(e.params) != set(PARAMS[e.form]):
        raise ValueError(f"a {e.form} edit has parameters {PARAMS[e.form]}, got {sorted(e.params)}")
    for name, value in e.params.items():
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"parameter {name!r} of a {e.form} edit must be {shapes[name]}, got {tuple(value.shape)}")
        checks.finite(value, f"parameter {name!r} of a {e.form} edit")
    return e
