"""Ranking metrics against hand-computed values; top-by-score order; the ranking config rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from binllm_core.config import load_config
from binllm_core.errors import ConfigError
from binllm_core.ranking.lists import top_by_score
from binllm_core.ranking.metrics import ranking_metrics, user_metrics


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
