"""Prompts longer than a ``max_length``: counted, and refused when most would be cut.

Prompts are cut from the left (``truncation_side = "left"``), so the answer cue at the end always
stays, and a cut prompt loses its beginning: the question, the liked titles, the user's code. A
few cut prompts are a fact worth a count in the manifest; a ``max_length`` that cuts most of them
trains or scores a model on item titles alone (``finetune.max_length=8`` gave a valid AUC of
exactly 0.5), so it is refused with the lengths render measured.
"""

from __future__ import annotations

import numpy as np

from binllm_core.errors import ConfigError


def count_truncated(lengths: np.ndarray, max_length: int, key: str, what: str) -> int:
    """How many of the token ``lengths`` exceed ``max_length``; a one-line ConfigError naming
    ``key`` and the measured lengths when that is more than half of ``what``."""
    cut = int((lengths > max_length).sum())
    if cut * 2 > len(lengths):
        p50, p95 = (int(np.ceil(v)) for v in np.percentile(lengths, [50, 95]))
        raise ConfigError(
            f"{key} = {max_length} cuts {cut:,} of {len(lengths):,} {what} (their tokens: "
            f"median {p50}, p95 {p95}, max {lengths.max()}): each would lose its beginning "
            "(question, history, codes)",
            todo=f"raise {key} to at least {p95}, better {int(lengths.max())}",
        )
    return cut
