"""Top-N items per user by Hamming distance between binary codes, with one deterministic tie rule.

The encoder is trained on ``d - 2 * Hamming(user code, item code)`` (the inner product of the ±1
codes), so the items nearest in Hamming distance are the binary model's own ranking. A ``d``-bit
code has only ``d + 1`` distances, so most of a top-N list is decided by the tie rule:

1. smaller Hamming distance first;
2. then the larger *tie score* (:data:`TIE_BREAKS`): ``relaxed`` — the inner product of the
   codes' pre-sign vectors ``tanh(proj(e))`` (the binary model's own continuous score);
   ``popularity`` — the item's positives in train; ``id`` — none;
3. then the smaller item id.

Both backends (:data:`BACKENDS`) return exactly this order: ``numpy`` scans every item
(``np.bitwise_count`` of the XOR of packed ``uint64`` words, one user at a time);
``faiss`` (``IndexBinaryFlat``, for catalogs of 10^5-10^7 items) finds each user's N-th distance,
then collects every item at or below it with ``range_search`` and applies the same rule, so a
tie at the boundary is never cut by faiss's own order.

Items a user must not get (``exclude``: their train interactions, by default) are never returned;
a user with fewer eligible items than N gets fewer rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

TIE_BREAKS = ("relaxed", "popularity", "id")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Rows of bits ``(n, d)`` (uint8 0/1) -> ``(n, ceil(d / 64))`` uint64 words."""
    bits = np.atleast_2d(np.asarray(bits, dtype=np.uint8))
    packed = np.packbits(bits, axis=1)
    width = -(-packed.shape[1] // 8) * 8
    padded = np.zeros((packed.shape[0], width), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(np.uint64)


def hamming(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Hamming distances ``(b, n)`` of packed user codes ``(b, w)`` to item codes ``(n, w)``."""
    out = np.zeros((users.shape[0], items.shape[0]), np.int16)
    for word in range(users.shape[1]):
        out += np.bitwise_count(users[:, word, None] ^ items[None, :, word]).astype(np.int16)
    return out


TieScore = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(user rows (b,), item positions (m,) or (b, m))`` -> tie scores ``(b, m)`` in ``[0, 1)``,
larger first."""


@dataclass(frozen=True)
class Catalog:
    """The items one retriever ranks: ids, packed codes, and what the tie rule reads."""

    iids: np.ndarray
    """Item ids in ascending order (the tie rule's last key is the position here)."""
    codes: np.ndarray
    """Packed codes ``(n, w)`` uint64, row k for ``iids[k]``."""
    bits: np.ndarray
    """The same codes unpacked ``(n, d)`` uint8 (faiss takes bytes)."""
    popularity: np.ndarray
    """Train positives per item ``(n,)``."""
    vectors: np.ndarray | None = None
    """Pre-sign item vectors ``(n, d)`` for the ``relaxed`` tie score."""

    @classmethod
    def build(
        cls,
        iids: np.ndarray,
        bits: np.ndarray,
        popularity: np.ndarray,
        vectors: np.ndarray | None = None,
    ) -> Catalog:
        order = np.argsort(iids, kind="stable")
        bits = np.asarray(bits, np.uint8)[order]
        return cls(
            iids=np.asarray(iids)[order],
            codes=pack_bits(bits),
            bits=bits,
            popularity=np.asarray(popularity, np.float64)[order],
            vectors=None if vectors is None else np.asarray(vectors, np.float32)[order],
        )

    def __len__(self) -> int:
        return len(self.iids)

    def positions(self, iids: np.ndarray) -> np.ndarray:
        """Catalog positions of ``iids`` (ids not in the catalog are left out)."""
        iids = np.asarray(iids)
        pos = np.searchsorted(self.iids, iids)
        inside = pos < len(self.iids)
        pos, iids = pos[inside], iids[inside]
        return pos[self.iids[pos] == iids]


def tie_score(rule: str, catalog: Catalog, user_vectors: np.ndarray | None) -> TieScore:
    """The tie score of ``rule`` (:data:`TIE_BREAKS`) over ``catalog``, mapped into ``[0, 1)``."""
    if rule == "id":
        return lambda users, items: np.zeros(_shape(users, items), np.float64)
    if rule == "popularity":
        scaled = catalog.popularity / (catalog.popularity.max(initial=0.0) + 1.0)
        return lambda users, items: np.broadcast_to(scaled[items], _shape(users, items))
    if rule == "relaxed":
        if catalog.vectors is None or user_vectors is None:
            raise ValueError("the relaxed tie rule needs the pre-sign vectors of users and items")
        dim = catalog.vectors.shape[1]
        vectors = catalog.vectors.astype(np.float64)
        users_v = np.asarray(user_vectors, np.float64)

        def relaxed(users: np.ndarray, items: np.ndarray) -> np.ndarray:
            u = users_v[users]
            if items.ndim == 1:
                score = u @ vectors[items].T
            else:
                score = np.einsum("bd,bmd->bm", u, vectors[items])
            # |u . v| <= d for vectors in [-1, 1]^d: (s + d) / (2d + 1) lies in [0, 1).
            return (np.clip(score, -dim, dim) + dim) / (2 * dim + 1)

        return relaxed
    raise ValueError(f"unknown tie rule {rule!r}: choose among {', '.join(TIE_BREAKS)}")


def _shape(users: np.ndarray, items: np.ndarray) -> tuple[int, int]:
    return (len(users), items.shape[-1])


@dataclass
class TopN:
    """Per user: up to ``n`` item positions in rank order, their distances and tie scores."""

    items: list[np.ndarray]
    distances: list[np.ndarray]
    ties: list[np.ndarray]


def select_top(
    distance: np.ndarray,
    tie: np.ndarray,
    positions: np.ndarray,
    n: int,
    excluded: Sequence[np.ndarray],
) -> TopN:
    """Rank candidates ``positions`` of each user by (distance, -tie, position), drop the
    ``excluded`` positions and keep the first ``n``. ``positions`` is either every catalog
    position in order ``(m,)`` (one scan of the catalog) or a candidate set per user ``(b, m)``."""
    key = distance - tie  # float64: tie scores lie in [0, 1), so distance decides first
    dense = positions.ndim == 1  # every catalog position, in order: index by position
    if dense:
        positions = np.broadcast_to(positions, key.shape)
    for row, drop in enumerate(excluded):
        if len(drop):
            key[row, drop if dense else np.isin(positions[row], drop)] = np.inf
    out = TopN([], [], [])
    m = key.shape[1]
    for row in range(key.shape[0]):
        k = min(n, m)
        if k == 0:
            chosen = np.array([], np.int64)
        else:
            kth = np.partition(key[row], k - 1)[k - 1]
            near = np.flatnonzero(key[row] <= kth)
            near = near[np.isfinite(key[row, near])]
            order = np.lexsort((positions[row, near], key[row, near]))[:k]
            chosen = near[order]
        out.items.append(positions[row, chosen])
        out.distances.append(distance[row, chosen].astype(np.int16))
        out.ties.append(tie[row, chosen])
    return out


class HammingBackend(Protocol):
    """A top-N search over one catalog (built once per actor)."""

    def __init__(self, catalog: Catalog, tie: TieScore) -> None: ...

    def search(
        self, users: np.ndarray, codes: np.ndarray, n: int, excluded: Sequence[np.ndarray]
    ) -> TopN:
        """``users``: row numbers for the tie score; ``codes``: their unpacked bits ``(b, d)``;
        ``excluded``: per user, catalog positions never to return."""
        ...


class NumpyHamming:
    """Exact scan of every item, one user at a time: XOR + ``np.bitwise_count`` on packed words.

    A ``d``-bit code has ``d + 1`` distances, so each user's N-th distance comes from a histogram
    of their distances; only the items at or below it are ranked by the tie rule (a full sort of
    the catalog is never needed). Memory: a few arrays of one byte or two per item."""

    def __init__(self, catalog: Catalog, tie: TieScore) -> None:
        self.catalog, self.tie = catalog, tie
        self.dim = catalog.bits.shape[1]
        self.words = [
            np.ascontiguousarray(catalog.codes[:, w]) for w in range(catalog.codes.shape[1])
        ]
        self.dtype = np.uint8 if self.dim < 255 else np.uint16

    def distances(self, code: np.ndarray) -> np.ndarray:
        """Hamming distances of one packed code ``(w,)`` to every item."""
        out = np.bitwise_count(code[0] ^ self.words[0]).astype(self.dtype, copy=False)
        for w in range(1, len(self.words)):
            out += np.bitwise_count(code[w] ^ self.words[w]).astype(self.dtype, copy=False)
        return out

    def search(
        self, users: np.ndarray, codes: np.ndarray, n: int, excluded: Sequence[np.ndarray]
    ) -> TopN:
        packed = pack_bits(codes)
        out = TopN([], [], [])
        none = np.array([], np.int64)
        for row in range(len(users)):
            dist = self.distances(packed[row])
            if len(excluded[row]):
                dist[excluded[row]] = self.dim + 1  # beyond every real distance
            within = np.cumsum(np.bincount(dist, minlength=self.dim + 2)[: self.dim + 1])
            radius = min(int(np.searchsorted(within, n)), self.dim)
            near = np.flatnonzero(dist <= radius)
            tie = self.tie(users[row : row + 1], near)
            part = select_top(dist[near][None, :].astype(np.int16), tie, near[None, :], n, [none])
            out.items += part.items
            out.distances += part.distances
            out.ties += part.ties
        return out


class FaissHamming:
    """``faiss.IndexBinaryFlat``: the N-th distance of each user from ``search``, then every
    item at or below it from ``range_search``, ranked by the same rule as :class:`NumpyHamming`."""

    def __init__(self, catalog: Catalog, tie: TieScore) -> None:
        import faiss

        self.catalog, self.tie = catalog, tie
        self.index = faiss.IndexBinaryFlat(catalog.bits.shape[1])
        self.index.add(np.packbits(catalog.bits, axis=1))

    def search(
        self, users: np.ndarray, codes: np.ndarray, n: int, excluded: Sequence[np.ndarray]
    ) -> TopN:
        queries = np.packbits(np.asarray(codes, np.uint8), axis=1)
        size = len(self.catalog)
        empty = np.array([], np.int64)
        out = TopN([empty] * len(users), [empty] * len(users), [empty] * len(users))
        if size == 0 or n == 0:
            return out
        # Enough neighbours that n remain after each user's exclusions.
        reach = min(size, n + max((len(e) for e in excluded), default=0))
        distances, found = self.index.search(queries, reach)
        radius = np.empty(len(users), np.int64)
        for row in range(len(users)):
            keep = ~np.isin(found[row], excluded[row])
            kept = distances[row][keep]
            radius[row] = kept[min(n, len(kept)) - 1] if len(kept) else distances[row][-1]
        for r in np.unique(radius):
            rows = np.flatnonzero(radius == r)
            lims, dist, ids = self.index.range_search(queries[rows], int(r) + 1)
            for j, row in enumerate(rows):
                cand = ids[lims[j] : lims[j + 1]].astype(np.int64)
                d = dist[lims[j] : lims[j + 1]].astype(np.int16)
                tie = self.tie(users[row : row + 1], cand[None, :])
                part = select_top(d[None, :], tie, cand[None, :], n, [excluded[row]])
                out.items[row], out.distances[row] = part.items[0], part.distances[0]
                out.ties[row] = part.ties[0]
        return out


BACKENDS: dict[str, type] = {"numpy": NumpyHamming, "faiss": FaissHamming}
"""Hamming top-N backends by name (``retrieve.backend``)."""


def backend(name: str, catalog: Catalog, tie: TieScore) -> HammingBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown retrieval backend {name!r}: choose among {', '.join(BACKENDS)}")
    return BACKENDS[name](catalog, tie)


def sampled_pool(
    positive: int, seen: np.ndarray, universe: np.ndarray, negatives: int, seed: int, uid: int
) -> np.ndarray:
    """The sampled protocol's pool: ``positive`` and ``negatives`` items of ``universe`` the user
    never interacted with (``seen``), drawn with a generator seeded by ``(seed, uid)``."""
    unseen = np.setdiff1d(universe, np.append(seen, positive), assume_unique=False)
    rng = np.random.default_rng([seed, uid])
    take = min(negatives, len(unseen))
    return np.append(positive, rng.choice(unseen, size=take, replace=False))


USERS_SCHEMA = {
    "split": "string",
    "uid": "int32",
    "positives": "list<int32>",
    "exclude": "list<int32>",
    "seen": "list<int32>",
    "history": "list<int32>",
    "sampled_positive": "int32 (null without a positive)",
}
"""Columns of the users table :func:`users_for_splits` makes (the stage's ``users`` table)."""


def users_for_splits(
    samples: pl.DataFrame,
    splits: Sequence[str],
    exclude: Sequence[str],
) -> pl.DataFrame:
    """One row per (split, user with a positive in the split) from ``samples`` (sample_id, uid,
    iid, label, split, timestamp, history):

    * ``positives``: the user's positive items of the split, oldest first, each once, none of
      the ``exclude`` items (those can never be recommended to the user);
    * ``exclude``: the user's items in the ``exclude`` splits other than this split;
    * ``seen``: every item the user interacted with (any split, any label);
    * ``history``: the history of the user's first sample of the split (the positives strictly
      before it), so a list made for a split never reads that split's items;
    * ``sampled_positive``: the first positive of the split (the sampled protocol's target).
    """
    ordered = samples.sort(["uid", "timestamp", "sample_id"])
    seen = ordered.group_by("uid", maintain_order=True).agg(
        pl.col("iid").unique().sort().alias("seen")
    )
    parts = []
    for split in splits:
        others = [s for s in exclude if s != split]
        excluded_pairs = ordered.filter(pl.col("split").is_in(others)).select("uid", "iid")
        rows = ordered.filter(pl.col("split") == split)
        # A positive the user also has in an excluded split can never be a candidate: it is
        # left out of the positives (and so is a second interaction with the same item).
        positives = (
            rows.filter(pl.col("label") == 1)
            .join(excluded_pairs.unique(), on=["uid", "iid"], how="anti", maintain_order="left")
            .unique(subset=["uid", "iid"], keep="first", maintain_order=True)
            .group_by("uid", maintain_order=True)
            .agg(pl.col("iid").alias("positives"))
        )
        firsts = rows.group_by("uid", maintain_order=True).agg(
            pl.col("history").first().alias("history")
        )
        users = positives.join(firsts, on="uid", how="left")
        excluded = excluded_pairs.group_by("uid").agg(
            pl.col("iid").unique().sort().alias("exclude")
        )
        users = (
            users.join(excluded, on="uid", how="left")
            .join(seen, on="uid", how="left")
            .with_columns(
                pl.lit(split).alias("split"),
                pl.col("exclude").fill_null(pl.lit([], pl.List(pl.Int32))),
                pl.col("positives").list.first().alias("sampled_positive"),
            )
            .sort("uid")
        )
        parts.append(users)
    columns = list(USERS_SCHEMA)
    if not parts:
        return pl.DataFrame(schema={"split": pl.String, "uid": pl.Int32})
    return pl.concat([p.select(columns) for p in parts]).with_columns(
        pl.col("uid").cast(pl.Int32),
        *[pl.col(c).cast(pl.List(pl.Int32)) for c in ("positives", "exclude", "seen", "history")],
        pl.col("sampled_positive").cast(pl.Int32),
    )


def rerank_users(users: pl.DataFrame, max_users: int, seed: int) -> dict[str, np.ndarray]:
    """Per split of ``users`` (split, uid): the sorted ids of the users the LLM re-ranks, a
    seeded random ``max_users`` of the split's users (0: every one). The same draw for the
    ``rerank`` stage and the evaluation that measures what it re-ranked."""
    out = {}
    for (split,), part in users.group_by(["split"], maintain_order=True):
        uids = np.sort(part["uid"].to_numpy())
        if 0 < max_users < len(uids):
            uids = np.sort(np.random.default_rng(seed).choice(uids, size=max_users, replace=False))
        out[split] = uids
    return out
