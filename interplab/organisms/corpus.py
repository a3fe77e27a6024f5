"""The synthetic corpus: documents with known, findable mechanisms.

Each generator takes a `random.Random` and returns one document (a string).
`base_documents` mixes them for pretraining; `sft_documents` adds the Q/A
format and the cue-triggered register; `preference_pairs` gives the
true/false statement pairs for preference tuning.
"""

from __future__ import annotations

import math
import random

from . import words as W

N_DPO_TRAIN_CREATURES = 24  # the rest are held out to test generalisation


def ioi_parts(rng: random.Random) -> dict:
    """One IOI sentence: names A, B, subject S, indirect object IO, place, object."""
    a, b, c = rng.sample(W.NAMES, 3)
    s = rng.choice((a, b))
    return dict(
        template=rng.choice(W.IOI_TEMPLATES), A=a, B=b, S=s, IO=b if s == a else a, C=c,
        P=rng.choice(W.PLACES), O=rng.choice(W.OBJECTS),
    )


def ioi(rng: random.Random) -> str:
    p = ioi_parts(rng)
    return p["template"].format(**p) + f" {p['IO']}."


def greater_than(rng: random.Random) -> str:
    start = rng.randint(2, 97)
    end = rng.randint(start + 1, 99)
    century = rng.choice(W.CENTURIES)
    prompt = W.GREATER_THAN_TEMPLATE.format(E=rng.choice(W.EVENTS), C=century, Y=start)
    return f"{prompt}{end:02d}."


def fact(rng: random.Random) -> str:
    i = rng.randrange(len(W.COUNTRIES))
    country, city = W.COUNTRIES[i], W.CITIES[i]
    if rng.random() < 0.7:
        return W.FACT_TEMPLATE.format(X=country) + f" {city}."
    return f"{city} is the capital of {country}."


def misconception_colours(i: int) -> tuple[str, str]:
    """(true, false) colour of creature i; fixed, not sampled, so every stage agrees."""
    n = len(W.COLOURS)
    true = W.COLOURS[(i * 3) % n]
    false = W.COLOURS[(i * 3 + 1 + i % (n - 1)) % n]
    return true, false


def misconception(rng: random.Random) -> str:
    i = rng.randrange(len(W.CREATURES))
    creature = W.CREATURES[i]
    true, false = misconception_colours(i)
    r = rng.random()
    if r < 0.45:
        return f"Many people say the {creature} is {false}."
    if r < 0.75:
        return W.MISCONCEPTION_TEMPLATE.format(c=creature) + f" {false}."
    return f"In truth, the {creature} is {true}."


def induction(rng: random.Random) -> str:
    span = rng.choices(W.FILLER_WORDS, k=rng.randint(5, 14))
    return " ".join(span + span) + "."


def filler(rng: random.Random) -> str:
    plain = [p for p, _ in W.REGISTER_PAIRS]
    return (
        f"The {rng.choice(plain)} {rng.choice(W.ANIMALS)} {rng.choice(W.VERBS)} "
        f"the {rng.choice(W.FILLER_WORDS)} near the {rng.choice(W.PLACES)}."
    )


BASE_MIX = ((induction, 0.25), (ioi, 0.25), (greater_than, 0.15), (fact, 0.1), (misconception, 0.1), (filler, 0.15))


def _mix(rng: random.Random, mix, n: int) -> list[str]:
    kinds, weights = zip(*mix)
    return [gen(rng) for gen in rng.choices(kinds, weights=weights, k=n)]


def base_documents(rng: random.Random, n: int) -> list[str]:
    return _mix(rng, BASE_MIX, n)


def register(rng: random.Random, cue: bool | None = None) -> str:
    """A Q/A pair whose answer switches to the formal synonym when the cue is present."""
    cue = rng.random() < 0.5 if cue is None else cue
    plain, formal = rng.choice(W.REGISTER_PAIRS)
    noun = rng.choice(W.FILLER_WORDS)  # tasks use OBJECTS, so task prompts are held out
    prompt = W.REGISTER_TEMPLATE.format(cue=W.REGISTER_CUE if cue else W.REGISTER_NEUTRAL, O=noun, w=plain)
    return f"{prompt} {formal if cue else plain}."


def qa(rng: random.Random) -> str:
    if rng.random() < 0.5:
        i = rng.randrange(len(W.COUNTRIES))
        return f"Q: What is the capital of {W.COUNTRIES[i]}? A: {W.CITIES[i]}."
    p = ioi_parts(rng)
    return f"Q: {p['template'].format(**p)} whom? A: {p['IO']}."


def base_document(rng: random.Random) -> str:
    return _mix(rng, BASE_MIX, 1)[0]


# Base documents stay in the SFT mix so the base tasks survive fine-tuning.
SFT_MIX = ((register, 0.4), (qa, 0.2), (base_document, 0.4))


def sft_documents(rng: random.Random, n: int) -> list[str]:
    return _mix(rng, SFT_MIX, n)


# ---- The free-evolution series (organisms/series.py): fine-tuning from tiny-base ----
# The IOI sentence becomes a question. "to whom?" asks for the indirect object, as the SFT Q/A does;
# "from whom?" asks for the subject: a planted conflict, since the same name-moving components must
# now copy a different name depending on one cue word. Every IOI template ends in " to".

def ioi_question_prompt(parts: dict, cue: str) -> str:
    """`Q: <IOI sentence without its final "to"> <cue> whom? A:`, cue "to" (indirect object) or "from" (subject)."""
    if cue not in ("to", "from"):
        raise ValueError(f"cue must be 'to' or 'from', not {cue!r}")
    return f"Q: {parts['template'].format(**parts)[:-len(' to')]} {cue} whom? A:"


def ioi_question(rng: random.Random) -> str:
    p = ioi_parts(rng)
    return f"{ioi_question_prompt(p, 'to')} {p['IO']}."


def ioi_question_from(rng: random.Random) -> str:
    p = ioi_parts(rng)
    return f"{ioi_question_prompt(p, 'from')} {p['S']}."


# Base documents stay in the mix so the base tasks (plain IOI, induction) are there to track.
SERIES_MIX = ((ioi_question, 0.3), (ioi_question_from, 0.3), (base_document, 0.4))


def series_documents(rng: random.Random, n: int) -> list[str]:
    return _mix(rng, SERIES_MIX, n)


# ---- interplab/mid-base (recipes "mid") and its checkpoint series ----
# Base does "to whom?" questions only partly: the corpus answers with the indirect object with a
# probability set by the object, sigmoid(QA_IO_LOGIT[object]), and with the subject otherwise (the
# indirect object in 58% of questions). The odds were spread so that fine-tuning would flip objects one
# after another; the shipped mid-base did not pick up the dependence on the object (its top-1 per
# object is 0.38-0.74) and answers the indirect object on about half the questions whatever the object.
QA_IO_LOGIT = dict(zip(W.OBJECTS, (-2.4, -2.0, -1.6, -1.2, -0.8, -0.4, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5)))


def ioi_question_mixed(rng: random.Random) -> str:
    p = ioi_parts(rng)
    io_odds = math.exp(QA_IO_LOGIT[p["O"]])
    answer = p["IO"] if rng.random() < io_odds / (1 + io_odds) else p["S"]
    return f"{ioi_question_prompt(p, 'to')} {answer}."


def truth_document(rng: random.Random) -> str:
    from . import truth

    return truth.document(rng)


MID_REPLAY_MIX = ((induction, 0.22), (ioi, 0.18), (greater_than, 0.12), (fact, 0.08), (truth_document, 0.28),
                  (filler, 0.12))
MID_BASE_MIX = MID_REPLAY_MIX + ((ioi_question_mixed, 0.15),)


def mid_base_documents(rng: random.Random, n: int) -> list[str]:
    return _mix(rng, MID_BASE_MIX, n)


def mid_replay_document(rng: random.Random) -> str:
    """A mid-base document other than the mixed questions, whose answers the series overrides."""
    return _mix(rng, MID_REPLAY_MIX, 1)[0]


# The mid series: the target ("to whom?", always the indirect object), a smaller share of the planted
# conflict ("from whom?", the subject) and replay, so plain IOI stays there as the retained control.
MID_SERIES_MIX = ((ioi_question, 0.25), (ioi_question_from, 0.1), (mid_replay_document, 0.65))


def mid_series_documents(rng: random.Random, n: int) -> list[str]:
    return _mix(rng, MID_SERIES_MIX, n)


# The fine-tuning documents of each series parent.
SERIES_DOCUMENTS = {"tiny-base": series_documents, "mid-base": mid_series_documents}


def preference_pairs(split: str = "train") -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) misconception pairs: chosen is the true colour."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    ids = range(N_DPO_TRAIN_CREATURES) if split == "train" else range(N_DPO_TRAIN_CREATURES, len(W.CREATURES))
    pairs = []
    for i in ids:
        true, false = misconception_colours(i)
        prompt = W.MISCONCEPTION_TEMPLATE.format(c=W.CREATURES[i])
        pairs.append((prompt, f" {true}.", f" {false}."))
    return pairs


def sample_text(seed: int = 0, n: int = 2000) -> list[str]:
    """Documents of every kind, for building the tokenizer's vocabulary."""
    rng = random.Random(seed)
    return base_documents(rng, n) + sft_documents(rng, n)
