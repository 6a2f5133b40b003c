"""Prompt templates and filling them.

The ``paper`` style reproduces the official BinLLM/CoLLM/TALLRec prompt files character for
character, including two quirks: the answer cue is preceded by a literal backslash-n (the files
hold ``\\n`` as two characters) and an empty history reads ``unkow``. The ``default`` style keeps
the wording and fixes both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from binllm_core.config import PLACEHOLDERS, PromptConfig
from binllm_core.modes import ITEM_TOKEN, MODES

_CUE = ' Answer with "Yes" or "No". \\n#Answer:'
PAPER_TEXT = (
    "#Question: A user has given high ratings to the following {items}: <ItemTitleList>. "
    "Leverage the information to predict whether the user would enjoy the {item} titled "
    "<TargetItemTitle>?" + _CUE
)
PAPER_CODE = (
    "#Question: A user has given high ratings to the following {items}: <ItemTitleList>. "
    "Additionally, we have information about the user's preferences encoded in the feature "
    "<UserID>. Using all available information, make a prediction about whether the user would "
    "enjoy the {item} titled <TargetItemTitle> with the feature <TargetItemID>?" + _CUE
)
EMPTY_HISTORY = {"paper": "unkow", "default": "none"}

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


ITEM_PLACEHOLDERS = ("<TargetItemTitle>", "<TargetItemID>")


def _item_anchor(template: str) -> str:
    """The literal text of ``template`` right before its first item placeholder (after the
    placeholder before it): in a filled prompt, the item's part begins where it ends."""
    first = min((template.find(p) for p in ITEM_PLACEHOLDERS if p in template), default=-1)
    if first < 0:
        return ""
    head = template[:first]
    return head[max((m.end() for m in _PLACEHOLDER_RE.finditer(head)), default=0) :]


@dataclass(frozen=True)
class Templates:
    """The two templates a run uses and the text standing for an empty history."""

    text: str
    code: str
    empty_history: str
    soft_history: bool = False
    """``soft`` prompts carry an item soft token after each history title."""

    def for_mode(self, mode: str) -> str:
        return self.code if MODES[mode].has_codes else self.text

    def history_marker(self, mode: str) -> str:
        """What follows each history title in ``mode``'s prompts (empty: nothing)."""
        return ITEM_TOKEN if MODES[mode].soft and self.soft_history else ""

    def soft_ids(self, history: Sequence[int], limit: int, uid: int, iid: int) -> list[int]:
        """The ids of a soft prompt's soft tokens in order of appearance: the shown history's
        items (with ``soft_history``), the user, the target item, as the code template places
        ``<ItemTitleList>``, ``<UserID>`` and ``<TargetItemID>``."""
        shown = shown_history(history, limit) if self.soft_history else []
        ids: dict[str, list[int]] = {
            "<ItemTitleList>": shown,
            "<UserID>": [uid],
            "<TargetItemID>": [iid],
        }
        return [i for m in _PLACEHOLDER_RE.finditer(self.code) for i in ids.get(m.group(0), [])]

    def prefix_cut(self) -> PrefixCut:
        """Where a prompt of these templates stops depending on the user alone (for scoring a
        user's prompts with one prefix pass, :mod:`binllm_core.llm.prefix_sharing`)."""
        return PrefixCut(tuple(a for a in map(_item_anchor, (self.text, self.code)) if a))


@dataclass(frozen=True)
class PrefixCut:
    """A prompt -> how many of its first characters hold the user's part: up to the end of the
    last occurrence of a template's item anchor (0 when none occurs).

    A cut only decides how much can be shared, never a score: prompts share a prefix pass only
    when their tokens up to the cut are identical. A title that happens to hold an anchor can
    therefore cost sharing, not correctness."""

    anchors: tuple[str, ...]

    def __call__(self, prompt: str) -> int:
        ends = [prompt.rfind(a) + len(a) for a in self.anchors if a in prompt]
        return max(ends, default=0)


def builtin_template(style: str, domain: str, with_codes: bool) -> str:
    """The official template text for ``style`` (``paper``/``default``) and ``domain``."""
    text = (PAPER_CODE if with_codes else PAPER_TEXT).format(items=f"{domain}s", item=domain)
    if style == "default":
        text = text.replace(" \\n#Answer:", "\n#Answer:")
    return text


def templates_from_config(cfg: PromptConfig) -> Templates:
    """Resolve built-in or own templates, after the prompt rules (:meth:`PromptConfig.check`,
    also run when a config is loaded) for a config built in code."""
    cfg.check("prompts")
    text = cfg.text_template or builtin_template(cfg.style, cfg.domain, with_codes=False)
    code = cfg.code_template or builtin_template(cfg.style, cfg.domain, with_codes=True)
    return Templates(text, code, cfg.empty_history or EMPTY_HISTORY[cfg.style], cfg.soft_history)


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every placeholder in one pass, so a title holding ``<UserID>`` stays as it is."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(0), m.group(0)), template)


def shown_history(history: Sequence[int], limit: int) -> list[int]:
    """The items of a history (oldest first) a prompt shows: the last ``limit``."""
    return list(history)[-limit:] if limit > 0 else []


def title_list(
    history: Sequence[int], titles: Mapping[int, str], limit: int, empty: str, marker: str = ""
) -> str:
    """The last ``limit`` history titles (history is oldest first), quoted and comma-joined;
    each followed by `` marker`` when one is given (a soft token)."""
    recent = shown_history(history, limit)
    if not recent:
        return empty
    after = f" {marker}" if marker else ""
    return ", ".join(f'"{titles[i]}"{after}' for i in recent)
