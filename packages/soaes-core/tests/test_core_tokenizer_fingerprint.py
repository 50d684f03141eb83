"""`tokenizer_fingerprint`: the one tokenizer hash of soaes (packed datasets, teacher-logit stores, drafts)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from soaes_core import tokenizer_fingerprint, tokenizer_mismatch


def _word_tokenizer(words: list[str], **special: str) -> Any:
    """A small real fast tokenizer (WordLevel over whitespace) with the given vocabulary order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                  **special)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    return tok


class _SlowTokenizer:
    """Just what a slow (python) tokenizer offers the fingerprint: a vocabulary and special tokens."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.special_tokens_map = {"eos_token": "</s>"}
        self.chat_template = None

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        return [self.vocab[t] for t in tokens] if isinstance(tokens, list) else self.vocab[tokens]


def test_format_and_stability() -> None:
    tok = _word_tokenizer(["state", "asset"])
    fp = tokenizer_fingerprint(tok)
    assert re.fullmatch(r"tokfp1:[0-9a-f]{64}", fp)
    assert tokenizer_fingerprint(copy.deepcopy(tok)) == fp
    # the pad token only fills batches (trainers set pad = eos): no change
    tok.pad_token = tok.eos_token
    assert tokenizer_fingerprint(tok) == fp
    # per-call state left on the backend by an encode with truncation/padding is not part of the tokenizer
    tok(["state asset state"], truncation=True, max_length=2, padding="max_length")
    assert tok.backend_tokenizer.truncation is not None  # transformers leaves it set until the next call
    assert tokenizer_fingerprint(tok) == fp


def test_same_size_other_vocabulary_differs() -> None:
    """The draft/target case: equal vocabulary sizes, other token strings -> other fingerprint."""
    a, b = _word_tokenizer(["state", "asset"]), _word_tokenizer(["asset", "state"])
    assert len(a) == len(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a, with_chat_template=False) != tokenizer_fingerprint(b, with_chat_template=False)


def test_special_tokens_and_template() -> None:
    tok = _word_tokenizer(["state", "asset"])
    fp, ids_only = tokenizer_fingerprint(tok), tokenizer_fingerprint(tok, with_chat_template=False)
    other = copy.deepcopy(tok)
    other.chat_template = "{{ messages[0].content }}"
    assert tokenizer_fingerprint(other) != fp
    assert tokenizer_fingerprint(other, with_chat_template=False) == ids_only
    eos = copy.deepcopy(tok)
    eos.eos_token = "asset"  # same vocabulary, another end-of-sequence token
    assert tokenizer_fingerprint(eos, with_chat_template=False) != ids_only
    added = copy.deepcopy(tok)
    added.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert tokenizer_fingerprint(added, with_chat_template=False) != ids_only


def test_slow_tokenizer_uses_vocabulary() -> None:
    a = _SlowTokenizer({"</s>": 0, "a": 1, "b": 2})
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(_SlowTokenizer({"</s>": 0, "a": 1, "b": 2}))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(_SlowTokenizer({"</s>": 0, "b": 1, "a": 2}))


@pytest.mark.parametrize("stored, expected", [
    ("same", None),
    ("other", "different tokenizer"),
    ("0" * 64, "older soaes"),  # an unversioned hash from before tokfp1
    (None, "older soaes"),
])
def test_mismatch_names_the_problem(stored: str | None, expected: str | None) -> None:
    tok = _word_tokenizer(["state", "asset"])
    values = {"same": tokenizer_fingerprint(tok), "other": tokenizer_fingerprint(_word_tokenizer(["x", "y"]))}
    problem = tokenizer_mismatch(values.get(stored, stored) if stored else None, tok)  # type: ignore[arg-type]
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem and "\n" not in problem


def test_ids_only_covers_the_id_mapping_and_special_tokens_only() -> None:
    """`ids_only=True` (draft vs target): ids and special tokens count; how text is split or templated does not."""
    from tokenizers import pre_tokenizers

    base = _word_tokenizer(["alpha", "beta", "gamma"])
    fp = tokenizer_fingerprint(base, ids_only=True)
    assert re.fullmatch(r"tokids1:[0-9a-f]{64}", fp)
    other_split = _word_tokenizer(["alpha", "beta", "gamma"])
    other_split.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_split.chat_template = None
    assert tokenizer_fingerprint(other_split) != tokenizer_fingerprint(base)
    assert tokenizer_fingerprint(other_split, ids_only=True) == fp
    assert tokenizer_fingerprint(_word_tokenizer(["beta", "alpha", "gamma"]), ids_only=True) != fp  # same size
    assert tokenizer_fingerprint(_word_tokenizer(["alpha", "beta", "gamma"], sep_token="gamma"), ids_only=True) != fp
