"""Behaviour of a model on held-out task prompts: the numbers in the organism card.

`python -m interplab.organisms evaluate` prints them for every shipped stage. This experiment
sits above both `tasks` and `organisms` (it builds tasks to measure organisms), so that
the dependency between those two runs one way: `tasks` reads the organisms' word lists,
and nothing in `organisms` imports `tasks`.
Prompts come from seeds the corpus never used (and, for the register and the
misconceptions, from nouns and creatures the training data never paired).
"""

from __future__ import annotations

import torch

from .. import tasks, training
from ..model import load
from ..organisms import corpus, words as W

EVAL_SEED = 12345


def induction_accuracy(m, n: int = 200) -> float:
    """Top-1 accuracy on every predictable token of a repeated span's second occurrence."""
    span = 10
    task = tasks.make("induction", m, n=n, seed=EVAL_SEED, span=span, predict=span - 1)
    full = torch.cat([task.clean, task.answer[:, None].to(task.clean.device)], dim=1)  # (n, 1 + 2*span)
    logits = m.logits(full[:, :-1])
    first = 1 + span  # position of the second occurrence's first token
    predicted = logits[:, first:].argmax(-1)  # predicts tokens first+1 ...
    return (predicted == full[:, first + 1 :]).float().mean().item()


def ioi_positive_fraction(m, n: int = 100) -> float:
    """Fraction of prompts (every template) with logit(IO) - logit(S) > 0."""
    diffs = []
    for template in range(len(W.IOI_TEMPLATES)):
        task = tasks.make("ioi", m, n=n, seed=EVAL_SEED + template, template=template)
        diffs.append(task.metric(m.logits(task.clean)))
    return (torch.cat(diffs) > 0).float().mean().item()


def greater_than_mass(m, n: int = 200) -> float:
    """Mean probability mass on two-digit years above the start year."""
    task = tasks.make("greater_than", m, n=n, seed=EVAL_SEED)
    year_ids = torch.tensor(m.tokenizer.convert_tokens_to_ids([f"{y:02d}" for y in range(100)]))
    probs = m.logits(task.clean)[:, -1].softmax(-1)[:, year_ids]  # (n, 100)
    above = torch.arange(100)[None, :] > task.meta["start"][:, None]
    return (probs * above).sum(-1).mean().item()


def facts_accuracy(m) -> float:
    prompts = m.to_tokens([W.FACT_TEMPLATE.format(X=x) for x in W.COUNTRIES])
    answers = torch.tensor(m.tokenizer.convert_tokens_to_ids(W.CITIES))
    return (m.logits(prompts)[:, -1].argmax(-1) == answers).float().mean().item()


def register_rates(m, n: int = 144) -> tuple[float, float]:
    """Fraction of top-1 answers in the formal word set, with and without the cue, on `n` distinct prompts
    (the register task has 144: 12 word pairs x 12 objects)."""
    task = tasks.make("register", m, n=n, seed=EVAL_SEED, distinct=True)
    formal = torch.tensor(m.tokenizer.convert_tokens_to_ids([f for _, f in W.REGISTER_PAIRS]))
    rate = lambda tokens: torch.isin(m.logits(tokens)[:, -1].argmax(-1), formal).float().mean().item()
    return rate(task.clean), rate(task.corrupt)


@torch.no_grad()
def truth_preference(m, split: str = "test") -> float:
    """Fraction of misconception pairs where the true statement is more likely."""
    pairs = corpus.preference_pairs(split)
    enc = lambda texts: torch.tensor([m.tokenizer.encode(t, add_special_tokens=False) for t in texts])
    prompts = m.to_tokens([p for p, _, _ in pairs])
    chosen = training.sequence_logprob(m.hf, prompts, enc([c for _, c, _ in pairs]))
    rejected = training.sequence_logprob(m.hf, prompts, enc([r for _, _, r in pairs]))
    return (chosen > rejected).float().mean().item()


def behaviour(m) -> dict[str, float]:
    with_cue, without_cue = register_rates(m)
    return {
        "induction_top1": induction_accuracy(m),
        "ioi_positive": ioi_positive_fraction(m),
        "greater_than_mass": greater_than_mass(m),
        "facts_top1": facts_accuracy(m),
        "register_with_cue": with_cue,
        "register_without_cue": without_cue,
        "truth_preferred_heldout": truth_preference(m, "test"),
    }


def behaviour_table(stages=("base", "sft", "dpo")) -> dict[str, dict[str, float]]:
    """`behaviour` of every shipped stage: `{stage: {metric: value}}`."""
    return {stage: behaviour(load(f"interplab/tiny-{stage}")) for stage in stages}


def format_table(rows: dict[str, dict[str, float]], digits: int = 3) -> str:
    metrics = list(next(iter(rows.values())))
    lines = [f"{'metric':<26}" + "".join(f"{s:>10}" for s in rows)]
    lines += [f"{k:<26}" + "".join(f"{rows[s][k]:>10.{digits}f}" for s in rows) for k in metrics]
    return "\n".join(lines)
