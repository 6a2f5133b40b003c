"""Hamming top-N: the order is (distance, tie score, id) for both backends, exactly as a brute-force
sort; excluded items never come back; the users table never leaks a split into its own list."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from binllm_core.ranking.retrieval import (
    BACKENDS,
    TIE_BREAKS,
    Catalog,
    backend,
    hamming,
    pack_bits,
    rerank_users,
    sampled_pool,
    tie_score,
    users_for_splits,
)


def catalog(n: int = 400, d: int = 16, seed: int = 0) -> tuple[Catalog, np.ndarray, np.ndarray]:
    """A catalog with shuffled ids and many distance ties (16 bits), plus 12 users."""
    rng = np.random.default_rng(seed)
    items = Catalog.build(
        iids=rng.permutation(np.arange(1, n + 1)),
        bits=rng.integers(0, 2, (n, d), dtype=np.uint8),
        popularity=rng.integers(0, 5, n),  # few values: popularity ties too, then id decides
        vectors=rng.uniform(-1, 1, (n, d)).astype(np.float32),
    )
    return items, rng.integers(0, 2, (12, d), dtype=np.uint8), rng.uniform(-1, 1, (12, d))


def brute_force(items: Catalog, bits: np.ndarray, tie, user: int, n: int, drop) -> list[int]:
    distance = (bits[user][None, :] != items.bits).sum(1)
    score = tie(np.array([user]), np.arange(len(items)))[0]
    keep = [p for p in range(len(items)) if p not in set(drop)]
    return sorted(keep, key=lambda p: (distance[p], -score[p], items.iids[p]))[:n]


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("rule", TIE_BREAKS)
def test_top_n_is_the_brute_force_order_with_the_tie_rule(name: str, rule: str):
    items, bits, vectors = catalog()
    tie = tie_score(rule, items, vectors)
    rng = np.random.default_rng(1)
    excluded = [rng.choice(len(items), size=int(rng.integers(0, 40)), replace=False) for _ in bits]
    found = backend(name, items, tie).search(np.arange(len(bits)), bits, 25, excluded)
    for user in range(len(bits)):
        expected = brute_force(items, bits, tie, user, 25, excluded[user])
        assert found.items[user].tolist() == expected
        assert not set(found.items[user].tolist()) & set(excluded[user].tolist())
        distance = (bits[user][None, :] != items.bits[expected]).sum(1)
        assert found.distances[user].tolist() == distance.tolist()


def test_ids_decide_the_last_ties_and_a_short_catalog_gives_short_lists():
    bits = np.zeros((5, 8), np.uint8)  # every item at distance 0: only the id orders them
    items = Catalog.build(np.array([9, 3, 7, 1, 5]), bits, np.zeros(5))
    tie = tie_score("id", items, None)
    for name in BACKENDS:
        found = backend(name, items, tie).search(
            np.array([0]), np.zeros((1, 8), np.uint8), 10, [np.array([1])]
        )
        assert items.iids[found.items[0]].tolist() == [1, 5, 7, 9]  # id 3 excluded


def test_packed_hamming_counts_differing_bits_across_words():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, (3, 96), dtype=np.uint8), rng.integers(0, 2, (4, 96), dtype=np.uint8)
    expected = (a[:, None, :] != b[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming(pack_bits(a), pack_bits(b)), expected)


def samples() -> pl.DataFrame:
    """User 1: train items 10, 11 (11 negative), valid 12, test 13 (positive) and 14 (negative).
    User 2: train 10, test 15 negative only (no positive: no list)."""
    rows = [
        (0, 1, 10, 1, "train", 100, []),
        (1, 1, 11, 0, "train", 101, [10]),
        (2, 1, 12, 1, "valid", 102, [10]),
        (3, 1, 13, 1, "test", 103, [10, 12]),
        (4, 1, 14, 0, "test", 104, [10, 12, 13]),
        (5, 2, 10, 1, "train", 100, []),
        (6, 2, 15, 0, "test", 101, [10]),
    ]
    names = ["sample_id", "uid", "iid", "label", "split", "timestamp", "history"]
    return pl.DataFrame(rows, schema=names, orient="row").with_columns(
        pl.col("uid").cast(pl.Int32),
        pl.col("iid").cast(pl.Int32),
        pl.col("history").cast(pl.List(pl.Int32)),
    )


def test_users_table_excludes_earlier_splits_never_the_split_itself():
    users = users_for_splits(samples(), ["test", "valid"], ["train", "valid"])
    test = users.filter(pl.col("split") == "test").row(0, named=True)
    assert test["uid"] == 1 and users.filter(pl.col("split") == "test").height == 1  # not user 2
    assert test["positives"] == [13]
    assert test["exclude"] == [10, 11, 12]  # train and valid, both labels
    assert test["seen"] == [10, 11, 12, 13, 14]
    assert test["history"] == [10, 12]  # as of the user's first test sample: no test item
    assert test["sampled_positive"] == 13
    valid = users.filter(pl.col("split") == "valid").row(0, named=True)
    assert valid["exclude"] == [10, 11] and valid["positives"] == [12]  # valid is not excluded


def test_sampled_pool_holds_the_positive_and_unseen_items_only_and_is_seeded():
    universe = np.arange(50)
    seen = np.array([1, 2, 3, 4])
    pool = sampled_pool(3, seen, universe, 20, seed=7, uid=5)
    assert pool[0] == 3 and len(pool) == 21 and len(set(pool.tolist())) == 21
    assert not set(pool[1:].tolist()) & set(seen.tolist())
    assert pool.tolist() == sampled_pool(3, seen, universe, 20, seed=7, uid=5).tolist()
    assert pool.tolist() != sampled_pool(3, seen, universe, 20, seed=7, uid=6).tolist()


def test_positives_are_counted_once_and_never_an_excluded_item():
    extra = pl.DataFrame(
        [(7, 1, 13, 1, "test", 105, [10, 12]), (8, 1, 10, 1, "test", 106, [10, 12])],
        schema=["sample_id", "uid", "iid", "label", "split", "timestamp", "history"],
        orient="row",
    ).with_columns(
        pl.col("uid").cast(pl.Int32),
        pl.col("iid").cast(pl.Int32),
        pl.col("history").cast(pl.List(pl.Int32)),
    )
    users = users_for_splits(pl.concat([samples(), extra]), ["test"], ["train", "valid"])
    # 13 twice counts once; 10 (liked again in test) is a train item: never a candidate.
    assert users.row(0, named=True)["positives"] == [13]


def test_the_llm_reranks_a_seeded_subset_of_each_splits_users_or_every_one():
    users = pl.DataFrame(
        {"split": ["test"] * 30 + ["valid"] * 3, "uid": [*range(30, 0, -1), 4, 5, 6]}
    )
    chosen = rerank_users(users, 5, seed=3)
    assert len(chosen["test"]) == 5 and chosen["test"].tolist() == sorted(chosen["test"])
    assert set(chosen["test"].tolist()) <= set(range(1, 31))
    assert chosen["valid"].tolist() == [4, 5, 6]  # fewer users than max_users: every one
    assert rerank_users(users, 5, seed=3)["test"].tolist() == chosen["test"].tolist()
    assert rerank_users(users, 5, seed=4)["test"].tolist() != chosen["test"].tolist()
    assert rerank_users(users, 0, seed=3)["test"].tolist() == list(range(1, 31))
