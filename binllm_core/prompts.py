"""Prompt templates and rendering: samples, titles and codes into one prompt per sample and mode.

The ``paper`` style reproduces the official BinLLM/CoLLM/TALLRec prompt files character for
character, including two quirks: the answer cue is preceded by a literal backslash-n (the files
hold ``\\n`` as two characters) and an empty history reads ``unkow``. The ``default`` style keeps
the wording and fixes both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from binllm_core.codes import CODE_FORMATS, CODE_MODES
from binllm_core.config import PLACEHOLDERS, PromptConfig
from binllm_core.errors import DataError
from binllm_core.soft import ITEM_TOKEN, SOFT, USER_TOKEN

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

PROMPT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("split", pa.string()),
        ("valid_small", pa.bool_()),
        ("mode", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("not_cold", pa.bool_()),
        ("warm", pa.bool_()),
        ("prompt", pa.string()),
        ("soft_ids", pa.list_(pa.int32())),
    ]
)
"""``soft_ids``: in ``soft`` prompts, the uid or iid of each soft token in order of appearance
(null in the other modes)."""
SAMPLE_COLUMNS = [n for n in PROMPT_SCHEMA.names if n not in ("mode", "prompt", "soft_ids")] + [
    "history"
]


@dataclass(frozen=True)
class Templates:
    """The two templates a run uses and the text standing for an empty history."""

    text: str
    code: str
    empty_history: str
    soft_history: bool = False
    """``soft`` prompts carry an item soft token after each history title."""

    def for_mode(self, mode: str) -> str:
        return self.text if mode == "text" else self.code

    def history_marker(self, mode: str) -> str:
        """What follows each history title in ``mode``'s prompts (empty: nothing)."""
        return ITEM_TOKEN if mode == SOFT and self.soft_history else ""

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
        user's prompts with one prefix pass, :mod:`binllm_core.prefix_sharing`)."""
        return PrefixCut(tuple(a for a in map(_item_anchor, (self.text, self.code)) if a))


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


@dataclass(frozen=True)
class Lookups:
    """Titles by ``iid`` and codes by ``uid``/``iid`` for each code mode (and for ``soft``, the
    soft token of every entity the encoder saw)."""

    titles: Mapping[int, str]
    user_codes: Mapping[str, Mapping[int, str]]
    item_codes: Mapping[str, Mapping[int, str]]


def lookups_from_tables(items: pa.Table, item_map: pa.Table, codes: pa.Table | None) -> Lookups:
    """Build the lookups from ``ingest/items``, ``samples/item_map`` and ``encode/codes``
    (entity, id, bits). Each format's text is made from the bits here, so codes encoded before a
    format existed are written in it too."""
    title_of = dict(zip(items["item"].to_pylist(), items["title"].to_pylist(), strict=True))
    titles = {
        iid: str(title_of.get(item) or item)
        for item, iid in zip(item_map["item"].to_pylist(), item_map["iid"].to_pylist(), strict=True)
    }
    user_codes: dict[str, dict[int, str]] = {m: {} for m in CODE_MODES}
    item_codes: dict[str, dict[int, str]] = {m: {} for m in CODE_MODES}
    if codes is not None and codes.num_rows:
        entity, ids = codes["entity"].to_pylist(), codes["id"].to_pylist()
        bits = np.stack(codes["bits"].to_numpy(zero_copy_only=False))
        for mode in CODE_MODES:
            texts = CODE_FORMATS[mode].to_text(bits)
            for ent, i, code in zip(entity, ids, texts, strict=True):
                (user_codes if ent == "user" else item_codes)[mode][i] = code
    user_codes[SOFT] = dict.fromkeys(user_codes[CODE_MODES[0]], USER_TOKEN)
    item_codes[SOFT] = dict.fromkeys(item_codes[CODE_MODES[0]], ITEM_TOKEN)
    return Lookups(titles, user_codes, item_codes)


def check_codes(
    uids: Sequence[int], iids: Sequence[int], lookups: Lookups, modes: Sequence[str]
) -> None:
    """Fail in one line when a sample's user or item has no code (before any rendering)."""
    for mode in (m for m in modes if m != "text"):
        for what, ids, codes in (
            ("user uid", uids, lookups.user_codes[mode]),
            ("item iid", iids, lookups.item_codes[mode]),
        ):
            missing = sorted(set(ids) - set(codes))
            if missing:
                raise DataError(
                    f"{what}={missing[0]} has no {mode} code: the encoder never saw it "
                    f"({len(missing)} such ids)",
                    "encode/codes",
                    "re-run encode on the same samples output, or render text prompts only",
                )


def render_table(
    samples: pa.Table,
    lookups: Lookups,
    templates: Templates,
    modes: Sequence[str],
    history_len: int,
) -> pa.Table:
    """One prompt row per sample and mode (modes in the given order within each sample)."""
    cols = {n: samples[n].to_pylist() for n in SAMPLE_COLUMNS}
    out: dict[str, list] = {n: [] for n in PROMPT_SCHEMA.names}
    markers = {mode: templates.history_marker(mode) for mode in modes}
    for row in range(samples.num_rows):
        uid, iid = cols["uid"][row], cols["iid"][row]
        past = cols["history"][row] or []
        try:
            history = {
                marker: title_list(
                    past, lookups.titles, history_len, templates.empty_history, marker
                )
                for marker in set(markers.values())
            }
            target = lookups.titles[iid]
        except KeyError as err:
            raise DataError(
                f"item iid={err.args[0]} of sample {cols['sample_id'][row]} has no title",
                "samples/item_map + ingest/items",
                "re-run the samples stage on the same ingest output",
            ) from None
        for mode in modes:
            codes = None
            if mode != "text":
                codes = (
                    code_of(lookups.user_codes[mode], uid, "user uid", mode),
                    code_of(lookups.item_codes[mode], iid, "item iid", mode),
                )
            for name in SAMPLE_COLUMNS[:-1]:
                out[name].append(cols[name][row])
            out["mode"].append(mode)
            out["prompt"].append(prompt_of(templates, mode, history[markers[mode]], target, codes))
            soft = templates.soft_ids(past, history_len, uid, iid) if mode == SOFT else None
            out["soft_ids"].append(soft)
    return pa.table(out, schema=PROMPT_SCHEMA)


def prompt_of(
    templates: Templates,
    mode: str,
    history: str,
    target_title: str,
    codes: tuple[str, str] | None = None,
) -> str:
    """One prompt: the mode's template with the history's title list, the target's title and,
    in a code mode, the (user, item) codes. Every prompt binllm renders is made here."""
    values = {"<ItemTitleList>": history, "<TargetItemTitle>": f'"{target_title}"'}
    if mode != "text":
        assert codes is not None, f"{mode} prompts need the user and item codes"
        values["<UserID>"], values["<TargetItemID>"] = codes
    return fill(templates.for_mode(mode), values)


def prompt_with_soft(
    templates: Templates,
    mode: str,
    history: Sequence[int],
    titles: Mapping[int, str],
    limit: int,
    target_title: str,
    codes: tuple[str, str] | None,
    uid: int,
    iid: int,
) -> tuple[str, list[int] | None]:
    """One prompt from a history of item ids (:func:`title_list`, :func:`prompt_of`) and, in
    ``soft`` mode, its soft ids (None otherwise)."""
    marker = templates.history_marker(mode)
    shown = title_list(history, titles, limit, templates.empty_history, marker)
    prompt = prompt_of(templates, mode, shown, target_title, codes)
    return prompt, templates.soft_ids(history, limit, uid, iid) if mode == SOFT else None


def code_of(codes: Mapping[int, str], key: int, what: str, mode: str) -> str:
    """The code of an entity, or a one-line error: the encoder never saw it."""
    code = codes.get(key)
    if code is None:
        raise DataError(
            f"{what}={key} has no {mode} code: the encoder never saw it",
            "encode/codes",
            "re-run encode on the same samples output, or render text prompts only",
        )
    return code
