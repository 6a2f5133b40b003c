"""The data protocol: interactions -> labelled, split samples with histories, and id maps.

Pure polars over whole frames; every rule is a :class:`ProtocolConfig` field. The steps follow
the official BinLLM/CoLLM notebooks (see ``reference/binllm_method.md`` section 1):

1. ``label = rating >= label_min_rating``.
2. ``keep_years`` (UTC calendar years), then the one-pass user/item activity filter: both counts
   are taken on the rows left after ``keep_years``, before either filter is applied.
3. The split (``per_user``, ``global``, ``months``, ``months_then_halves``); rows outside every
   month range are dropped.
4. Ids: ``uid``/``iid`` 1-based in order of first appearance in source ``row`` order among the
   kept rows (0 is padding); ``sample_id`` is the rank of ``row`` among the kept rows.
5. ``history``: the last ``history_len`` positives of the user strictly before the sample's
   second (any split), oldest first; ``not_cold``, ``warm`` and ``valid_small`` flags.

Time ties are always broken by the source ``row`` (stable), so a re-run gives identical rows.
Nothing here loops over users in Python, and no user's full positive list is joined onto rows:
the history is a gather from a per-positive window table (see :func:`_histories`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.config import ProtocolConfig, month_range
from binllm_core.errors import DataError, StageError

SPLITS = ("train", "valid", "test")
SPLIT_DTYPE = pl.Enum(SPLITS)
"""``split`` while the protocol runs (one byte a row); a string in the output."""
INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp", "row")
# Added to ``fraction * n`` before flooring so that e.g. 0.29 * 100 = 28.999999999999996 cuts at 29.
EPS = 1e-9
# Rows per chunk when cutting the history lists (bounds the temporary index arrays).
SLICE_CHUNK = 1_000_000

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.Int64(),
    "uid": pl.Int32(),
    "iid": pl.Int32(),
    "label": pl.Int8(),
    "rating": pl.Float32(),
    "timestamp": pl.Int64(),
    "split": pl.String(),
    "valid_small": pl.Boolean(),
    "history": pl.List(pl.Int32()),
    "not_cold": pl.Boolean(),
    "warm": pl.Boolean(),
}


@dataclass
class ProtocolResult:
    """The output of :func:`build_samples`."""

    samples: pl.DataFrame
    """One row per kept interaction, columns :data:`SAMPLES_SCHEMA`, ordered by ``sample_id``."""
    dropped: pl.DataFrame
    """Interactions dropped as orphans or exact duplicates: the interaction columns and a
    ``reason``."""
    user_map: pl.DataFrame
    """``user`` (source string) -> ``uid`` (int32), ordered by ``uid``."""
    item_map: pl.DataFrame
    """``item`` (source string) -> ``iid`` (int32), ordered by ``iid``."""
    stats: dict[str, Any]
    """Counts and rates for the manifest (see :func:`protocol_stats`)."""


def build_samples(
    interactions: pl.DataFrame, cfg: ProtocolConfig, items: pl.Series | None = None
) -> ProtocolResult:
    """Apply the protocol ``cfg`` to an ``interactions`` frame (ingest's table); ``items``, the
    ids of the items file, finds orphan interactions (none looked for without it)."""
    validate_protocol(cfg)
    frame = _prepare(interactions)
    total = frame.height
    frame, dropped_rows, found = _orphans_and_duplicates(frame, cfg, items)
    frame = _keep_years(frame, cfg.keep_years)
    after_years = frame.height
    frame = _activity_filter(frame, cfg.min_user_interactions, cfg.min_item_interactions)
    after_filter = frame.height
    frame = assign_split(frame, cfg)
    _check_splits(frame, cfg)
    frame = frame.filter(pl.col("split").is_not_null())
    frame, user_map, item_map = _assign_ids(frame)
    frame = frame.with_columns(
        label=(pl.col("rating") >= cfg.label_min_rating).cast(pl.Int8),
    )
    frame = frame.with_columns(history=_histories(frame, cfg.history_len))
    frame = _cold_warm(frame, cfg.warm_more_than)
    frame = frame.with_columns(
        valid_small=_valid_small(frame["split"], cfg.valid_small_fraction, cfg.valid_small_seed)
    )
    samples = frame.select([pl.col(c).cast(t) for c, t in SAMPLES_SCHEMA.items()])
    dropped = {
        "dropped_keep_years": total - after_years,
        "dropped_activity_filter": after_years - after_filter,
        "dropped_outside_splits": after_filter - samples.height,
    }
    stats = protocol_stats(samples, user_map, item_map) | {"input_rows": total} | dropped | found
    return ProtocolResult(samples, dropped_rows, user_map, item_map, stats)


# ---- config ------------------------------------------------------------------------------------
def validate_protocol(cfg: ProtocolConfig) -> None:
    """The protocol's rules (:meth:`ProtocolConfig.check`, also run when a config is loaded), for
    configs built in code; a bad value is a one-line :class:`ConfigError`."""
    cfg.check("protocol", f"protocol {cfg.name}")


# ---- steps -------------------------------------------------------------------------------------
def _prepare(interactions: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in INTERACTION_COLUMNS if c not in interactions.columns]
    if missing:
        raise DataError(
            f"interactions lack column(s) {', '.join(missing)} "
            f"(has: {', '.join(interactions.columns)})",
            "table ingest/interactions",
            "re-run the ingest stage (binllm run CONFIG --stages ingest --force)",
        )
    frame = interactions.select(
        pl.col("user").cast(pl.String),
        pl.col("item").cast(pl.String),
        pl.col("rating").cast(pl.Float32),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("row").cast(pl.Int64),
    )
    nulls = [c for c in INTERACTION_COLUMNS if frame[c].null_count()]
    if nulls:
        raise DataError(
            f"interactions have empty values in column {nulls[0]}",
            "table ingest/interactions",
            "fix the source or ingest with data.on_bad_rows=skip",
        )
    return frame if frame["row"].is_sorted() else frame.sort("row")


def _utc(col: str = "timestamp") -> pl.Expr:
    return pl.from_epoch(pl.col(col), time_unit="s")


def _month_index() -> pl.Expr:
    return _utc().dt.year().cast(pl.Int64) * 12 + _utc().dt.month().cast(pl.Int64) - 1


REJECT_REASON = "reason"


def _orphans_and_duplicates(
    frame: pl.DataFrame, cfg: ProtocolConfig, items: pl.Series | None
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The interactions the ``orphans`` and ``duplicates`` policies keep, those they drop (with
    a ``reason``), and the counts found of each (``frame`` is in source order)."""
    orphan = pl.lit(False) if items is None else ~pl.col("item").is_in(items.implode())
    keys = ["user", "item", "rating", "timestamp"]
    marked = frame.with_columns(
        _orphan=orphan,
        _copy=pl.col("row").rank("ordinal").over(keys) > 1,
        _first=pl.col("row").min().over(keys),
    )
    reason = (
        pl.when(pl.col("_orphan") & pl.lit(cfg.orphans == "drop"))
        .then(pl.concat_str(pl.lit("item "), pl.col("item"), pl.lit(" is not in the items file")))
        .when(pl.col("_copy") & pl.lit(cfg.duplicates == "drop"))
        .then(
            pl.concat_str(
                pl.lit("exact duplicate of the interaction at byte offset "),
                pl.col("_first").cast(pl.String),
            )
        )
    )
    marked = marked.with_columns(reason.alias(REJECT_REASON))
    orphans = int(marked["_orphan"].sum())
    found = {
        "orphan_rows": orphans,
        "duplicate_rows": int(marked["_copy"].sum()),
        "dropped_orphans": orphans if cfg.orphans == "drop" else 0,
    }
    helpers = ["_orphan", "_copy", "_first"]
    rejects = marked.filter(pl.col(REJECT_REASON).is_not_null()).drop(helpers)
    kept = marked.filter(pl.col(REJECT_REASON).is_null()).drop([*helpers, REJECT_REASON])
    found["dropped_duplicates"] = rejects.height - found["dropped_orphans"]
    return kept, rejects, found


def _keep_years(frame: pl.DataFrame, years: list[int]) -> pl.DataFrame:
    if not years:
        return frame
    return frame.filter(_utc().dt.year().is_in(years))


def _activity_filter(frame: pl.DataFrame, min_user: int, min_item: int) -> pl.DataFrame:
    """One pass: both counts come from ``frame`` before either filter (as the official code)."""
    if min_user <= 0 and min_item <= 0:
        return frame
    keep = (pl.len().over("user") >= min_user) & (pl.len().over("item") >= min_item)
    return frame.filter(keep)


def assign_split(frame: pl.DataFrame, cfg: ProtocolConfig) -> pl.DataFrame:
    """Add ``split`` (train/valid/test, null for rows the protocol drops); keeps ``row`` order.

    The orders are computed on narrow frames: integer keys sort several times faster than the
    user strings and the wide rows.
    """
    if cfg.split == "per_user":
        users = frame.select("user", "timestamp", "row")
        codes = _id_map(users, "user", "_user")
        narrow = users.join(codes, on="user", maintain_order="left").drop("user")
        position, count = pl.int_range(pl.len()).over("_user"), pl.len().over("_user")
        split = _in_order(narrow, ["_user", "timestamp", "row"], _cut(position, count, cfg))
    elif cfg.split == "global":
        cut = _cut(pl.int_range(pl.len()), pl.len(), cfg)
        split = _in_order(frame.select("timestamp", "row"), ["timestamp", "row"], cut)
    elif cfg.split == "months":
        split = frame.select(split=_months_split(cfg))["split"]
    else:
        split = _halves_split(frame, cfg)
    return frame.with_columns(split=split.cast(SPLIT_DTYPE))


def _in_order(narrow: pl.DataFrame, by: list[str], expr: pl.Expr) -> pl.Series:
    """Evaluate ``expr`` over ``narrow`` sorted by ``by``; return it in ``narrow``'s order."""
    ordered = narrow.with_row_index("_pos").sort(by)
    return ordered.select("_pos", split=expr).sort("_pos")["split"]


def _cut(position: pl.Expr, n: pl.Expr, cfg: ProtocolConfig) -> pl.Expr:
    """Split by 0-based ``position`` among ``n`` rows in time order.

    train: ``position < floor(f_train * n)``; valid: ``position < floor((f_train + f_valid) * n)``;
    test: the rest. So with 0.8/0.1/0.1 a user with 10 rows gets 8/1/1, with 15 rows 12/1/2, and
    with fewer than 10 rows possibly no valid row (n = 1: its only row is test).
    """
    train, valid, _ = cfg.fractions
    return (
        pl.when(position < (n * train + EPS).floor())
        .then(pl.lit("train"))
        .when(position < (n * (train + valid) + EPS).floor())
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )


def _in_months(value: list[str], key: str) -> pl.Expr:
    lo, hi = month_range(value, key)
    return _month_index().is_between(lo, hi)


def _months_split(cfg: ProtocolConfig) -> pl.Expr:
    expr = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for name in SPLITS:
        key = f"{name}_months"
        expr = expr.when(_in_months(getattr(cfg, key), key)).then(pl.lit(name))
    return expr.otherwise(pl.lit(None, pl.String))


def _halves_split(frame: pl.DataFrame, cfg: ProtocolConfig) -> pl.Series:
    """Train months, then the holdout rows in (timestamp, row) order: first floor(m / 2) valid,
    the other ceil(m / 2) test."""
    narrow = frame.select(
        "timestamp",
        "row",
        _train=_in_months(cfg.train_months, "protocol.train_months"),
        _held=_in_months(cfg.holdout_months, "protocol.holdout_months"),
    )
    held = pl.col("_held")
    position = pl.int_range(pl.len()).over("_held")
    split = (
        pl.when(pl.col("_train"))
        .then(pl.lit("train"))
        .when(held & (position < pl.len().over("_held") // 2))
        .then(pl.lit("valid"))
        .when(held)
        .then(pl.lit("test"))
        .otherwise(pl.lit(None, pl.String))
    )
    return _in_order(narrow, ["_held", "timestamp", "row"], split)


def _check_splits(frame: pl.DataFrame, cfg: ProtocolConfig) -> None:
    """An empty split is a :class:`StageError` naming the protocol, the split and why."""
    counts = dict(frame.group_by("split").len().iter_rows())
    for name in SPLITS:
        if counts.get(name, 0):
            continue
        if cfg.split in ("per_user", "global"):
            why = (
                f"0 of {frame.height:,} interactions land in {name} with fractions {cfg.fractions}"
            )
            todo = "raise that fraction or check the filters and the source"
        else:
            key = f"{name}_months" if cfg.split == "months" or name == "train" else "holdout_months"
            first, last = getattr(cfg, key)
            why = f"0 of {frame.height:,} interactions fall in {first}..{last}{_date_span(frame)}"
            todo = f"change protocol.{key} to months the data covers"
        raise StageError(f"protocol {cfg.name} leaves split {name} empty: {why}", todo=todo)


def check_labels(frame: pl.DataFrame, cfg: ProtocolConfig) -> None:
    """For a run (stage ``samples``): a split of ``frame`` (samples) whose samples all have one
    label (no AUC can be measured, nothing learned) is a :class:`StageError` naming the
    threshold and the ratings."""
    for name in SPLITS:
        split = frame.filter(pl.col("split") == name)
        if split["label"].n_unique() > 1:
            continue
        kind = "positive" if split["label"][0] == 1 else "negative"
        low, high = split["rating"].min(), split["rating"].max()
        todo = (
            "set protocol.label_min_rating inside the ratings' range"
            if frame["label"].n_unique() == 1
            else "change the split (protocol.fractions or months) or use more data"
        )
        raise StageError(
            f"protocol {cfg.name}: every one of the {split.height:,} {name} samples is {kind} "
            f"with label_min_rating {cfg.label_min_rating:g} (their ratings span "
            f"{low:g}..{high:g})",
            todo=todo,
        )


def _date_span(frame: pl.DataFrame) -> str:
    """`` (data covers YYYY-MM-DD..YYYY-MM-DD UTC)`` for error messages; empty for no rows."""
    if frame.is_empty():
        return ""
    span = frame.select(lo=_utc().min().dt.date(), hi=_utc().max().dt.date()).row(0)
    return f" (data covers {span[0]}..{span[1]} UTC)"


def _assign_ids(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """1-based ids in order of first appearance (``frame`` is in ``row`` order); sample_id."""
    user_map = _id_map(frame, "user", "uid")
    item_map = _id_map(frame, "item", "iid")
    frame = (
        frame.join(user_map, on="user", how="left", maintain_order="left")
        .join(item_map, on="item", how="left", maintain_order="left")
        .drop("user", "item")
        .with_row_index("sample_id")
        .with_columns(pl.col("sample_id").cast(pl.Int64))
    )
    return frame, user_map, item_map


def _id_map(frame: pl.DataFrame, key: str, name: str) -> pl.DataFrame:
    keys = frame.select(pl.col(key).unique(maintain_order=True))
    return keys.with_columns(pl.int_range(1, keys.height + 1, dtype=pl.Int32).alias(name))


def _histories(frame: pl.DataFrame, history_len: int) -> pl.Series:
    """The last ``history_len`` positives of each sample's user strictly before its second.

    Rows sorted by (uid, timestamp, sample_id); ``seen`` counts positives earlier in that order.
    Taken at the first row of the sample's (uid, timestamp) tie group it excludes same-second
    items and the row's own label. In the positives table, in the same order, a sample's history
    is then the slice ``[max(at_user, at_second - history_len), at_second)``, where ``at_user``
    is ``seen`` at the user's first row. The slices are cut straight into one list array:
    memory is the output's, whatever the users' activity.
    """
    ordered = frame.select("sample_id", "uid", "iid", "timestamp", "label").sort(
        ["uid", "timestamp", "sample_id"]
    )
    first_of_user = (pl.col("uid") != pl.col("uid").shift(1)).fill_null(True)
    first_of_second = first_of_user | (pl.col("timestamp") != pl.col("timestamp").shift(1))
    label = pl.col("label").cast(pl.Int64)
    seen = label.cum_sum() - label
    ordered = ordered.with_columns(
        at_user=pl.when(first_of_user).then(seen).forward_fill(),
        hi=pl.when(first_of_second).then(seen).forward_fill(),
    )
    bounds = ordered.select(
        "sample_id", "hi", lo=pl.max_horizontal("at_user", pl.col("hi") - history_len)
    )
    lo = np.empty(frame.height, dtype=np.int64)
    hi = np.empty(frame.height, dtype=np.int64)
    sample_id = bounds["sample_id"].to_numpy()
    lo[sample_id] = bounds["lo"].to_numpy()
    hi[sample_id] = bounds["hi"].to_numpy()
    positives = ordered.filter(pl.col("label") == 1)["iid"].to_numpy()
    return _slices(positives, lo, hi).alias("history")


def _slices(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> pl.Series:
    """A list column whose row k is ``values[lo[k]:hi[k]]``, built in chunks of rows so that the
    index arrays stay small."""
    lengths = hi - lo
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    parts = [values[:0]]
    for start in range(0, lengths.size, SLICE_CHUNK):
        stop = min(start + SLICE_CHUNK, lengths.size)
        base = offsets[start]
        shift = np.repeat(offsets[start:stop] - base - lo[start:stop], lengths[start:stop])
        parts.append(values[np.arange(offsets[stop] - base) - shift])
    flat = pa.array(np.concatenate(parts), pa.int32())
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), flat)).cast(pl.List(pl.Int32))


def _cold_warm(frame: pl.DataFrame, warm_more_than: int) -> pl.DataFrame:
    in_train = (pl.col("split") == "train").cast(pl.Int64)
    user_train = in_train.sum().over("uid")
    item_train = in_train.sum().over("iid")
    return frame.with_columns(
        not_cold=(user_train > 0) & (item_train > 0),
        warm=(user_train > warm_more_than) & (item_train > warm_more_than),
    )


def _valid_small(split: pl.Series, fraction: float, seed: int) -> pl.Series:
    """Mark ``round(fraction * n_valid)`` valid rows (half up), drawn with numpy's PCG64 from
    ``seed`` over the valid rows in ``sample_id`` order."""
    is_valid = (split == "valid").to_numpy()
    positions = np.flatnonzero(is_valid)
    size = math.floor(fraction * positions.size + 0.5)
    chosen = np.random.default_rng(seed).choice(positions.size, size=size, replace=False)
    mark = np.zeros(split.len(), dtype=bool)
    mark[positions[chosen]] = True
    return pl.Series("valid_small", mark)


# ---- stats -------------------------------------------------------------------------------------
def protocol_stats(
    samples: pl.DataFrame, user_map: pl.DataFrame, item_map: pl.DataFrame
) -> dict[str, Any]:
    """Manifest metrics: per split rows, users, items, label mean; flags; user_num/item_num."""
    per_split = samples.group_by("split").agg(
        rows=pl.len(),
        users=pl.col("uid").n_unique(),
        items=pl.col("iid").n_unique(),
        label_mean=pl.col("label").mean(),
        not_cold_mean=pl.col("not_cold").mean(),
        warm_rows=pl.col("warm").sum(),
        cold_rows=(~pl.col("not_cold")).sum(),
        empty_history_rows=(pl.col("history").list.len() == 0).sum(),
    )
    stats: dict[str, Any] = {
        "rows": samples.height,
        "user_num": int(user_map["uid"].max() or 0) + 1,
        "item_num": int(item_map["iid"].max() or 0) + 1,
        "valid_small_rows": int(samples["valid_small"].sum()),
    }
    by_split = {row.pop("split"): row for row in per_split.iter_rows(named=True)}
    for name in SPLITS:
        row = by_split.get(name, {})
        for key, value in row.items():
            if key == "not_cold_mean" and name == "train":
                continue
            stats[f"{name}_{key}"] = round(value, 6) if isinstance(value, float) else int(value)
    return stats
