"""Scoring many prompts with an :class:`~binllm_core.recommender.LLMRecommender`: the one scorer.

Tokenise every prompt once, order them by token length so each forward pass of ``batch_size``
pads little, left-pad each batch, score it, and put the scores back in input order. Finetune's
evaluation, the ``score`` stage's actors, pair scoring, nightly and the benchmarks all use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from binllm_core.recommender import LLMRecommender, pad_left, tokenize


class Scorer:
    """Answer scores of prompt lists, in order, under ``torch.inference_mode``."""

    def __init__(
        self,
        recommender: LLMRecommender,
        batch_size: int,
        max_length: int,
        sort_by_length: bool = True,
    ) -> None:
        self.recommender = recommender
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length

    def score(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores as float64, token counts) of ``prompts``, in their order."""
        rec = self.recommender
        ids = tokenize(rec.tokenizer, prompts, self.max_length)
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        order = np.argsort(lengths, kind="stable") if self.sort_by_length else np.arange(len(ids))
        out = np.empty(len(ids), np.float64)
        was_training = rec.net.training
        rec.net.eval()
        device = rec.device
        try:
            with torch.inference_mode():
                for start in range(0, len(ids), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    batch = pad_left([ids[i] for i in idx], rec.tokenizer.pad_token_id)
                    out[idx] = rec.score(batch.to(device)).cpu().numpy()
        finally:
            rec.net.train(was_training)
        return out, lengths
