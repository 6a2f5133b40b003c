"""Token lengths per chunk are the lengths of the tokenizer's call, on the texts render makes and
on texts built to break the chunking."""

from __future__ import annotations

import random

import pytest

from binllm_core.config import ModelConfig
from binllm_core.llm.backbone import load_tokenizer
from binllm_core.modes import ITEM_TOKEN, USER_TOKEN
from binllm_core.prompts.token_lengths import WHITE_SPACE, TokenLengths
from tests.conftest import SMOLLM_GGUF

needs_smollm = pytest.mark.skipif(
    not SMOLLM_GGUF.exists(), reason=f"shared model not found at {SMOLLM_GGUF}"
)

HARD_TEXTS = [
    "A user watched Misérables, Les (1995) and 89.210.30.178: Yes or No?",
    f"{USER_TOKEN} liked{ITEM_TOKEN} 0110 1011 #Answer:",
    "a title with <|im_end|> inside, and one more <|user_emb|>",
    "",
    " ",
    "   leading spaces, trailing spaces   ",
    "\n#Answer:",
    "double  space, tab\tand\t\ttabs, new\n\nlines\r\nand\x0bvertical\x0cfeed",
    "no-break\xa0space, ideographic\u3000space, em\u2003space, narrow\u202fspace",
    "file\x1cseparators\x1d are\x1e not\x1f whitespace to the tokenizer",
    "Schindler's List, 'Til There Was You, it'll, we've, they're, I'm, he'd",
    "digits 1234567890 and 3.14159, codes 0101-1100 and ff.a0.3c.9e",
    "emoji 🎬🍿 and CJK 千と千尋の神隠し, Greek Ωμέγα, Arabic مرحبا",
    '"quoted", "Toy Story (1995)", "Heat (1995)"?',
    "word " * 300,
]


def _called(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _random_texts(n: int, seed: int) -> list[str]:
    """Random strings over an alphabet of letters, digits, punctuation, apostrophes and every
    kind of whitespace (also the characters only Python counts as whitespace)."""
    ws = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u200a"]
    ws += ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\x1c", "\x1f"]
    alphabet = [*"aZé日", *"07", *".,:;!?\"'()-#", "'s", "'ll", *ws, " ", " ", "  "]
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("backbone", ["tiny", pytest.param(str(SMOLLM_GGUF), marks=needs_smollm)])
def test_lengths_are_those_of_the_call(backbone: str) -> None:
    tokenizer = load_tokenizer(ModelConfig(backbone=backbone))
    lengths = TokenLengths(tokenizer)
    texts = HARD_TEXTS + _random_texts(3000, seed=7)
    assert lengths(texts) == _called(tokenizer, texts)
    assert lengths(list(reversed(texts))) == _called(tokenizer, list(reversed(texts)))


@needs_smollm
def test_byte_level_bpe_is_counted_by_chunk_and_stays_exact() -> None:
    """SmolLM2's tokenizer takes the chunk path (the speed render relies on); the counts stay
    exact with the chunk memory warm, after it is started over, and with padding set."""
    tokenizer = load_tokenizer(ModelConfig(backbone=str(SMOLLM_GGUF)))
    lengths = TokenLengths(tokenizer)
    assert lengths.by_chunk
    texts = HARD_TEXTS + _random_texts(500, seed=11)
    expected = _called(tokenizer, texts)
    assert lengths(texts) == expected and lengths(texts) == expected
    import binllm_core.prompts.token_lengths as module

    limit, module.MAX_CHUNKS = module.MAX_CHUNKS, 8
    try:
        assert lengths(texts) == expected  # started over in every batch
    finally:
        module.MAX_CHUNKS = limit
    tokenizer.backend_tokenizer.enable_padding(length=512)  # as a tokenizer.json may set it
    padded = TokenLengths(tokenizer)
    assert not padded.by_chunk and padded(texts) == expected


@needs_smollm
def test_other_pre_tokenizers_take_the_whole_text() -> None:
    """A pattern that lets punctuation take the newlines after it (Llama 3's does) is not cut
    by chunk: the lengths still come from the whole texts."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = load_tokenizer(ModelConfig(backbone=str(SMOLLM_GGUF)))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s+|\p{L}+|\p{N}"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    lengths = TokenLengths(tokenizer)
    texts = ["end.\n\nnext", "a.\nb", *HARD_TEXTS]
    assert not lengths.by_chunk and lengths(texts) == _called(tokenizer, texts)


def test_white_space_is_unicode_white_space() -> None:
    """The class spelled out is exactly Unicode's White_Space (Python's isspace less
    U+001C..U+001F), the whitespace of the tokenizers' regex engine."""
    import re

    spelled = re.compile(f"[{WHITE_SPACE}]")
    found = {chr(c) for c in range(0x110000) if spelled.fullmatch(chr(c))}
    assert found == {chr(c) for c in range(0x110000) if chr(c).isspace()} - set("\x1c\x1d\x1e\x1f")
