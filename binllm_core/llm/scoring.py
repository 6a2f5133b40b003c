"""Scoring many prompts with an :class:`~binllm_core.llm.recommender.LLMRecommender`: the one
scorer.

Tokenise every prompt once (whole). With a prefix cut (:mod:`binllm_core.llm.prefix_sharing`),
prompts whose prefix tokens are identical are scored as groups: up to ``batch_size`` prefixes
in one forward pass, then their suffixes, ``batch_size`` at a time (ordered by length), each
with a fresh copy of its prefix's key/value cache, so memory stays within about two ordinary
batches. Every other prompt is scored whole: ordered by token length so each forward pass of
``batch_size`` pads little, left-padded. Scores come back in input order. Finetune's
evaluation, the ``score`` stage's actors, pair scoring, nightly and the benchmarks all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from binllm_core.llm.batches import pad_left, soft_batch
from binllm_core.llm.prefix_sharing import (
    PrefixCache,
    PrefixCut,
    Tokenized,
    group_by_prefix,
    left_padded,
    suffix_logits,
    tokenize_with_prefix,
)
from binllm_core.llm.recommender import LLMRecommender


@dataclass
class ScoringWork:
    """What a scorer has done so far: prompts, their tokens, and the tokens it ran."""

    prompts: int = 0
    shared_prompts: int = 0
    """Prompts scored in a group that shares its prefix."""
    groups: int = 0
    tokens: int = 0
    """Tokens of the whole prompts."""
    computed_tokens: int = 0
    """Tokens the forward passes ran (a group's prefix once)."""


class Scorer:
    """Answer scores of prompt lists, in order, under ``torch.inference_mode``."""

    def __init__(
        self,
        recommender: LLMRecommender,
        batch_size: int,
        max_length: int,
        sort_by_length: bool = True,
        prefix_cut: PrefixCut | None = None,
    ) -> None:
        self.recommender = recommender
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length
        self.prefix_cut = prefix_cut
        """Where a prompt's shareable prefix ends; None scores every prompt whole."""
        self.work = ScoringWork()

    def score(
        self, prompts: Sequence[str], soft: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores as float64, token counts) of ``prompts``, in their order; soft prompts
        (``soft``: each prompt's soft ids) are scored whole."""
        rec = self.recommender
        cut = self.prefix_cut if soft is None else None
        tokens = tokenize_with_prefix(rec.tokenizer, prompts, self.max_length, cut)
        groups = [g for g in group_by_prefix(tokens) if len(g) > 1]
        alone = sorted(set(range(len(tokens.ids))) - {i for g in groups for i in g})
        out = np.empty(len(tokens.ids), np.float64)
        was_training = rec.model.training
        rec.model.eval()
        try:
            with torch.inference_mode():
                self._score_whole(tokens, alone, out, soft)
                self._score_groups(tokens, groups, out)
        finally:
            rec.model.train(was_training)
        lengths = tokens.lengths
        self.work.prompts += len(lengths)
        self.work.tokens += int(lengths.sum())
        return out, lengths

    def _score_whole(
        self,
        tokens: Tokenized,
        rows: list[int],
        out: np.ndarray,
        soft: Sequence[Sequence[int]] | None,
    ) -> None:
        rec = self.recommender
        rows_arr = np.asarray(rows, np.int64)
        if self.sort_by_length:
            rows_arr = rows_arr[np.argsort(tokens.lengths[rows_arr], kind="stable")]
        for start in range(0, len(rows_arr), self.batch_size):
            idx = rows_arr[start : start + self.batch_size]
            ids = [tokens.ids[i] for i in idx]
            if soft is None:
                batch = pad_left(ids, rec.tokenizer.pad_token_id)
            else:
                mine = [soft[i] for i in idx]
                batch = soft_batch(rec.tokenizer, ids, mine, self.max_length)
            out[idx] = rec.score(batch.to(rec.device)).cpu().numpy()
            self.work.computed_tokens += batch.n_tokens

    def _score_groups(self, tokens: Tokenized, groups: list[list[int]], out: np.ndarray) -> None:
        rec = self.recommender
        pad, device = rec.tokenizer.pad_token_id, rec.device
        groups = sorted(groups, key=lambda g: tokens.prefix_tokens[g[0]])
        for start in range(0, len(groups), self.batch_size):
            chunk = groups[start : start + self.batch_size]
            cuts = [tokens.prefix_tokens[g[0]] for g in chunk]
            heads = [tokens.ids[g[0]][:k] for g, k in zip(chunk, cuts, strict=True)]
            ids, mask = left_padded(heads, pad)
            config = rec.model.config
            prefix = PrefixCache.compute(rec.net, ids.to(device), mask.to(device), config)
            members = [(n, i) for n, g in enumerate(chunk) for i in g]
            members.sort(key=lambda m: len(tokens.ids[m[1]]) - cuts[m[0]])
            for first in range(0, len(members), self.batch_size):
                part = members[first : first + self.batch_size]
                suffix, suffix_mask = left_padded([tokens.ids[i][cuts[n] :] for n, i in part], pad)
                group = torch.as_tensor([n for n, _ in part], dtype=torch.long, device=device)
                logits = suffix_logits(
                    rec.net, prefix, group, suffix.to(device), suffix_mask.to(device)
                )
                out[[i for _, i in part]] = rec.model.answer(logits).cpu().numpy()
                self.work.computed_tokens += int(suffix_mask.sum())
            self.work.computed_tokens += int(mask.sum())
            self.work.groups += len(chunk)
            self.work.shared_prompts += len(members)
