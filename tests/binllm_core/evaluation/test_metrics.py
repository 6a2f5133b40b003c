"""AUC and UAUC against a brute-force pairwise count (ties count half)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from binllm_core.evaluation.metrics import auc, score_report, uauc


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def brute_uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    values = []
    for u in np.unique(users):
        m = users == u
        if m.sum() < 2 or len(np.unique(labels[m])) < 2:
            continue
        values.append(brute_auc(labels[m], scores[m]))
    return float(np.mean(values)) if values else math.nan


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_uauc_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    users = rng.integers(1, 40, n)
    labels = rng.integers(0, 2, n)
    # Few distinct values: many ties, within and across users.
    scores = rng.integers(-4, 5, n).astype(np.float64) + labels * rng.integers(0, 2, n)
    assert auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    assert uauc(users, labels, scores) == pytest.approx(
        brute_uauc(users, labels, scores), abs=1e-12
    )


def test_edge_cases() -> None:
    assert auc(np.array([1, 0]), np.array([0.3, 0.3])) == 0.5
    assert auc(np.array([1, 0, 1]), np.array([2.0, 1.0, 3.0])) == 1.0
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    # User 1: one row (skipped); user 2: one class (skipped); user 3: perfect; user 4: inverted.
    users = np.array([1, 2, 2, 3, 3, 4, 4])
    labels = np.array([1, 0, 0, 1, 0, 1, 0])
    scores = np.array([0.0, 1.0, 2.0, 5.0, 1.0, 1.0, 5.0])
    assert uauc(users, labels, scores) == 0.5
    assert math.isnan(uauc(users[:3], labels[:3], scores[:3]))


def test_score_report_subsets() -> None:
    rng = np.random.default_rng(7)
    n = 300
    users = rng.integers(1, 20, n)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n)
    warm = rng.random(n) < 0.5
    not_cold = rng.random(n) < 0.7
    report = score_report(users, labels, scores, warm, not_cold)
    assert report["warm_auc"] == pytest.approx(brute_auc(labels[warm], scores[warm]))
    cold = ~not_cold
    assert report["cold_uauc"] == pytest.approx(brute_uauc(users[cold], labels[cold], scores[cold]))
    assert set(report) == {"auc", "uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc"}
