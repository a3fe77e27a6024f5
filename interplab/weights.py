"""Weight diffs between two models of one architecture, their SVD, and alignment with directions.

Every matrix here is oriented like `nn.Linear`: `[d_out, d_in]`, so that
`y = W x`. GPT-2 stores its `Conv1D` weights the other way round
(`[d_in, d_out]`, `y = x W`; `spec.conv1d`); `weight()` transposes those, so
the left singular vectors `U` always live in a module's output space and the
right ones `V` in its input space, for every architecture.

Each SVD also records what those spaces are. The output projections that
write into the residual stream (`spec.mlp_out`, `spec.head_values`) have
`out_space="resid"`; modules that read from the (normalised) residual stream
have `in_space="resid"`. `ModuleSVD.alignment(direction, space="resid")`
picks the side that lives in the direction's space, and refuses otherwise.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from . import checks
from .model import linear_weight
from .scores import Scores

WRITERS = {"mlp_out": "mlp", "head_values": "heads"}  # spec field -> its input space
SPEC_FIELDS = ("embed", "unembed", "attn", "head_values", "mlp", "mlp_out")


@dataclass
class ModuleSVD:
    """Truncated SVD `W ≈ U diag(S) Vᵀ` of one module's (diff) matrix `[d_out, d_in]`.

    U: `[d_out, k]` left singular vectors (output space `out_space`).
    S: `[k]` singular values, descending.
    V: `[d_in, k]` right singular vectors (input space `in_space`).
    frobenius: Frobenius norm of the whole matrix (not only the top k).
    """

    name: str
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    frobenius: float
    out_space: str
    in_space: str

    def vectors(self, space: str) -> torch.Tensor:
        """The singular vectors `[d, k]` that live in `space` (U for the output side, V for the input)."""
        sides = [vecs for vecs, name in ((self.U, self.out_space), (self.V, self.in_space)) if name == space]
        if len(sides) != 1:
            raise ValueError(
                f"{self.name} maps {self.in_space!r} -> {self.out_space!r}; "
                + (f"no side lives in {space!r}." if not sides else f"both sides live in {space!r}; pick U or V.")
            )
        return sides[0]

    def alignment(self, direction: torch.Tensor, space: str = "resid") -> torch.Tensor:
        """|cos| between each of the top-k singular vectors in `space` and `direction [d]`: `[k]`.

        Absolute value, because a singular vector's sign is arbitrary.
        """
        vecs = self.vectors(space)
        if direction.shape != (vecs.shape[0],):
            raise ValueError(
                f"direction has shape {tuple(direction.shape)} but {self.name}'s {space!r} side has "
                f"dimension {vecs.shape[0]}"
            )
        checks.nonzero(direction, "direction")  # a zero direction has no angle (NaN)
        return (vecs.T @ direction.float() / direction.float().norm()).abs()


def resolve(m, module: str, layer: int | None = None) -> str:
    """The full dotted name of a module: a spec field (`"mlp_out"`), a path in a block, or a full name.

    `resolve(m, "mlp_out", 2)` -> `"transformer.h.2.mlp.c_proj"` on GPT-2.
    """
    path = getattr(m.spec, module) if module in SPEC_FIELDS else module
    name = f"{m.spec.blocks}.{layer}.{path}" if layer is not None else path
    modules = dict(m.hf.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        raise KeyError(
            f"{m.name} ({m.spec.family}) has no module {name!r}. "
            + (f"Did you mean {close}? " if close else "")
            + f"Use a spec field ({', '.join(WRITERS)}), a path inside a block with layer=, "
            "or a full name from m.hf.named_modules()."
        )
    return name


def weight(m, module: str, layer: int | None = None) -> torch.Tensor:
    """A linear module's weight oriented `[d_out, d_in]` (Conv1D transposed), as float32 on CPU."""
    name = resolve(m, module, layer)
    mod = dict(m.hf.named_modules())[name]
    if isinstance(mod, Conv1D | torch.nn.Linear):
        return linear_weight(mod).detach().float().cpu()
    raise TypeError(f"{name} is a {type(mod).__name__}, not a linear map (nn.Linear or Conv1D); it has no weight matrix to diff")


def check_same_architecture(a, b) -> None:
    """Raise a clear error unless `a` and `b` have the same model type and parameter shapes."""
    type_a, type_b = a.hf.config.model_type, b.hf.config.model_type
    if type_a != type_b:
        raise ValueError(f"cannot diff a {type_a!r} model against a {type_b!r} model: the architectures differ")
    shapes_a = {n: tuple(p.shape) for n, p in a.hf.named_parameters()}
    shapes_b = {n: tuple(p.shape) for n, p in b.hf.named_parameters()}
    if shapes_a != shapes_b:
        differ = sorted(n for n in shapes_a.keys() | shapes_b.keys() if shapes_a.get(n) != shapes_b.get(n))
        first = differ[0]
        raise ValueError(
            f"cannot diff models of different shapes: {len(differ)} parameters differ, e.g. {first}: "
            f"{shapes_a.get(first)} vs {shapes_b.get(first)}. Diff checkpoints of one architecture and size."
        )


def diff(a, b, module: str, layer: int | None = None) -> torch.Tensor:
    """`W_b - W_a` of one module, oriented `[d_out, d_in]`."""
    check_same_architecture(a, b)
    return weight(b, module, layer) - weight(a, module, layer)


def spaces(m, module: str, layer: int | None = None) -> tuple[str, str]:
    """`(out_space, in_space)` names for a module: "resid" where it writes to or reads from the residual stream."""
    name = resolve(m, module, layer)
    for field, in_space in WRITERS.items():
        if layer is not None and name == resolve(m, field, layer):
            return "resid", in_space
    d_out, d_in = weight(m, module, layer).shape
    # Every other linear map in a block reads the normalised residual stream (q/k/v, MLP in).
    reads_resid = layer is not None and d_in == m.d_model
    return f"{name}:out", "resid" if reads_resid else f"{name}:in"


def svd(matrix: torch.Tensor, k: int = 1, name: str = "matrix", out_space: str = "out", in_space: str = "in") -> ModuleSVD:
    """Top-k SVD of `matrix [d_out, d_in]` (exact, then truncated)."""
    if matrix.dim() != 2:
        raise ValueError(f"svd needs a matrix, got shape {tuple(matrix.shape)}")
    checks.count(k, "k", high=min(matrix.shape))  # singular vectors of this matrix
    checks.finite(matrix, name)
    # LAPACK is several times faster on tall row-major input than on wide, so factor the tall side.
    wide = matrix.shape[0] < matrix.shape[1]
    U, S, Vh = torch.linalg.svd((matrix.T if wide else matrix).float().contiguous(), full_matrices=False)
    if wide:
        U, Vh = Vh.T, U.T
    return ModuleSVD(name, U[:, :k], S[:k], Vh[:k].T, matrix.norm().item(), out_space, in_space)


def diff_svd(a, b, module: str, layer: int | None = None, k: int = 1) -> ModuleSVD:
    """Top-k SVD of `W_b - W_a` for one module, with its spaces labelled."""
    out_space, in_space = spaces(a, module, layer)
    # a zero diff has no singular vectors worth reading: any unit vector would do
    delta = checks.nonzero(diff(a, b, module, layer), f"W_b - W_a of {resolve(a, module, layer)}")
    return svd(delta, k, resolve(a, module, layer), out_space, in_space)


@dataclass
class DiffTable:
    """Per-stage, per-module, per-layer summaries of weight diffs (`Scores` over (stage, module, layer)).

    norm: Frobenius norm of `ΔW = W_b - W_a`. top_sv: its largest singular value.
    alignment: |cos(top left singular vector, direction of that layer)|.
    share: `‖dᵀ ΔW‖² / ‖ΔW‖²_F`, the fraction of the whole diff that writes along the direction d.
    Their chance levels for a random direction in d_model dimensions: `chance_cos` (E|cos|)
    and `chance_share` (1 / d_model).
    """

    norm: Scores
    top_sv: Scores
    alignment: Scores
    share: Scores
    chance_cos: float
    chance_share: float

    def __str__(self) -> str:
        stages, modules = self.norm.labels["stage"], self.norm.labels["module"]
        rows = [f"{'stage':<10}{'module':<13}{'layer':>5}{'‖ΔW‖_F':>9}{'σ1':>8}{'|cos(u1,d)|':>13}{'share(d)':>10}"]
        for (s, j, layer), value in self.norm.items():
            rows.append(f"{stages[s]:<10}{modules[j]:<13}{layer:>5}{value:>9.3f}{self.top_sv.values[s, j, layer]:>8.3f}"
                        f"{self.alignment.values[s, j, layer]:>13.3f}{self.share.values[s, j, layer]:>10.4f}")
        rows.append(f"chance for a random direction: |cos| {self.chance_cos:.3f}, share {self.chance_share:.4f}")
        return "\n".join(rows)


def diff_table(stages: dict[str, tuple], directions: torch.Tensor, modules=("mlp_out", "head_values")) -> DiffTable:
    """SVD of every layer's residual-stream writers for each stage `{"base→sft": (m_a, m_b), ...}`.

    directions: `[n_layers, d_model]`, one residual-stream direction per layer
    (e.g. a probe read at that block's output), compared with the output side
    of the diff of that layer's modules.
    """
    checks.nonempty(stages, "stages (a dict {name: (model_a, model_b)})")
    first = next(iter(stages.values()))[0]
    if directions.shape != (first.n_layers, first.d_model):
        raise ValueError(f"directions must be [n_layers, d_model] = [{first.n_layers}, {first.d_model}], "
                         f"got {tuple(directions.shape)}")
    unknown = [mod for mod in modules if mod not in WRITERS]
    if unknown:
        raise ValueError(f"diff_table compares residual-stream writers only ({list(WRITERS)}), got {unknown}")
    directions = torch.nn.functional.normalize(directions.float(), dim=-1)
    shape = (len(stages), len(modules), first.n_layers)
    norm, top_sv, align, share = (torch.zeros(shape) for _ in range(4))
    for s, (a, b) in enumerate(stages.values()):
        for j, module in enumerate(modules):
            for layer in range(a.n_layers):
                delta = diff(a, b, module, layer)  # (d_model, d_in)
                result = svd(delta, 1, resolve(a, module, layer), *spaces(a, module, layer))
                norm[s, j, layer], top_sv[s, j, layer] = result.frobenius, result.S[0]
                align[s, j, layer] = (result.alignment(directions[layer], "resid")[0] if result.frobenius > 0
                                      else math.nan)  # no diff: no singular vector to align (Scores warns)
                share[s, j, layer] = (directions[layer] @ delta).square().sum() / delta.square().sum().clamp_min(1e-30)
    labels = dict(stage=list(stages), module=list(modules))
    dims = ("stage", "module", "layer")
    return DiffTable(
        Scores(norm, dims, labels, dict(title="‖W_b − W_a‖_F")),
        Scores(top_sv, dims, labels, dict(title="top singular value of W_b − W_a")),
        Scores(align, dims, labels, dict(title="|cos(top left singular vector, direction)|")),
        Scores(share, dims, labels, dict(title="share of ‖ΔW‖² written along the direction")),
        _random_abs_cos(first.d_model),
        1 / first.d_model,
    )


def _random_abs_cos(d: int) -> float:
    """E|cos| of two independent uniform unit vectors in R^d."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
