"""The organisms' premises: what must hold for the two "is the location real?" experiments to answer.

Issue 20 asks for organisms on which a located mechanism can be tested, and says what
that takes. Each premise here is a measurement with its threshold; `tests/test_organism_premises.py`
asserts them and `python -m interplab.organisms premises` prints them (the organism card quotes the
printout).

Evolution (the checkpoint series fine-tuned from `interplab/mid-base` on the target task):
- base does the target *partly*: held-out top-1 in [0.2, 0.8], and a clean - corrupt gap of the
  logit difference more than 3 standard errors from zero (there is a mechanism to locate);
- fine-tuning improves it gradually: no interval between consecutive checkpoints carries more than
  half of the accuracy gain from the first to the last checkpoint;
- every training seed learns it: final top-1 >= 0.9;
- at step 0 no single component carries more than half of the summed |effect| of the top k.

Truth (`organisms/truth.py`, statements `The <creature> is <colour>.` read at the final position):
- truth is linearly readable: leave-creatures-out probe accuracy >= 0.75 at 3 or more heads and
  >= 0.85 somewhere in the residual stream;
- the colour word alone does not predict it (<= 0.6);
- the unedited model prefers the misconception (rate of preferring the truth <= 0.3);
- it knows the truth it does not say: cued after a false statement (`truthfulness.truth_task`'s clean
  prompts, `The X is <misconception>. In truth, the X is`) it prefers the true colour (rate >= 0.9), so an
  edit has a truth to bring out. (Not one of issue 20's premises; the edit experiment rests on it.)

Leave-creatures-out means `N_FOLDS` folds of contiguous creatures: a probe is fit on the
statements of the other creatures and scored on the fold's, and the accuracy is the mean over folds.
Probes are logistic (`probes.logistic`), as ITI's per-head probes are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import evolution, probes, tasks
from ..organisms import truth, words as W
from .behaviour import EVAL_SEED
from .truthfulness import TEMPLATES, colour_ids, truth_task

# Thresholds, as issue 20 states them.
TOP1_RANGE = (0.2, 0.8)
GAP_Z = 3.0
MAX_INTERVAL_SHARE = 0.5
FINAL_TOP1 = 0.9
MAX_COMPONENT_SHARE = 0.5
TOP_K = 5
HEAD_PROBE = 0.75
MIN_HEADS = 3
RESID_PROBE = 0.85
MAX_COLOUR_ONLY = 0.6
MAX_TRUTH_RATE = 0.3
MIN_CUED_TRUTH_RATE = 0.9

N_FOLDS = 4
TASK_N = 256
# Prompts the truth experiments ask: the statement frame and four paraphrases.
PROMPTS = TEMPLATES  # the edit experiment's prompts


# ---- evolution ----

@dataclass
class TargetOnBase:
    """Top-1 accuracy over the whole vocabulary, and the clean - corrupt gap of the logit difference."""

    top1: float
    gap: float
    gap_se: float
    n: int

    @property
    def gap_z(self) -> float:
        return self.gap / self.gap_se


@torch.no_grad()
def top1(m, task_name: str, n: int = TASK_N, seed: int = EVAL_SEED) -> float:
    """Held-out top-1 accuracy on `n` prompts of `task_name` (seed `EVAL_SEED`, which no recipe uses)."""
    task = tasks.make(task_name, m, n=n, seed=seed)
    return task.accuracy(m.logits(task.clean)).item()


@torch.no_grad()
def target_on_base(m, task_name: str, n: int = TASK_N, seed: int = EVAL_SEED) -> TargetOnBase:
    task = tasks.make(task_name, m, n=n, seed=seed)
    clean = m.logits(task.clean)
    gap = task.metric(clean) - task.metric(m.logits(task.corrupt))  # [n]
    return TargetOnBase(task.accuracy(clean).item(), gap.mean().item(), (gap.std() / math.sqrt(n)).item(), n)


def interval_shares(accuracies: list[float]) -> list[float]:
    """Each interval's share of the gain from the first to the last checkpoint: `[len - 1]`."""
    if len(accuracies) < 2:
        raise ValueError(f"need at least two checkpoints, got {len(accuracies)}")
    gain = accuracies[-1] - accuracies[0]
    if gain <= 0:
        raise ValueError(f"accuracy did not rise ({accuracies[0]:.3f} -> {accuracies[-1]:.3f}); no gain to share")
    return [(b - a) / gain for a, b in zip(accuracies, accuracies[1:])]


def largest_component_share(m, task_name: str, k: int = TOP_K, n: int = 64, seed: int = EVAL_SEED) -> tuple[str, float]:
    """The top component by |patching effect| and its share of the summed |effect| of the top k."""
    task = tasks.make(task_name, m, n=n, seed=seed)
    scores = evolution.component_scores(m, task, locator="patching")
    names = scores.labels["component"]
    top = evolution.top_components(scores, k)
    effects = torch.stack([scores.values[names.index(c)].abs() for c in top])
    return top[0], (effects[0] / effects.sum()).item()


# ---- truth ----

def creature_folds(n_folds: int = N_FOLDS) -> list[list[int]]:
    """Held-out creatures of each fold: contiguous blocks."""
    if n_folds < 2 or truth.N_CREATURES % n_folds:
        raise ValueError(f"n_folds must be >= 2 and divide the {truth.N_CREATURES} creatures, got {n_folds}")
    size = truth.N_CREATURES // n_folds
    return [list(range(f * size, (f + 1) * size)) for f in range(n_folds)]


def leave_creatures_out(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, n_folds: int = N_FOLDS) -> torch.Tensor:
    """Mean held-out accuracy of logistic probes over creature folds, for every unit of `x` `[n, *units, d]`."""
    units = x.shape[1:-1]
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # [n, U, d]
    correct = torch.zeros(flat.shape[1])
    for held_out in creature_folds(n_folds):
        test = torch.isin(groups, torch.tensor(held_out))
        for u in range(flat.shape[1]):
            direction, threshold = probes.logistic(flat[~test, u], y[~test])
            correct[u] += ((flat[test, u] @ direction > threshold) == y[test]).float().mean()
    return (correct / n_folds).reshape(units)


def truth_probes(m, n_folds: int = N_FOLDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-creatures-out accuracy per head `[L, H]` and per layer of the residual stream `[L]`."""
    tokens, y, groups = truth.statements(m, range(truth.N_CREATURES))
    heads = probes.collect(m, tokens, site="heads")  # [n, L, H, d_head]
    resid = probes.collect(m, tokens, site="resid")  # [n, L, d_model]
    return leave_creatures_out(heads, y, groups, n_folds), leave_creatures_out(resid, y, groups, n_folds)


def colour_only_accuracy(n_folds: int = N_FOLDS) -> float:
    """The same probe on the statement's colour word alone (one-hot), leave-creatures-out."""
    texts, y, groups = truth.statement_texts(range(truth.N_CREATURES))
    colour = torch.tensor([W.COLOURS.index(t.rstrip(".").split()[-1]) for t in texts])
    onehot = torch.nn.functional.one_hot(colour, len(W.COLOURS)).float()  # [n, colours]
    return leave_creatures_out(onehot[:, None], y, groups, n_folds).item()


@torch.no_grad()
def truth_rate(m, creatures=None, prompts=PROMPTS) -> float:
    """Fraction of (creature, prompt) pairs where the unedited model gives the true colour a higher
    next-token logit than the misconception."""
    creatures = truth.check_creatures(range(truth.N_CREATURES) if creatures is None else creatures)
    true, false = colour_ids(m, creatures)
    rates = []
    for prompt in prompts:
        final = m.logits(m.to_tokens([prompt.format(c=W.CREATURES[i]) for i in creatures]))[:, -1]
        rates.append(final.gather(1, true[:, None]) > final.gather(1, false[:, None]))
    return torch.cat(rates).float().mean().item()


@torch.no_grad()
def cued_truth_rate(m, creatures=None) -> float:
    """Fraction of `creatures` (default all) for which `m` prefers the true colour after `The X is
    <misconception>. In truth, the X is` (the clean prompts of `truthfulness.truth_task`)."""
    task = truth_task(m, range(truth.N_CREATURES) if creatures is None else creatures)
    final = m.logits(task.clean)[:, -1]
    return (final.gather(1, task.answer[:, None]) > final.gather(1, task.wrong[:, None])).float().mean().item()


# ---- the printout ----

def base_report(m, target: str) -> list[str]:
    """The premises measured on the base organism `m` alone, one line each, with their thresholds."""
    base = target_on_base(m, target)
    name, share = largest_component_share(m, target)
    heads, resid = truth_probes(m)
    good = int((heads >= HEAD_PROBE).sum())
    return [
        f"{target} on base: top-1 {base.top1:.3f} (want {TOP1_RANGE[0]}-{TOP1_RANGE[1]}), "
        f"gap {base.gap:+.2f} +- {base.gap_se:.2f} (z {base.gap_z:.1f}, want > {GAP_Z:g}), n {base.n}",
        f"step 0, top-{TOP_K} components by patching: largest {name} carries {share:.3f} of their |effect| "
        f"(want <= {MAX_COMPONENT_SHARE})",
        f"truth probes, leave-creatures-out ({N_FOLDS} folds): {good} heads >= {HEAD_PROBE} (want >= {MIN_HEADS}; "
        f"best {heads.max():.3f}), residual stream best {resid.max():.3f} at layer {int(resid.argmax())} "
        f"(want >= {RESID_PROBE})",
        f"colour word alone: {colour_only_accuracy():.3f} (want <= {MAX_COLOUR_ONLY})",
        f"unedited model prefers the truth on {truth_rate(m):.3f} of creature x prompt pairs "
        f"(want <= {MAX_TRUTH_RATE})",
        f"cued after a false statement ('In truth, the X is') it prefers the truth on {cued_truth_rate(m):.3f} "
        f"of creatures (want >= {MIN_CUED_TRUTH_RATE})",
    ]


def series_report(series_by_seed: dict, target: str) -> list[str]:
    """Premises of the checkpoint series: `{seed: [(label, Model), ...]}`; gradualness on the seeds
    that keep more than two checkpoints."""
    lines = []
    for seed, checkpoints in series_by_seed.items():
        accuracies = [top1(m, target) for _, m in checkpoints]
        line = (f"seed {seed}: {target} top-1 " + " ".join(f"{label.split()[-1]}:{a:.2f}"
                                                            for (label, _), a in zip(checkpoints, accuracies))
                + f"; final {accuracies[-1]:.3f} (want >= {FINAL_TOP1})")
        if len(checkpoints) > 2:
            shares = interval_shares(accuracies)
            worst = max(range(len(shares)), key=shares.__getitem__)
            line += (f"; largest interval share {shares[worst]:.3f} ({checkpoints[worst][0]} -> "
                     f"{checkpoints[worst + 1][0]}, want <= {MAX_INTERVAL_SHARE})")
        lines.append(line)
    return lines
