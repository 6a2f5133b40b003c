"""The blend of the LLM's and the retriever's scores: z-scores, the retriever's order at alpha 0,
the LLM's at 1, and alpha chosen on a valid curve (ties: the smaller)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from binllm_core.ranking.blend import (
    alpha_curve,
    blend_order,
    blend_scores,
    blend_weights,
    choose_alpha,
    zscore,
)

GRID = [round(0.1 * i, 1) for i in range(11)]


def test_zscore_standardizes_and_a_flat_score_is_zero():
    z = zscore(np.array([1.0, 2.0, 3.0, 6.0]))
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert np.array_equal(zscore(np.array([4.0, 4.0, 4.0])), np.zeros(3))
    assert zscore(np.array([])).size == 0


def test_alpha_zero_is_the_retrievers_order_and_alpha_one_the_llms():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        # Distances with many ties, in retrieval order (a tie rule decided among equals).
        hamming, rank = np.sort(rng.integers(0, 6, n)).astype(float), np.arange(1, n + 1)
        shuffle = rng.permutation(n)  # rows come in any order
        hamming, rank = hamming[shuffle], rank[shuffle]
        llm = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
        order = blend_order(blend_scores(llm, hamming, rank, 0.0), rank)
        assert np.array_equal(rank[order], np.arange(1, n + 1))
        order = blend_order(blend_scores(llm, hamming, rank, 1.0), rank)
        assert np.array_equal(order, np.lexsort((rank, -llm)))
    # a popularity list (no distances) is ordered by its rank; a flat LLM changes nothing
    rank = np.array([3, 1, 2])
    for alpha in (0.0, 0.5, 1.0):
        scores = blend_scores(np.zeros(3), np.full(3, np.nan), rank, alpha)
        assert rank[blend_order(scores, rank)].tolist() == [1, 2, 3]


def candidates(users: dict[int, tuple[list[float], list[int]]]) -> pl.DataFrame:
    """uid -> (LLM scores, distances) of items 1..n in retrieval order."""
    rows = [
        {"uid": u, "iid": i + 1, "score": s, "hamming": h, "retrieval_rank": i + 1}
        for u, (scores, distances) in users.items()
        for i, (s, h) in enumerate(zip(scores, distances, strict=True))
    ]
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=0)


def test_an_llm_against_the_positives_gets_alpha_zero():
    # The retriever puts each user's positive first; the LLM scores in the opposite order.
    users = {u: (list(range(10)), list(range(u, u + 10))) for u in (1, 2, 3)}
    positives = {u: np.array([1]) for u in users}
    curve = alpha_curve(candidates(users), positives, GRID)
    assert list(curve) == GRID
    assert curve[0.0] == pytest.approx(1.0) and curve[1.0] < 0.5
    assert choose_alpha(curve) == 0.0  # alpha up to 0.5 ties with 0: the smaller wins


def test_a_perfect_llm_gets_alpha_one():
    # The positive (item 5) is far down the retriever's list; the LLM puts it first, only just
    # above item 1, which the retriever puts first: any weight on the retriever loses it.
    scores = [0.99, 0.0, 0.0, 0.0, 1.0, 0.0]
    users = {u: (scores, [1, 4, 5, 6, 9, 9]) for u in (1, 2)}
    curve = alpha_curve(candidates(users), {1: np.array([5]), 2: np.array([5])}, GRID)
    assert curve[1.0] == pytest.approx(1.0) and max(v for a, v in curve.items() if a < 1) < 1
    assert choose_alpha(curve) == 1.0


def test_curve_counts_users_without_a_list_and_is_empty_without_positives():
    users = {1: ([0.0, 1.0], [0, 3])}
    curve = alpha_curve(candidates(users), {1: np.array([2]), 9: np.array([4])}, [0.0, 1.0])
    assert curve == {0.0: pytest.approx(0.5 / np.log2(3)), 1.0: pytest.approx(0.5)}
    assert alpha_curve(candidates(users), {1: np.array([], int)}, [0.0]) == {}


def test_choose_alpha_takes_the_best_and_the_smaller_of_equals():
    assert choose_alpha({0.0: 0.1, 0.5: 0.3, 1.0: 0.2}) == 0.5
    assert choose_alpha({0.0: 0.2, 0.3: 0.3, 0.6: 0.3 + 1e-15, 1.0: 0.1}) == 0.3
    with pytest.raises(ValueError, match="no valid figure"):
        choose_alpha({})


def test_weights_per_mode_forced_chosen_or_the_retriever_without_valid_users():
    # The retriever puts the positive (item 5) fifth; the text LLM puts it first, the binary
    # LLM last: text gets alpha 1, binary 0 (every weight ties with the retriever).
    distances = [1, 4, 5, 6, 9, 9]
    by_mode = {"text": [0.99, 0.0, 0.0, 0.0, 1.0, 0.0], "binary": [0.0, 0.0, 0.0, 0.0, -1.0, 0.0]}
    frame = pl.concat(
        candidates({u: (scores, distances) for u in (1, 2)}).with_columns(mode=pl.lit(mode))
        for mode, scores in by_mode.items()
    )
    positives = {1: np.array([5]), 2: np.array([5])}
    found = blend_weights(frame, positives, ["binary", "text"], [0.0, 0.5, 1.0])
    retriever = 1 / np.log2(6)
    assert found["binary"]["alpha"] == 0.0 and found["binary"]["valid_lift"] == 0.0
    assert found["text"]["alpha"] == 1.0 and found["text"]["chosen_by"] == "valid NDCG@10"
    assert found["text"]["valid_lift"] == pytest.approx(1 - retriever)
    assert found["text"]["valid_ndcg@10"]["0"] == pytest.approx(retriever)
    assert found["text"]["valid_users"] == 2 and list(found["text"]["valid_ndcg@10"]) == [
        "0",
        "0.5",
        "1",
    ]
    # A forced weight is used, measured beside the grid, and may do worse than the retriever.
    anti = candidates({u: (list(range(10)), list(range(10))) for u in (1, 2)})
    forced = blend_weights(
        anti.with_columns(mode=pl.lit("text")), {1: np.array([1])}, ["text"], [0.0, 1.0], 0.3
    )["text"]
    assert forced["alpha"] == 0.3 and forced["chosen_by"] == "rerank.alpha"
    assert list(forced["valid_ndcg@10"]) == ["0", "0.3", "1"] and forced["valid_lift"] <= 0
    assert forced["valid_ndcg@10"]["1"] < forced["valid_ndcg@10"]["0"]
    none = blend_weights(frame, {}, ["text"], [0.0, 1.0])["text"]
    assert none["alpha"] == 0.0 and none["valid_lift"] is None and none["valid_users"] == 0
    assert none["chosen_by"].startswith("no valid user")
