"""Listwise training groups: the next liked item against the retriever's candidates, seeded, and
written as the run's prompts."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from binllm_core.modes import ITEM_TOKEN, SOFT, USER_TOKEN
from binllm_core.prompts.ranking_groups import (
    GroupSpec,
    build_groups,
    group_prompts,
    held_out_negatives,
    sample_users,
    valid_groups,
)
from binllm_core.prompts.render import Lookups
from binllm_core.prompts.user_pairs import RunLookups, render_candidates
from tests.builders import TEMPLATES, item_code, user_code

CATALOG = np.arange(1, 61)
# (uid, iid, label, timestamp); rows out of time order on purpose.
ROWS = [
    (1, 12, 1, 30),
    (1, 10, 1, 10),
    (1, 13, 1, 40),
    (1, 20, 0, 25),
    (1, 11, 1, 20),
    (2, 15, 1, 20),
    (2, 14, 1, 10),
    (3, 16, 1, 10),
]


def with_history(frame: pl.DataFrame, before: pl.DataFrame | None = None) -> pl.DataFrame:
    """``frame`` with the protocol's history: each sample's user's positives (of ``before``
    and ``frame``) strictly before its second, oldest first."""
    every = frame if before is None else pl.concat([before.drop("history"), frame])
    liked = every.filter(pl.col("label") == 1).sort("timestamp", "sample_id")
    histories = [
        liked.filter((pl.col("uid") == u) & (pl.col("timestamp") < t))["iid"].to_list()[-10:]
        for u, t in frame.select("uid", "timestamp").iter_rows()
    ]
    return frame.with_columns(history=pl.Series(histories, dtype=pl.List(pl.Int64)))


def train() -> pl.DataFrame:
    uid, iid, label, ts = zip(*ROWS, strict=True)
    frame = pl.DataFrame(
        {
            "sample_id": list(range(len(ROWS))),
            "uid": uid,
            "iid": iid,
            "label": label,
            "timestamp": ts,
        }
    )
    return with_history(frame)


def candidates() -> dict[int, np.ndarray]:
    """User 1's retriever ranks its own later like (13) and its dislike (20) high."""
    return {
        1: np.array([13, 21, 20, 22, 23, 24, 25, 26, 27, 28]),
        2: np.array([31, 32, 33, 14]),
    }


def rated(uid: int) -> set[int]:
    return {i for u, i, _, _ in ROWS if u == uid}


def test_a_group_is_the_next_liked_item_after_the_history_at_the_latest_points() -> None:
    groups = build_groups(train(), candidates(), CATALOG, GroupSpec(size=4, per_user=2), seed=0)
    assert [(g.uid, g.history, g.positive) for g in groups] == [
        (1, (10, 11), 12),
        (1, (10, 11, 12), 13),
        (2, (14,), 15),
    ]  # user 3 has no liked item before its only one
    everything = build_groups(train(), candidates(), CATALOG, GroupSpec(size=4, per_user=9), 0)
    assert [g.positive for g in everything if g.uid == 1] == [11, 12, 13]
    no_history = GroupSpec(size=4, per_user=9, min_history=0)
    assert [g.history for g in build_groups(train(), {}, CATALOG, no_history, 0) if g.uid == 3] == [
        ()
    ]


def test_negatives_are_the_retrievers_items_the_user_never_rated() -> None:
    spec = GroupSpec(size=5, per_user=3, pool=4)
    for group in build_groups(train(), candidates(), CATALOG, spec, seed=3):
        assert len(group.items) == 5 and len(set(group.items)) == 5
        negatives = set(group.items[1:])
        assert not negatives & rated(group.uid)
        if group.uid == 1:  # the first four eligible candidates: 21, 22, 23, 24
            assert negatives == {21, 22, 23, 24}
    # pool = size - 1 is the retriever's top exactly, in its order.
    top = build_groups(train(), candidates(), CATALOG, GroupSpec(size=3, pool=2), seed=1)
    assert top[0].items[1:] == (21, 22)


def test_a_uniform_share_comes_from_the_catalog_and_short_candidates_are_filled() -> None:
    spec = GroupSpec(size=9, per_user=1, pool=20, uniform_share=0.5)
    user1 = next(g for g in build_groups(train(), candidates(), CATALOG, spec, 0) if g.uid == 1)
    eligible = [21, 22, 23, 24, 25, 26, 27, 28]
    assert sum(i in eligible for i in user1.items[1:]) >= 4
    assert all(i in CATALOG and i not in rated(1) for i in user1.items[1:])
    # User 2 has three eligible candidates: all of them, and the catalog gives the rest.
    user2 = next(g for g in build_groups(train(), candidates(), CATALOG, spec, 0) if g.uid == 2)
    only_candidates = GroupSpec(size=9, per_user=1, pool=20)
    filled = build_groups(train(), candidates(), CATALOG, only_candidates, 0)
    assert {31, 32, 33} <= set(next(g for g in filled if g.uid == 2).items[1:])
    assert len(user2.items) == 9 and not set(user2.items[1:]) & rated(2)
    # A user with fewer eligible items than the group's negatives gets none: in items 10-15,
    # user 1 never rated 14 and 15 only; user 2 never rated 10-13.
    small = build_groups(train(), {}, np.arange(10, 16), GroupSpec(size=4), 0)
    assert [g.uid for g in small] == [2] and set(small[0].items[1:]) < {10, 11, 12, 13}


def test_groups_are_seeded_per_user() -> None:
    spec = GroupSpec(size=6, per_user=2, pool=8, uniform_share=0.4)
    first = build_groups(train(), candidates(), CATALOG, spec, seed=7)
    assert first == build_groups(train(), candidates(), CATALOG, spec, seed=7)
    assert first != build_groups(train(), candidates(), CATALOG, spec, seed=8)
    alone = build_groups(train().filter(pl.col("uid") == 2), candidates(), CATALOG, spec, seed=7)
    assert alone == [g for g in first if g.uid == 2]


def test_a_bad_spec_fails() -> None:
    with pytest.raises(ValueError):
        GroupSpec(size=1)
    with pytest.raises(ValueError):
        GroupSpec(size=4, uniform_share=1.5)


def lookups() -> Lookups:
    titles = {int(i): f"item {i}" for i in CATALOG}
    users = {
        "binary": {u: user_code(u) for u in (1, 2, 3)},
        SOFT: dict.fromkeys((1, 2, 3), USER_TOKEN),
    }
    items = {"binary": {int(i): item_code(int(i)) for i in CATALOG}}
    items[SOFT] = dict.fromkeys(items["binary"], ITEM_TOKEN)
    return Lookups(titles, users, items)


@pytest.mark.parametrize("mode", ["text", "binary", SOFT])
def test_a_groups_prompts_are_the_runs_prompts_for_its_history_and_items(mode: str) -> None:
    spec = GroupSpec(size=4, per_user=1, pool=4)
    group = build_groups(train(), candidates(), CATALOG, spec, seed=0)[0]
    written = group_prompts(group, lookups(), TEMPLATES, mode, history_len=10)
    assert written.labels == [1, 0, 0, 0]
    run = RunLookups(
        uid_of={"u": group.uid},
        iid_of={str(i): i for i in group.items},
        title_of_item={},
        histories={group.uid: list(group.history)},
        prompt=lookups(),
    )
    pairs = pa.table(
        {
            "row": list(range(len(group.items))),
            "user": ["u"] * len(group.items),
            "item": [str(i) for i in group.items],
            "label": pa.nulls(len(group.items), pa.int8()),
        }
    )
    rendered = render_candidates(pairs, run, TEMPLATES, mode, "error", history_len=10)
    assert written.prompts == rendered["prompt"].to_pylist()
    if mode == SOFT:  # the soft ids of each prompt: the user's, then the item's
        assert written.soft == rendered["soft_ids"].to_pylist()
        assert [ids[-2:] for ids in written.soft] == [[1, i] for i in group.items]
    else:
        assert written.soft is None
    assert '"item 10", "item 11", "item 12"' in written.prompts[0]
    assert '"item 13"' in written.prompts[0]  # the positive, asked about first


def test_a_valid_group_is_the_valid_like_against_the_users_candidates() -> None:
    """History: the first valid sample's (the train likes in time order); positive: the first
    valid like; negatives: the
    retriever's first items the user never rated in train and none of its valid items; a user
    without candidates gets catalog items; a user without a valid like gets no group."""
    valid = pl.DataFrame(
        {
            "sample_id": [100, 101, 102, 103, 104],
            "uid": [1, 1, 1, 2, 3],
            "iid": [21, 50, 22, 40, 41],
            "label": [0, 1, 1, 1, 0],
            "timestamp": [50, 60, 70, 30, 30],
        }
    )
    valid = with_history(valid, train())
    found = valid_groups(train(), valid, candidates(), CATALOG, 4, seed=1)
    assert [g.uid for g in found] == [1, 2]
    one, two = found
    assert one.history == (10, 11, 12, 13) and one.items == (50, 23, 24, 25)
    assert two.history == (14, 15) and two.items[:4] == (40, 31, 32, 33)
    no_candidates = valid_groups(train(), valid, {}, CATALOG, 4, seed=1)[0]
    assert no_candidates.items[0] == 50 and len(set(no_candidates.items)) == 4
    assert not set(no_candidates.items[1:]) & (rated(1) | {21, 22, 50})
    assert no_candidates == valid_groups(train(), valid, {}, CATALOG, 4, seed=1)[0]


def test_users_are_sampled_seeded_and_held_out_negatives_counted() -> None:
    uids = np.array([5, 3, 3, 9, 1, 7])
    assert sample_users(uids, 0, 1).tolist() == [1, 3, 5, 7, 9]
    some = sample_users(uids, 3, 1)
    assert len(some) == 3 and set(some) <= {1, 3, 5, 7, 9}
    assert some.tolist() == sample_users(uids, 3, 1).tolist() == sorted(some.tolist())
    groups = build_groups(train(), candidates(), CATALOG, GroupSpec(size=4, pool=3), seed=0)
    held_out = {1: {21, 22, 99}, 2: {31}}
    expected = sum(i in held_out.get(g.uid, ()) for g in groups for i in g.items[1:])
    assert held_out_negatives(groups, held_out) == expected > 0


def test_a_group_shows_its_samples_history_never_an_item_of_the_same_second() -> None:
    """Items liked in the same second are not in each other's history (the protocol's rule,
    the one every prompt of the run follows)."""
    frame = pl.DataFrame(
        {
            "sample_id": [0, 1, 2, 3],
            "uid": [7, 7, 7, 7],
            "iid": [1, 2, 3, 4],
            "label": [1, 1, 1, 1],
            "timestamp": [10, 20, 20, 30],
        }
    )
    groups = build_groups(with_history(frame), {}, CATALOG, GroupSpec(size=3, per_user=9), 0)
    assert [(g.history, g.positive) for g in groups] == [((1,), 2), ((1,), 3), ((1, 2, 3), 4)]
