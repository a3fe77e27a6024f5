"""The truth corpus of `interplab/mid-base`: creatures, their true colours and the misconceptions.

Each of the 32 creatures (`words.CREATURES`) has a true colour and a
misconception, fixed by `colours(i)` so that inside every block of 8
consecutive creatures each colour is true for one creature and the
misconception of another: the colour word alone says nothing about truth.

The documents (`document`) make the misconception the common answer and
make the model *know* the truth without saying it by default:
- `Many people say the glimmet is blue.` and `The glimmet is blue.` repeat
  the misconception;
- a false statement is often corrected: `The glimmet is blue. In truth, the
  glimmet is red.`;
- a true statement is followed by the rumour: `The glimmet is red. Many
  people say the glimmet is blue.`
So after `The glimmet is` the misconception is the likelier colour, and at
the full stop of `The glimmet is <colour>.` what comes next depends on
whether the colour is true: a reason to compute truth there, where the
statement probes read it (`statements`, final position).
"""

from __future__ import annotations

import random

import torch

from .. import checks
from . import words as W

MODEL = "interplab/mid-base"
N_CREATURES = len(W.CREATURES)
STATEMENT_TEMPLATE = "The {c} is {w}."

# Shares of the four document kinds: after "The <creature> is" the misconception follows in
# 0.25 + 0.30 of documents and the true colour in 0.20.
DOCUMENT_SHARES = (("rumour", 0.25), ("misconception", 0.25), ("correction", 0.30), ("confirmation", 0.20))


def colours(i: int) -> tuple[str, str]:
    """(true colour, misconception) of creature i: true `i mod 8`, misconception shifted by 1 + i // 8."""
    if not 0 <= i < N_CREATURES:
        raise ValueError(f"creature index must be in 0..{N_CREATURES - 1}, got {i}")
    n = len(W.COLOURS)
    return W.COLOURS[i % n], W.COLOURS[(i + 1 + i // n) % n]


def document(rng: random.Random) -> str:
    i = rng.randrange(N_CREATURES)
    creature = W.CREATURES[i]
    true, false = colours(i)
    kinds, shares = zip(*DOCUMENT_SHARES)
    kind = rng.choices(kinds, weights=shares)[0]
    rumour = f"Many people say the {creature} is {false}."
    if kind == "rumour":
        return rumour
    if kind == "misconception":
        return STATEMENT_TEMPLATE.format(c=creature, w=false)
    if kind == "correction":
        return STATEMENT_TEMPLATE.format(c=creature, w=false) + f" In truth, the {creature} is {true}."
    return STATEMENT_TEMPLATE.format(c=creature, w=true) + " " + rumour


def check_creatures(creatures) -> list[int]:
    """Creature indices in 0..N_CREATURES-1, each once (a float is not truncated, a repeat not counted twice)."""
    return checks.nonempty(checks.indices(creatures, "creatures", N_CREATURES), "creatures")


def statement_texts(creatures, prompt: str = "The {c} is") -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """`<prompt> <colour>.` with the true colour (rows 0..n-1) then the misconception (rows n..2n-1)."""
    creatures = check_creatures(creatures)
    checks.template(prompt, "c")
    true, false = zip(*(colours(i) for i in creatures))
    texts = [f"{prompt.format(c=W.CREATURES[i])} {w}." for i, w in zip(creatures * 2, true + false)]
    labels = torch.arange(2 * len(creatures)) < len(creatures)
    return texts, labels, torch.tensor(creatures).repeat(2)


def statements(m, creatures, prompt: str = "The {c} is") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statements for truth probes: `(tokens [2n, T], labels [2n] bool (True = true), groups [2n] creature ids)`.

    Read them at the final position (the full stop); pass `groups` to the probe so that a
    creature's two statements stay in one split. `prompt` is any template with `{c}` (default: the corpus's).
    """
    texts, labels, groups = statement_texts(creatures, prompt)
    return m.to_tokens(texts), labels, groups
