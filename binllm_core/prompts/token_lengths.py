"""Prompt lengths in tokens, exactly as the tokenizer's call gives them, counted per word.

render writes every prompt's ``n_tokens``, and on these CPUs tokenizing is ~90 % of render's time
(10.8k prompts/s against 85k/s for the rendering itself). Prompts are made of few distinct words
(the template's, the titles', the codes'), so most of that work repeats. :class:`TokenLengths`
counts each distinct *chunk* once and adds the counts up.

Why adding up is exact, for a byte-level BPE tokenizer (GPT-2, SmolLM2, ...): its pre-tokenizer
cuts the text with the GPT-2 pattern ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``, and BPE merges only inside a piece. No alternative of
that pattern matches a non-whitespace character followed by a whitespace one (the only space
an alternative can hold after its first character is in a run of whitespace), so a piece always
ends before whitespace that follows non-whitespace. Cutting a text there gives chunks of one
whitespace run and one non-whitespace run, and the pattern cuts each chunk alone exactly as in
the text: its one look-ahead, ``(?!\\S)``, sees a character inside the chunk or the text's end.
Whitespace here is Unicode's White_Space property, the ``\\s`` of the tokenizers' regex engine
(Oniguruma); Python's ``\\s`` also takes U+001C..U+001F, so the class is spelled out.

Anything else takes the tokenizer's whole-text path: a text holding an added token (split out
before pre-tokenization), a tokenizer with a normalizer, another pre-tokenizer (Llama 3's
pattern, for one, lets punctuation take the newlines after it), BPE dropout, padding or
truncation set on the backend, or a slow tokenizer.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""Unicode's White_Space characters, as a regex class body."""
_CHUNK = re.compile(f"[{WHITE_SPACE}]*[^{WHITE_SPACE}]+|[{WHITE_SPACE}]+")
MAX_CHUNKS = 1 << 20
"""Counts kept at most (then started over): a catalog's words, not its prompts."""


class TokenLengths:
    """``texts -> lengths``: each text's length in tokens without special tokens, the lengths
    of ``tokenizer(texts, add_special_tokens=False)``; chunk by chunk where that is exact."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if _encodes_plainly(backend) else None
        self.by_chunk = self.backend is not None and _cuts_before_whitespace(backend)
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._counts: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> list[int]:
        if not self.by_chunk:
            return self._whole(texts)
        lengths: list[int | None] = [None] * len(texts)
        chunked: list[tuple[int, list[str]]] = []
        whole: list[int] = []
        for i, text in enumerate(texts):
            if self._added is not None and self._added.search(text):
                whole.append(i)
            else:
                chunked.append((i, _CHUNK.findall(text)))
        new = list({c for _, chunks in chunked for c in chunks if c not in self._counts})
        if len(self._counts) + len(new) > MAX_CHUNKS:
            self._counts = {}
            new = list({c for _, chunks in chunked for c in chunks})
        self._counts.update(zip(new, self._whole(new), strict=True))
        count = self._counts.__getitem__
        for i, chunks in chunked:
            lengths[i] = sum(map(count, chunks))
        for i, n in zip(whole, self._whole([texts[i] for i in whole]), strict=True):
            lengths[i] = n
        return lengths  # type: ignore[return-value]

    def _whole(self, texts: list[str]) -> list[int]:
        """The tokenizer on whole texts: its Rust backend without character offsets
        (``encode_batch_fast``, ~2x the call) where it neither pads nor truncates."""
        if not texts:
            return []
        if self.backend is not None:
            encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return [len(e.ids) for e in encoded]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encodes_plainly(backend: object) -> bool:
    """A fast tokenizer's backend that neither pads nor truncates (a tokenizer.json may set
    either; the call's lengths ignore both when not asked for them)."""
    return (
        backend is not None
        and getattr(backend, "padding", None) is None
        and getattr(backend, "truncation", None) is None
        and hasattr(backend, "encode_batch_fast")
    )


def _cuts_before_whitespace(backend: object) -> bool:
    """Whether the backend is a byte-level BPE whose pieces never cross from non-whitespace
    into whitespace (module docstring): no normalizer, GPT-2's pattern, no dropout."""
    from tokenizers import models, pre_tokenizers

    pre = backend.pre_tokenizer  # type: ignore[attr-defined]
    return (
        backend.normalizer is None  # type: ignore[attr-defined]
        and isinstance(pre, pre_tokenizers.ByteLevel)
        and pre.use_regex
        and not pre.add_prefix_space
        and isinstance(backend.model, models.BPE)  # type: ignore[attr-defined]
        and not backend.model.dropout  # type: ignore[attr-defined]
    )
