"""What the encoder learns (``encoder.objective``): one entry per objective in :data:`OBJECTIVES`,
each turning an epoch of train rows into batches and a batch's logits into a loss.

* ``rated`` (the paper's task): BCE-with-logits on the rated train samples, liked (label 1)
  against disliked (0). Its codes serve the prompts: a run keeps the epoch of the best valid AUC.
* ``implicit`` (what published binary-code retrievers train on: HashGNN, CIGAR/HashRec, BiGeaR):
  each liked train item against ``encoder.negatives`` items drawn uniformly from the catalog
  that the user never rated in train (with ``encoder.hard_negatives``, the first of them is one
  of the user's rated dislikes where the user has any), scored by BPR or by BCE
  (``encoder.implicit_loss``). Its codes serve the Hamming lists: a run keeps the epoch of the
  best valid NDCG@10 of the lists (:func:`list_ndcg`).
* ``mixed``: ``encoder.implicit_weight`` times the implicit loss plus the rest times the rated
  one, in the same steps; kept by NDCG@10 like ``implicit``.

Negatives are drawn from a generator seeded by (seed, epoch, rank), so a resumed run draws what
the uninterrupted one drew.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from binllm_core.config import EncoderConfig
from binllm_core.encoder.data import Rows
from binllm_core.ranking.metrics import METRICS

AUC, NDCG = "auc", "ndcg"
LIST_K = 10
"""The list length of the NDCG a retrieval objective keeps its best epoch by."""


@dataclass(frozen=True)
class Seen:
    """Every (user, item) pair rated in train, as sorted keys ``user * item_num + item``, and
    each user's rated dislikes (the hard negatives) as a CSR table."""

    keys: np.ndarray
    item_num: int
    dislike_start: np.ndarray
    dislikes: np.ndarray

    @classmethod
    def of(cls, train: Rows, user_num: int, item_num: int) -> Seen:
        keys = np.unique(train.users.astype(np.int64) * item_num + train.items)
        bad = train.labels < 0.5
        order = np.lexsort((train.items[bad], train.users[bad]))
        users, items = train.users[bad][order], train.items[bad][order]
        start = np.searchsorted(users, np.arange(user_num + 1))
        return cls(keys, item_num, start, items.astype(np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.item_num + items
        at = np.searchsorted(self.keys, keys)
        at = np.minimum(at, len(self.keys) - 1)
        return self.keys[at] == keys if len(self.keys) else np.zeros(len(keys), bool)

    def items_of(self, user: int) -> np.ndarray:
        """The items ``user`` rated in train (sorted)."""
        lo = np.searchsorted(self.keys, user * self.item_num)
        hi = np.searchsorted(self.keys, (user + 1) * self.item_num)
        return self.keys[lo:hi] - user * self.item_num


@dataclass
class Batch:
    """One step's pairs: first the implicit part (``positives`` liked pairs, then ``negatives``
    drawn pairs for each, negative j of positive b at ``positives * (1 + j) + b``), then the
    rated pairs with their ``labels``."""

    users: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor
    positives: int = 0
    negatives: int = 0

    @property
    def implicit_rows(self) -> int:
        return self.positives * (1 + self.negatives)


@dataclass(frozen=True)
class Objective:
    """One entry of :data:`OBJECTIVES`: which losses it sums and the metric its codes serve."""

    implicit: bool
    rated: bool
    serves: str

    def weights(self, cfg: EncoderConfig) -> tuple[float, float]:
        """The weights of the implicit and the rated loss."""
        if self.implicit and self.rated:
            return cfg.implicit_weight, 1.0 - cfg.implicit_weight
        return float(self.implicit), float(self.rated)

    def batches(
        self,
        rows: Rows,
        cfg: EncoderConfig,
        batch_size: int,
        gen: torch.Generator,
        rng: np.random.Generator,
        seen: Seen | None,
    ) -> Iterator[Batch]:
        """One epoch over this worker's ``rows``: the rated rows in a seeded order, and the
        liked ones (each with its drawn negatives) spread over as many steps."""
        rated = torch.randperm(len(rows), generator=gen) if self.rated else None
        liked = np.flatnonzero(rows.labels > 0.5) if self.implicit else np.array([], np.int64)
        if self.implicit:
            liked = liked[torch.randperm(len(liked), generator=gen).numpy()]
        steps = math.ceil((len(rows) if self.rated else len(liked)) / batch_size)
        per_step = math.ceil(len(liked) / steps) if steps else 0
        users, items = torch.from_numpy(rows.users), torch.from_numpy(rows.items)
        labels = torch.from_numpy(rows.labels)
        for step in range(steps):
            parts_u, parts_i, n_pos = [], [], 0
            if self.implicit:
                chosen = liked[step * per_step : (step + 1) * per_step]
                u, i = rows.users[chosen], rows.items[chosen]
                negatives = draw_negatives(u, cfg.negatives, cfg.hard_negatives, seen, rng)
                parts_u.append(np.concatenate([u, np.tile(u, cfg.negatives)]))
                parts_i.append(np.concatenate([i, negatives.T.reshape(-1)]))
                n_pos = len(chosen)
            if self.rated:
                sl = rated[step * batch_size : (step + 1) * batch_size]
                parts_u.append(users[sl].numpy())
                parts_i.append(items[sl].numpy())
                batch_labels = labels[sl]
            else:
                batch_labels = torch.zeros(0)
            yield Batch(
                torch.from_numpy(np.concatenate(parts_u)),
                torch.from_numpy(np.concatenate(parts_i)),
                batch_labels,
                n_pos,
                cfg.negatives if self.implicit else 0,
            )

    def loss(self, logits: torch.Tensor, batch: Batch, cfg: EncoderConfig) -> torch.Tensor:
        implicit_weight, rated_weight = self.weights(cfg)
        total = logits.new_zeros(())
        if self.implicit and batch.positives:
            cut = batch.implicit_rows
            total = total + implicit_weight * implicit_loss(
                logits[:cut], batch.positives, batch.negatives, cfg.implicit_loss
            )
        if self.rated:
            rated = logits[batch.implicit_rows :]
            total = total + rated_weight * F.binary_cross_entropy_with_logits(rated, batch.labels)
        return total


OBJECTIVES: dict[str, Objective] = {
    "rated": Objective(implicit=False, rated=True, serves=AUC),
    "implicit": Objective(implicit=True, rated=False, serves=NDCG),
    "mixed": Objective(implicit=True, rated=True, serves=NDCG),
}
"""``encoder.objective`` -> :class:`Objective`. A new objective is an entry here."""


def implicit_loss(logits: torch.Tensor, positives: int, negatives: int, kind: str) -> torch.Tensor:
    """BPR (mean of ``-log sigmoid(pos - neg)`` over every drawn negative) or BCE (liked pairs
    1, drawn pairs 0, each part a mean, summed) of an implicit part laid out as in
    :class:`Batch`."""
    pos = logits[:positives]
    neg = logits[positives:].view(negatives, positives)
    if kind == "bpr":
        return -F.logsigmoid(pos.unsqueeze(0) - neg).mean()
    return F.binary_cross_entropy_with_logits(
        pos, torch.ones_like(pos)
    ) + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, batch: Batch, temperature: float
) -> torch.Tensor:
    """KL divergence from the teacher's softmax over each liked item and its drawn items to
    the student's, at ``temperature``, times its square (so the term's gradients keep their
    size as the temperature changes); the mean over liked items. Logits are laid out as in
    :class:`Batch`; the teacher's should carry no gradient."""
    if not batch.positives:
        return student.new_zeros(())

    def groups(logits: torch.Tensor) -> torch.Tensor:  # (positives, 1 + negatives)
        part = logits[: batch.implicit_rows].view(1 + batch.negatives, batch.positives)
        return part.T / temperature

    target = F.log_softmax(groups(teacher), dim=-1)
    guess = F.log_softmax(groups(student), dim=-1)
    kl = F.kl_div(guess, target, log_target=True, reduction="batchmean")
    return kl * temperature**2


def draw_negatives(
    users: np.ndarray, k: int, hard: bool, seen: Seen | None, rng: np.random.Generator
) -> np.ndarray:
    """``k`` items per user (``(len(users), k)``), uniform over the catalog's ids ``1..n-1``,
    redrawn (up to 10 times) where the user rated the item in train; with ``hard``, column 0
    is one of the user's rated dislikes where the user has any."""
    item_num = seen.item_num if seen is not None else 0
    out = rng.integers(1, item_num, size=(len(users), k))
    if seen is None:
        return out
    rows = np.repeat(users, k).reshape(len(users), k)
    for _ in range(10):
        clash = seen.contains(rows.reshape(-1), out.reshape(-1)).reshape(out.shape)
        if not clash.any():
            break
        out[clash] = rng.integers(1, item_num, size=int(clash.sum()))
    if hard and k:
        start, end = seen.dislike_start[users], seen.dislike_start[users + 1]
        has = end > start
        pick = start[has] + (rng.random(int(has.sum())) * (end[has] - start[has])).astype(np.int64)
        out[has, 0] = seen.dislikes[pick]
    return out


def list_ndcg(
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    valid: Rows,
    seen: Seen,
    popularity: np.ndarray,
    k: int = LIST_K,
) -> float:
    """NDCG@``k`` of each valid user's list (items by inner product of the two tables, the
    user's train items left out, ties by train popularity then id), against the user's valid
    positives; the mean over users with one. For ±1 codes the order is the Hamming order."""
    liked = valid.labels > 0.5
    # Each valid user's positives, grouped once (a mask per user costs users x rows an epoch).
    liked_users, liked_items = valid.users[liked], valid.items[liked]
    order = np.argsort(liked_users, kind="stable")
    users, starts = np.unique(liked_users[order], return_index=True)
    groups = np.split(liked_items[order], starts[1:])
    positives_of = dict(zip(users.tolist(), groups, strict=True))
    if not len(users):
        return float("nan")
    # In float64 a tie term below 1e-6 orders equal scores (a code's inner product is an even
    # integer) and leaves distinct ones as they are.
    tie = torch.from_numpy(popularity / (1.0 + popularity.max()) * 1e-6).to(item_table.device)
    users_t, items_t = user_table.double(), item_table.double()
    hits, n_pos = [], []
    for chunk in np.array_split(users, max(1, len(users) // 512)):
        scores = users_t[torch.from_numpy(chunk)] @ items_t.T + tie
        scores[:, 0] = -math.inf  # the padding id
        for row, user in enumerate(chunk):
            scores[row, torch.from_numpy(seen.items_of(int(user)))] = -math.inf
        top = torch.topk(scores, k, dim=1).indices.cpu().numpy()
        for row, user in enumerate(chunk):
            positives = positives_of[int(user)]
            hits.append(np.isin(top[row], positives))
            n_pos.append(len(np.unique(positives)))
    return float(METRICS[NDCG].per_user(np.array(hits), np.array(n_pos)).mean())
