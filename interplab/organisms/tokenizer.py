"""The organisms' word-level tokenizer, built with `tokenizers`.

Words and punctuation are tokens; runs of digits split into two-digit tokens,
so "1732" is "17" "32" as in GPT-2, and a two-digit year is one token.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import corpus, words

SPECIALS = ("<pad>", "<unk>", "<bos>")


def _pre_tokenizer():
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")]
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic: the vocabulary is every word list plus every piece of a fixed corpus sample, sorted."""
    pre = _pre_tokenizer()
    pieces = {f"{i:02d}" for i in range(100)}
    for value in vars(words).values():
        if isinstance(value, tuple | list):
            flat = (w for item in value for w in (item if isinstance(item, tuple) else [item]))
            pieces.update(w for w in flat if isinstance(w, str) and w.isalpha())
    for text in corpus.sample_text(seed=0):
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + sorted(pieces))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )
