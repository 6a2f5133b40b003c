"""Prompt modes: what a prompt shows of the user and the item besides titles.

One entry per mode in :data:`MODES`: ``text`` (titles only), one mode per code format of
:data:`~binllm_core.codes.CODE_FORMATS` (titles and codes written in that format), and ``soft``
(titles, and soft tokens where the codes would be, filled from the encoder's embeddings by a
projector: :mod:`binllm_core.llm.soft`). Code that differs by mode reads an attribute of the
entry instead of comparing names. Torch-free, so rendering prompts never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from binllm_core.codes import CODE_FORMATS

TEXT = "text"
SOFT = "soft"
"""The prompt mode whose user and item slots hold soft tokens."""
USER_TOKEN = "<|user_emb|>"
ITEM_TOKEN = "<|item_emb|>"


@dataclass(frozen=True)
class PromptMode:
    name: str
    code_format: str | None = None
    """The entry of :data:`~binllm_core.codes.CODE_FORMATS` whose text fills the code slots."""
    soft: bool = False
    """The code slots hold soft tokens (the run's projector reads the encoder's embeddings)."""

    @property
    def has_codes(self) -> bool:
        """Its prompts show the user and the item through the encoder (codes or soft tokens),
        so the run trains an encoder and a user or item without a code has no such prompt."""
        return self.soft or self.code_format is not None

    @property
    def template(self) -> str:
        """Which of the run's two templates it fills: ``text`` or ``code``."""
        return "code" if self.has_codes else "text"


MODES: dict[str, PromptMode] = {
    TEXT: PromptMode(TEXT),
    **{name: PromptMode(name, code_format=name) for name in CODE_FORMATS},
    SOFT: PromptMode(SOFT, soft=True),
}
"""Every prompt mode by name. A new code format is a new mode without an edit here."""
CODE_MODES: tuple[str, ...] = tuple(m.name for m in MODES.values() if m.code_format)
"""Prompt modes that hold codes."""
TEXT_AND_CODE_MODES: tuple[str, ...] = tuple(m.name for m in MODES.values() if not m.soft)
"""Prompt modes written in words alone: titles only, or titles and codes in one of the formats
(what ``prompts.modes`` renders by default)."""
