"""What the LLM recommender is trained to do, one entry per task: how a task's examples become a
batch, what a forward pass reads from the LM, and the loss.

* ``rec`` — the recommendation task: BCE-with-logits of the answer score (the ``Yes`` logit)
  against the 0/1 label; its batches may share user prefixes.
* ``bpr`` — pairwise preference in words: BCE-with-logits of ``logit(" A") - logit(" B")`` at the
  answer cue against 1 when (A) is the item the user liked.
* ``mim`` — masked item: the language-modelling loss on the tokens of the hidden title(s)
  written after the prompt, and on nothing else.
* ``rank`` — listwise: a micro-batch is whole groups of ``rec`` prompts, a liked item and the
  retriever's candidates (:mod:`binllm_core.prompts.ranking_groups`); softmax cross-entropy of
  the group's answer scores (the score the scorer ranks by) with the liked item as the target.
  ``rank_pairs`` is its pairwise form: BPR of the liked item's score over each candidate's.

The rows of ``bpr`` and ``mim`` come from :mod:`binllm_core.prompts.aux_rows`, the groups of the
``rank`` tasks from :mod:`binllm_core.prompts.ranking_groups`. A forward pass runs through the
recommender's :class:`~binllm_core.llm.recommender.AnswerModel` (the module DDP wraps), which hands
the batch to the task's :meth:`Objective.forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from binllm_core.llm.batches import (
    Batch,
    PromptBatch,
    TargetBatch,
    collate,
    pad_left,
    tokenize,
    with_targets,
)
from binllm_core.llm.prefix_sharing import PrefixCut, SharedPrefixBatch
from binllm_core.llm.soft import info_nce
from binllm_core.llm.strategies import REC

if TYPE_CHECKING:
    from binllm_core.llm.recommender import AnswerModel


@dataclass(frozen=True)
class Examples:
    """A micro-batch of one task: prompts with their 0/1 labels (``rec``: the rating label;
    ``bpr``: 1 when (A) is the liked item) or the answer texts to write (``mim``)."""

    task: str
    prompts: Sequence[str]
    labels: Sequence[int] = field(default_factory=tuple)
    answers: Sequence[str] = field(default_factory=tuple)
    soft: Sequence[Sequence[int]] | None = None
    """Soft prompts: each prompt's soft ids (:mod:`binllm_core.llm.soft`); None in words."""
    plain: Sequence[str] | None = None
    """The same samples' prompts in words, for a curriculum that swaps them in
    (:func:`binllm_core.llm.tuning.with_curriculum`)."""

    def __len__(self) -> int:
        return len(self.prompts)


class Objective(Protocol):
    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> Batch | TargetBatch: ...

    def forward(self, model: AnswerModel, batch: Any) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor: ...


class YesNo:
    """``rec``: the answer score against the label."""

    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> Batch:
        return collate(tokenizer, examples.prompts, examples.labels, max_length, cut, examples.soft)

    def forward(self, model: AnswerModel, batch: Batch) -> torch.Tensor:
        return model.answer(batch.last_logits(model.net, model.config, model.soft))

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output, batch.labels.float())


class SoftContrastive(YesNo):
    """``rec`` on soft prompts with RSLLM-style contrastive terms added to the BCE: InfoNCE
    between the LLM's last hidden state at the user's soft token and at the target item's (the
    prompt's last item soft token), over the batch's positives; and InfoNCE between the
    projected target item embedding and the LLM's embedding of its title
    (:func:`binllm_core.llm.soft.info_nce`, in-batch negatives)."""

    def __init__(self, user_item: float, item_title: float, temperature: float) -> None:
        self.user_item, self.item_title, self.temperature = user_item, item_title, temperature

    def forward(self, model: AnswerModel, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        soft = model.soft
        if soft is None or batch.soft_ids is None:
            raise ValueError("contrastive terms need soft prompts and a projector")
        out = batch.forward(model.net, soft, output_hidden_states=self.user_item > 0)
        score = model.answer(out.logits[:, -1])
        user_at, item_at = _last_positions(batch.input_ids, soft.user_token, soft.item_token)
        has = (user_at >= 0) & (item_at >= 0)  # a curriculum's text prompts have none
        rows = torch.arange(len(batch), device=batch.input_ids.device)[has]
        user_at, item_at = user_at[has], item_at[has]
        extra = score.sum() * 0.0
        if self.user_item > 0:
            hidden = out.hidden_states[-1]
            positive = batch.labels.to(hidden.device)[has] > 0.5
            users, items = hidden[rows, user_at][positive], hidden[rows, item_at][positive]
            uids = _ids_at(batch, soft, rows, user_at)[positive]
            iids = _ids_at(batch, soft, rows, item_at)[positive]
            # Another row of the same user or item is no negative (its state is the same).
            same = (uids[:, None] == uids[None, :]) | (iids[:, None] == iids[None, :])
            extra = extra + self.user_item * info_nce(users, items, self.temperature, same)
        if self.item_title > 0 and len(rows):
            iids = _ids_at(batch, soft, rows, item_at)
            unique = torch.unique(iids)  # in-batch negatives must be other items
            projected = soft.project_items(unique)
            titles = soft.titles[unique.cpu()].to(projected.device)
            extra = extra + self.item_title * info_nce(projected, titles, self.temperature)
        return score, extra

    def loss(self, output: tuple[torch.Tensor, torch.Tensor], batch: PromptBatch) -> torch.Tensor:
        score, extra = output
        return F.binary_cross_entropy_with_logits(score, batch.labels.float()) + extra


def _last_positions(
    input_ids: torch.Tensor, user_token: int, item_token: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the position of its last user soft token and of its last item soft token (-1
    where it has none)."""
    width = torch.arange(input_ids.shape[1], device=input_ids.device)
    user = torch.where(input_ids == user_token, width, -1).amax(1)
    item = torch.where(input_ids == item_token, width, -1).amax(1)
    return user, item


def _ids_at(
    batch: PromptBatch, soft: Any, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The soft ids at soft-token ``positions`` of ``rows`` (one position per row)."""
    at = soft.placeholders(batch.input_ids)
    index = torch.cumsum(at.flatten().long(), 0).reshape(at.shape) - 1
    return batch.soft_ids.to(positions.device)[index[rows, positions]]


class LetterChoice(YesNo):
    """``bpr``: which of two letters the LM puts first, against the label (1 = the first)."""

    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> Batch:
        ids = tokenize(tokenizer, examples.prompts, max_length)
        return pad_left(ids, tokenizer.pad_token_id, examples.labels)

    def forward(self, model: AnswerModel, batch: Batch) -> torch.Tensor:
        first, second = model.letters
        logits = batch.last_logits(model.net, model.config, model.soft)
        return (logits[:, first] - logits[:, second]).float()


class AnswerText:
    """``mim``: cross-entropy of the answer's tokens only (the prompt's are not predicted)."""

    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> TargetBatch:
        return with_targets(tokenizer, examples.prompts, examples.answers, max_length)

    def forward(self, model: AnswerModel, batch: TargetBatch) -> torch.Tensor:
        logits = batch.target_logits(model.net).float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=-100
        )

    def loss(self, output: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
        return output


class ListRanking(YesNo):
    """``rank``/``rank_pairs``: the answer scores of whole groups, each group's liked item
    first (its label 1, the candidates' 0), scored as ``rec`` scores them, under a loss over
    each group's scores ``(groups, size)`` whose liked item is column 0. With a prefix cut a
    group's prompts share the user's prefix and run it once; gradients flow through both
    passes as through whole prompts."""

    def __init__(self, loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.group_loss = loss

    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> Batch:
        group_size(examples.labels)
        return super().collate(tokenizer, examples, max_length, cut)

    def forward(self, model: AnswerModel, batch: Batch) -> torch.Tensor:
        """The answer scores in the order of the examples' prompts."""
        return in_input_order(batch, super().forward(model, batch))

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = in_input_order(batch, batch.labels)
        return self.group_loss(output.reshape(-1, group_size(labels.tolist())))


def in_input_order(batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Values of a batch's rows in the order its prompts were given (a shared-prefix batch
    orders its rows by group)."""
    if isinstance(batch, SharedPrefixBatch) and batch.order is not None:
        return torch.empty_like(rows).index_copy(0, batch.order.to(rows.device), rows)
    return rows


def group_size(labels: Sequence[int]) -> int:
    """The size of the groups ``labels`` hold: each group begins with its one 1 and all are
    equally long (ValueError otherwise)."""
    starts = [i for i, y in enumerate(labels) if y == 1]
    size = len(labels) // max(len(starts), 1)
    if not starts or starts != list(range(0, len(labels), size)):
        raise ValueError(
            "listwise rows must be whole groups of one size, each its liked item (label 1) "
            f"first: labels {list(labels)[:12]}"
        )
    return size


def softmax_first(scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's softmax with column 0 (the liked item) as the target."""
    target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def bpr_first(scores: torch.Tensor) -> torch.Tensor:
    """BPR: mean ``-log sigmoid(s_liked - s_candidate)`` over each row's candidates."""
    return -F.logsigmoid(scores[:, :1].float() - scores[:, 1:].float()).mean()


OBJECTIVES: dict[str, Objective] = {
    REC: YesNo(),
    "bpr": LetterChoice(),
    "mim": AnswerText(),
    "rank": ListRanking(softmax_first),
    "rank_pairs": ListRanking(bpr_first),
}
"""Task name -> its objective; a new task is an entry here and a row builder in
:mod:`binllm_core.prompts` (``aux_rows``, ``ranking_groups``). A recommender trains with these
unless a tuning step replaces one (``rec`` by :class:`SoftContrastive` in an ``rsllm`` step:
``AnswerModel.objectives``)."""
