"""Activation patching sweeps.

Run the model on one prompt of each pair (the *base*: the corrupt prompt when
denoising, the clean one when noising), overwrite one component's activation
with its value from the other prompt (the *source*), and score the final
logits with the task's metric. A sweep does this for every component.

How it is fast: a sweep is a list of rows (component x example), and one
nnsight trace runs a whole batch of rows, each row carrying its own patch,
written as `where(mask, source, activation)` on one module. Batches never
straddle layers, and a patch at layer l leaves blocks < l exactly as in the
unpatched base run, so (`reuse_prefix=True`) those blocks are skipped and the
cached base output of block l-1 is fed to block l. This is exact for every
family: rotary tables and attention masks are built outside the blocks.
Attention is causal, so a patch at position p also leaves positions < p
unchanged: per-position sweeps (`reuse_positions=True`) group rows by p, run
only positions >= p, and give the model the base run's keys and values of
positions < p as its cache (the model applies the rotary offsets itself).

Sites (the activation patched at one layer, and its columns per head):

- resid:    input of block l (resid_pre), `[batch, seq, d_model]`
- attn_out: output of the attention output projection (`spec.head_values`)
- mlp_out:  output of `spec.mlp_out`
- heads:    input of `spec.head_values`, head h = columns `h*d_head:(h+1)*d_head`
- q, k, v:  output of the q/k/v projections (`spec.qkv`, `spec.qkv_layout`).
  Patching head h's query (key, value) vector is the same as patching the
  input of head h's query (key, value) projection, since that vector depends
  on nothing else. Under grouped-query attention keys and values are
  patched per key/value head (dim `kv_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from . import bars, checks, metrics
from .metrics import Metric
from .scores import Scores

MODES = ("denoising", "noising")
SITES = ("resid", "attn_out", "mlp_out", "heads", "q", "k", "v")


@dataclass(frozen=True)
class Site:
    """Where a sweep patches at each layer.

    `path` is relative to a block (None: the block itself); `side` is "input"
    or "output"; the activation is `[batch, seq, width]` and unit u (a head,
    or the single whole-width unit) owns columns `starts[u]:starts[u]+size`.
    """

    name: str
    path: str | None
    side: str
    width: int
    starts: tuple[int, ...]
    size: int
    unit: str

    def columns(self) -> torch.Tensor:
        """Boolean `[n_units, width]`: which columns each unit owns."""
        owned = torch.zeros(len(self.starts), self.width, dtype=torch.bool)
        for u, start in enumerate(self.starts):
            owned[u, start : start + self.size] = True
        return owned


def site_of(m, site: str) -> Site:
    """The `Site` for a sweep site (one of `SITES`) on model `m`."""
    if site not in SITES:
        raise ValueError(f"unknown sweep site {site!r}; choose one of {SITES}")
    spec, dh = m.spec, m.d_head
    if site == "resid":
        return Site(site, None, "input", m.d_model, (0,), m.d_model, "")
    if site in ("attn_out", "mlp_out"):
        path = spec.head_values if site == "attn_out" else spec.mlp_out
        return Site(site, path, "output", m.d_model, (0,), m.d_model, "")
    if site == "heads":
        return Site(site, spec.head_values, "input", m.n_heads * dh, tuple(h * dh for h in range(m.n_heads)), dh,
                    "head")
    return _qkv_site(m, site)


def _qkv_site(m, which: str) -> Site:
    spec, dh, nh = m.spec, m.d_head, m.n_heads
    n_units = nh if which == "q" else m.n_kv_heads
    unit = "head" if n_units == nh else "kv_head"
    columns = [spec.qkv_columns(which, u, nh, m.n_kv_heads, dh) for u in range(n_units)]
    width = spec.qkv_width(which, nh, m.n_kv_heads, dh)
    return Site(which, columns[0][0], "output", width, tuple(c.start for _, c in columns), dh, unit)


def _envoy(m, where: Site, layer: int):
    block = m.envoy(m.spec.blocks)[layer]
    return block if where.path is None else m.envoy(where.path, layer)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'denoising' (clean into corrupt) or 'noising' (corrupt into clean), "
                         f"got {mode!r}")


def effect(patched: torch.Tensor, clean: float, corrupt: float, mode: str, normalize: bool) -> torch.Tensor:
    """The signed effect of a patch, +1 (normalized) when it carries the whole clean-vs-corrupt effect.

    denoising: `(m_patched - m_corrupt)`; noising: `(m_clean - m_patched)`; divided by
    `(m_clean - m_corrupt)` with `normalize`. The same convention holds in paths, attribution and circuits.
    """
    raw = patched - corrupt if mode == "denoising" else clean - patched
    return raw / (clean - corrupt) if normalize else raw


def _cache(m, tokens, where: Site, metric: Metric, batch_size: int, remote: bool, keep_kv: bool = False):
    """One unpatched run over all examples: per-layer site activations, block outputs, metric and, with
    `keep_kv`, the attention keys/values.

    Returns acts `[n_layers, n, seq, width]`, block outputs `[n_layers, n, seq, d_model]`, metric `[n]`,
    and kv `[2, n_layers, n, n_kv_heads, seq, d_head]` (after rotary, as the model caches them) or None.
    """
    blocks = m.envoy(m.spec.blocks)
    acts, outs, scores, kvs = [], [], [], []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size]
        # Stacked and saved inside the trace, so a remote run sends back three tensors.
        # A cache without the config holds every position in every layer (the model's own cache would keep
        # only the last `window` positions of sliding-window layers); the model's masks do the windowing.
        cached = dict(cache=DynamicCache()) if keep_kv else dict(use_cache=False)
        with torch.no_grad(), m.nn.trace(chunk, remote=remote, logits_to_keep=1, **cached):
            a, o = [], []
            for layer in range(m.n_layers):  # in execution order, as nnsight requires
                a.append(getattr(_envoy(m, where, layer), where.side))
                o.append(blocks[layer].output)
            a, o = torch.stack(a).save(), torch.stack(o).save()
            logits = m.nn.output.logits[:, -1].save()
            cache = m.nn.output.cache.save() if keep_kv else None
        acts.append(a)
        outs.append(o)
        scores.append(metrics.apply(metric, logits, torch.arange(start, start + chunk.shape[0])))
        if keep_kv:
            kvs.append(torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers], 1))
    kv = torch.cat(kvs, 2) if keep_kv else None
    return torch.cat(acts, 1), torch.cat(outs, 1), torch.cat(scores), kv


def _past(m, kv: torch.Tensor, examples: torch.Tensor, start: int) -> DynamicCache:
    """The base run's keys/values of positions `< start` for rows `examples`, as the model's cache."""
    picked = kv[:, :, examples, :, :start]  # (2, n_layers, B, n_kv_heads, start, d_head)
    # No config: every layer a full cache of all `start` positions, so sliding-window layers see absolute
    # positions and their masks (built from the config's window) stay exact.
    return DynamicCache(list(zip(picked[0], picked[1])))


def _patched_run(m, where: Site, layer: int, tokens, mask, source, prefix, past, remote: bool,
                 unembed: bool) -> torch.Tensor:
    """One trace: row i gets `where(mask[i], source[i], activation[i])` at `layer`.

    Returns the final position's logits `[B, d_vocab]`, or with `unembed=False` the unembedding's input
    there, `[B, d_model]` (the unembedding is skipped). `prefix` `[B, T, d_model]`, if given, is the base
    output of block `layer - 1`: blocks < layer are skipped. `past`, if given, caches the base keys/values
    of the positions before `tokens`, which are then the prompt's last T positions (and `mask`, `source`,
    `prefix` cover those T positions only).
    """
    blocks, unembedding = m.envoy(m.spec.blocks), m.envoy(m.spec.unembed)
    cached = dict(use_cache=False)
    if past is not None:  # `cache=` (past_key_values= is deprecated), with a mask over cached and new positions,
        # which nnsight would otherwise build over the new positions only
        width = past.get_seq_length() + tokens.shape[1]
        cached = dict(cache=past, attention_mask=torch.ones(tokens.shape[0], width, dtype=torch.long,
                                                            device=tokens.device))
    with torch.no_grad(), m.nn.trace(tokens, remote=remote, logits_to_keep=1, **cached):
        if prefix is not None:
            for earlier in range(layer):
                blocks[earlier].skip(prefix)
        target = _envoy(m, where, layer)
        if where.side == "input":
            target.input = torch.where(mask, source, target.input)
        else:
            target.output = torch.where(mask, source, target.output)
        if unembed:
            final = m.nn.output.logits[:, -1].save()
        else:
            final = unembedding.input[:, -1].save()
            unembedding.skip(torch.zeros(()))
    return final


class _Unembedding:
    """Scores the final hidden states of many traces together, `batch_size` rows at a time.

    Reading the unembedding's weights dominates its cost on small batches, so one call per
    `batch_size` rows beats one per trace when position reuse makes the traces small.
    """

    def __init__(self, m, metric: Metric, out: torch.Tensor, batch_size: int):
        self.m, self.metric, self.out, self.batch_size = m, metric, out, batch_size
        self.waiting: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, layer: int, rows: torch.Tensor, examples: torch.Tensor, hidden: torch.Tensor) -> None:
        self.waiting.append((layer, rows, examples, hidden))
        if sum(len(w[1]) for w in self.waiting) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if not self.waiting:
            return
        layers, rows, examples, hidden = zip(*self.waiting)
        values = metrics.apply(self.metric, self.m.final_logits(torch.cat(hidden)), torch.cat(examples))
        for layer, r, v in zip(layers, rows, values.split([len(r) for r in rows])):
            self.out[layer, r] = v.to(self.out.dtype).cpu()
        self.waiting = []


def sweep(
    m,
    task,
    site: str,
    per_position: bool = True,
    mode: str = "denoising",
    normalize: bool = True,
    metric: Metric | None = None,
    batch_size: int = 256,
    reuse_prefix: bool = True,
    reuse_positions: bool = True,
    remote: bool = False,
    progress: bool | None = None,
) -> Scores:
    """Patch every component of one `site` (see `SITES`), one at a time, and score each.

    Components are (layer, unit[, pos]); units are heads for "heads"/"q"/"k"/"v"
    and the whole activation otherwise. With `per_position=False` a patch covers
    every position. `metric(final_logits [B, d_vocab], examples [B]) -> [B]`
    (`metrics.Metric`) defaults to the task's logit difference. The score is the
    signed effect of the mean metric, +1 when the component carries the whole
    clean-vs-corrupt effect: denoising `(m_patched - m_corrupt) / (m_clean - m_corrupt)`,
    noising `(m_clean - m_patched) / (m_clean - m_corrupt)` (ratios of means, stable when
    single examples have a small gap); `normalize=False` leaves out the division.
    The gap is checked before the sweep runs. `batch_size` bounds the rows
    (component x example) per forward pass.

    `reuse_prefix` and `reuse_positions` change the speed, not the values: the first skips
    the blocks before the patched layer, the second (per-position sweeps, local runs) starts
    a row at its patched position and takes the earlier positions' keys/values from the base
    run's cache; its batches then hold one position's rows, at most `n_units x n` of them.
    """
    check_mode(mode)
    checks.task(m, task)
    checks.batch_size(batch_size)
    checks.remote(m, remote)
    where = site_of(m, site)
    metric = metric or metrics.task_metric(task)
    clean_tokens, corrupt_tokens = task.clean.to(m.device), task.corrupt.to(m.device)
    base, source = (corrupt_tokens, clean_tokens) if mode == "denoising" else (clean_tokens, corrupt_tokens)

    # A cache object cannot be sent to NDIF, so remote sweeps reuse the prefix only.
    keep_kv = reuse_positions and per_position and not remote
    source_acts, _, source_metric, _ = _cache(m, source, where, metric, batch_size, remote)
    _, base_outs, base_metric, base_kv = _cache(m, base, where, metric, batch_size, remote, keep_kv)
    clean_metric, corrupt_metric = (source_metric, base_metric) if mode == "denoising" else (base_metric,
                                                                                             source_metric)
    metrics.check_gap(clean_metric, corrupt_metric, normalize, f"the {task.name} task")
    n, seq = base.shape
    n_units, n_pos = len(where.starts), seq if per_position else 1
    # positions[p]: the positions a patch at position index p covers, (n_pos, seq)
    positions = torch.eye(seq, dtype=torch.bool) if per_position else torch.ones(1, seq, dtype=torch.bool)
    columns = where.columns()  # (n_units, width)
    # Rows of one layer, component-major: row r patches unit r // (n_pos*n), position r // n % n_pos, example r % n.
    rows = torch.arange(n_units * n_pos * n)
    unit_of, pos_of, example_of = rows // (n_pos * n), rows // n % n_pos, rows % n

    # Causal attention: a patch at position p leaves every position before p as in the base run,
    # so a row needs computing from `first[row]` on. Batches share one first position.
    first = pos_of if keep_kv else torch.zeros_like(rows)
    groups = [rows[first == start] for start in first.unique()]
    batches = [(layer, group[s : s + batch_size]) for layer in range(m.n_layers) for group in groups
               for s in range(0, len(group), batch_size)]
    patched = torch.empty(m.n_layers, len(rows), dtype=source_acts.dtype)
    # Locally the unembedding waits and runs on full batches; a remote run unembeds in its trace.
    unembedding = _Unembedding(m, metric, patched, batch_size)
    for layer, batch in bars.bar(batches, progress, f"patching {site}"):
        ex, start = example_of[batch], first[batch[0]].item()
        mask = positions[pos_of[batch]][:, :, None] & columns[unit_of[batch]][:, None, :]  # (B, seq, width)
        prefix = base_outs[layer - 1][ex, start:] if reuse_prefix and layer > 0 else None
        past = _past(m, base_kv, ex, start) if start > 0 else None
        final = _patched_run(m, where, layer, base[ex, start:], mask[:, start:].to(m.device),
                             source_acts[layer][ex, start:], prefix, past, remote, unembed=remote)
        if remote:
            patched[layer, batch] = metrics.apply(metric, final, ex).to(patched.dtype).cpu()
        else:
            unembedding.add(layer, batch, ex, final)
    unembedding.flush()

    values = patched.view(m.n_layers, n_units, n_pos, n).mean(-1)  # (n_layers, n_units, n_pos)
    values = effect(values, clean_metric.mean().item(), corrupt_metric.mean().item(), mode, normalize)
    return _scores(m, task, where, per_position, values, dict(
        site=site, mode=mode, normalize=normalize, task=task.name, n=n,
        clean_metric=clean_metric.mean().item(), corrupt_metric=corrupt_metric.mean().item()))


def _scores(m, task, where: Site, per_position: bool, values: torch.Tensor, meta: dict) -> Scores:
    dims, labels = ["layer"], {}
    if where.unit:
        dims.append(where.unit)
    else:
        values = values[:, 0]
    if per_position:
        dims.append("pos")
        labels["pos"] = m.to_str_tokens(task.clean[0])
    else:
        values = values[..., 0]
    what = "normalized effect" if meta["normalize"] else "effect"
    meta["title"] = f"{meta['mode']} {where.name} patching on {meta['task']} ({what})"
    return Scores(values, tuple(dims), labels, meta)


def resid(m, task, **options) -> Scores:
    """Patch the residual stream entering each block, one position at a time: Scores over (layer, pos)."""
    return sweep(m, task, "resid", per_position=True, **options)


def attn_out(m, task, per_position: bool = True, **options) -> Scores:
    """Patch each layer's attention output: Scores over (layer, pos), or (layer,) without `per_position`."""
    return sweep(m, task, "attn_out", per_position=per_position, **options)


def mlp_out(m, task, per_position: bool = True, **options) -> Scores:
    """Patch each layer's MLP output: Scores over (layer, pos), or (layer,) without `per_position`."""
    return sweep(m, task, "mlp_out", per_position=per_position, **options)


def heads(m, task, per_position: bool = False, **options) -> Scores:
    """Patch each head's output (its slice of the output projection's input): Scores over (layer, head[, pos])."""
    return sweep(m, task, "heads", per_position=per_position, **options)


def head_inputs(m, task, which: str = "q", per_position: bool = False, **options) -> Scores:
    """Patch the input of each head's query, key or value projection (`which`): Scores over (layer, head[, pos]).

    Under grouped-query attention keys and values are shared, so "k"/"v" sweep key/value heads (dim "kv_head").
    """
    if which not in ("q", "k", "v"):
        raise ValueError(f"which must be 'q', 'k' or 'v', got {which!r}")
    return sweep(m, task, which, per_position=per_position, **options)
