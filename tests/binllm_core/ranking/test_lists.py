"""Ranking metrics against hand-computed values and their bootstrap intervals; the paired ratio
of two methods; top-by-score order; the ranking config rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from binllm_core.config import load_config
from binllm_core.errors import ConfigError
from binllm_core.ranking.lists import Ranked, ratio_rows, top_by_score
from binllm_core.ranking.metrics import (
    INTERVAL_KEYS,
    bootstrap_interval,
    ranking_metrics,
    ratio_interval,
    user_metrics,
)


def test_metrics_of_one_list_by_hand():
    ranked, positives = np.array([5, 3, 9, 1]), np.array([3, 1])
    at2 = user_metrics(ranked, positives, 2)  # hits: -, 3
    assert at2["recall"] == 0.5 and at2["hr"] == 1.0 and at2["mrr"] == 0.5
    assert at2["ndcg"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    at4 = user_metrics(ranked, positives, 4)  # hits at ranks 2 and 4
    ideal = 1 + 1 / math.log2(3)
    assert at4["ndcg"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    assert at4["recall"] == 1.0 and at4["mrr"] == 0.5
    miss = user_metrics(ranked, np.array([7]), 4)
    assert miss == {"recall": 0.0, "ndcg": 0.0, "hr": 0.0, "mrr": 0.0}


def test_mean_over_users_with_positives_and_missing_lists_are_misses():
    lists = {1: np.array([4, 2]), 2: np.array([8])}
    positives = {1: np.array([4]), 2: np.array([9]), 3: np.array([1]), 4: np.array([], int)}
    got = ranking_metrics(lists, positives, [1])[1]
    assert got["users"] == 3  # user 4 has no positive; user 3 has no list (all misses)
    assert got["hr"] == pytest.approx(1 / 3) and got["ndcg"] == pytest.approx(1 / 3)


def test_intervals_hold_the_mean_and_are_the_same_on_a_rerun():
    rng = np.random.default_rng(0)
    lists = {u: rng.permutation(30)[:10] for u in range(200)}
    positives = {u: rng.choice(30, 2, replace=False) for u in range(200)}
    found = ranking_metrics(lists, positives, [5, 10], resamples=500, seed=11)
    assert found == ranking_metrics(lists, positives, [5, 10], resamples=500, seed=11)
    assert found != ranking_metrics(lists, positives, [5, 10], resamples=500, seed=12)
    for k, at_k in found.items():
        for key in ("recall", "ndcg", "hr", "mrr"):
            assert at_k[f"{key}_low"] < at_k[key] < at_k[f"{key}_high"], (k, key)
        # the means are those without intervals
        assert {m: at_k[m] for m in ("ndcg", "hr")} == {
            m: ranking_metrics(lists, positives, [k])[k][m] for m in ("ndcg", "hr")
        }
    assert not set(INTERVAL_KEYS) & set(ranking_metrics(lists, positives, [5])[5])


def test_the_bootstrap_draws_depend_on_the_users_not_on_the_figures():
    values = np.random.default_rng(1).random((50, 3))
    low, high = bootstrap_interval(values, 200, seed=5)
    low1, high1 = bootstrap_interval(values[:, 1:2], 200, seed=5)
    assert (low1[0], high1[0]) == (low[1], high[1])  # another method, the same resamples
    same = bootstrap_interval(np.full((50, 1), 0.25), 200, seed=5)
    assert (same[0][0], same[1][0]) == (0.25, 0.25)


def test_a_paired_ratio_is_surer_than_the_two_intervals_it_is_made_of():
    rng = np.random.default_rng(3)
    hard = rng.random(400)  # what both methods share: how easy each user is
    better, worse = hard, 0.9 * hard + 0.05 * rng.random(400)
    ratio, low, high = ratio_interval(worse, better, 1000, seed=5)
    assert ratio == pytest.approx(worse.mean() / better.mean())
    assert low < ratio < high
    # the unpaired bounds would allow from low/high to high/low; pairing rules most of it out
    (w_low, b_low), (w_high, b_high) = bootstrap_interval(np.stack([worse, better], 1), 1000, 5)
    assert high - low < 0.5 * (w_high / b_low - w_low / b_high)
    assert ratio_interval(worse, better, 1000, seed=5) == (ratio, low, high)  # a re-run
    scaled = ratio_interval(0.5 * better, better, 200, seed=5)
    assert scaled == pytest.approx((0.5, 0.5, 0.5))
    assert math.isnan(ratio_interval(worse, better, 0, seed=5)[1])  # no resamples, no bounds
    nothing = np.zeros(400)
    assert all(math.isnan(v) for v in ratio_interval(worse, nothing, 100, seed=5))  # not inf
    one = np.zeros(400)
    one[7] = 1.0  # a third of the draws leave this user out: undefined ratios, not the bounds
    ratio, low, high = ratio_interval(worse, one, 200, seed=5)
    assert ratio == pytest.approx(worse.mean() / one.mean()) and 0 < low < high


def test_codes_against_float_on_every_user_with_the_paired_interval():
    rng = np.random.default_rng(4)
    users = list(range(300))
    positives = {u: rng.choice(50, 2, replace=False) for u in users}
    sets = {"all": users}
    lists = {
        "codes": {u: rng.permutation(50)[:10] for u in users},
        "float": {u: np.concatenate([positives[u][:1], rng.permutation(50)[:9]]) for u in users},
    }
    ranked = [
        Ranked("full", "test", method, method, lists[method], positives, sets, (5, 10))
        for method in ("codes", "float")
    ] + [Ranked("full", "valid", "codes", "codes", lists["codes"], positives, sets, (10,))]
    (row,) = ratio_rows(ranked, resamples=300, seed=2)  # valid has no float lists: no ratio
    missing = Ranked("full", "test", "float", "float", {}, positives, sets, (5, 10))
    (undefined,) = ratio_rows([ranked[0], missing], resamples=300, seed=2)
    assert math.isnan(undefined["ratio"]) and math.isnan(undefined["low"])
    fewer = Ranked(
        "full", "test", "float", "float", lists["float"], positives, {"all": users[1:]}, (10,)
    )
    with pytest.raises(ValueError, match="not the same users"):
        ratio_rows([ranked[0], fewer])
    means = {m: ranking_metrics(lists[m], positives, [10])[10]["ndcg"] for m in lists}
    assert row["ratio"] == pytest.approx(means["codes"] / means["float"])
    assert row["low"] < row["ratio"] < row["high"] < 1.0  # random lists lose, surely
    assert (row["split"], row["numerator"], row["denominator"]) == ("test", "codes", "float")
    assert (row["metric"], row["users"], row["n_users"]) == ("ndcg@10", "all", 300)


def test_top_by_score_breaks_ties_by_column_and_skips_exclusions():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert top_by_score(scores, 3)[0].tolist() == [1, 2, 4]
    assert top_by_score(scores, 3, [np.array([2])])[0].tolist() == [1, 4, 3]
    assert top_by_score(scores, 9, [np.array([0, 1, 2, 3, 4])])[0].tolist() == []


def test_max_users_moved_from_retrieve_to_rerank_is_one_line_at_load(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["retrieve.max_users=25"])
    message = str(err.value)
    assert message.startswith("config key retrieve.max_users moved to rerank.max_users at --set")
    assert "\n" not in message
    old = tmp_path / "old.yaml"
    old.write_text("retrieve:\n  top_n: 50\n  max_users: 25\n")
    with pytest.raises(ConfigError, match=f"moved to rerank.max_users at {old}; "):
        load_config(old)
    assert load_config("configs/tiny.yaml", ["rerank.max_users=3"]).rerank.max_users == 3


def test_rerank_cannot_take_more_candidates_than_retrieved():
    with pytest.raises(ConfigError, match="rerank.top_n = 30 is more than"):
        load_config("configs/tiny.yaml", ["retrieve.top_n=20", "rerank.top_n=30"])
    with pytest.raises(ConfigError, match="retrieve.tie_break"):
        load_config("configs/tiny.yaml", ["retrieve.tie_break=random"])
