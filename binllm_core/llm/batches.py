"""The batches the LLM recommender trains and scores on, built from prompts.

:func:`collate` tokenises prompts and left-pads them into a :class:`PromptBatch` (the answer cue
in the last column), or groups prompts that share a prefix into a
:class:`~binllm_core.llm.prefix_sharing.SharedPrefixBatch`; :class:`TargetBatch` is a prompt
followed by the answer text it is trained to write (the language-modelling objective of
:mod:`binllm_core.llm.objectives`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from binllm_core.llm.prefix_sharing import (
    PrefixCut,
    SharedPrefixBatch,
    group_by_prefix,
    left_padded,
    positions,
    tokenize_with_prefix,
)
from binllm_core.llm.soft import check_soft_ids, soft_token_ids


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class PromptBatch:
    """Whole prompts, left-padded (the answer cue in the last column), with labels when
    training. :class:`~binllm_core.llm.prefix_sharing.SharedPrefixBatch` is the other kind of batch:
    prompts grouped by a shared prefix that runs once per group."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    soft_ids: torch.Tensor | None = None
    """Soft prompts: the entity id of every soft token, row-major in order of appearance
    (:mod:`binllm_core.llm.soft`); None for prompts in words."""

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    computed_tokens = n_tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PromptBatch:
        labels = None if self.labels is None else self.labels.to(device)
        soft = None if self.soft_ids is None else self.soft_ids.to(device)
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), labels, soft)

    def inputs(self, net: torch.nn.Module, soft: Any = None) -> dict[str, torch.Tensor]:
        """The token inputs of a forward pass: ``input_ids``, or for soft prompts
        ``inputs_embeds`` with the projected vectors of ``soft`` (a
        :class:`~binllm_core.llm.soft.SoftTokens`) at the soft tokens."""
        if self.soft_ids is None:
            return {"input_ids": self.input_ids}
        if soft is None:
            raise ValueError("soft prompts need a recommender with a projector (attach_soft)")
        embedding = net.get_input_embeddings()
        return {"inputs_embeds": soft.embed(embedding, self.input_ids, self.soft_ids)}

    def forward(self, net: torch.nn.Module, soft: Any = None, **kwargs: Any) -> Any:
        """The LM's output for the batch (``kwargs``: e.g. ``output_hidden_states``)."""
        return net(
            **self.inputs(net, soft),
            attention_mask=self.attention_mask,
            position_ids=positions(self.attention_mask),
            logits_to_keep=1,
            **kwargs,
        )

    def last_logits(
        self, net: torch.nn.Module, config: Any = None, soft: Any = None
    ) -> torch.Tensor:
        """Logits at each prompt's last token, shape ``(batch, vocab)``."""
        return self.forward(net, soft).logits[:, -1]


Batch = PromptBatch | SharedPrefixBatch
"""What the recommender scores and trains on."""


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt: no special tokens added, truncated from the left."""
    return tokenizer(
        list(prompts), add_special_tokens=False, truncation=True, max_length=max_length
    )["input_ids"]


def pad_left(
    ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None
) -> PromptBatch:
    """Token id lists as one left-padded batch."""
    input_ids, mask = left_padded(ids, pad_id)
    target = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    return PromptBatch(input_ids, mask, target)


def soft_batch(
    tokenizer: Any,
    ids: Sequence[Sequence[int]],
    soft: Sequence[Sequence[int]],
    max_length: int,
    labels: Sequence[int] | None = None,
) -> PromptBatch:
    """Soft prompts' token ids and their soft ids as one left-padded batch (checked: each
    prompt holds one soft token per id, less those a truncated prompt lost)."""
    batch = pad_left(ids, tokenizer.pad_token_id, labels)
    token_ids = soft_token_ids(tokenizer)
    flat = check_soft_ids(ids, soft, token_ids, max_length)
    batch.soft_ids = torch.as_tensor(flat, dtype=torch.long)
    return batch


def collate(
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[int] | None,
    max_length: int,
    cut: PrefixCut | None = None,
    soft: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Prompts (and their 0/1 labels) as one batch, as the recommendation task trains. With a
    prefix ``cut``, prompts that share their prefix tokens form groups whose prefix runs
    once, and every other prompt is a group of one (its prefix and suffix run as two pieces of
    one sequence, so a group of one pads little next to short suffixes); the rows and labels
    then follow the groups (see :meth:`SharedPrefixBatch.build`). Soft prompts (``soft``: their
    soft ids) always run whole."""
    if soft is not None:
        ids = tokenize(tokenizer, prompts, max_length)
        return soft_batch(tokenizer, ids, soft, max_length, labels)
    tokens = tokenize_with_prefix(tokenizer, prompts, max_length, cut)
    groups = group_by_prefix(tokens)
    if len(groups) == len(tokens.ids):
        return pad_left(tokens.ids, tokenizer.pad_token_id, labels)
    prefix = [tokens.prefix_tokens[g[0]] or len(tokens.ids[g[0]]) - 1 for g in groups]
    return SharedPrefixBatch.build(tokens.ids, groups, prefix, tokenizer.pad_token_id, labels)


@dataclass
class TargetBatch:
    """Prompts each followed by the answer text it is trained to write, left-padded as one
    sequence; ``targets`` holds the answer's token ids right-aligned in the last ``T`` columns
    (``-100`` where a shorter answer leaves room), ``T`` the longest answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TargetBatch:
        return TargetBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device)
        )

    def target_logits(self, net: torch.nn.Module) -> torch.Tensor:
        """The logits that predict each target column, ``(batch, T, vocab)``: those of the
        ``T`` positions before it (only they are computed)."""
        width = self.targets.shape[1]
        out = net(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions(self.attention_mask),
            logits_to_keep=width + 1,
        )
        return out.logits[:, :-1]


def with_targets(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], max_length: int
) -> TargetBatch:
    """Prompts and the answers they should be followed by, as one :class:`TargetBatch`: each
    sequence keeps its answer (its last ``max_length - 1`` tokens when longer) and loses the
    beginning of its prompt past ``max_length``."""
    answer_ids = tokenize(tokenizer, answers, max_length - 1)
    rows, width = [], max(map(len, answer_ids))
    for head, answer in zip(tokenize(tokenizer, prompts, max_length), answer_ids, strict=True):
        rows.append([*head[max(0, len(head) + len(answer) - max_length) :], *answer])
    input_ids, mask = left_padded(rows, tokenizer.pad_token_id)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, answer in enumerate(answer_ids):
        if answer:
            targets[row, width - len(answer) :] = torch.as_tensor(answer)
    return TargetBatch(input_ids, mask, targets)
