"""Train and time-aware popularity: the counts, the order, and a window chosen on valid only."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from binllm_core.ranking.popularity import (
    DAY_S,
    choose_window,
    head_lists,
    liked_counts,
    popularity_order,
)


def samples(rows: list[tuple[int, int, int, str, float]]) -> pl.DataFrame:
    """(uid, iid, label, split, day) rows."""
    uid, iid, label, split, day = zip(*rows, strict=True)
    return pl.DataFrame(
        {
            "uid": uid,
            "iid": iid,
            "label": label,
            "split": split,
            "timestamp": [int(d * DAY_S) for d in day],
        }
    )


# Item 1 was liked by many long ago, item 2 by a few lately (train ends on day 400, a dislike).
# Valid users like item 2, test users item 1: the last 30 days win on valid, the whole train
# (365 days) on test. Choosing on test would take 365.
TRAIN = [(u, 1, 1, "train", 100) for u in range(10, 16)] + [
    (20, 2, 1, "train", 390),
    (21, 2, 1, "train", 395),
    (22, 3, 0, "train", 400),
]
VALID = [(u, 2, 1, "valid", 401) for u in (30, 31, 32)] + [(33, 1, 0, "valid", 401)]
TEST = [(u, 1, 1, "test", 402) for u in (40, 41, 42, 43)]
ITEMS = np.arange(1, 6)


def test_counts_are_train_positives_and_a_window_keeps_its_last_days():
    frame = samples(TRAIN + VALID + TEST)
    assert liked_counts(frame, 6).tolist() == [0, 6, 2, 0, 0, 0]
    assert liked_counts(frame, 6, days=30).tolist() == [0, 0, 2, 0, 0, 0]
    assert liked_counts(frame, 6, days=5).tolist() == [0, 0, 1, 0, 0, 0]  # day 395 of 400


def test_the_window_is_chosen_on_valid_never_on_test():
    choice = choose_window(samples(TRAIN + VALID + TEST), ITEMS, [365, 30])
    assert choice is not None and choice.days == 30
    assert choice.valid_ndcg == {30: pytest.approx(1.0), 365: pytest.approx(1 / np.log2(3))}
    assert choice.popularity_valid_ndcg == pytest.approx(1 / np.log2(3))
    assert choice.valid_users == 3  # user 33 has no valid positive
    assert choice.scores.tolist() == [0, 0, 2, 0, 0, 0]
    assert choice.summary()["valid_ndcg@10"] == {"30": 1.0, "365": pytest.approx(1 / np.log2(3))}


def test_equal_windows_take_the_shortest_and_no_valid_positive_chooses_nothing():
    choice = choose_window(samples(TRAIN + VALID), ITEMS, [30, 15, 60])
    assert choice is not None and choice.days == 15 and list(choice.valid_ndcg) == [15, 30, 60]
    assert choose_window(samples(TRAIN + TEST), ITEMS, [30]) is None


def test_valid_positives_the_user_has_in_train_do_not_count_and_train_items_are_left_out():
    # User 30 has item 2 in train: its valid item 2 is no positive, its valid item 3 is, and
    # its list (2 left out) is 1, 3, ...: a hit at rank 2 whatever the window.
    rows = [*TRAIN, (30, 2, 1, "train", 100), (30, 2, 1, "valid", 401), (30, 3, 1, "valid", 401)]
    choice = choose_window(samples(rows), ITEMS, [30, 365])
    assert choice is not None and choice.valid_users == 1
    assert choice.valid_ndcg[365] == pytest.approx(1 / np.log2(3))


def test_order_breaks_ties_by_train_popularity_then_id():
    popularity = np.array([0, 1, 3, 3, 0, 2], np.float64)
    recent = np.array([0, 1, 0, 0, 1, 0], np.float64)
    items = np.arange(1, 6)
    assert popularity_order(recent, popularity, items).tolist() == [1, 4, 2, 3, 5]
    assert popularity_order(popularity, popularity, items).tolist() == [2, 3, 5, 1, 4]
    lists = head_lists(np.array([2, 3, 5, 1, 4]), [7, 8], [[3], []], 2)
    assert {u: v.tolist() for u, v in lists.items()} == {7: [2, 5], 8: [2, 3]}
