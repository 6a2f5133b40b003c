"""The encoder's data: samples as arrays (:class:`Rows`), split by subset, and the train
interaction graph LightGCN propagates over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Samples as arrays: ids (int64), labels (float32) and, for evaluation, the subset flags."""

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    warm: np.ndarray | None = None
    not_cold: np.ndarray | None = None

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Rows:
        """Rows from a table with ``uid, iid, label`` and optionally ``warm, not_cold``."""

        def col(name: str, dtype: Any) -> np.ndarray | None:
            if name not in table.column_names:
                return None
            return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)

        return cls(
            users=col("uid", np.int64),
            items=col("iid", np.int64),
            labels=col("label", np.float32),
            warm=col("warm", bool),
            not_cold=col("not_cold", bool),
        )

    def __len__(self) -> int:
        return len(self.labels)


def split_samples(table: pa.Table) -> dict[str, Rows]:
    """The ``samples`` table as ``{train, valid, test}`` rows, each in ``sample_id`` order."""
    if "sample_id" in table.column_names:
        table = table.sort_by("sample_id")
    split = table.column("split").to_numpy(zero_copy_only=False)
    return {
        name: Rows.from_arrow(table.filter(pa.array(split == name)))
        for name in ("train", "valid", "test")
    }


def train_graph(train: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the LightGCN graph: the distinct (user, item) positives of the train split."""
    pos = train.labels > 0.5
    pairs = np.unique(np.stack([train.users[pos], train.items[pos]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def normalized_adjacency(
    user_num: int, item_num: int, users: np.ndarray, items: np.ndarray
) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` of the bipartite user-item graph as a sparse (n, n) tensor.

    Nodes are users ``0..user_num-1`` then items ``user_num..``; isolated nodes (padding, users
    or items without a train positive) get an empty row.
    """
    n = user_num + item_num
    rows = np.concatenate([users, items + user_num])
    cols = np.concatenate([items + user_num, users])
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.zeros(n)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    values = inv_sqrt[rows] * inv_sqrt[cols]
    index = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
    values_t = torch.from_numpy(values.astype(np.float32))
    return torch.sparse_coo_tensor(index, values_t, (n, n), check_invariants=False).coalesce()
