"""Tasks: equal-length pairs, corruptions that are what they claim, the metric, odd tokenizers."""

import re

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import interplab as il
from interplab.organisms import words as W
from interplab.organisms.tokenizer import _pre_tokenizer, build_tokenizer

N = 24


def _model(tok) -> il.Model:
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    return il.load(transformers.GPT2LMHeadModel(config), tokenizer=tok)


@pytest.fixture(scope="module")
def m():
    return _model(build_tokenizer())


def _words(m, ids) -> list[str]:
    return m.to_str_tokens(ids)


@pytest.mark.parametrize("name", sorted(il.tasks.TASKS))
def test_task_shapes_and_seeds(m, name):
    task = il.tasks.make(name, m, n=N, seed=0)
    assert len(task) == N and task.clean.shape == task.corrupt.shape and task.clean.shape[0] == N
    assert task.answer.shape == task.wrong.shape == (N,)
    assert (task.answer != task.wrong).all()
    # The ids are the tokenized texts (BOS first), nothing padded or cut.
    bos = [m.tokenizer.bos_token_id]
    rows, texts = task.clean.tolist() + task.corrupt.tolist(), task.clean_text + task.corrupt_text
    for ids, text in zip(rows, texts, strict=True):
        assert ids == bos + m.tokenizer.encode(text, add_special_tokens=False)
    again, other = il.tasks.make(name, m, n=N, seed=0), il.tasks.make(name, m, n=N, seed=1)
    for field in ("clean", "corrupt", "answer", "wrong"):
        assert torch.equal(getattr(task, field), getattr(again, field))
    assert task.clean_text != other.clean_text


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in "ABSPO":
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>\\w+)")
    return re.compile(pattern + "$")


@pytest.mark.parametrize("template", range(len(W.IOI_TEMPLATES)))
def test_ioi_corrupt_subject_is_a_third_name(m, template):
    task = il.tasks.make("ioi", m, n=N, seed=3, template=template)
    parse = _template_regex(W.IOI_TEMPLATES[template])
    for clean, corrupt, answer, wrong in zip(task.clean_text, task.corrupt_text, _words(m, task.answer),
                                             _words(m, task.wrong), strict=True):
        c, k = parse.match(clean).groupdict(), parse.match(corrupt).groupdict()
        assert c["S"] in (c["A"], c["B"]) and c["A"] != c["B"]
        assert (k["A"], k["B"], k["P"], k["O"]) == (c["A"], c["B"], c["P"], c["O"])
        assert k["S"] in W.NAMES and k["S"] not in (c["A"], c["B"])
        indirect_object = c["B"] if c["S"] == c["A"] else c["A"]
        assert (answer, wrong) == (indirect_object, c["S"])


def test_greater_than_corrupt_starts_at_01(m):
    task = il.tasks.make("greater_than", m, n=N, seed=0)
    parse = re.compile(r"The (\w+) lasted from the year (\d\d)(\d\d) to the year (\d\d)$")
    for i, (clean, corrupt) in enumerate(zip(task.clean_text, task.corrupt_text, strict=True)):
        event, century, start, century_again = parse.match(clean).groups()
        assert parse.match(corrupt).groups() == (event, century, "01", century)
        assert century == century_again and int(start) == task.meta["start"][i]
        answer, wrong = _words(m, [task.answer[i], task.wrong[i]])
        assert int(answer) > int(start) > int(wrong)


def test_induction_clean_repeats_corrupt_does_not(m):
    span, predict = 8, 3
    task = il.tasks.make("induction", m, n=N, seed=0, span=span, predict=predict)
    assert task.clean.shape[1] == 1 + span + predict
    for clean, corrupt, answer, wrong in zip(task.clean, task.corrupt, task.answer, task.wrong, strict=True):
        first, second = clean[1:1 + span], clean[1 + span:]
        assert len(set(first.tolist())) == span
        assert torch.equal(second, first[:predict]) and answer == first[predict]
        k_first, k_second = corrupt[1:1 + span], corrupt[1 + span:]
        assert torch.equal(k_second, second)
        assert not set(k_first.tolist()) & set(k_second.tolist()) and wrong == k_first[predict]
        assert answer not in k_first


def test_facts_and_register_answers(m):
    capital = dict(zip(W.COUNTRIES, W.CITIES, strict=True))
    facts = il.tasks.make("facts", m, n=N, seed=0)
    for clean, corrupt, answer, wrong in zip(facts.clean_text, facts.corrupt_text, _words(m, facts.answer),
                                             _words(m, facts.wrong), strict=True):
        country, other = clean.split()[-2], corrupt.split()[-2]
        assert country != other and (answer, wrong) == (capital[country], capital[other])

    formal = dict(W.REGISTER_PAIRS)
    register = il.tasks.make("register", m, n=N, seed=0)
    answers, wrongs = _words(m, register.answer), _words(m, register.wrong)
    for clean, corrupt, answer, wrong in zip(register.clean_text, register.corrupt_text, answers, wrongs, strict=True):
        assert clean.split()[1] == W.REGISTER_CUE and corrupt.split()[1] == W.REGISTER_NEUTRAL
        assert clean.split()[2:] == corrupt.split()[2:]
        plain = clean.split()[7].rstrip(".")
        assert (answer, wrong) == (formal[plain], plain)


def test_metric_is_final_position_logit_difference(m):
    task = il.tasks.make("ioi", m, n=5, seed=0)
    logits = torch.randn(5, task.clean.shape[1], len(m.tokenizer), generator=torch.Generator().manual_seed(0))
    by_hand = torch.tensor([logits[i, -1, task.answer[i]] - logits[i, -1, task.wrong[i]] for i in range(5)])
    torch.testing.assert_close(task.metric(logits), by_hand, rtol=0, atol=0)
    torch.testing.assert_close(task.metric(logits[:, -1]), by_hand, rtol=0, atol=0)

    planted = torch.zeros(5, len(m.tokenizer))
    planted[range(5), task.answer] = 5.0
    planted[range(5), task.wrong] = 2.0
    assert task.metric(planted).tolist() == [3.0] * 5
    assert task.accuracy(planted).item() == 1.0
    with pytest.raises(ValueError, match="batch 4 but the task has 5"):
        task.metric(logits[:4])


def _tokenizer_without(missing: set[str], split: dict[str, tuple[str, str]]) -> PreTrainedTokenizerFast:
    """The organisms' vocabulary minus `missing` words; words in `split` become two WordPiece tokens."""
    vocab = [w for w in build_tokenizer().get_vocab() if w not in missing | set(split)]
    vocab += [piece for head, tail in split.values() for piece in (head, "##" + tail)]
    model = models.WordPiece(vocab={w: i for i, w in enumerate(sorted(vocab))}, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>")


def test_split_and_unknown_words_are_dropped_with_a_warning():
    tok = _tokenizer_without(missing={"John", "Alice"}, split={"Mary": ("Ma", "ry"), "Bob": ("Bo", "b")})
    assert len(tok.encode(" Mary", add_special_tokens=False)) == 2
    m = _model(tok)
    with pytest.warns(UserWarning, match=r"4 names split into several tokens or are unknown.*'Mary', 'John'"):
        task = il.tasks.make("ioi", m, n=N, seed=0)
    used = {w for text in task.clean_text + task.corrupt_text for w in text.split()}
    assert used.isdisjoint({"Mary", "John", "Alice", "Bob"})
    assert m.tokenizer.unk_token_id not in task.clean


def test_too_few_single_token_words_is_a_clear_error():
    keep = {"Sarah", "Tom"}
    tok = _tokenizer_without(missing=set(W.NAMES) - keep - {"Mary"}, split={"Mary": ("Ma", "ry")})
    with pytest.warns(UserWarning, match="names"):
        with pytest.raises(ValueError, match="only 2 names are single tokens .* needs 3"):
            il.tasks.make("ioi", _model(tok), n=4, seed=0)


def test_unknown_task_and_bad_n(m):
    with pytest.raises(ValueError, match="unknown task 'iou'; available"):
        il.tasks.make("iou", m)
    with pytest.raises(ValueError, match="n must be a positive int"):
        il.tasks.make("ioi", m, n=0)


def test_task_rows_index_every_field_and_refuse_out_of_range(m):
    task = il.tasks.make("greater_than", m, n=6, seed=1)
    picked = task[[4, 1, 1]]
    assert torch.equal(picked.clean, task.clean[[4, 1, 1]])
    assert torch.equal(picked.answer, task.answer[[4, 1, 1]])
    assert picked.clean_text == [task.clean_text[i] for i in (4, 1, 1)]
    assert torch.equal(picked.meta["start"], task.meta["start"][[4, 1, 1]])
    assert task[2:4].corrupt_text == task.corrupt_text[2:4]
    assert len(task[3]) == 1 and task[-1].clean_text == task.clean_text[-1:]
    with pytest.raises(IndexError, match="out of range"):
        task[[0, 6]]


def test_a_tokenizer_without_a_declared_unknown_token_cannot_make_answer_equal_wrong():
    """Unknown words become the vocabulary's <unk> id, which the tokenizer does not name: today such a
    task can have answer == wrong. Every word used must decode back to itself."""
    vocab = [w for w in build_tokenizer().get_vocab() if w not in {"Mary", "John", "Alice", "Bob"}]
    model = models.WordLevel(vocab={w: i for i, w in enumerate(sorted(vocab))}, unk_token="<unk>")
    raw = Tokenizer(model)
    raw.pre_tokenizer = _pre_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", pad_token="<pad>")  # no unk_token=
    assert tok.unk_token_id is None and tok.encode(" Mary", add_special_tokens=False) != []
    m = _model(tok)
    with pytest.warns(UserWarning, match="4 names"):
        task = il.tasks.make("ioi", m, n=N, seed=0)
    assert (task.answer != task.wrong).all()
    unk = raw.token_to_id("<unk>")
    assert unk not in task.clean and unk not in task.answer and unk not in task.wrong
    for ids, text in zip(task.clean, task.clean_text):
        assert tok.decode(ids[1:]).split() == text.replace(",", " ,").split()


def test_template_out_of_range_is_a_clear_error(m):
    with pytest.raises(ValueError, match=r"template must be an int in 0\.\.\d"):
        il.tasks.make("ioi", m, n=4, template=99)  # today an IndexError from inside the generator


def test_repeated_prompts_are_warned_about_and_distinct_draws_without_repeats(m):
    with pytest.warns(UserWarning, match=r"facts: 16 examples but only \d+ distinct clean prompts"):
        task = il.tasks.make("facts", m, n=16, seed=0)
    assert len(set(task.clean_text)) < 16
    unique = il.tasks.make("facts", m, n=16, seed=0, distinct=True)
    assert len(set(unique.clean_text)) == 16
    n_pairs = len(W.COUNTRIES)
    with pytest.raises(ValueError, match=rf"produced only {n_pairs} distinct clean prompts \(it can produce {n_pairs}\)"):
        il.tasks.make("facts", m, n=n_pairs + 1, seed=0, distinct=True)
