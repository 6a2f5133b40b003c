"""The data protocol: interactions -> labelled, split samples with histories, and id maps.

Every rule is a :class:`ProtocolConfig` field. The steps follow the official BinLLM/CoLLM
notebooks (see ``reference/binllm_method.md`` section 1):

1. ``keep_years`` (UTC calendar years) while reading; ``label = rating >= label_min_rating``.
2. Orphans and exact duplicates, then the one-pass user/item activity filter: both counts are
   taken on the rows left after ``keep_years`` and the duplicates, before either filter applies.
3. The split (``per_user``, ``global``, ``months``, ``months_then_halves``); rows outside every
   month range are dropped.
4. Ids: ``uid``/``iid`` 1-based in order of first appearance in source ``row`` order among the
   kept rows (0 is padding); ``sample_id`` is the rank of ``row`` among the kept rows.
5. ``history``: the last ``history_len`` positives of the user strictly before the sample's
   second (any split), oldest first; ``not_cold``, ``warm`` and ``valid_small`` flags.

Time ties are always broken by the source ``row`` (stable), so a re-run gives identical rows.

**How it runs.** The rows are cut into partitions of whole users (:func:`partition_of`). Each
rule that needs only a user's rows (duplicates, the user count, the per-user split, histories,
flags) is a *step*: a polars function of one partition that returns the new partition and small
*partials* (item counts, per-day counts, first rows, per-split sums) that :data:`REDUCERS`
combine across partitions. :func:`run_protocol` runs the steps in order through a
:class:`Partitions` executor and turns the combined partials into the global facts the next step
needs (item counts, the time cuts of the ``global`` and ``months_then_halves`` splits, id maps);
:func:`finish` then numbers the rows in ``row`` order. :func:`build_samples` runs it all in this
process on one partition; stage ``samples`` runs the same steps on Ray over many, so no process
ever holds the whole table. Nothing here loops over users in Python, and no user's full positive
list is joined onto rows: the history is a gather from a per-positive window table (see
:func:`_histories`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.config import ProtocolConfig, month_range
from binllm_core.errors import DataError, StageError

SPLITS = ("train", "valid", "test")
INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp", "row")
# Added to ``fraction * n`` before flooring so that e.g. 0.29 * 100 = 28.999999999999996 cuts at 29.
EPS = 1e-9
# Rows per chunk when cutting the history lists (bounds the temporary index arrays).
SLICE_CHUNK = 1_000_000
DAY_S = 86_400

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

Partials = dict[str, pl.DataFrame]
"""A step's small side results, by name; :data:`REDUCERS` combines each name across partitions."""
Step = Callable[..., tuple[pl.DataFrame | None, Partials]]
"""``step(partition, **shared) -> (new partition or None to keep it, partials)``."""


class Partitions(Protocol):
    """Where the partitions of whole users live and how a step runs over them."""

    def map(self, step: Step, **shared: Any) -> Partials:
        """Run ``step`` on every partition, replace each by the step's frame, and return the
        partials combined with :func:`combine`. ``shared`` values (bounded by the number of
        users or items) go to every call."""
        ...

    def set_aside(self, column: str) -> None:
        """Move the rows whose ``column`` is not null out of the partitions (they are the
        ``dropped`` table) and drop ``column`` from the rest."""
        ...


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


@dataclass
class Aggregates:
    """What :func:`run_protocol` leaves besides the partitions (all bounded by users/items)."""

    user_map: pl.DataFrame
    """``user`` -> ``uid``, ordered by ``uid``."""
    item_map: pl.DataFrame
    """``item`` -> ``iid``, ordered by ``iid``."""
    per_split: pl.DataFrame
    """Per split sums of the samples (see :func:`_split_sums`), for the stats and label check."""
    valid_small: np.ndarray
    """Sorted ranks, among the valid samples in ``sample_id`` order, of those in ``valid_small``."""
    stats: dict[str, Any]
    """The manifest metrics (:func:`protocol_stats` plus the drop counts)."""


def build_samples(
    interactions: pl.DataFrame, cfg: ProtocolConfig, items: pl.Series | None = None
) -> ProtocolResult:
    """Apply the protocol ``cfg`` to an ``interactions`` frame (ingest's table) in this process;
    ``items``, the ids of the items file, finds orphan interactions (none looked for without
    it)."""
    validate_protocol(cfg)
    parts = InProcess([prepare(interactions, cfg)])
    agg = run_protocol(parts, cfg, items, input_rows=interactions.height)
    samples = finish(pl.concat(parts.frames).sort("row"), 0, 0, agg.valid_small)
    dropped = pl.concat(parts.aside).sort("row")
    return ProtocolResult(samples, dropped, agg.user_map, agg.item_map, agg.stats)


class InProcess:
    """:class:`Partitions` held as polars frames in this process."""

    def __init__(self, frames: list[pl.DataFrame]) -> None:
        self.frames = frames
        self.aside: list[pl.DataFrame] = []

    def map(self, step: Step, **shared: Any) -> Partials:
        total: Partials = {}
        for k, frame in enumerate(self.frames):
            out, partials = step(frame, **shared)
            self.frames[k] = frame if out is None else out
            total = combine(total, partials)
        return total

    def set_aside(self, column: str) -> None:
        for k, frame in enumerate(self.frames):
            self.aside.append(frame.filter(pl.col(column).is_not_null()))
            self.frames[k] = frame.filter(pl.col(column).is_null()).drop(column)


# ---- the run ----------------------------------------------------------------------------------
def run_protocol(
    parts: Partitions, cfg: ProtocolConfig, items: pl.Series | None, input_rows: int
) -> Aggregates:
    """Run the steps over ``parts`` (partitions of whole users of :func:`prepare`'d rows); they
    end holding each kept sample with ``row`` and without ``sample_id``/``valid_small``, for
    :func:`finish`. ``input_rows`` counts the interactions before ``keep_years``."""
    found = parts.map(dedupe_step, cfg=cfg, items=items)
    parts.set_aside(REJECT_REASON)
    counts = found["found"].row(0, named=True)
    after_years = counts.pop("rows")
    dropped = counts["dropped_orphans"] + counts["dropped_duplicates"]
    after_filter = parts.map(filter_step, cfg=cfg, item_counts=found["item_counts"])
    cuts = _time_cuts(parts, cfg, after_filter.get("days"))
    split = parts.map(split_step, cfg=cfg, cuts=cuts)
    _check_splits(split["splits"], cfg)
    user_map = _ranked(split["users"], "user", "uid")
    item_map = _ranked(split["items"], "item", "iid")
    item_train = item_map.join(split["items"], on="item").select("item", "iid", "train")
    made = parts.map(samples_step, cfg=cfg, user_map=user_map, item_train=item_train)
    per_split = made["per_split"]
    n_valid = int(per_split.filter(pl.col("split") == "valid")["rows"].sum())
    chosen = valid_small_ranks(n_valid, cfg.valid_small_fraction, cfg.valid_small_seed)
    stats = protocol_stats(per_split, split["items"], user_map, item_map, chosen.size)
    stats |= {
        "input_rows": input_rows,
        "dropped_keep_years": input_rows - after_years,
        "dropped_activity_filter": after_years - dropped - int(after_filter["rows"]["n"].sum()),
        "dropped_outside_splits": int(split["splits"].filter(pl.col("split").is_null())["n"].sum()),
        **counts,
    }
    return Aggregates(user_map, item_map, per_split, chosen, stats)


def combine(total: Partials, partials: Partials) -> Partials:
    """``total`` with one more partition's ``partials`` folded in by :data:`REDUCERS`."""
    out = dict(total)
    for name, frame in partials.items():
        out[name] = REDUCERS[name](pl.concat([out[name], frame]) if name in out else frame)
    return out


def _sum_by(*keys: str) -> Callable[[pl.DataFrame], pl.DataFrame]:
    return lambda f: f.group_by(list(keys)).agg(pl.exclude(*keys).sum())


REDUCERS: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {
    "found": lambda f: f.sum(),
    "item_counts": _sum_by("item"),
    "rows": lambda f: f.sum(),
    "days": _sum_by("day"),
    "in_days": lambda f: f,
    "splits": lambda f: f.group_by("split").agg(
        pl.col("n").sum(), pl.col("lo").min(), pl.col("hi").max()
    ),
    "users": lambda f: f.group_by("user").agg(pl.col("first").min()),
    "items": lambda f: f.group_by("item").agg(
        pl.col("first").min(), pl.exclude("item", "first").sum()
    ),
    "per_split": lambda f: f.group_by("split").agg(
        pl.exclude("split", "rating_min", "rating_max").sum(),
        pl.col("rating_min").min(),
        pl.col("rating_max").max(),
    ),
}
"""How each partial is combined across partitions (all are bounded by users, items or days)."""


# ---- config ------------------------------------------------------------------------------------
def validate_protocol(cfg: ProtocolConfig) -> None:
    """The protocol's rules (:meth:`ProtocolConfig.check`, also run when a config is loaded), for
    configs built in code; a bad value is a one-line :class:`ConfigError`."""
    cfg.check("protocol", f"protocol {cfg.name}")


# ---- per batch, while reading ------------------------------------------------------------------
def prepare(interactions: pl.DataFrame, cfg: ProtocolConfig) -> pl.DataFrame:
    """A batch of ingest's interactions with the protocol's types, without empty values, and only
    the years ``keep_years`` keeps (so later steps never see the others)."""
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
    if cfg.keep_years:
        frame = frame.filter(_utc().dt.year().is_in(cfg.keep_years))
    return frame


def partition_of(frame: pl.DataFrame, n: int) -> pl.Series:
    """Each row's partition among ``n``: a seeded hash of its user, so a user's rows meet."""
    return (pl.col("user").hash(seed=0) % n).alias("_part").pipe(frame.select).to_series()


def _utc(col: str = "timestamp") -> pl.Expr:
    return pl.from_epoch(pl.col(col), time_unit="s")


def _month_index() -> pl.Expr:
    return _utc().dt.year().cast(pl.Int64) * 12 + _utc().dt.month().cast(pl.Int64) - 1


# ---- steps (each on one partition of whole users) ----------------------------------------------
REJECT_REASON = "reason"


def dedupe_step(
    frame: pl.DataFrame, cfg: ProtocolConfig, items: pl.Series | None
) -> tuple[pl.DataFrame, Partials]:
    """Orphans and exact duplicates: the partition in ``row`` order with a ``reason`` (null for a
    kept row); partials: the counts found and the item counts of the kept rows."""
    frame = frame.sort("row")
    kept, rejects, found = _orphans_and_duplicates(frame, cfg, items)
    out = pl.concat([kept.with_columns(pl.lit(None, pl.String).alias(REJECT_REASON)), rejects])
    found = {"rows": frame.height, **found}
    return out, {
        "found": pl.DataFrame([found], schema=dict.fromkeys(found, pl.Int64)),
        "item_counts": kept.group_by("item").agg(n=pl.len()),
    }


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


def filter_step(
    frame: pl.DataFrame, cfg: ProtocolConfig, item_counts: pl.DataFrame
) -> tuple[pl.DataFrame, Partials]:
    """The one-pass activity filter (the user's count here, the item's from ``item_counts``, both
    on the same rows); partials: the rows left and, for a split cut in time order over all users,
    the per-day counts of the rows it orders (see :func:`_time_cuts`)."""
    min_user, min_item = cfg.min_user_interactions, cfg.min_item_interactions
    if min_user > 0 or min_item > 0:
        counts = frame.join(item_counts, on="item", how="left", maintain_order="left")["n"]
        frame = frame.filter((pl.len().over("user") >= min_user) & (counts >= min_item))
    partials = {"rows": pl.DataFrame({"n": [frame.height]}, schema={"n": pl.Int64})}
    if cfg.split in ("global", "months_then_halves"):
        keys = _ordered_keys(frame, cfg)
        partials["days"] = keys.group_by(day=pl.col("timestamp") // DAY_S).agg(n=pl.len())
    return frame, partials


def days_step(frame: pl.DataFrame, cfg: ProtocolConfig, days: list[int]) -> tuple[None, Partials]:
    """Partials: the (timestamp, row) keys the time cut orders that fall on ``days``."""
    keys = _ordered_keys(frame, cfg)
    return None, {"in_days": keys.filter((pl.col("timestamp") // DAY_S).is_in(days))}


Cut = tuple[int, int] | None
"""A (timestamp, row) key: the rows ordered before it are on the cut's early side; None: all."""


def _ordered_keys(frame: pl.DataFrame, cfg: ProtocolConfig) -> pl.DataFrame:
    """The (timestamp, row) keys of the rows a ``global`` or ``months_then_halves`` split orders
    over all users: every row, or the holdout months' rows."""
    if cfg.split == "months_then_halves":
        frame = frame.filter(_in_months(cfg.holdout_months, "protocol.holdout_months"))
    return frame.select("timestamp", "row")


def _time_cuts(parts: Partitions, cfg: ProtocolConfig, days: pl.DataFrame | None) -> list[Cut]:
    """The keys at the positions where a split over all users in (timestamp, row) order changes.

    ``global``: positions ``floor(f_train * n)`` and ``floor((f_train + f_valid) * n)`` (train
    before the first, valid before the second); ``months_then_halves``: ``floor(m / 2)`` of the
    ``m`` holdout rows (valid before it). The per-day counts locate each position's day; one
    more pass fetches only those days' keys, and the key is picked among them.
    """
    if days is None:
        return []
    n = int(days["n"].sum())
    if cfg.split == "global":
        train, valid, _ = cfg.fractions
        positions = [math.floor(n * train + EPS), math.floor(n * (train + valid) + EPS)]
    else:
        positions = [n // 2]
    days = days.sort("day")
    ends = days["n"].cum_sum().to_numpy()
    located = {}
    for k in positions:
        if k < n:
            at = int(np.searchsorted(ends, k, side="right"))
            located[k] = (int(days["day"][at]), k - (int(ends[at - 1]) if at else 0))
    if not located:
        return [None] * len(positions)
    wanted = sorted({day for day, _ in located.values()})
    keys = parts.map(days_step, cfg=cfg, days=wanted)["in_days"]
    keys = keys.with_columns(day=pl.col("timestamp") // DAY_S).sort("timestamp", "row")
    cuts: list[Cut] = []
    for k in positions:
        if k not in located:
            cuts.append(None)
            continue
        day, rank = located[k]
        cuts.append(keys.filter(pl.col("day") == day).select("timestamp", "row").row(rank))
    return cuts


def split_step(
    frame: pl.DataFrame, cfg: ProtocolConfig, cuts: list[Cut]
) -> tuple[pl.DataFrame, Partials]:
    """The split; the rows it keeps. Partials: rows and time span per split (null: outside every
    range), each user's and item's first row, and each item's rows per split."""
    frame = assign_split(frame, cfg, cuts)
    splits = frame.group_by("split").agg(
        n=pl.len(), lo=pl.col("timestamp").min(), hi=pl.col("timestamp").max()
    )
    frame = frame.filter(pl.col("split").is_not_null())
    users = frame.group_by("user").agg(first=pl.col("row").min())
    items = frame.group_by("item").agg(
        first=pl.col("row").min(),
        **{name: (pl.col("split") == name).sum().cast(pl.Int64) for name in SPLITS},
    )
    return frame, {"splits": splits, "users": users, "items": items}


def assign_split(frame: pl.DataFrame, cfg: ProtocolConfig, cuts: list[Cut]) -> pl.DataFrame:
    """Add ``split`` (train/valid/test, null for rows the protocol drops); keeps row order.
    ``cuts``: :func:`_time_cuts` for the splits over all users in time order."""
    if cfg.split == "per_user":
        split = _per_user_split(frame, cfg)
    elif cfg.split == "global":
        train, valid = cuts
        split = frame.select(
            pl.when(_before(train))
            .then(pl.lit("train"))
            .when(_before(valid))
            .then(pl.lit("valid"))
            .otherwise(pl.lit("test"))
        ).to_series()
    elif cfg.split == "months":
        split = frame.select(split=_months_split(cfg))["split"]
    else:
        held = _in_months(cfg.holdout_months, "protocol.holdout_months")
        split = frame.select(
            pl.when(_in_months(cfg.train_months, "protocol.train_months"))
            .then(pl.lit("train"))
            .when(held & _before(cuts[0]))
            .then(pl.lit("valid"))
            .when(held)
            .then(pl.lit("test"))
            .otherwise(pl.lit(None, pl.String))
        ).to_series()
    return frame.with_columns(split=split.cast(pl.String))


def _before(cut: Cut) -> pl.Expr:
    """Rows whose (timestamp, row) orders before ``cut`` (every row when None)."""
    if cut is None:
        return pl.lit(True)
    ts, row = cut
    return (pl.col("timestamp") < ts) | ((pl.col("timestamp") == ts) & (pl.col("row") < row))


def _per_user_split(frame: pl.DataFrame, cfg: ProtocolConfig) -> pl.Series:
    """Each user's rows in (timestamp, row) order, cut by position. The order is computed on a
    narrow frame: integer keys sort several times faster than the user strings and wide rows."""
    users = frame.select("user", "timestamp", "row")
    codes = _id_map(users, "user", "_user")
    narrow = users.join(codes, on="user", maintain_order="left").drop("user")
    position, count = pl.int_range(pl.len()).over("_user"), pl.len().over("_user")
    ordered = narrow.with_row_index("_pos").sort(["_user", "timestamp", "row"])
    return ordered.select("_pos", split=_cut(position, count, cfg)).sort("_pos")["split"]


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


def _check_splits(splits: pl.DataFrame, cfg: ProtocolConfig) -> None:
    """An empty split is a :class:`StageError` naming the protocol, the split and why
    (``splits``: rows and time span per split, null for rows outside every range)."""
    counts = dict(splits.select("split", "n").iter_rows())
    height = int(splits["n"].sum())
    for name in SPLITS:
        if counts.get(name, 0):
            continue
        if cfg.split in ("per_user", "global"):
            why = f"0 of {height:,} interactions land in {name} with fractions {cfg.fractions}"
            todo = "raise that fraction or check the filters and the source"
        else:
            key = f"{name}_months" if cfg.split == "months" or name == "train" else "holdout_months"
            first, last = getattr(cfg, key)
            why = f"0 of {height:,} interactions fall in {first}..{last}{_date_span(splits)}"
            todo = f"change protocol.{key} to months the data covers"
        raise StageError(f"protocol {cfg.name} leaves split {name} empty: {why}", todo=todo)


def _date_span(splits: pl.DataFrame) -> str:
    """`` (data covers YYYY-MM-DD..YYYY-MM-DD UTC)`` for error messages; empty for no rows."""
    if not int(splits["n"].sum()):
        return ""
    span = splits.select(
        lo=pl.from_epoch(pl.col("lo").min(), time_unit="s").dt.date(),
        hi=pl.from_epoch(pl.col("hi").max(), time_unit="s").dt.date(),
    ).row(0)
    return f" (data covers {span[0]}..{span[1]} UTC)"


def _ranked(first: pl.DataFrame, key: str, name: str) -> pl.DataFrame:
    """``key`` -> 1-based ``name`` in order of first appearance (``first``: each key's first
    ``row``)."""
    return first.sort("first").select(
        key, pl.int_range(1, first.height + 1, dtype=pl.Int32).alias(name)
    )


def _id_map(frame: pl.DataFrame, key: str, name: str) -> pl.DataFrame:
    keys = frame.select(pl.col(key).unique(maintain_order=True))
    return keys.with_columns(pl.int_range(1, keys.height + 1, dtype=pl.Int32).alias(name))


def samples_step(
    frame: pl.DataFrame,
    cfg: ProtocolConfig,
    user_map: pl.DataFrame,
    item_train: pl.DataFrame,
) -> tuple[pl.DataFrame, Partials]:
    """Ids, label, history and flags (``item_train``: item, iid and its train rows); the
    samples with ``row``. Partials: the per-split sums (:func:`_split_sums`)."""
    frame = (
        frame.sort("row")
        .join(user_map, on="user", how="left", maintain_order="left")
        .join(item_train, on="item", how="left", maintain_order="left")
        .drop("user", "item")
        .with_columns(label=(pl.col("rating") >= cfg.label_min_rating).cast(pl.Int8))
    )
    frame = frame.with_columns(history=_histories(frame, cfg.history_len))
    user_train = (pl.col("split") == "train").cast(pl.Int64).sum().over("uid")
    item_train_n = pl.col("train")
    frame = frame.with_columns(
        not_cold=(user_train > 0) & (item_train_n > 0),
        warm=(user_train > cfg.warm_more_than) & (item_train_n > cfg.warm_more_than),
    )
    columns = [c for c in SAMPLES_SCHEMA if c not in ("sample_id", "valid_small")]
    frame = frame.select([pl.col(c).cast(SAMPLES_SCHEMA[c]) for c in columns] + ["row"])
    return frame, {"per_split": _split_sums(frame)}


def _histories(frame: pl.DataFrame, history_len: int) -> pl.Series:
    """The last ``history_len`` positives of each row's user strictly before its second.

    Rows sorted by (uid, timestamp, row); ``seen`` counts positives earlier in that order.
    Taken at the first row of the sample's (uid, timestamp) tie group it excludes same-second
    items and the row's own label. In the positives table, in the same order, a sample's history
    is then the slice ``[max(at_user, at_second - history_len), at_second)``, where ``at_user``
    is ``seen`` at the user's first row. The slices are cut straight into one list array:
    memory is the output's, whatever the users' activity.
    """
    ordered = (
        frame.select("uid", "iid", "timestamp", "label", "row")
        .with_row_index("_pos")
        .sort(["uid", "timestamp", "row"])
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
        "_pos", "hi", lo=pl.max_horizontal("at_user", pl.col("hi") - history_len)
    )
    lo = np.empty(frame.height, dtype=np.int64)
    hi = np.empty(frame.height, dtype=np.int64)
    position = bounds["_pos"].to_numpy()
    lo[position] = bounds["lo"].to_numpy()
    hi[position] = bounds["hi"].to_numpy()
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


def _split_sums(samples: pl.DataFrame) -> pl.DataFrame:
    """Per split: rows, users (a partition holds whole users, so these add up), label and flag
    sums, empty histories and the rating range."""
    return samples.group_by("split").agg(
        rows=pl.len(),
        users=pl.col("uid").n_unique().cast(pl.Int64),
        label_sum=pl.col("label").cast(pl.Int64).sum(),
        not_cold_sum=pl.col("not_cold").cast(pl.Int64).sum(),
        warm_rows=pl.col("warm").cast(pl.Int64).sum(),
        cold_rows=(~pl.col("not_cold")).cast(pl.Int64).sum(),
        empty_history_rows=(pl.col("history").list.len() == 0).cast(pl.Int64).sum(),
        rating_min=pl.col("rating").min(),
        rating_max=pl.col("rating").max(),
    )


# ---- numbering, in row order -------------------------------------------------------------------
def valid_small_ranks(n_valid: int, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction * n_valid)`` (half up) ranks among the valid samples in ``sample_id``
    order, drawn with numpy's PCG64 from ``seed``; sorted."""
    size = math.floor(fraction * n_valid + 0.5)
    return np.sort(np.random.default_rng(seed).choice(n_valid, size=size, replace=False))


def finish(
    samples: pl.DataFrame, first_id: int, valid_before: int, valid_small: np.ndarray
) -> pl.DataFrame:
    """``sample_id`` and ``valid_small`` for a run of samples in ``row`` order that starts at
    ``first_id`` after ``valid_before`` valid samples; the :data:`SAMPLES_SCHEMA` columns."""
    is_valid = (samples["split"] == "valid").to_numpy()
    rank = valid_before + np.cumsum(is_valid) - 1
    return samples.with_columns(
        sample_id=pl.int_range(first_id, first_id + samples.height, dtype=pl.Int64),
        valid_small=pl.Series(is_valid & np.isin(rank, valid_small)),
    ).select([pl.col(c).cast(t) for c, t in SAMPLES_SCHEMA.items()])


def check_labels(per_split: pl.DataFrame, cfg: ProtocolConfig) -> None:
    """For a run (stage ``samples``): a split whose samples all have one label (no AUC can be
    measured, nothing learned) is a :class:`StageError` naming the threshold and the ratings
    (``per_split``: :attr:`Aggregates.per_split`)."""
    sums = {row["split"]: row for row in per_split.iter_rows(named=True)}
    total, positives = int(per_split["rows"].sum()), int(per_split["label_sum"].sum())
    for name in SPLITS:
        split = sums[name]
        if 0 < split["label_sum"] < split["rows"]:
            continue
        kind = "positive" if split["label_sum"] == split["rows"] else "negative"
        low, high = split["rating_min"], split["rating_max"]
        todo = (
            "set protocol.label_min_rating inside the ratings' range"
            if positives in (0, total)
            else "change the split (protocol.fractions or months) or use more data"
        )
        raise StageError(
            f"protocol {cfg.name}: every one of the {split['rows']:,} {name} samples is {kind} "
            f"with label_min_rating {cfg.label_min_rating:g} (their ratings span "
            f"{low:g}..{high:g})",
            todo=todo,
        )


# ---- stats -------------------------------------------------------------------------------------
def protocol_stats(
    per_split: pl.DataFrame,
    items: pl.DataFrame,
    user_map: pl.DataFrame,
    item_map: pl.DataFrame,
    valid_small_rows: int,
) -> dict[str, Any]:
    """Manifest metrics: per split rows, users, items, label mean; flags; user_num/item_num
    (``items``: each item's rows per split)."""
    stats: dict[str, Any] = {
        "rows": int(per_split["rows"].sum()),
        "user_num": int(user_map["uid"].max() or 0) + 1,
        "item_num": int(item_map["iid"].max() or 0) + 1,
        "valid_small_rows": valid_small_rows,
    }
    by_split = {row["split"]: row for row in per_split.iter_rows(named=True)}
    for name in SPLITS:
        row = by_split.get(name)
        if row is None:
            continue
        n = row["rows"]
        values = {
            "rows": n,
            "users": row["users"],
            "items": int((items[name] > 0).sum()),
            "label_mean": round(row["label_sum"] / n, 6),
            "not_cold_mean": round(row["not_cold_sum"] / n, 6),
            "warm_rows": row["warm_rows"],
            "cold_rows": row["cold_rows"],
            "empty_history_rows": row["empty_history_rows"],
        }
        for key, value in values.items():
            if key == "not_cold_mean" and name == "train":
                continue
            stats[f"{name}_{key}"] = value
    return stats
