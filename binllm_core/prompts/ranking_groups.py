"""Listwise training groups: the lists the LLM re-ranks, rebuilt from the train split with the
answer known (LlamaRec: train the ranker on its retriever's candidates; CIGAR: half its
negatives from the candidate set).

At re-rank time the LLM orders a user's top retrieved candidates, items the user never rated
in train, each asked about with the user's liked titles as the history. A training group is that
situation at a point of the user's train history:

* the **point**: one of the user's train positives (liked items ordered by time, then sample
  id); each user gives the latest ``per_user`` points whose history holds at least
  ``min_history`` items: the latest points are the nearest to what the product re-ranks (the
  whole train history, then the next item);
* the **history**: the point sample's own, as the protocol wrote it (the user's positives
  strictly before its second, the last ``history_len``, oldest first): what that sample's
  prompt shows, so items liked in the same second are never in it;
* the **positive**: the liked item at the point, always ``items[0]``;
* ``size - 1`` **negatives**: a share ``uniform_share`` (rounded) drawn uniformly from the
  catalog, the rest drawn from the first ``pool`` items of the user's retrieved candidates
  (the retriever's ranking, best first; ``pool = size - 1`` takes its top exactly). A
  negative is never an item the user rated in train at any time: a later liked item would be a
  false negative, and the product's candidates leave train interactions out too. When the
  candidates run short the catalog fills the group.

Only train interactions are excluded: a user's valid or test items are unknown to training and
can be drawn as negatives (from the candidates, where a good retriever ranks them high).

Draws are seeded per (seed, uid), so a user's groups do not depend on which other users are
built with it (Ray may shard users). :func:`group_prompts` writes a group's ``size`` prompts in
a prompt mode with :func:`~binllm_core.prompts.render.prompt_with_soft`, the function the
re-ranked candidates' prompts come from, so a group's prompts are the run's prompts for the same
(history, item).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from binllm_core.errors import DataError
from binllm_core.modes import MODES
from binllm_core.prompts.render import Lookups, code_of, prompt_with_soft
from binllm_core.prompts.templates import Templates


@dataclass(frozen=True)
class GroupSpec:
    """How many groups per user and what a group holds."""

    size: int
    """Prompts per group: the positive and ``size - 1`` negatives."""
    per_user: int = 1
    """Points per user, the latest ones."""
    min_history: int = 1
    """Items a point's history needs."""
    pool: int = 20
    """The retriever's first ``pool`` eligible candidates the candidate negatives come from."""
    uniform_share: float = 0.0
    """Share of the negatives drawn uniformly from the catalog (CIGAR: 0.5)."""

    def __post_init__(self) -> None:
        if self.size < 2 or self.per_user < 1 or self.min_history < 0:
            raise ValueError(f"a group needs size >= 2, per_user >= 1, min_history >= 0: {self}")
        if self.pool < 0 or not 0.0 <= self.uniform_share <= 1.0:
            raise ValueError(f"pool >= 0 and uniform_share in [0, 1]: {self}")

    @property
    def uniform(self) -> int:
        """Negatives drawn from the catalog when the candidates suffice."""
        return round(self.uniform_share * (self.size - 1))


@dataclass(frozen=True)
class RankingGroup:
    """One listwise example: the user's history at a point, the positive first in ``items``."""

    uid: int
    history: tuple[int, ...]
    items: tuple[int, ...]

    @property
    def positive(self) -> int:
        return self.items[0]


def build_groups(
    train: pl.DataFrame,
    candidates: Mapping[int, np.ndarray],
    catalog: np.ndarray,
    spec: GroupSpec,
    seed: int,
) -> list[RankingGroup]:
    """The groups of every user of ``train`` (the train split's samples: ``uid``, ``iid``,
    ``label``, ``timestamp``, ``sample_id``, ``history``), by uid, each user's points oldest
    first; a group's history is its liked sample's own (the protocol's: the user's positives
    strictly before that second, the last ``history_len``), as that sample's prompt shows it.

    ``candidates``: per uid, the retriever's items best first (a user without any gets catalog
    negatives only); ``catalog``: the item ids the uniform negatives come from. A point whose
    user has fewer than ``size - 1`` eligible items gives no group."""
    liked = pl.col("label") == 1
    users = (
        train.sort("uid", "timestamp", "sample_id")
        .group_by("uid", maintain_order=True)
        .agg(
            liked=pl.col("iid").filter(liked),
            histories=pl.col("history").filter(liked),
            rated=pl.col("iid"),
        )
    )
    catalog = np.unique(np.asarray(catalog))
    out = []
    for uid, liked, histories, rated in users.iter_rows():
        long_enough = [j for j, h in enumerate(histories) if len(h) >= spec.min_history]
        points = long_enough[-spec.per_user :]
        if not points:
            continue
        rng = np.random.default_rng([seed, uid])
        seen = np.unique(np.asarray(rated, np.int64))
        pool = first_unseen(candidates.get(uid, ()), seen, spec.pool)
        for j in points:
            negatives = _negatives(pool, catalog, seen, spec, rng)
            if negatives is not None:
                out.append(RankingGroup(uid, tuple(histories[j]), (liked[j], *negatives)))
    return out


def first_unseen(ranked: Sequence[int] | np.ndarray, banned: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of the retriever's ``ranked`` items that are not ``banned``, in its order
    (a repeated candidate counts once)."""
    ranked = np.asarray(ranked, np.int64)
    eligible = ranked[~np.isin(ranked, banned)]
    _, first = np.unique(eligible, return_index=True)
    return eligible[np.sort(first)][:n]


def _negatives(
    pool: np.ndarray,
    catalog: np.ndarray,
    seen: np.ndarray,
    spec: GroupSpec,
    rng: np.random.Generator,
) -> list[int] | None:
    """``size - 1`` distinct negatives: from ``pool`` (kept in the retriever's order), then
    uniform from the catalog less ``seen`` and those; None when there are not enough."""
    wanted = spec.size - 1
    hard = min(wanted - spec.uniform, len(pool))
    picked = pool[np.sort(rng.choice(len(pool), hard, replace=False))] if hard else pool[:0]
    uniform = _uniform(catalog, np.concatenate([seen, picked]), wanted - hard, rng)
    return None if uniform is None else [int(i) for i in (*picked, *uniform)]


def _uniform(
    catalog: np.ndarray, banned: np.ndarray, k: int, rng: np.random.Generator
) -> list[int] | None:
    """``k`` distinct items drawn uniformly from the sorted ``catalog`` less ``banned``; None
    when fewer are left. Draws are rejected and redrawn while most of the catalog is eligible
    (a user rates few items), so no pass over a large catalog is made per group."""
    banned = np.unique(banned)
    eligible = len(catalog) - int(np.isin(banned, catalog, assume_unique=True).sum())
    if eligible < k:
        return None
    if 2 * eligible < len(catalog):
        return [int(i) for i in rng.choice(np.setdiff1d(catalog, banned), k, replace=False)]
    taken = set(banned.tolist())
    out: list[int] = []
    while len(out) < k:
        for item in rng.choice(catalog, 2 * (k - len(out)) + 8).tolist():
            if item not in taken and len(out) < k:
                taken.add(item)
                out.append(item)
    return out


def valid_groups(
    train: pl.DataFrame,
    valid: pl.DataFrame,
    candidates: Mapping[int, np.ndarray],
    catalog: np.ndarray,
    size: int,
    seed: int,
) -> list[RankingGroup]:
    """One group per user of ``valid`` (its samples of the users to evaluate: ``uid``, ``iid``,
    ``label``, ``timestamp``, ``sample_id``, ``history``) with a liked item there, by uid: the
    history is that of the user's first valid sample (what stage ``retrieve`` records for the
    lists ``rerank`` orders: the positives before the split), the positive the user's first
    valid liked item, and the ``size - 1`` negatives the
    first of ``candidates[uid]`` (the retriever's order) that the user never rated in train and
    that are none of the user's valid items; a short list is filled uniformly from the catalog
    (seeded per user), a user without enough eligible items gives no group."""
    ordered = ["uid", "timestamp", "sample_id"]
    rated = train.group_by("uid").agg(pl.col("iid"))
    seen_of = dict(zip(rated["uid"].to_list(), rated["iid"].to_list(), strict=True))
    users = (
        valid.sort(ordered)
        .group_by("uid", maintain_order=True)
        .agg(
            positive=pl.col("iid").filter(pl.col("label") == 1).first(),
            items=pl.col("iid"),
            history=pl.col("history").first(),
        )
    )
    catalog = np.unique(np.asarray(catalog))
    out = []
    for uid, positive, items, history in users.sort("uid").iter_rows():
        if positive is None:
            continue
        banned = np.unique(np.asarray([*seen_of.get(uid, ()), *items], np.int64))
        hard = first_unseen(candidates.get(uid, ()), banned, size - 1)
        rng = np.random.default_rng([seed, uid])
        fill = _uniform(catalog, np.concatenate([banned, hard]), size - 1 - len(hard), rng)
        if fill is not None:
            negatives = [int(i) for i in (*hard, *fill)]
            out.append(RankingGroup(uid, tuple(history or ()), (int(positive), *negatives)))
    return out


def sample_users(uids: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The distinct ``uids``, sorted; a seeded random ``limit`` of them when 0 < limit < their
    number."""
    uids = np.unique(np.asarray(uids, np.int64))
    if not 0 < limit < len(uids):
        return uids
    return np.sort(np.random.default_rng(seed).choice(uids, limit, replace=False))


def held_out_negatives(groups: list[RankingGroup], held_out: Mapping[int, set[int]]) -> int:
    """How many negatives of ``groups`` are one of their user's ``held_out`` items (valid or
    test interactions): items a good retriever ranks high, which training cannot leave out
    without reading the labels it is measured on."""
    return sum(1 for g in groups for iid in g.items[1:] if iid in held_out.get(g.uid, ()))


@dataclass(frozen=True)
class GroupPrompts:
    """A group's prompts in one mode, the positive's first, with their 0/1 labels and, in
    ``soft`` mode, each prompt's soft ids."""

    prompts: list[str]
    labels: list[int]
    soft: list[list[int]] | None


def group_prompts(
    group: RankingGroup,
    lookups: Lookups,
    templates: Templates,
    mode: str,
    history_len: int,
) -> GroupPrompts:
    """The prompts of ``group`` in ``mode``: for each item, the prompt the run renders for the
    user with this history and that item (one-line error when an item has no title, or, in a
    code mode, the user or an item has no code)."""
    prompts, soft = [], []
    for iid in group.items:
        title = lookups.titles.get(iid)
        if title is None:
            raise DataError(
                f"item iid={iid} of a ranking group of user uid={group.uid} has no title",
                "samples/item_map + ingest/items",
                "build the groups' catalog and candidates from the run's items",
            )
        codes = None
        if MODES[mode].has_codes:
            codes = (
                code_of(lookups.user_codes[mode], group.uid, "user uid", mode),
                code_of(lookups.item_codes[mode], iid, "item iid", mode),
            )
        prompt, ids = prompt_with_soft(
            templates,
            mode,
            group.history,
            lookups.titles,
            history_len,
            title,
            codes,
            group.uid,
            iid,
        )
        prompts.append(prompt)
        soft.append(ids)
    labels = [1] + [0] * (len(group.items) - 1)
    return GroupPrompts(prompts, labels, soft if MODES[mode].soft else None)
