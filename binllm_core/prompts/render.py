"""Rendering: samples, titles and codes into one prompt per sample and mode, with the run's
:mod:`~binllm_core.prompts.templates`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from binllm_core.codes import CODE_FORMATS
from binllm_core.errors import DataError
from binllm_core.modes import CODE_MODES, ITEM_TOKEN, MODES, SOFT, USER_TOKEN
from binllm_core.prompts.templates import Templates, fill, title_list

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
    for mode in (m for m in modes if MODES[m].has_codes):
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
            if MODES[mode].has_codes:
                codes = (
                    code_of(lookups.user_codes[mode], uid, "user uid", mode),
                    code_of(lookups.item_codes[mode], iid, "item iid", mode),
                )
            for name in SAMPLE_COLUMNS[:-1]:
                out[name].append(cols[name][row])
            out["mode"].append(mode)
            out["prompt"].append(prompt_of(templates, mode, history[markers[mode]], target, codes))
            soft = templates.soft_ids(past, history_len, uid, iid) if MODES[mode].soft else None
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
    if MODES[mode].has_codes:
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
    return prompt, templates.soft_ids(history, limit, uid, iid) if MODES[mode].soft else None


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
