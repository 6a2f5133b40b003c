"""A max_length that cuts a few prompts is counted; one that cuts most of them is refused."""

from __future__ import annotations

import numpy as np
import pytest

from binllm_core.errors import ConfigError
from binllm_core.prompts.truncation import count_truncated


def test_prompts_longer_than_max_length_are_counted():
    lengths = np.array([10, 200, 210, 90, 250])
    assert count_truncated(lengths, 205, "finetune.max_length", "train prompts") == 2
    assert count_truncated(lengths, 250, "finetune.max_length", "train prompts") == 0
    assert count_truncated(np.array([], np.int64), 8, "score.max_length", "prompts") == 0


def test_a_max_length_that_cuts_most_prompts_is_one_line_with_their_lengths():
    lengths = np.arange(100, 300)
    with pytest.raises(ConfigError) as err:
        count_truncated(lengths, 8, "finetune.max_length", "train prompts (binary)")
    assert str(err.value) == (
        "finetune.max_length = 8 cuts 200 of 200 train prompts (binary) (their tokens: median "
        "200, p95 290, max 299): each would lose its beginning (question, history, codes); "
        "raise finetune.max_length to at least 290, better 299"
    )
