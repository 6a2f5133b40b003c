"""What the LLM recommender is trained to do, one entry per task: how a task's examples become a
batch, what a forward pass reads from the LM, and the loss.

* ``rec`` — the recommendation task: BCE-with-logits of the answer score (the ``Yes`` logit)
  against the 0/1 label; its batches may share user prefixes.
* ``bpr`` — pairwise preference in words: BCE-with-logits of ``logit(" A") - logit(" B")`` at the
  answer cue against 1 when (A) is the item the user liked.
* ``mim`` — masked item: the language-modelling loss on the tokens of the hidden title(s)
  written after the prompt, and on nothing else.

The rows of ``bpr`` and ``mim`` come from :mod:`binllm_core.aux_tasks`. A forward pass runs
through the recommender's :class:`~binllm_core.recommender.AnswerModel` (the module DDP wraps),
which hands the batch to the task's :meth:`Objective.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from binllm_core.batches import Batch, TargetBatch, collate, pad_left, tokenize, with_targets
from binllm_core.prefix_sharing import PrefixCut

if TYPE_CHECKING:
    from binllm_core.recommender import AnswerModel

REC = "rec"
LETTERS = ("A", "B")
"""The two choices of a ``bpr`` prompt, in order; the answer is one of them after a space."""


@dataclass(frozen=True)
class Examples:
    """A micro-batch of one task: prompts with their 0/1 labels (``rec``: the rating label;
    ``bpr``: 1 when (A) is the liked item) or the answer texts to write (``mim``)."""

    task: str
    prompts: Sequence[str]
    labels: Sequence[int] = field(default_factory=tuple)
    answers: Sequence[str] = field(default_factory=tuple)

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
        return collate(tokenizer, examples.prompts, examples.labels, max_length, cut)

    def forward(self, model: AnswerModel, batch: Batch) -> torch.Tensor:
        return model.answer(batch.last_logits(model.net, model.config))

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output, batch.labels.float())


class LetterChoice(YesNo):
    """``bpr``: which of two letters the LM puts first, against the label (1 = the first)."""

    def collate(
        self, tokenizer: Any, examples: Examples, max_length: int, cut: PrefixCut | None
    ) -> Batch:
        ids = tokenize(tokenizer, examples.prompts, max_length)
        return pad_left(ids, tokenizer.pad_token_id, examples.labels)

    def forward(self, model: AnswerModel, batch: Batch) -> torch.Tensor:
        first, second = model.letters
        logits = batch.last_logits(model.net, model.config)
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


OBJECTIVES: dict[str, Objective] = {REC: YesNo(), "bpr": LetterChoice(), "mim": AnswerText()}
"""Task name -> its objective; a new task is an entry here and a row builder in
:mod:`binllm_core.aux_tasks`."""
