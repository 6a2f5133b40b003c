"""Arbitrary (user, item) pairs -> prompts, with what a trained run knows about them.

A candidate names a user and an item by their *source* ids (strings, as in the raw data). The
run supplies the rest: ``samples/user_map`` and ``samples/item_map`` turn them into ``uid``/``iid``;
the user's history is their latest positives in the run's ``samples`` (every split, oldest first,
the last ``history_len`` kept); codes come from ``encode/codes``; titles from ``ingest/items``.

A pair whose user or item the encoder never saw has no code. It is never given a wrong one: by
the ``unknown`` policy it is rendered as a ``text`` prompt and flagged ``cold`` (``text``), left
out (``skip``) or stops the job with its row (``error``). The policy only matters for code modes;
in ``text`` mode every pair is rendered and ``cold`` still says whether the encoder knew it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from binllm_core.errors import DataError
from binllm_core.modes import MODES
from binllm_core.prompts.render import Lookups, lookups_from_tables, prompt_with_soft
from binllm_core.prompts.templates import Templates

UNKNOWN_POLICIES = ("text", "skip", "error")

PAIR_PROMPTS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("mode", pa.string()),
        ("cold", pa.bool_()),
        ("prompt", pa.string()),
        ("prompt_hash", pa.string()),
        ("soft_ids", pa.list_(pa.int32())),
    ]
)
"""Rendered candidates: ``row`` is the position in the input; ``uid``/``iid`` are 0 when the run
does not know the user/item; ``label`` is null unless the input had one; ``cold`` is true when the
user or the item has no code; ``prompt_hash`` (16 hex of SHA-1) identifies the prompt text;
``soft_ids``: the ids of a soft prompt's soft tokens (null in the other modes)."""


@dataclass(frozen=True)
class RunLookups:
    """Everything a trained run knows that a candidate prompt needs."""

    uid_of: Mapping[str, int]
    iid_of: Mapping[str, int]
    title_of_item: Mapping[str, str]
    histories: Mapping[int, list[int]]
    prompt: Lookups


def build_lookups(
    items: pa.Table,
    user_map: pa.Table,
    item_map: pa.Table,
    codes: pa.Table | None,
    samples: pa.Table,
    history_len: int,
) -> RunLookups:
    """Lookups from ``ingest/items`` (item, title), ``samples/user_map`` (user, uid),
    ``samples/item_map`` (item, iid), ``encode/codes`` and ``samples/samples`` (uid, iid, label,
    timestamp, sample_id)."""
    title_of_item = {
        str(i): str(t) if t is not None else str(i)
        for i, t in zip(items["item"].to_pylist(), items["title"].to_pylist(), strict=True)
    }
    uid_of = dict(
        zip(map(str, user_map["user"].to_pylist()), user_map["uid"].to_pylist(), strict=True)
    )
    iid_of = dict(
        zip(map(str, item_map["item"].to_pylist()), item_map["iid"].to_pylist(), strict=True)
    )
    positives = (
        pl.from_arrow(samples.select(["sample_id", "uid", "iid", "label", "timestamp"]))
        .filter(pl.col("label") == 1)
        .sort(["uid", "timestamp", "sample_id"])
        .group_by("uid", maintain_order=True)
        .agg(pl.col("iid").tail(max(history_len, 0)))
    )
    histories = dict(zip(positives["uid"].to_list(), positives["iid"].to_list(), strict=True))
    return RunLookups(
        uid_of, iid_of, title_of_item, histories, lookups_from_tables(items, item_map, codes)
    )


def check_pairs(pairs: pa.Table, where: str) -> pa.Table:
    """The ``user``/``item`` (strings) and optional ``label`` (int8) columns of an input table."""
    missing = [c for c in ("user", "item") if c not in pairs.column_names]
    if missing:
        raise DataError(
            f"the candidates table has no {missing[0]} column (it has: "
            f"{', '.join(pairs.column_names) or 'none'})",
            where,
            "give a Parquet table with string columns user and item (source ids)",
        )
    pairs = pa.table({n: _plain(pairs[n]) for n in pairs.column_names})
    columns = {name: check_ids(pairs[name], name, "candidates", where) for name in ("user", "item")}
    columns["label"] = _labels(pairs, where)
    return pa.table(columns)


def check_ids(col: pa.ChunkedArray, name: str, table: str, where: str) -> pa.ChunkedArray:
    """A column of source ids as strings: strings or integers, none empty; a float id (which
    never matches the run's ids) or an empty one is one line naming its row."""
    if pa.types.is_null(col.type):  # no value at all (an empty frame written by pandas)
        col = pa.chunked_array([pa.nulls(len(col), pa.string())])
    if not (
        pa.types.is_string(col.type)
        or pa.types.is_large_string(col.type)
        or pa.types.is_integer(col.type)
    ):
        raise DataError(
            f"the {table} table's {name} column holds {col.type}, not ids",
            where,
            f"write {name} as strings (source ids such as '196') or integers; a float id "
            "never matches the run's ids",
        )
    col = pc.cast(col, pa.string()) if col.type != pa.string() else col
    empty = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise DataError(f"the {table} table has an empty {name} in row {row}", where)
    return col


def _labels(pairs: pa.Table, where: str) -> pa.Array:
    """The optional ``label`` column as int8 0/1 (nulls allowed; none when absent)."""
    if "label" not in pairs.column_names:
        return pa.nulls(pairs.num_rows, pa.int8())
    col = pairs["label"]
    if pa.types.is_null(col.type):
        return pa.nulls(pairs.num_rows, pa.int8())
    numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
    if not (numeric or pa.types.is_boolean(col.type)):
        raise DataError(
            f"the candidates table's label column holds {col.type}",
            where,
            "give label as 0/1 integers or booleans, or leave the column out",
        )
    # 0.0/1.0 are labels too (pandas writes an integer column with a missing value as floats).
    floats = pa.types.is_floating(col.type)
    labels = col if floats else pc.cast(col, pa.int64())
    allowed = pa.array([0.0, 1.0] if floats else [0, 1], labels.type)
    bad = pc.and_(pc.is_valid(labels), pc.invert(pc.is_in(labels, allowed)))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise DataError(
            f"the candidates table has label {labels[row].as_py()} in row {row}",
            where,
            "labels are 0 or 1 (or empty)",
        )
    return pc.cast(labels, pa.int8())


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary-encoded column (a pandas categorical) as its plain values."""
    if pa.types.is_dictionary(column.type):
        return pc.cast(column, column.type.value_type)
    return column


def prompt_hash(prompt: str, soft_ids: list[int] | None = None) -> str:
    """What identifies a prompt (16 hex of SHA-1): its text, and the ids of its soft tokens
    (soft prompts of different entities can read the same)."""
    key = prompt if soft_ids is None else f"{prompt}\x00{soft_ids}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def render_candidates(
    pairs: pa.Table,
    lookups: RunLookups,
    templates: Templates,
    mode: str,
    unknown: str,
    history_len: int,
    where: str = "candidates",
) -> pa.Table:
    """One prompt row per candidate (``row`` must be a column: the input position), in order.

    Rows the ``unknown`` policy skips are left out; see the module docstring."""
    if unknown not in UNKNOWN_POLICIES:
        raise DataError(f"unknown-candidate policy {unknown!r}", todo="use text, skip or error")
    rows = pairs["row"].to_pylist()
    users, items = pairs["user"].to_pylist(), pairs["item"].to_pylist()
    labels = pairs["label"].to_pylist()
    needs_code = MODES[mode].has_codes
    user_codes = lookups.prompt.user_codes.get(mode, {}) if needs_code else {}
    item_codes = lookups.prompt.item_codes.get(mode, {}) if needs_code else {}
    all_user_codes = _any_codes(lookups.prompt.user_codes)
    all_item_codes = _any_codes(lookups.prompt.item_codes)
    out: dict[str, list] = {n: [] for n in PAIR_PROMPTS_SCHEMA.names}
    for row, user, item, label in zip(rows, users, items, labels, strict=True):
        uid, iid = lookups.uid_of.get(user, 0), lookups.iid_of.get(item, 0)
        user_known = uid != 0 and uid in all_user_codes
        item_known = iid != 0 and iid in all_item_codes
        cold = not (user_known and item_known)
        row_mode = mode
        if needs_code and (uid not in user_codes or iid not in item_codes):
            if unknown == "skip":
                continue
            if unknown == "error":
                what = f"user {user!r}" if uid not in user_codes else f"item {item!r}"
                raise DataError(
                    f"{what} of candidate row {row} was never seen by the encoder (no {mode} code)",
                    where,
                    "set score.unknown=text to score it with the text prompt, or skip",
                )
            row_mode = "text"
        codes = (user_codes[uid], item_codes[iid]) if MODES[row_mode].has_codes else None
        prompt, soft = prompt_with_soft(
            templates,
            row_mode,
            lookups.histories.get(uid, []) if uid else [],
            lookups.prompt.titles,
            history_len,
            _title(lookups, item, iid),
            codes,
            uid,
            iid,
        )
        for name, value in (
            ("row", row),
            ("user", user),
            ("item", item),
            ("uid", uid),
            ("iid", iid),
            ("label", label),
            ("mode", row_mode),
            ("cold", cold),
            ("prompt", prompt),
            ("prompt_hash", prompt_hash(prompt, soft)),
            ("soft_ids", soft),
        ):
            out[name].append(value)
    return pa.table(out, schema=PAIR_PROMPTS_SCHEMA)


def _title(lookups: RunLookups, item: str, iid: int) -> str:
    if iid and iid in lookups.prompt.titles:
        return lookups.prompt.titles[iid]
    return lookups.title_of_item.get(item) or item


def _any_codes(by_mode: Mapping[str, Mapping[int, str]]) -> set[int]:
    known: set[int] = set()
    for codes in by_mode.values():
        known.update(codes)
    return known


def with_row_numbers(pairs: pa.Table, start: int = 0) -> pa.Table:
    """``pairs`` with a leading ``row`` column (input positions from ``start``)."""
    return pairs.add_column(0, "row", pa.array(range(start, start + pairs.num_rows), pa.int64()))


def distinct_pairs(pairs: pa.Table) -> pa.Table:
    """Each (user, item) once, first occurrence kept, in input order."""
    frame = pl.from_arrow(pairs).unique(subset=["user", "item"], keep="first", maintain_order=True)
    return frame.to_arrow().cast(pairs.schema)


def summary(prompts: pa.Table, n_input: int) -> dict[str, int]:
    """Counts for a manifest: rendered, cold and skipped rows, rows per mode."""
    modes: Sequence[dict] = pc.value_counts(prompts["mode"]).to_pylist() if prompts.num_rows else []
    return {
        "input_rows": n_input,
        "rendered_rows": prompts.num_rows,
        "cold_rows": int(pc.sum(prompts["cold"]).as_py() or 0) if prompts.num_rows else 0,
        "skipped_rows": n_input - prompts.num_rows,
        "rows_per_mode": {m["values"]: m["counts"] for m in modes},
    }
