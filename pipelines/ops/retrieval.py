"""Retrieval on Ray Data (batches of users): each user's top-N items by Hamming distance, for
stage ``retrieve`` and ``binllm recommend``.

For every user with a positive in ``retrieve.splits``, the ``top_n`` items nearest to the
user's code (:mod:`binllm_core.ranking.retrieval`: distance, then the tie rule
``retrieve.tie_break``, then item id), never an item of the user's ``retrieve.exclude`` splits.
Under the sampled protocol (``retrieve.sampled_negatives`` > 0) each user also gets a pool: the
split's first positive and that many items the user never interacted with, every one ranked by
the same rule.

:class:`UserRetriever` runs in ``map_batches`` on an actor pool (it holds the item codes once);
``binllm recommend`` (:mod:`pipelines.recommend`) uses it too. Tables:

* ``candidates`` (:data:`CANDIDATES_SCHEMA`): protocol (``full`` / ``sampled``), split, uid,
  iid, user and item (source ids), rank (1 = nearest), hamming, tie (the tie score) and
  source (``hamming``; ``popularity`` for a user without a code: the most popular items they
  have not seen, which only ``binllm recommend`` meets — the encoder codes every user of the
  samples);
* ``users`` (:data:`binllm_core.ranking.retrieval.USERS_SCHEMA` less ``seen``): what the lists were
  made for — positives, exclusions, the history the re-ranker's prompts show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.codes import id_table
from binllm_core.config import RetrieveConfig, RunConfig
from binllm_core.errors import ConfigError, StageError
from binllm_core.ranking.retrieval import (
    Catalog,
    backend,
    hamming,
    pack_bits,
    sampled_pool,
    select_top,
    tie_score,
)
from pipelines.runtime.ray_helpers import to_arrow
from pipelines.runtime.stage import StageContext

FULL, SAMPLED, SERVE = "full", "sampled", "serve"
CANDIDATES_SCHEMA = pa.schema(
    [
        ("protocol", pa.string()),
        ("split", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("rank", pa.int32()),
        ("hamming", pa.int16()),
        ("tie", pa.float64()),
        ("source", pa.string()),
    ]
)
"""Candidates: ``protocol`` is ``full`` (top-N of the catalog), ``sampled`` (the pool of the
sampled protocol, every item ranked) or ``serve`` (``binllm recommend``); ``hamming`` is null for
a popularity list."""
ROWS_PER_FILE = 1_000_000
"""Rows per file of ``candidates`` (the last file holds the rest)."""


class UserRetriever:
    """Callable class for ``map_batches``: a batch of users (split, uid, exclude, seen,
    sampled_positive) -> their candidate rows (:data:`CANDIDATES_SCHEMA`), user by user in the
    batch's order (each user's list, then its sampled pool)."""

    def __init__(
        self,
        catalog: Catalog,
        user_bits: np.ndarray,
        user_vectors: np.ndarray | None,
        user_names: np.ndarray,
        item_names: np.ndarray,
        cfg: RetrieveConfig,
        known_users: np.ndarray,
    ) -> None:
        self.catalog = catalog
        self.user_bits, self.known = user_bits, known_users
        self.user_names, self.item_names = user_names, item_names
        self.cfg = cfg
        self.tie = tie_score(cfg.tie_break, catalog, user_vectors)
        if cfg.backend == "faiss":
            import faiss

            faiss.omp_set_num_threads(max(1, int(cfg.cpus_per_actor)))  # not every core
        self.search = backend(cfg.backend, catalog, self.tie)
        self.universe = np.arange(len(catalog))

    def __call__(self, batch: pa.Table) -> pa.Table:
        users = batch["uid"].to_numpy()
        names = (
            batch["user"].to_pylist()
            if "user" in batch.column_names
            else [str(self.user_names[u]) for u in users]
        )
        protocols = (
            batch["protocol"].to_pylist()
            if "protocol" in batch.column_names
            else [FULL] * batch.num_rows
        )
        who = list(zip(protocols, batch["split"].to_pylist(), users.tolist(), names, strict=True))
        exclude = [
            self.catalog.positions(np.asarray(e, np.int64)) for e in _lists(batch, "exclude")
        ]
        known = np.array([u < len(self.known) and self.known[u] for u in users], bool)
        # (user's position in the batch, 0 = its list / 1 = its sampled pool, rows)
        lists: list[tuple[int, int, pa.Table]] = []
        coded = np.flatnonzero(known)
        if len(coded):
            found = self.search.search(
                users[coded],
                self.user_bits[users[coded]],
                self.cfg.top_n,
                [exclude[i] for i in coded],
            )
            for j, i in enumerate(coded):
                top = (found.items[j], found.distances[j], found.ties[j])
                lists.append((int(i), 0, self._rows(who[i], *top, "hamming")))
        for i in np.flatnonzero(~known):
            popular = self._rows(who[i], self._popular(exclude[i]), None, None, "popularity")
            lists.append((int(i), 0, popular))
        if self.cfg.sampled_negatives and "sampled_positive" in batch.column_names:
            targets = batch["sampled_positive"].to_pylist()
            seen = _lists(batch, "seen")
            for i in coded:
                if targets[i] is not None:
                    lists.append((int(i), 1, self._sampled(who[i], targets[i], seen[i])))
        # User by user in the batch's order.
        rows = [table for _, _, table in sorted(lists, key=lambda x: x[:2])]
        return pa.concat_tables(rows) if rows else CANDIDATES_SCHEMA.empty_table()

    def _popular(self, exclude: np.ndarray) -> np.ndarray:
        """The most popular items (ties: id) but ``exclude``, for a user without a code."""
        score = self.catalog.popularity.copy()
        score[exclude] = -np.inf
        order = np.lexsort((self.universe, -score))
        return order[np.isfinite(score[order])][: self.cfg.top_n]

    def _sampled(self, who: tuple, target: int, seen: list[int]) -> pa.Table:
        """The sampled protocol's pool of one user, every item ranked by the same rule."""
        uid = who[2]
        position = self.catalog.positions(np.array([target]))
        if not len(position):
            return CANDIDATES_SCHEMA.empty_table()  # the target has no code: no pool
        pool = sampled_pool(
            int(position[0]),
            self.catalog.positions(np.asarray(seen, np.int64)),
            self.universe,
            self.cfg.sampled_negatives,
            self.cfg.seed,
            uid,
        )
        one = np.array([uid])
        distance = hamming(pack_bits(self.user_bits[one]), self.catalog.codes[pool])
        tie = self.tie(one, pool[None, :])
        top = select_top(distance, tie, pool[None, :], len(pool), [np.array([], np.int64)])
        return self._rows(
            (SAMPLED, *who[1:]), top.items[0], top.distances[0], top.ties[0], "hamming"
        )

    def _rows(
        self,
        who: tuple,
        items: np.ndarray,
        distances: np.ndarray | None,
        ties: np.ndarray | None,
        source: str,
    ) -> pa.Table:
        """Candidate rows of one list; ``who`` = (protocol, split, uid, user name)."""
        protocol, split, uid, name = who
        n = len(items)
        iids = self.catalog.iids[items]
        return pa.table(
            {
                "protocol": pa.array([protocol] * n, pa.string()),
                "split": pa.array([split] * n, pa.string()),
                "uid": pa.array(np.full(n, uid), pa.int32()),
                "iid": pa.array(iids, pa.int32()),
                "user": pa.array([name] * n, pa.string()),
                "item": pa.array(self.item_names[iids].astype(str), pa.string()),
                "rank": pa.array(np.arange(1, n + 1), pa.int32()),
                "hamming": pa.array(distances, pa.int16())
                if distances is not None
                else pa.nulls(n, pa.int16()),
                "tie": pa.array(ties, pa.float64())
                if ties is not None
                else pa.nulls(n, pa.float64()),
                "source": pa.array([source] * n, pa.string()),
            },
            schema=CANDIDATES_SCHEMA,
        )


def _lists(batch: pa.Table, column: str) -> list[list[int]]:
    return [v or [] for v in batch[column].to_pylist()]


def codes_stage(cfg: RunConfig) -> str:
    """The stage whose codes the lists are retrieved by: ``encode_retrieval`` where the run sets
    ``retrieval_encoder``, else ``encode`` (the prompts' codes)."""
    return "encode" if cfg.retrieval_encoder is None else "encode_retrieval"


def retriever_kwargs(ctx: StageContext, cfg: RetrieveConfig, samples: pl.DataFrame) -> dict:
    """What a :class:`UserRetriever` is built from: the run's codes, vectors, id maps and train
    popularity (tables bounded by the numbers of users and items)."""
    if cfg.backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ConfigError(
                "retrieve.backend = faiss needs the faiss-cpu package",
                todo="pip install faiss-cpu, or set retrieve.backend=numpy (same lists)",
            ) from None
    encode = codes_stage(ctx.cfg)
    codes = ctx.read_table(encode, "codes", columns=["entity", "id", "bits"])
    tables = ctx.manifest_of(encode).get("tables", {})
    vectors = None
    if cfg.tie_break == "relaxed":
        if "embeddings" not in tables:
            raise StageError(
                f"retrieve.tie_break = relaxed needs the {encode} stage's embeddings table, "
                f"which this run's {encode} output predates",
                ctx.uri(ctx.stage_path(encode)),
                f"run binllm run CONFIG --stages {encode} --force (same codes, one more table), "
                "or set retrieve.tie_break=popularity",
            )
        vectors = ctx.read_table(encode, "embeddings", columns=["entity", "id", "relaxed"])
    item_bits = id_table(codes, "item", "bits")
    user_bits = id_table(codes, "user", "bits")
    item_map = ctx.read_table("samples", "item_map", columns=["item", "iid"])
    user_map = ctx.read_table("samples", "user_map", columns=["user", "uid"])
    # The catalog: every item of the codes table (the encoder's tables cover every item id of
    # the samples, so items first seen after train have codes from their initialisation).
    iids = np.sort(codes.filter(pc.equal(codes["entity"], "item"))["id"].to_numpy())
    train_pos = samples.filter((pl.col("split") == "train") & (pl.col("label") == 1))
    popularity = np.bincount(train_pos["iid"].to_numpy(), minlength=len(item_bits))
    catalog = Catalog.build(
        iids,
        item_bits[iids],
        popularity[iids],
        None if vectors is None else id_table(vectors, "item", "relaxed")[iids],
    )
    known = np.zeros(len(user_bits), bool)
    known[codes.filter(pc.equal(codes["entity"], "user"))["id"].to_numpy()] = True
    return {
        "catalog": catalog,
        "user_bits": user_bits,
        "user_vectors": None if vectors is None else id_table(vectors, "user", "relaxed"),
        "user_names": _names(user_map, "user", "uid"),
        "item_names": _names(item_map, "item", "iid"),
        "cfg": cfg,
        "known_users": known,
    }


def _names(table: pa.Table, name: str, key: str) -> np.ndarray:
    ids = table[key].to_numpy()
    out = np.full(int(ids.max()) + 1 if len(ids) else 1, "", dtype=object)
    out[ids] = table[name].to_pylist()
    return out


def retrieve(users: pa.Table, kwargs: dict[str, Any], cfg: RetrieveConfig) -> ray.data.Dataset:
    """``users`` (split, uid, exclude, seen[, sampled_positive, protocol]) -> candidates, lazily,
    on ``retrieve.num_actors`` actors."""
    # One block per Ray batch, so that every actor of the pool gets work.
    blocks = [users.slice(i, cfg.batch_users) for i in range(0, users.num_rows, cfg.batch_users)]
    return ray.data.from_arrow(blocks or [users]).map_batches(
        UserRetriever,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_users,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
    )


FILE_ORDER = ["split", "uid", "protocol", "rank"]
"""The order of the rows of ``candidates``: each user's list, then its sampled pool, users by
split and id."""


def in_order(candidates: ray.data.Dataset) -> ray.data.Dataset:
    """``candidates`` sorted by :data:`FILE_ORDER` in blocks of :data:`ROWS_PER_FILE` rows but
    the last (write them with as many rows per file): the same lists make the same files, and
    so the same output identity, whatever ``batch_users`` and ``num_actors`` were. The sort is
    explicit: in whole pipeline runs, with ``preserve_order`` set, one user's list was seen at
    the end of the file; and the sort's blocks are joined before the write, which otherwise
    wrote them as two files split where the sort's sampled bounds fell."""
    ordered = candidates.sort(FILE_ORDER).materialize()
    return ordered.repartition(target_num_rows_per_block=ROWS_PER_FILE, strict=True)


def full_lists(
    ctx: StageContext, splits: Sequence[str] | None = None, top: int = 0
) -> dict[str, dict[int, np.ndarray]]:
    """Per split (of ``splits``; None: every one), each user's full-protocol candidates of
    ``retrieve/candidates`` best first, the first ``top`` of them (0: all); read where the
    rows are, only (split, uid, iid, rank) reach the caller."""

    def full(batch: pa.Table) -> pa.Table:
        keep = pc.equal(batch["protocol"], FULL)
        if splits is not None:
            keep = pc.and_(keep, pc.is_in(batch["split"], pa.array(list(splits), pa.string())))
        if top:
            keep = pc.and_(keep, pc.less_equal(batch["rank"], top))
        return batch.filter(keep).select(["split", "uid", "iid", "rank"])

    schema = pa.schema(
        [("split", pa.string()), ("uid", pa.int32()), ("iid", pa.int32()), ("rank", pa.int32())]
    )
    rows = ctx.read_dataset("retrieve", "candidates").map_batches(full, batch_format="pyarrow")
    table = pl.from_arrow(to_arrow(rows, schema))
    out: dict[str, dict[int, np.ndarray]] = {}
    per_user = table.sort("split", "uid", "rank").group_by("split", "uid", maintain_order=True)
    for split, uid, iids in per_user.agg(pl.col("iid")).iter_rows():
        out.setdefault(split, {})[int(uid)] = np.asarray(iids, np.int64)
    return out
