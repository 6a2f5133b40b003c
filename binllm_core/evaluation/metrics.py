"""AUC and UAUC exactly as the official evaluation computes them (method file, section 3.8).

* AUC is sklearn's ``roc_auc_score``: the Mann-Whitney statistic with tied scores counted half,
  computed here from average ranks so that no sklearn is needed.
* UAUC groups rows by user, skips users with fewer than 2 rows or a single class, and takes the
  unweighted mean of the per-user AUCs.

Both return ``nan`` where they are undefined (one class overall, or no eligible user), which the
stages report as ``null``.
"""

from __future__ import annotations

import math

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start..end-1, 1-based
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean over users of the per-user AUC (users with both classes only)."""
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(users) == 0:
        return math.nan
    # Sort by user, then score: ties are runs of equal (user, score) inside one user's block.
    order = np.lexsort((scores, users))
    u, y, s = users[order], labels[order], scores[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    user_start = np.flatnonzero(new_user)
    tie_start = np.flatnonzero(new_tie)
    tie_end = np.r_[tie_start[1:], len(u)]
    # Position of each row's user block start, to turn global positions into in-user ranks.
    block_of_tie = np.cumsum(new_user)[tie_start] - 1
    offset = user_start[block_of_tie]
    tie_rank = (tie_start + tie_end + 1) / 2.0 - offset
    ranks = np.repeat(tie_rank, tie_end - tie_start)
    block = np.cumsum(new_user) - 1
    n_blocks = len(user_start)
    n_pos = np.bincount(block, weights=y, minlength=n_blocks)
    n_all = np.bincount(block, minlength=n_blocks).astype(np.float64)
    n_neg = n_all - n_pos
    pos_rank_sum = np.bincount(block, weights=ranks * y, minlength=n_blocks)
    eligible = (n_pos > 0) & (n_neg > 0)
    if not eligible.any():
        return math.nan
    per_user = (pos_rank_sum[eligible] - n_pos[eligible] * (n_pos[eligible] + 1) / 2.0) / (
        n_pos[eligible] * n_neg[eligible]
    )
    return float(per_user.mean())


def score_report(
    users: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    warm: np.ndarray,
    not_cold: np.ndarray,
) -> dict[str, float]:
    """AUC and UAUC overall, on warm rows and on cold rows (``not not_cold``), as one dict.

    Keys: ``auc, uauc, warm_auc, warm_uauc, cold_auc, cold_uauc``.
    """
    report = {"auc": auc(labels, scores), "uauc": uauc(users, labels, scores)}
    for name, mask in (("warm", np.asarray(warm, bool)), ("cold", ~np.asarray(not_cold, bool))):
        report[f"{name}_auc"] = auc(labels[mask], scores[mask])
        report[f"{name}_uauc"] = uauc(users[mask], labels[mask], scores[mask])
    return report
