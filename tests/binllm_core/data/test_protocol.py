"""The data protocol on hand-built frames, and on MovieLens 100K with its presets."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from binllm_core.config import ProtocolConfig, load_config
from binllm_core.data.protocol import (
    SAMPLES_SCHEMA,
    InProcess,
    build_samples,
    finish,
    partition_of,
    prepare,
    run_protocol,
)
from binllm_core.errors import ConfigError, DataError, StageError

REPO = Path(__file__).resolve().parents[3]


def utc(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) -> unix seconds."""
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def interactions(rows: list[tuple[str, str, float, int]]) -> pl.DataFrame:
    """An ingest-like interactions frame from (user, item, rating, timestamp); row = index."""
    users, items, ratings, times = zip(*rows, strict=True) if rows else ([], [], [], [])
    return pl.DataFrame(
        {
            "user": list(users),
            "item": list(items),
            "rating": pl.Series(ratings, dtype=pl.Float32),
            "timestamp": pl.Series(times, dtype=pl.Int64),
            "row": pl.Series(range(len(rows)), dtype=pl.Int64),
        }
    )


def protocol(**fields) -> ProtocolConfig:
    return dataclasses.replace(ProtocolConfig(name="test"), **fields)


def preset(name: str) -> ProtocolConfig:
    return load_config(REPO / "configs" / f"{name}.yaml").protocol


def read_ml100k(folder: Path) -> pl.DataFrame:
    raw = pl.read_csv(
        folder / "ml-100k.inter",
        separator="\t",
        schema_overrides={"user_id:token": pl.String, "item_id:token": pl.String},
    )
    return raw.select(
        user=pl.col("user_id:token"),
        item=pl.col("item_id:token"),
        rating=pl.col("rating:float").cast(pl.Float32),
        timestamp=pl.col("timestamp:float").cast(pl.Int64),
        row=pl.int_range(pl.len(), dtype=pl.Int64),
    )


def naive_histories(frame: pl.DataFrame, samples: pl.DataFrame, n: int) -> list[list[int]]:
    """Reference: per sample, scan every row of its user (quadratic, for small frames)."""
    rows = samples.select("uid", "iid", "label", "timestamp").rows()
    out = []
    for uid, _, _, ts in rows:
        earlier = [(t, i) for u, i, lab, t in rows if u == uid and lab == 1 and t < ts]
        items = [i for _, i in sorted(earlier, key=lambda e: e[0])]  # stable: ties in row order
        out.append(items[max(len(items) - n, 0) :])
    return out


# ---- splits ------------------------------------------------------------------------------------
ML1M_BOUNDARIES = [
    ("2001-05-31 23:59:59", None),
    ("2001-06-01 00:00:00", "train"),
    ("2002-03-31 23:59:59", "train"),
    ("2002-04-01 00:00:00", "valid"),
    ("2002-08-31 23:59:59", "valid"),
    ("2002-09-01 00:00:00", "test"),
    ("2003-01-31 23:59:59", "test"),
    ("2003-02-01 00:00:00", None),
    ("2000-04-25 10:00:00", None),
]


def test_ml1m_month_slots_at_every_boundary():
    rows = [("u1", f"i{k}", 4.0, utc(when)) for k, (when, _) in enumerate(ML1M_BOUNDARIES)]
    result = build_samples(interactions(rows), preset("ml1m"))
    expected = [(utc(when), split) for when, split in ML1M_BOUNDARIES if split]
    assert result.samples.select("timestamp", "split").rows() == expected
    assert result.stats["dropped_outside_splits"] == 3
    assert result.samples["sample_id"].to_list() == [0, 1, 2, 3, 4, 5]


def test_per_user_split_rounds_down_and_breaks_ties_by_row():
    # u1: 10 rows -> 8/1/1; u2: 15 rows -> floor(12)/floor(13.5)=13 -> 12/1/2; u3: 1 row -> test
    rows = [("u1", f"a{k}", 5.0, 100 + k) for k in range(10)]
    rows += [("u2", f"b{k}", 5.0, 200 + k) for k in range(15)]
    rows += [("u3", "c", 5.0, 300)]
    # u1's last two rows share a second: row order (not the item name) puts z8 first
    rows[8], rows[9] = ("u1", "z8", 5.0, 500), ("u1", "a9", 5.0, 500)
    samples = build_samples(interactions(rows), protocol(split="per_user")).samples
    counts = samples.group_by("uid", "split").len().sort("uid", "split").rows()
    assert counts == [
        (1, "test", 1), (1, "train", 8), (1, "valid", 1),
        (2, "test", 2), (2, "train", 12), (2, "valid", 1),
        (3, "test", 1),
    ]  # fmt: skip
    by_item = dict(samples.select("iid", "split").rows())
    assert by_item[9] == "valid" and by_item[10] == "test"


def test_global_split_cuts_all_rows_in_time_order():
    times = [50, 10, 90, 20, 80, 30, 70, 40, 60, 90]
    rows = [(f"u{k % 3}", f"i{k}", 4.0, t) for k, t in enumerate(times)]
    samples = build_samples(interactions(rows), protocol(split="global")).samples
    order = samples.sort("timestamp", "sample_id")["split"].to_list()
    assert order == ["train"] * 8 + ["valid", "test"]
    # the tie at t=90: row 2 comes before row 9
    assert samples.filter(pl.col("timestamp") == 90)["split"].to_list() == ["valid", "test"]


def test_months_then_halves_keeps_years_and_halves_the_holdout():
    rows = [
        ("u1", "a", 5.0, utc("2016-12-31 23:59:59")),  # dropped by keep_years
        ("u1", "b", 5.0, utc("2017-01-01 00:00:00")),
        ("u2", "c", 4.0, utc("2017-11-30 23:59:59")),
        ("u1", "d", 5.0, utc("2017-12-20 00:00:00")),
        ("u2", "e", 5.0, utc("2017-12-01 00:00:00")),
        ("u1", "f", 5.0, utc("2017-12-10 00:00:00")),
        ("u2", "g", 1.0, utc("2017-12-10 00:00:00")),  # tie with f: after it (row order)
        ("u1", "h", 5.0, utc("2017-12-31 23:59:59")),
        ("u2", "i", 5.0, utc("2018-01-01 00:00:00")),  # dropped by keep_years
    ]
    cfg = protocol(
        label_min_rating=5.0,
        keep_years=[2017],
        split="months_then_halves",
        train_months=["2017-01", "2017-11"],
        holdout_months=["2017-12", "2017-12"],
    )
    result = build_samples(interactions(rows), cfg)
    splits = dict(result.samples.join(result.item_map, on="iid").select("item", "split").rows())
    # holdout in time order: e, f, g, d, h -> first floor(5 / 2) = 2 valid, 3 test
    assert splits == {
        "b": "train", "c": "train", "e": "valid", "f": "valid", "g": "test", "d": "test",
        "h": "test",
    }  # fmt: skip
    assert result.stats["dropped_keep_years"] == 2
    assert result.samples["label"].to_list() == [1, 0, 1, 1, 1, 0, 1]


def test_activity_filter_is_one_pass():
    # u1 has 3 rows but one is on item z (1 row): the item filter drops it, u1 stays with 2
    rows = [("u1", "x", 5.0, 1), ("u1", "y", 5.0, 2), ("u1", "z", 5.0, 3)]
    rows += [("u2", "x", 5.0, 4), ("u2", "y", 5.0, 5), ("u2", "x", 5.0, 6)]
    rows += [("u3", "x", 5.0, 7), ("u3", "y", 5.0, 8)]  # u3 has 2 rows: dropped
    cfg = protocol(split="global", fractions=[0.5, 0.25, 0.25])
    cfg = dataclasses.replace(cfg, min_user_interactions=3, min_item_interactions=2)
    result = build_samples(interactions(rows), cfg)
    kept = result.samples.join(result.user_map, on="uid").join(result.item_map, on="iid")
    assert kept.select("user", "item").rows() == [("u1", "x"), ("u1", "y")] + [
        ("u2", "x"), ("u2", "y"), ("u2", "x")
    ]  # fmt: skip
    assert result.stats["dropped_activity_filter"] == 3


def test_ids_are_one_based_in_first_appearance_order():
    rows = [("b", "z", 4.0, 9), ("a", "y", 4.0, 1), ("b", "x", 4.0, 5), ("c", "z", 4.0, 3)]
    result = build_samples(
        interactions(rows), protocol(split="global", fractions=[0.5, 0.25, 0.25])
    )
    assert result.user_map.rows() == [("b", 1), ("a", 2), ("c", 3)]
    assert result.item_map.rows() == [("z", 1), ("y", 2), ("x", 3)]
    assert result.stats["user_num"] == 4 and result.stats["item_num"] == 4
    assert dict(result.samples.schema) == SAMPLES_SCHEMA


# ---- history and flags -------------------------------------------------------------------------
def test_history_is_strictly_before_with_ties_and_never_leaks_labels():
    rows = [
        ("u", "a", 5.0, 10),
        ("v", "q", 5.0, 15),  # another user: never in u's history
        ("u", "b", 5.0, 20),
        ("u", "c", 5.0, 20),  # same second as b: neither sees the other
        ("u", "d", 1.0, 30),  # negative: never in a history
        ("u", "e", 5.0, 40),
        ("u", "f", 5.0, 50),
    ]
    result = build_samples(interactions(rows), protocol(split="global", history_len=3))
    named = dict(zip(result.item_map["iid"], result.item_map["item"], strict=True))
    histories = {
        named[iid]: [named[h] for h in hist]
        for iid, hist in result.samples.select("iid", "history").rows()
    }
    assert histories == {
        "a": [], "q": [], "b": ["a"], "c": ["a"], "d": ["a", "b", "c"], "e": ["a", "b", "c"],
        "f": ["b", "c", "e"],
    }  # fmt: skip


@pytest.mark.parametrize("split", ["per_user", "global"])
def test_history_matches_a_naive_scan(split):
    rnd = random.Random(7)
    rows = [
        (
            f"u{rnd.randrange(6)}",
            f"i{rnd.randrange(30)}",
            float(rnd.randint(1, 5)),
            rnd.randrange(40),
        )
        for _ in range(400)
    ]
    frame = interactions(rows)
    samples = build_samples(frame, protocol(split=split, history_len=4)).samples
    assert samples["history"].to_list() == naive_histories(frame, samples, 4)


def test_not_cold_and_warm_flags():
    train = [("u1", f"i{k % 2}", 5.0, k) for k in range(8)]  # u1: 8 train rows, i0/i1: 4 each
    train += [("u2", "i0", 5.0, 8), ("u2", "i2", 5.0, 9)]  # 10 rows: the first 10 are train
    later = [
        ("u1", "i0", 5.0, 100),  # warm: u1 has 8 > 3, i0 has 5 > 3
        ("u1", "i2", 5.0, 101),  # not warm: i2 has 1 train row
        ("u3", "i0", 5.0, 102),  # cold: u3 unseen
        ("u1", "i9", 5.0, 103),  # cold: i9 unseen
    ]
    cfg = protocol(split="global", fractions=[10 / 14, 2 / 14, 2 / 14], warm_more_than=3)
    samples = build_samples(interactions(train + later), cfg).samples
    assert samples["split"].to_list() == ["train"] * 10 + ["valid"] * 2 + ["test"] * 2
    assert samples["not_cold"].to_list() == [True] * 12 + [False, False]
    assert samples["warm"].to_list()[10:] == [True, False, False, False]
    assert samples["warm"].to_list()[:10] == [True] * 8 + [False, False]  # u2: 2 train rows


def test_valid_small_is_a_seeded_exact_share_of_valid():
    rows = [(f"u{k}", f"i{k % 7}", 4.0, k) for k in range(1000)]
    cfg = protocol(split="global", fractions=[0.5, 0.3, 0.2], valid_small_fraction=0.25)
    first = build_samples(interactions(rows), cfg).samples
    again = build_samples(interactions(rows), cfg).samples
    assert first.filter("valid_small")["split"].unique().to_list() == ["valid"]
    assert first["valid_small"].sum() == 75
    assert first.equals(again)
    other = build_samples(interactions(rows), dataclasses.replace(cfg, valid_small_seed=1)).samples
    assert not first["valid_small"].equals(other["valid_small"])


# ---- bad input ---------------------------------------------------------------------------------
def test_an_empty_split_names_protocol_split_and_range():
    rows = [
        ("u", "i", 4.0, utc("2001-07-01 00:00:00")),
        ("u", "j", 4.0, utc("2002-05-01 00:00:00")),
    ]
    with pytest.raises(StageError) as err:
        build_samples(interactions(rows), preset("ml1m"))
    message = str(err.value)
    assert "protocol ml1m leaves split test empty" in message
    assert "0 of 2 interactions fall in 2002-09..2003-01" in message
    assert "2001-07-01..2002-05-01" in message and "protocol.test_months" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "months",
    [["2001-06"], ["2001-6", "2002-03"], ["2001-13", "2002-03"], ["2002-03", "2001-06"], "x"],
)
def test_bad_months_are_a_config_error(months):
    cfg = dataclasses.replace(preset("ml1m"), train_months=months)
    with pytest.raises(ConfigError, match="protocol.train_months"):
        build_samples(interactions([("u", "i", 4.0, 1)]), cfg)


def test_overlapping_months_and_bad_fractions_are_config_errors():
    with pytest.raises(ConfigError, match="overlap"):
        build_samples(
            interactions([("u", "i", 4.0, 1)]),
            dataclasses.replace(preset("ml1m"), valid_months=["2002-03", "2002-08"]),
        )
    with pytest.raises(ConfigError, match="fractions"):
        build_samples(interactions([("u", "i", 4.0, 1)]), protocol(fractions=[0.8, 0.3, 0.1]))


def test_missing_columns_are_a_data_error():
    frame = interactions([("u", "i", 4.0, 1)]).drop("row", "rating")
    with pytest.raises(DataError, match="lack column.s. rating, row"):
        build_samples(frame, protocol())


# ---- MovieLens 100K ----------------------------------------------------------------------------
@pytest.fixture
def ml100k(ml100k_dir: Path) -> pl.DataFrame:
    return read_ml100k(ml100k_dir)


@pytest.mark.parametrize("name", ["ml100k", "ml100k_global"])
def test_ml100k_presets(ml100k, name):
    cfg = preset(name)
    result = build_samples(ml100k, cfg)
    samples, stats = result.samples, result.stats
    assert sum(stats[f"{s}_rows"] for s in ("train", "valid", "test")) == 100_000
    assert (stats["user_num"], stats["item_num"]) == (944, 1683)
    assert (result.user_map.height, result.item_map.height) == (943, 1682)
    assert samples["sample_id"].to_list() == list(range(100_000))
    valid = samples.filter(pl.col("split") == "valid")
    assert valid["valid_small"].sum() == round(0.5 * valid.height)
    assert samples.filter(pl.col("split") != "valid")["valid_small"].sum() == 0
    # every history item is an earlier positive of the same user ((user, item) is unique here)
    exploded = (
        samples.select("uid", "timestamp", pl.col("history").alias("hist_iid"))
        .explode("hist_iid")
        .drop_nulls()
    )
    source = samples.select("uid", hist_iid="iid", hist_ts="timestamp", hist_label="label")
    checked = exploded.join(source, on=["uid", "hist_iid"], how="left")
    assert checked["hist_ts"].null_count() == 0
    assert (checked["hist_ts"] < checked["timestamp"]).all()
    assert (checked["hist_label"] == 1).all()
    assert samples["history"].list.len().max() == cfg.history_len
    assert build_samples(ml100k, cfg).samples.equals(samples)


def test_ml100k_per_user_numbers(ml100k):
    stats = build_samples(ml100k, preset("ml100k")).stats
    assert (stats["train_rows"], stats["valid_rows"], stats["test_rows"]) == (79_619, 9_942, 10_439)
    assert stats["train_users"] == stats["valid_users"] == stats["test_users"] == 943


@pytest.mark.parametrize("name", ["ml100k", "ml100k_global"])
def test_partitions_of_users_give_the_samples_of_one_frame(ml100k, name):
    cfg = preset(name)
    whole = build_samples(ml100k, cfg)
    frame = prepare(ml100k, cfg)
    tagged = frame.with_columns(_part=partition_of(frame, 5))
    parts = InProcess(tagged.partition_by("_part", include_key=False))
    assert len(parts.frames) == 5
    agg = run_protocol(parts, cfg, None, input_rows=ml100k.height)
    samples = finish(pl.concat(parts.frames).sort("row"), 0, 0, agg.valid_small)
    assert samples.equals(whole.samples)
    assert agg.user_map.equals(whole.user_map) and agg.item_map.equals(whole.item_map)
    assert agg.stats == whole.stats
