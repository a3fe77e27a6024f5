"""Tasks: clean/corrupt prompt pairs, answer tokens and a metric.

`make(name, model, n, seed)` builds one of `TASKS`. Prompts are plain text
built from `organisms.words`, so any tokenizer works: a template word that
does not encode to a single token is dropped (with a warning) before
sampling, and every kept prompt is checked to encode to the same length.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field, replace

import torch

from . import checks, metrics
from .organisms import words as W


@dataclass
class Task:
    """A batch of `n` prompt pairs of equal token length.

    clean, corrupt: `[n, seq]` token ids (BOS first where the tokenizer has one).
    answer, wrong: `[n]` token ids compared at the final position.
    meta: per-example extras, e.g. `start` years for greater_than.
    """

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    clean_text: list[str]
    corrupt_text: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.clean.shape[0]

    def __getitem__(self, rows: int | slice | list[int] | torch.Tensor) -> "Task":
        """The examples `rows` (an int, a slice, a list or a 1-D index tensor, repeats allowed) as a Task.

        Every per-example field is indexed: prompts, answers, texts and `meta`.
        """
        n = len(self)
        if isinstance(rows, int) and not isinstance(rows, bool):
            rows = [rows]
        index = torch.arange(n)[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        if index.dtype == torch.bool:  # a mask selects rows, as in torch; read as ints it would pick rows 0 and 1
            if index.shape != (n,):
                raise IndexError(f"a boolean mask over a task of {n} examples must have shape ({n},), "
                                 f"got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.is_floating_point():
            raise TypeError(f"rows must be ints (or a boolean mask), got {index.dtype} values {index.tolist()[:4]}")
        if index.dim() != 1:
            raise IndexError(f"index a task with an int, a slice or a 1-D list of rows, got shape {tuple(index.shape)}")
        if len(index) and (index.min() < -n or index.max() >= n):
            raise IndexError(f"rows {index.tolist()[:8]} are out of range for a task of {n} examples")
        index = index % n if n else index
        pick = lambda t: t[index.to(t.device)]
        texts = lambda xs: [xs[i] for i in index.tolist()] if len(xs) == n else list(xs)  # a task may carry no texts
        return replace(
            self,
            clean=pick(self.clean), corrupt=pick(self.corrupt), answer=pick(self.answer), wrong=pick(self.wrong),
            clean_text=texts(self.clean_text), corrupt_text=texts(self.corrupt_text),
            meta={k: pick(v) if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v for k, v in self.meta.items()},
        )

    def check_paired(self) -> None:
        """Raise unless clean and corrupt prompts pair up position by position, as patching needs."""
        if self.clean.shape != self.corrupt.shape:
            raise ValueError(
                f"clean {tuple(self.clean.shape)} and corrupt {tuple(self.corrupt.shape)} prompts differ in shape; "
                "patching pairs them position by position, so build both to the same token length "
                "(il.tasks.make does)."
            )

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example logit difference answer - wrong at the final position: `[n]`.

        Accepts `[n, seq, d_vocab]` or final-position `[n, d_vocab]` logits.
        """
        final = metrics.final(logits)
        if final.shape[0] != len(self):
            raise ValueError(f"logits have batch {final.shape[0]} but the task has {len(self)} examples")
        return metrics.logit_diff(final, self.answer, self.wrong)

    def accuracy(self, logits: torch.Tensor) -> torch.Tensor:
        """Fraction of examples whose top-1 final-position token is the answer."""
        return metrics.accuracy(logits, self.answer.to(logits.device)).cpu()


def _round_trips(tokenizer, token_id: int, word: str) -> bool:
    """Whether `token_id` decodes back to `word`: an unknown word is one token too, the same <unk> for
    every unknown word, and a tokenizer that declares no unknown token gives no other way to tell."""
    return token_id != tokenizer.unk_token_id and tokenizer.decode([token_id]).strip() == word.strip()


def _is_single_token(tokenizer, word: str) -> bool:
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    return len(ids) == 1 and _round_trips(tokenizer, ids[0], word)


def _template(template: int) -> str:
    if not (isinstance(template, int) and 0 <= template < len(W.IOI_TEMPLATES)):
        raise ValueError(f"template must be an int in 0..{len(W.IOI_TEMPLATES) - 1} (an index into "
                         f"organisms.words.IOI_TEMPLATES), got {template!r}")
    return W.IOI_TEMPLATES[template]


def single_token_words(tokenizer, candidates, what: str) -> list[str]:
    """The candidates that encode to one known token after a space, warning about the rest."""
    kept = [w for w in candidates if _is_single_token(tokenizer, w)]
    dropped = [w for w in candidates if w not in kept]
    if dropped:
        warnings.warn(
            f"{len(dropped)} {what} split into several tokens or are unknown to this tokenizer "
            "and were dropped: "
            f"{dropped[:8]}{' ...' if len(dropped) > 8 else ''}",
            stacklevel=3,
        )
    return kept


def _need(pool: list[str], k: int, what: str) -> list[str]:
    if len(pool) < k:
        raise ValueError(
            f"only {len(pool)} {what} are single tokens with this tokenizer but the task needs {k}; "
            "this task cannot be built for this model (try another task or a different tokenizer)."
        )
    return pool


def _ioi(rng, tok, template: int = 0):
    names = _need(single_token_words(tok, W.NAMES, "names"), 3, "names")
    places = _need(single_token_words(tok, W.PLACES, "places"), 1, "places")
    objects = _need(single_token_words(tok, W.OBJECTS, "objects"), 1, "objects")
    text = _template(template)

    def example():
        a, b, c = rng.sample(names, 3)
        s = rng.choice((a, b))
        io = b if s == a else a
        fill = dict(A=a, B=b, P=rng.choice(places), O=rng.choice(objects))
        # ABC corruption: the repeated subject becomes a third name.
        return text.format(S=s, **fill), text.format(S=c, **fill), " " + io, " " + s, {}

    return example


def _induction(rng, tok, span: int = 10, predict: int = 5):
    if not 0 < predict < span:
        raise ValueError(f"predict must be between 1 and span-1, got predict={predict}, span={span}")
    pool = _need(single_token_words(tok, W.FILLER_WORDS, "filler words"), span * 2, "filler words")

    def example():
        seq = rng.sample(pool, span)
        other = rng.sample([w for w in pool if w not in seq], span)
        # Corrupt: a different first occurrence, so nothing is repeated.
        clean = " ".join(seq + seq[:predict])
        corrupt = " ".join(other + seq[:predict])
        return clean, corrupt, " " + seq[predict], " " + other[predict], {}

    return example


def _greater_than(rng, tok):
    events = _need(single_token_words(tok, W.EVENTS, "events"), 1, "events")

    def example():
        start, century, event = rng.randint(2, 98), rng.choice(W.CENTURIES), rng.choice(events)
        clean = W.GREATER_THAN_TEMPLATE.format(E=event, C=century, Y=start)
        corrupt = W.GREATER_THAN_TEMPLATE.format(E=event, C=century, Y=1)
        above, below = rng.randint(start + 1, 99), rng.randint(0, start - 1)
        return clean, corrupt, f"{above:02d}", f"{below:02d}", {"start": start}

    example.capacity = 97 * len(W.CENTURIES) * len(events)  # distinct clean prompts
    return example


def _facts(rng, tok):
    pairs = [(x, c) for x, c in zip(W.COUNTRIES, W.CITIES)]
    ok = set(single_token_words(tok, W.COUNTRIES + W.CITIES, "country and city names"))
    pairs = _need([p for p in pairs if p[0] in ok and p[1] in ok], 2, "country/city pairs")

    def example():
        (x, city), (x2, city2) = rng.sample(pairs, 2)
        return W.FACT_TEMPLATE.format(X=x), W.FACT_TEMPLATE.format(X=x2), " " + city, " " + city2, {}

    example.capacity = len(pairs)
    return example


def _register(rng, tok):
    words = set(single_token_words(tok, [w for pair in W.REGISTER_PAIRS for w in pair], "register words"))
    pairs = _need([p for p in W.REGISTER_PAIRS if p[0] in words and p[1] in words], 1, "register pairs")
    objects = _need(single_token_words(tok, W.OBJECTS, "objects"), 1, "objects")

    def example():
        (plain, formal), obj = rng.choice(pairs), rng.choice(objects)
        clean = W.REGISTER_TEMPLATE.format(cue=W.REGISTER_CUE, O=obj, w=plain)
        corrupt = W.REGISTER_TEMPLATE.format(cue=W.REGISTER_NEUTRAL, O=obj, w=plain)
        return clean, corrupt, " " + formal, " " + plain, {}

    example.capacity = len(pairs) * len(objects)
    return example


def _ioi_question(rng, tok, cue: str = "to", template: int = 0):
    """IOI as a question (the checkpoint series' format): "... {cue} whom? A:". Cue "to" asks for the
    indirect object, cue "from" for the subject; the corrupt prompt replaces the repeated subject by a
    third name (ABC), as in `ioi`."""
    from .organisms.corpus import ioi_question_prompt

    names = _need(single_token_words(tok, W.NAMES, "names"), 3, "names")
    places = _need(single_token_words(tok, W.PLACES, "places"), 1, "places")
    objects = _need(single_token_words(tok, W.OBJECTS, "objects"), 1, "objects")
    text = W.IOI_TEMPLATES[template]

    def example():
        a, b, c = rng.sample(names, 3)
        s = rng.choice((a, b))
        io = b if s == a else a
        fill = dict(template=text, A=a, B=b, P=rng.choice(places), O=rng.choice(objects))
        answer, wrong = (io, s) if cue == "to" else (s, io)
        clean, corrupt = ioi_question_prompt(dict(fill, S=s), cue), ioi_question_prompt(dict(fill, S=c), cue)
        return clean, corrupt, " " + answer, " " + wrong, {}

    return example


def _ioi_from(rng, tok, template: int = 0):
    return _ioi_question(rng, tok, cue="from", template=template)


TASKS = {
    "ioi": _ioi,
    "induction": _induction,
    "greater_than": _greater_than,
    "facts": _facts,
    "register": _register,
    "ioi_qa": _ioi_question,
    "ioi_from": _ioi_from,
}


def _answer_id(tok, prompt_ids: list[int], prompt: str, answer: str) -> int | None:
    ids = tok.encode(prompt + answer, add_special_tokens=False)
    extends_prompt = len(ids) == len(prompt_ids) + 1 and ids[: len(prompt_ids)] == prompt_ids
    if not extends_prompt or not _round_trips(tok, ids[-1], answer):
        return None
    return ids[-1]


def make(name: str, model, n: int = 64, seed: int = 0, distinct: bool = False, **options) -> Task:
    """Build `n` examples of task `name` for `model`'s tokenizer, reproducibly from `seed`.

    Examples are drawn at random, so a task with few possible prompts (`facts` has one per
    country) repeats some: that is warned about, with the number of distinct clean prompts.
    `distinct=True` draws without repeats instead, and raises when the task cannot produce `n`
    distinct clean prompts (the error says how many it found).

    Options: ioi, ioi_qa, ioi_from `template` (index into IOI_TEMPLATES); induction `span`, `predict`.
    ioi_qa and ioi_from are the planted conflict of the checkpoint series (`organisms/series.py`):
    the same question with cue "to whom?" (answer: indirect object) or "from whom?" (answer: subject).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    n, seed = checks.count(n, "n"), checks.seed(seed)
    tok = model.tokenizer
    rng = random.Random(seed)
    example = TASKS[name](rng, tok, **options)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []

    rows, length, rejected, seen = [], None, 0, set()
    for _ in range(20 * n):
        if len(rows) == n:
            break
        clean, corrupt, answer, wrong, meta = example()
        if distinct and clean in seen:
            continue
        c_ids = tok.encode(clean, add_special_tokens=False)
        k_ids = tok.encode(corrupt, add_special_tokens=False)
        a_id, w_id = _answer_id(tok, c_ids, clean, answer), _answer_id(tok, c_ids, clean, wrong)
        length = length or len(c_ids)
        if len(c_ids) != length or len(k_ids) != length or a_id is None or w_id is None or a_id == w_id:
            rejected += 1
            continue
        seen.add(clean)
        rows.append((bos + c_ids, bos + k_ids, a_id, w_id, clean, corrupt, meta))
    if distinct and len(rows) < n:
        capacity = getattr(example, "capacity", None)
        can = f" (it can produce {capacity})" if capacity else f" in {20 * n} draws"
        raise ValueError(f"{name} produced only {len(seen)} distinct clean prompts{can} but n={n} were asked "
                         "for; ask for fewer, or pass distinct=False to allow repeats.")
    if len(rows) < n:
        raise ValueError(
            f"could build only {len(rows)} of {n} {name} prompts whose clean and corrupt versions "
            f"tokenize to the same length with single-token answers ({rejected} rejected); "
            "ask for fewer, or use a tokenizer that keeps the task's words whole."
        )
    if rejected:
        warnings.warn(f"{name}: skipped {rejected} sampled prompts of a different token length", stacklevel=2)
    capacity = getattr(example, "capacity", None)  # generators that know it say how many prompts they can make
    if len(seen) < n and ((capacity and n > capacity) or len(seen) < 0.9 * n):
        can = f"; it can produce {capacity}" if capacity else ""
        warnings.warn(f"{name}: {n} examples but only {len(seen)} distinct clean prompts{can}. Repeats weigh some "
                      "prompts twice (probes.task_activations keeps them in one split); pass distinct=True to draw "
                      "without repeats.", stacklevel=2)
    clean_ids, corrupt_ids, answers, wrongs, clean_text, corrupt_text, metas = zip(*rows)
    device = model.device
    meta = {k: torch.tensor([m[k] for m in metas]) for k in metas[0]}
    return Task(
        name=name,
        clean=torch.tensor(clean_ids, device=device),
        corrupt=torch.tensor(corrupt_ids, device=device),
        answer=torch.tensor(answers),
        wrong=torch.tensor(wrongs),
        clean_text=list(clean_text),
        corrupt_text=list(corrupt_text),
        meta=meta,
    )


def random_tokens(model, n: int = 4, seq: int = 6, seed: int = 0) -> Task:
    """A task of random token ids, for checks on any model: corrupt differs from clean at positions 1 and 2.

    Answer and wrong tokens are random too, so the metric has no meaning beyond
    being a fixed function of the final logits.
    """
    n, seed = checks.count(n, "n"), checks.seed(seed)
    checks.count(seq, "seq (positions 1-2 are corrupted)", low=4)
    g = torch.Generator().manual_seed(seed)
    low = 3  # skip the organisms' special tokens
    clean = torch.randint(low, model.d_vocab, (n, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(low, model.d_vocab, (n, 2), generator=g)
    answer, wrong = torch.randint(low, model.d_vocab, (2, n), generator=g)
    return Task("random", clean.to(model.device), corrupt.to(model.device), answer, wrong, [""] * n, [""] * n)
