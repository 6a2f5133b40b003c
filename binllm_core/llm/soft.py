"""Soft tokens: collaborative embeddings put into the LLM's input through a projector.

The other way of giving an LLM collaborative knowledge, the one BinLLM argues against (CoLLM,
its parent; RSLLM and LLaRA). A ``soft`` prompt is the code template with a placeholder token
where a code would be: :data:`USER_TOKEN` at ``<UserID>``, :data:`ITEM_TOKEN` at
``<TargetItemID>`` and, with ``prompts.soft_history``, after each history title. The two
tokens are added to the tokenizer as special tokens but never looked up in the LM's embedding
matrix (which is not resized): :meth:`SoftTokens.embed` embeds the prompt with the placeholder
positions masked to the pad token, then overwrites those rows, in order of appearance, with the
projected vectors of the entities the prompt's ``soft_ids`` name.

The vectors are the encoder's ``embeddings`` table (``float``: the continuous MF/LightGCN
embeddings, CoLLM's input; or ``relaxed``: tanh(proj(e)), whose signs are BinLLM's codes);
they are fixed, and only the projector (and, for ``rsllm``, the LoRA adapter) learns. Projector
shapes (:data:`PROJECTORS`) follow the public code of the relatives:

* ``collm``: ``Linear(d, 10 d) -> ReLU -> Linear(10 d, hidden)``;
* ``llara``: ``Linear(d, hidden) -> GELU -> Linear(hidden, hidden)``.

The contrastive terms of the ``rsllm`` strategy (:func:`info_nce`, used by
:class:`binllm_core.llm.objectives.SoftContrastive`) are InfoNCE with in-batch negatives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from binllm_core.errors import ConfigError, DataError
from binllm_core.modes import ITEM_TOKEN, USER_TOKEN

SOFT_SPEC = "soft.json"
"""Next to a saved adapter: the shape of its projector (:class:`SoftSpec`)."""


def _collm(dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 10 * dim), torch.nn.ReLU(), torch.nn.Linear(10 * dim, hidden)
    )


def _llara(dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
    )


PROJECTORS: dict[str, Callable[[int, int], torch.nn.Module]] = {"collm": _collm, "llara": _llara}
"""Projector name -> a module from (vector dim, LM hidden size); a new shape is an entry here."""


def soft_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of the two placeholder tokens in a tokenizer that has them
    (:func:`binllm_core.llm.loading.load_tokenizer` adds them)."""
    ids = tokenizer.convert_tokens_to_ids([USER_TOKEN, ITEM_TOKEN])
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"the tokenizer lacks {USER_TOKEN}/{ITEM_TOKEN}: call add_soft_tokens")
    return int(ids[0]), int(ids[1])


@dataclass(frozen=True)
class SoftSpec:
    """What rebuilds a saved projector: its kind and shape, and the ``embeddings`` column it
    was trained on (``soft.json``)."""

    projector: str
    dim: int
    hidden: int
    vectors: str = "float"

    def save(self, folder: str | Path) -> None:
        Path(folder, SOFT_SPEC).write_text(json.dumps(asdict(self)))

    @classmethod
    def parse(cls, text: str | bytes) -> SoftSpec:
        return cls(**json.loads(text))

    @classmethod
    def read(cls, folder: str | Path) -> SoftSpec | None:
        path = Path(folder, SOFT_SPEC)
        return cls.parse(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class EntityVectors:
    """Fixed vectors by id (row 0 = padding): ``users`` ``(user_num, d)``, ``items``
    ``(item_num, d)``."""

    users: np.ndarray
    items: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.users.shape[1])

    @classmethod
    def from_table(cls, table: Any, column: str) -> EntityVectors:
        """From the encoder's ``embeddings`` table (entity, id, relaxed, float)."""
        from binllm_core.codes import id_table

        if column not in table.column_names:
            raise DataError(
                f"the embeddings table has no {column} column (has: {table.column_names})",
                "encode/embeddings",
                "re-run encode, or set finetune.soft.vectors to relaxed or float",
            )
        return cls(id_table(table, "user", column), id_table(table, "item", column))


class SoftTokens(torch.nn.Module):
    """The projector and the fixed entity vectors it projects (buffers, never saved with it)."""

    def __init__(
        self,
        vectors: EntityVectors,
        spec: SoftSpec,
        token_ids: tuple[int, int],
        title_vectors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if spec.projector not in PROJECTORS:
            raise ConfigError(
                f"projector {spec.projector!r} is not known", todo=f"use {', '.join(PROJECTORS)}"
            )
        if spec.dim != vectors.dim:
            raise ConfigError(
                f"the projector takes {spec.dim}-dim vectors and the embeddings have {vectors.dim}",
                todo="score with the embeddings of the run whose adapter this is",
            )
        self.spec = spec
        self.projector = PROJECTORS[spec.projector](spec.dim, spec.hidden)
        self.user_token, self.item_token = token_ids
        self.register_buffer("users", torch.as_tensor(vectors.users, dtype=torch.float32), False)
        self.register_buffer("items", torch.as_tensor(vectors.items, dtype=torch.float32), False)
        self.titles = title_vectors
        """The LM's embedding of each item's title (contrastive term), kept on the CPU: only
        a batch's rows go to the device."""

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.user_token) | (input_ids == self.item_token)

    def raw_vectors(self, input_ids: torch.Tensor, soft_ids: torch.Tensor) -> torch.Tensor:
        """The entity vector of every placeholder, in row-major order of appearance."""
        at = self.placeholders(input_ids)
        is_user = input_ids[at] == self.user_token
        ids = soft_ids.to(input_ids.device)
        if int(at.sum()) != ids.numel():
            raise DataError(
                f"a batch has {int(at.sum())} soft placeholders for {ids.numel()} soft ids",
                "soft prompts",
                "render soft prompts with binllm (prompts.modes soft) so each holds its ids",
            )
        for name, table, mine in (("user", self.users, is_user), ("item", self.items, ~is_user)):
            picked = ids[mine]
            if picked.numel() and (int(picked.max()) >= len(table) or int(picked.min()) < 1):
                bad = int(picked[(picked >= len(table)) | (picked < 1)][0])
                raise DataError(
                    f"soft {name} id {bad} has no embedding ({len(table) - 1} {name}s)",
                    "encode/embeddings",
                    "score with the embeddings of the run that rendered these prompts",
                )
        out = self.users.new_empty((ids.numel(), self.users.shape[1]))
        out[is_user] = self.users[ids[is_user]]
        out[~is_user] = self.items[ids[~is_user]]
        return out

    def embed(
        self, embedding: torch.nn.Module, input_ids: torch.Tensor, soft_ids: torch.Tensor
    ) -> torch.Tensor:
        """``inputs_embeds`` of a batch: the LM's embeddings, placeholders replaced by the
        projected vectors."""
        at = self.placeholders(input_ids)
        projected = self.projector(self.raw_vectors(input_ids, soft_ids))
        embeds = embedding(input_ids.masked_fill(at, 0))
        return embeds.masked_scatter(at[..., None], projected.to(embeds.dtype))

    def project_items(self, iids: torch.Tensor) -> torch.Tensor:
        return self.projector(self.items[iids])


TITLE_CHUNK = 4096
"""Titles embedded at a time (bounds the gathered token rows)."""


def title_vectors(
    tokenizer: Any, embedding: torch.nn.Module, titles: dict[int, str], item_num: int
) -> torch.Tensor:
    """The LM's own embedding of each item's title: the mean of its tokens' input embeddings,
    ``(item_num, hidden)``, zeros for ids without a title (RSLLM's item-text alignment target)."""
    hidden = embedding.weight.shape[1]
    out = torch.zeros(item_num, hidden)
    ids = sorted(i for i in titles if 0 < i < item_num)
    tokens = tokenizer([titles[i] for i in ids], add_special_tokens=False)["input_ids"]
    weight = embedding.weight.detach()
    for start in range(0, len(ids), TITLE_CHUNK):
        rows = tokens[start : start + TITLE_CHUNK]
        flat = torch.as_tensor([t for row in rows for t in row], dtype=torch.long)
        owner = torch.repeat_interleave(torch.as_tensor([len(r) for r in rows]))
        sums = torch.zeros(len(rows), hidden).index_add_(
            0, owner, weight[flat.to(weight.device)].float().cpu()
        )
        counts = torch.as_tensor([max(1, len(r)) for r in rows], dtype=torch.float32)
        out[torch.as_tensor(ids[start : start + TITLE_CHUNK])] = sums / counts[:, None]
    return out


def check_soft_ids(
    token_rows: Sequence[Sequence[int]],
    soft_rows: Sequence[Sequence[int]],
    token_ids: tuple[int, int],
    max_length: int,
) -> list[int]:
    """The soft ids of a batch, flat, one per placeholder token left in the rows: a prompt that
    lost its beginning to ``max_length`` drops the ids of the placeholders it lost (the oldest);
    any other mismatch between a prompt's placeholders and its ids is a one-line error."""
    flat: list[int] = []
    for row, (tokens, ids) in enumerate(zip(token_rows, soft_rows, strict=True)):
        found = sum(1 for t in tokens if t in token_ids)
        truncated = len(tokens) >= max_length
        if found > len(ids) or (found < len(ids) and not truncated):
            raise DataError(
                f"soft prompt {row} of the batch holds {found} placeholder tokens for "
                f"{len(ids)} soft ids",
                "soft prompts",
                f"its template needs {USER_TOKEN} at <UserID> and {ITEM_TOKEN} at "
                "<TargetItemID>: render soft prompts with binllm from a code template",
            )
        flat.extend(ids[len(ids) - found :])
    return flat


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    temperature: float,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row k of ``anchor`` against every row of ``positive``,
    cosine similarity over ``temperature``, the k-th the right one (symmetric mean of both
    directions); ``same[j, k]`` True leaves row k out of row j's negatives (the same entity).
    Zero for fewer than two rows."""
    if anchor.shape[0] < 2:
        return anchor.sum() * 0.0
    a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
    logits = a @ p.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    if same is not None:
        off = same.to(a.device) & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(off, float("-inf"))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
