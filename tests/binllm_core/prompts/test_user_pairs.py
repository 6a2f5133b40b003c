"""(user, item) pairs -> prompts: ids, latest-positive histories, codes, unknown users/items."""

from __future__ import annotations

import pyarrow as pa
import pytest

from binllm_core.config import PromptConfig
from binllm_core.errors import DataError
from binllm_core.prompts.templates import templates_from_config
from binllm_core.prompts.user_pairs import (
    build_lookups,
    check_pairs,
    distinct_pairs,
    render_candidates,
    summary,
    with_row_numbers,
)

TEMPLATES = templates_from_config(PromptConfig())


def lookups(history_len: int = 2):
    items = pa.table({"item": ["a", "b", "c", "z"], "title": ["Alpha", "Beta", "Gamma", "Zeta"]})
    user_map = pa.table({"user": ["u1", "u2", "u3"], "uid": pa.array([1, 2, 3], pa.int32())})
    item_map = pa.table({"item": ["a", "b", "c"], "iid": pa.array([1, 2, 3], pa.int32())})
    # u3 has an id (seen by samples) but no code: treated like an unknown user.
    codes = pa.table(
        {
            "entity": ["user", "user", "item", "item", "item"],
            "id": pa.array([1, 2, 1, 2, 3], pa.int32()),
            "bits": pa.array(
                [[0] * 4 + [int(b) for b in c] for c in ("0001", "0010", "1000", "0100", "1100")],
                pa.list_(pa.uint8(), 8),
            ),
        }
    )
    samples = pa.table(
        {
            "sample_id": pa.array([0, 1, 2, 3, 4], pa.int64()),
            "uid": pa.array([1, 1, 1, 1, 2], pa.int32()),
            "iid": pa.array([1, 2, 3, 1, 3], pa.int32()),
            "label": pa.array([1, 1, 0, 1, 1], pa.int8()),
            "timestamp": pa.array([10, 30, 40, 20, 5], pa.int64()),
        }
    )
    return build_lookups(items, user_map, item_map, codes, samples, history_len)


def pairs(users, items, labels=None):
    table = {"user": users, "item": items}
    if labels is not None:
        table["label"] = labels
    return with_row_numbers(check_pairs(pa.table(table), "test"))


def test_history_is_latest_positives_in_time_order():
    lk = lookups(history_len=2)
    # u1 positives by time: a (10), a (20), b (30); c (40) is a negative. Last two: a, b.
    assert lk.histories[1] == [1, 2]
    assert lk.histories[2] == [3]


def test_known_pair_gets_its_codes_and_history():
    out = render_candidates(pairs(["u1"], ["c"]), lookups(), TEMPLATES, "binary", "text", 10)
    row = out.to_pylist()[0]
    assert (row["uid"], row["iid"], row["mode"], row["cold"]) == (1, 3, "binary", False)
    assert '"Alpha", "Beta"' in row["prompt"] and '"Gamma"' in row["prompt"]
    assert "0001" in row["prompt"] and "1100" in row["prompt"]
    assert row["label"] is None and len(row["prompt_hash"]) == 16


@pytest.mark.parametrize(("user", "item"), [("nobody", "a"), ("u1", "z"), ("u3", "a"), ("u1", "q")])
def test_unknown_user_or_item_falls_back_to_text_and_is_cold(user: str, item: str):
    out = render_candidates(pairs([user], [item]), lookups(), TEMPLATES, "binary", "text", 10)
    row = out.to_pylist()[0]
    assert row["mode"] == "text" and row["cold"] is True
    # No code of anyone leaks into a text prompt.
    assert not any(code in row["prompt"] for code in ("0001", "0010", "1000", "0100", "1100"))
    if item == "z":
        assert '"Zeta"' in row["prompt"]  # titled from ingest/items though outside item_map
    if item == "q":
        assert '"q"' in row["prompt"]  # no title anywhere: the source id stands in


def test_skip_and_error_policies():
    p = pairs(["u1", "nobody", "u2"], ["a", "a", "b"], [1, 0, 1])
    kept = render_candidates(p, lookups(), TEMPLATES, "dotdec", "skip", 10)
    assert kept["row"].to_pylist() == [0, 2] and kept["label"].to_pylist() == [1, 1]
    assert summary(kept, 3)["skipped_rows"] == 1
    with pytest.raises(DataError) as err:
        render_candidates(p, lookups(), TEMPLATES, "dotdec", "error", 10, where="c.parquet")
    assert "'nobody'" in str(err.value) and "row 1" in str(err.value)
    assert "c.parquet" in str(err.value) and "\n" not in str(err.value)


def test_text_mode_renders_everyone_and_still_flags_cold():
    out = render_candidates(
        pairs(["u1", "nobody"], ["a", "a"]), lookups(), TEMPLATES, "text", "skip", 10
    )
    assert out["mode"].to_pylist() == ["text", "text"]
    assert out["cold"].to_pylist() == [False, True]


def test_input_checks_are_one_line():
    with pytest.raises(DataError, match="no item column"):
        check_pairs(pa.table({"user": ["u1"]}), "x.parquet")
    with pytest.raises(DataError, match="empty user in row 1"):
        check_pairs(pa.table({"user": ["u1", None], "item": ["a", "b"]}), "x.parquet")
    ints = check_pairs(pa.table({"user": [1, 2], "item": [3, 4]}), "x")
    assert ints["user"].type == pa.string() and ints["label"].null_count == 2
    with pytest.raises(DataError, match="user column holds double, not ids"):
        check_pairs(pa.table({"user": [1.0, 2.0], "item": ["a", "b"]}), "x.parquet")
    with pytest.raises(DataError, match="label column holds string at x.parquet; give label"):
        check_pairs(pa.table({"user": ["u"], "item": ["a"], "label": ["yes"]}), "x.parquet")
    with pytest.raises(DataError, match="has label 5 in row 1"):
        check_pairs(pa.table({"user": ["u", "v"], "item": ["a", "b"], "label": [1, 5]}), "x")
    labels = check_pairs(
        pa.table({"user": ["u", "v", "w"], "item": ["a"] * 3, "label": [True, None, False]}), "x"
    )["label"]
    assert labels.type == pa.int8() and labels.to_pylist() == [1, None, 0]
    # What pandas writes: categorical ids, float labels with a gap, an empty frame's columns.
    pandas_like = pa.table(
        {
            "user": pa.array(["u", "v", "u"]).dictionary_encode(),
            "item": ["a", "b", "c"],
            "label": [1.0, None, 0.0],
        }
    )
    got = check_pairs(pandas_like, "x")
    assert got["user"].to_pylist() == ["u", "v", "u"] and got["label"].to_pylist() == [1, None, 0]
    with pytest.raises(DataError, match="has label 0.5 in row 0"):
        check_pairs(pa.table({"user": ["u"], "item": ["a"], "label": [0.5]}), "x")
    empty = pa.table({"user": pa.nulls(0), "item": pa.nulls(0), "label": pa.nulls(0)})
    assert (
        check_pairs(empty, "x").schema
        == check_pairs(pa.table({"user": ["u"], "item": ["a"]}), "x").slice(0, 0).schema
    )


def test_distinct_pairs_keeps_first_in_order():
    p = check_pairs(pa.table({"user": ["b", "a", "b"], "item": ["x", "y", "x"]}), "x")
    out = distinct_pairs(p)
    assert out["user"].to_pylist() == ["b", "a"] and out.schema == p.schema
