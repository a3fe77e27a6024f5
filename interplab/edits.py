"""Edits: steering (ITI), learned per-head interventions and their optimization, applied through nnsight.

Every edit acts on one place: the per-head values that enter each layer's
attention output projection (`spec.head_values`, `[batch, seq, n_heads * d_head]`,
head h = columns `h*d_head:(h+1)*d_head`). At a layer it changes those values by

    o  <-  o + Δ(o),    Δ(o) = o ⊙ scale + shift + (o · a) b

at the edit's positions ("all", or the "last" position of each forward: in
generation every new token; when `train` scores prompt + completion, the
prompt's last position and every completion position, which is what
generation under the edit would touch), with `scale`, `shift`, `a`, `b`
dense over the layer's values and zero outside the chosen heads (except `a`).
The kinds are special cases:

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

Why batched training works: an edit is data, not a hook, so one trace can give
each group of rows its own edit (the parameters of K edits are stacked and
gathered per row). `train` fits K edits in one loop that way, against the
unedited model as the preference-loss reference. The model is frozen, so the
blocks below an edit's first layer always compute the same thing: their output
is cached once and those blocks are skipped (as the patching sweeps do).
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks, probes, training
from .scores import Scores

Head = tuple[int, int]
POSITIONS = ("all", "last")
KINDS = ("additive", "lofit", "rank1", "composite")
PARAMS = {"additive": ("vector",), "lofit": ("scale", "shift"), "rank1": ("a", "b"), "composite": ()}


def head_name(head: Head) -> str:
    """`(layer, head)` -> `"a{layer}.h{head}"`, the project's head naming."""
    return f"a{head[0]}.h{head[1]}"


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

    kind: "additive" (params `vector [n, d_head]`), "lofit" (`scale`, `shift` `[n, d_head]`),
    "rank1" (`a [n_layers_used, n_heads * d_head]`, one per layer in `layers`; `b [n, d_head]`)
    or "composite" (`parts`). Row i of a per-head parameter belongs to `heads[i]`.
    positions: "all" or "last" (the final position of every forward; each new token in generation;
    the prompt's last and every completion position in `train`).
    """

    model: object = field(repr=False)
    kind: str
    heads: tuple[Head, ...]
    params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    positions: str = "all"
    parts: tuple[Edit, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; choose one of {KINDS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        self.heads = tuple((int(l), int(h)) for l, h in self.heads)

    def __repr__(self) -> str:
        names = ", ".join(head_name(h) for h in self.heads[:8]) + (" ..." if len(self.heads) > 8 else "")
        return f"Edit({self.kind}, heads=[{names}], positions={self.positions!r})"

    @property
    def layers(self) -> list[int]:
        """The layers this edit touches, in execution order."""
        return sorted({l for l, _ in self.heads} | {l for p in self.parts for l in p.layers})

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (a composite's: its parts')."""
        return [t for p in self.parts for t in p.parameters()] + list(self.params.values())

    def terms(self, layer: int) -> list[Term]:
        """The changes this edit makes at `layer` (dense over the layer's values, differentiable)."""
        if self.kind == "composite":
            return [t for p in self.parts for t in p.terms(layer)]
        rows = [i for i, (l, _) in enumerate(self.heads) if l == layer]
        if not rows:
            return []
        last = True if self.positions == "last" else None
        at = torch.tensor([self.heads[i][1] for i in rows])
        dense = lambda p: _dense(p[rows], at, self.model.n_heads)  # noqa: E731
        if self.kind == "additive":
            return [Term(last, shift=dense(self.params["vector"]))]
        if self.kind == "lofit":
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
        return torch.cat([_edited_logits(self.model, self, chunk, remote=remote)
                          for chunk in tokens.split(batch_size)])

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
        """The JSON-able description: kind, heads, positions (and parts)."""
        return dict(kind=self.kind, heads=[list(h) for h in self.heads], positions=self.positions,
                    parts=[p.config() for p in self.parts])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter tensors by name (`parts.{i}.{name}` inside a composite), detached copies."""
        out = {f"parts.{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.state_dict().items()}
        return out | {k: v.detach().clone() for k, v in self.params.items()}

    def save(self, folder: str | Path) -> None:
        """Write `edit.json` (config) and `edit.pt` (state_dict) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "edit.json").write_text(json.dumps(self.config(), indent=1))
        torch.save(self.state_dict(), folder / "edit.pt")


def load(m, folder: str | Path) -> Edit:
    """An edit saved with `Edit.save(folder)`, for model `m`."""
    folder = Path(folder)
    if not (folder / "edit.json").exists():
        raise FileNotFoundError(f"{folder} has no edit.json; save an edit there with `edit.save(folder)`")
    state = torch.load(folder / "edit.pt", weights_only=True)
    return from_config(m, json.loads((folder / "edit.json").read_text()), state)


def from_config(m, config: dict, state: dict[str, torch.Tensor]) -> Edit:
    """Rebuild an edit from `Edit.config()` and `Edit.state_dict()`."""
    parts = tuple(from_config(m, c, {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"parts.{i}.")})
                  for i, c in enumerate(config["parts"]))
    params = {k: v.clone() for k, v in state.items() if not k.startswith("parts.")}
    return _checked(Edit(m, config["kind"], tuple(map(tuple, config["heads"])), params, config["positions"], parts))


def compose(edits: list[Edit]) -> Edit:
    """One edit whose change is the sum of the edits' changes (all on the same model)."""
    edits = list(edits)
    if not edits:
        raise ValueError("compose needs at least one edit")
    if any(e.model is not edits[0].model for e in edits):
        raise ValueError("compose: the edits belong to different models; build them all on one Model")
    parts = tuple(p for e in edits for p in (e.parts if e.kind == "composite" else (e,)))
    heads = tuple(dict.fromkeys(h for p in parts for h in p.heads))
    return Edit(edits[0].model, "composite", heads, {}, "all", parts)


# ---- building edits ----

def additive(m, vectors: dict[Head, torch.Tensor], positions: str = "all") -> Edit:
    """Add `vectors[(layer, head)]` (`[d_head]`) to that head's values at `positions` ("all" or "last")."""
    heads = _check_heads(m, tuple(vectors))
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
    n_layers = len({l for l, _ in heads})
    gen = torch.Generator().manual_seed(seed)
    width = m.n_heads * m.d_head
    a = (torch.randn(n_layers, width, generator=gen) * init_scale / width**0.5).to(_dtype(m))
    b = torch.zeros(len(heads), m.d_head, dtype=_dtype(m))
    return _checked(Edit(m, "rank1", heads, {"a": a, "b": b}, positions))


# ---- ITI ----

@dataclass
class ITIProbe:
    """ITI's per-head probes (Li et al. 2023, likenneth/honest_llama) on the last token's head values.

    accuracy: held-out (validation) accuracy of a logistic probe per head, Scores over (layer, head).
    theta: `[n_layers, n_heads, d_head]` unit mass-mean direction, true minus false, on the training split.
    sigma: `[n_layers, n_heads]` std (ddof 0) of the training activations projected on theta.
    train: `[n]` bool, the rows theta and sigma were computed on.
    """

    accuracy: Scores
    theta: torch.Tensor
    sigma: torch.Tensor
    train: torch.Tensor

    def top(self, k: int) -> list[Head]:
        """The k heads with the highest validation accuracy."""
        return top_k(self.accuracy, k)


def fit_iti(
    m,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    pos: int = -1,
    batch_size: int = 64,
    remote: bool = False,
) -> ITIProbe:
    """Collect head values at `pos` for `tokens` `[n, seq]` and fit ITI's probes (labels `[n]`, True = truthful).

    `groups` `[n]` keeps related rows (a statement and its false twin) in one split. With `remote=True`
    the head values are collected on NDIF and the probes fit here.
    """
    x = probes.collect(m, tokens, site="heads", pos=pos, batch_size=batch_size, remote=remote)  # (n, L, H, dh)
    return fit_iti_activations(x, labels, groups, test_fraction, seed)


def fit_iti_activations(
    x: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None, test_fraction: float = 0.3,
    seed: int = 0,
) -> ITIProbe:
    """`fit_iti` on activations already collected, `x` `[n, n_layers, n_heads, d_head]`."""
    if x.dim() != 4:
        raise ValueError(f"x must be head values [n, n_layers, n_heads, d_head], got {tuple(x.shape)}")
    y = probes._check(x.flatten(1), labels, dims=2)[1]
    accuracy, _ = probes.sweep(x, y, kind="logistic", test_fraction=test_fraction, seed=seed, groups=groups)
    with warnings.catch_warnings():  # the sweep has already warned about rows it cannot separate
        warnings.simplefilter("ignore")
        joined = probes.split_groups(x.flatten(1), y, groups)
    train, _ = probes.split(len(y), test_fraction, seed, joined)  # the split the sweep used
    xt, yt = x[train].float(), y[train]
    diff = xt[yt].mean(0) - xt[~yt].mean(0)  # (L, H, dh)
    norm = diff.norm(dim=-1, keepdim=True)
    if (norm < 1e-12).any():
        raise ValueError("some head has the same mean activation for both labels: no direction to steer along")
    theta = diff / norm
    sigma = torch.einsum("nlhd,lhd->nlh", xt, theta).std(0, correction=0)  # (L, H)
    accuracy.meta.update(title="ITI probe validation accuracy", kind="logistic")
    return ITIProbe(accuracy, theta, sigma, train)


def iti(m, probe: ITIProbe, heads: list[Head], alpha: float, positions: str = "all") -> Edit:
    """ITI: add `alpha * sigma_h * theta_h` to each chosen head (any heads: probe-ranked or random)."""
    heads = _check_heads(m, heads)
    return additive(m, {h: alpha * probe.sigma[h] * probe.theta[h] for h in heads}, positions)


# ---- choosing heads ----

def all_heads(m) -> list[Head]:
    """Every (layer, head), layer-major."""
    return [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]


def single_heads(m) -> list[list[Head]]:
    """Each head alone: `[[(0, 0)], [(0, 1)], ...]`."""
    return [[h] for h in all_heads(m)]


def top_k(scores: Scores, k: int) -> list[Head]:
    """The k (layer, head) with the highest values of a Scores over (layer, head)."""
    if scores.dims != ("layer", "head"):
        raise ValueError(f"top_k needs Scores over ('layer', 'head'), got dims {scores.dims}")
    _check_k(k, scores.values.numel())
    return [idx for idx, _ in scores.top(k, by_abs=False)]


def random_heads(m, k: int, seed: int) -> list[Head]:
    """k heads drawn uniformly without replacement (seeded), in layer-major order."""
    _check_k(k, m.n_layers * m.n_heads)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(m.n_layers * m.n_heads, generator=gen)[:k].sort().values
    return [divmod(int(i), m.n_heads) for i in pick]


# ---- optimization ----

def train(
    m,
    edits: Edit | list[Edit],
    prompts: torch.Tensor | list[str],
    chosen: torch.Tensor | list[str],
    rejected: torch.Tensor | list[str],
    kind: str = "ipo",
    beta: float = 0.1,
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    progress: bool = True,
    remote: bool = False,
) -> torch.Tensor:
    """Train the edits' parameters (in place) with the IPO or DPO loss; the model's weights never change.

    prompts `[N, P]`, chosen/rejected completions `[N, C]` (token ids, or strings: prompts get a BOS,
    completions none). The reference is the unedited model, its log-probs computed once. All K edits
    train together: a forward runs K groups of rows, group k carrying edit k, and the loss is the sum
    of the groups' mean losses, so each edit gets exactly the gradient it would get alone (Adam,
    constant `lr`, no clipping or decay). `beta` is IPO's τ (target margin 1/(2τ)) or
    DPO's β. `batch_size` pairs per step are drawn with `seed` (the same rows for every group); None
    uses all N. With `reuse_prefix` the edits that start at layer l share a forward that skips blocks
    < l (their unedited output is cached once), one forward per distinct first layer: less arithmetic,
    more forwards (worth it unless the batch is tiny). Returns the losses `[steps, K]`. Local only
    (`remote=True` raises).
    """
    checks.local_only(remote, "edits.train", "it steps torch.optim on the edits' parameters here, with "
                      "gradients from a local backward pass at every step")
    if kind not in ("ipo", "dpo"):
        raise ValueError(f"kind must be 'ipo' or 'dpo', not {kind!r}")
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    if not edits or any(e.model is not m for e in edits):
        raise ValueError("train needs a non-empty list of edits built on this model `m`")
    prompts, chosen, rejected = _pairs(m, prompts, chosen, rejected)
    n, k = len(prompts), len(edits)
    params = [p.requires_grad_(True) for e in edits for p in e.parameters()]
    if not params or len({id(p) for p in params}) != len(params):
        raise ValueError("the edits must have parameters to train, and no tensor may belong to two of them "
                         "(pass each edit once)")
    with torch.no_grad():
        ref_c, ref_r = (training.sequence_logprob(m.hf, prompts, c) for c in (chosen, rejected))
    # Edits whose first layer is l share one forward per step that starts at block l, fed the unedited
    # output of block l-1 (cached once: the model is frozen, so it never changes).
    by_first: dict[int, list[int]] = {}
    for i, e in enumerate(edits):
        by_first.setdefault(e.layers[0] if reuse_prefix else 0, []).append(i)
    before = sorted(first - 1 for first in by_first if first > 0)
    cache_c, cache_r = (_block_outputs(m, torch.cat([prompts, c], 1), before) for c in (chosen, rejected))

    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = torch.zeros(steps, k, dtype=torch.float64)
    with _frozen(m.hf):
        for step in tqdm(range(steps), desc=f"train {k} edit(s)", disable=not progress):
            rows = torch.arange(n) if batch_size is None else torch.randperm(n, generator=gen)[:batch_size]
            per_edit = [None] * k
            for first, group in by_first.items():
                prefix = (cache_c[first - 1][rows], cache_r[first - 1][rows]) if first > 0 else None
                pol_c, pol_r = _policy_logprobs(m, [edits[i] for i in group], prompts[rows], chosen[rows],
                                                rejected[rows], first, prefix)  # (K_group, b) each
                for j, i in enumerate(group):
                    per_edit[i] = training.preference_loss(pol_c[j], pol_r[j], ref_c[rows], ref_r[rows],
                                                           beta=beta, kind=kind)
            per_edit = torch.stack(per_edit)
            for p, g in zip(params, torch.autograd.grad(per_edit.sum(), params)):
                p.grad = g
            opt.step()
            losses[step] = per_edit.detach()
    for p in params:
        p.requires_grad_(False)
    return losses


def edited_logprobs(m, edits: list[Edit], prompts: torch.Tensor, completions: torch.Tensor,
                    remote: bool = False) -> torch.Tensor:
    """log p(completion | prompt) under each edit, one forward for all: `[K, N]` (differentiable when local).

    prompts `[N, P]`, completions `[N, C]`. "last" edits act from the prompt's last position on.
    """
    checks.remote(m, remote)
    return _logprobs(m, edits, prompts, completions, remote=remote)


def _logprobs(m, edits, prompts, completions, first: int = 0, prefix=None, remote: bool = False) -> torch.Tensor:
    """`edited_logprobs`; with `prefix` `[N, P+C, d_model]` (block first-1's unedited output) blocks < first
    are skipped."""
    k, n = len(edits), len(prompts)
    tokens = torch.cat([prompts, completions], 1).repeat(k, 1)  # (K*N, P+C), group-major
    batch = _Batch(edits, torch.arange(k).repeat_interleave(n))
    skip = (first, prefix.repeat(k, 1, 1)) if prefix is not None else None
    logits = _edited_logits(m, batch, tokens, start=prompts.shape[1] - 1, skip=skip,  # "last": what generation edits
                            remote=remote)
    return _completion_logprob(logits, prompts.shape[1], completions.repeat(k, 1)).view(k, n)


def _policy_logprobs(m, edits, prompts, chosen, rejected, first: int = 0, prefix=None):
    """(log p(chosen), log p(rejected)) `[K, N]` each; one forward for both when they have the same length."""
    pre_c, pre_r = prefix if prefix is not None else (None, None)
    if chosen.shape == rejected.shape:
        both = _logprobs(m, edits, torch.cat([prompts, prompts]), torch.cat([chosen, rejected]), first,
                         torch.cat([pre_c, pre_r]) if prefix is not None else None)
        return both.split(len(prompts), dim=1)
    return _logprobs(m, edits, prompts, chosen, first, pre_c), _logprobs(m, edits, prompts, rejected, first, pre_r)


def _block_outputs(m, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Unedited outputs of blocks `layers` for `tokens` `[N, T]`: {layer: `[N, T, d_model]`}."""
    if not layers:
        return {}
    blocks, saved = m.envoy(m.spec.blocks), []
    with torch.no_grad(), m.nn.trace(tokens):
        for layer in layers:
            saved.append(blocks[layer].output.save())
    return dict(zip(layers, saved))


@contextmanager
def _frozen(module: torch.nn.Module):
    """Weights without requires_grad inside (no graph below the first edit), restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _completion_logprob(logits: torch.Tensor, prompt_len: int, completions: torch.Tensor) -> torch.Tensor:
    logits = logits[:, prompt_len - 1 : -1]  # (B, C, V): the positions that predict the completion
    return logits.log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1).sum(-1)


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


def _check_heads(m, heads) -> tuple[Head, ...]:
    heads = tuple(heads)
    if not heads:
        raise ValueError("an edit needs at least one (layer, head)")
    for head in heads:
        if not (isinstance(head, tuple | list) and len(head) == 2):
            raise ValueError(f"heads are (layer, head) pairs, got {head!r}")
        l, h = head
        if not (0 <= l < m.n_layers and 0 <= h < m.n_heads):
            raise ValueError(f"head {tuple(head)} is outside the model ({m.n_layers} layers x {m.n_heads} heads)")
    if len(set(map(tuple, heads))) != len(heads):
        raise ValueError(f"heads repeat: {heads}; name each (layer, head) once")
    return tuple(map(tuple, heads))


def _check_k(k: int, total: int) -> None:
    if not (isinstance(k, int) and 1 <= k <= total):
        raise ValueError(f"k must be an int between 1 and the number of heads ({total}), got {k!r}")


def _checked(e: Edit) -> Edit:
    """Validate an edit's parameter names and shapes against its kind and model."""
    m = e.model
    if e.kind == "composite":
        return e
    _check_heads(m, e.heads)
    n_layers = len({l for l, _ in e.heads})
    shapes = {"vector": (len(e.heads), m.d_head), "scale": (len(e.heads), m.d_head),
              "shift": (len(e.heads), m.d_head), "b": (len(e.heads), m.d_head),
              "a": (n_layers, m.n_heads * m.d_head)}
    if set(e.params) != set(PARAMS[e.kind]):
        raise ValueError(f"a {e.kind} edit has parameters {PARAMS[e.kind]}, got {sorted(e.params)}")
    for name, value in e.params.items():
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"parameter {name!r} of a {e.kind} edit must be {shapes[name]}, got {tuple(value.shape)}")
    return e


def _pairs(m, prompts, chosen, rejected):
    """Token tensors (prompts `[N, P]`, completions `[N, C]`) from ids or strings, with shape checks."""
    as_ids = lambda x, bos: m.to_tokens(x, prepend_bos=bos) if isinstance(x, list | tuple) else x  # noqa: E731
    prompts, chosen, rejected = as_ids(prompts, True), as_ids(chosen, False), as_ids(rejected, False)
    for name, t in (("prompts", prompts), ("chosen", chosen), ("rejected", rejected)):
        checks.tokens(m, t, name)
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(f"{n} prompts but {len(chosen)} chosen and {len(rejected)} rejected completions; "
                         "give one of each per prompt")
    for name, c in (("prompts + chosen", chosen), ("prompts + rejected", rejected)):
        checks.tokens(m, torch.cat([prompts, c], 1), name)  # the sequences scored: within the context length
    return prompts.to(m.device), chosen.to(m.device), rejected.to(m.device)
