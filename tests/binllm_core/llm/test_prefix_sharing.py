"""Prefix sharing: a user's prefix computed once gives the scores, the loss and the gradients of
scoring every prompt whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binllm_core.config import FinetuneConfig, ModelConfig
from binllm_core.llm.batches import PromptBatch, collate
from binllm_core.llm.prefix_sharing import SharedPrefixBatch, group_by_prefix, tokenize_with_prefix
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.tuning import TaskRows, prefix_grouped_batches
from binllm_core.prompts.render import prompt_of
from tests.builders import TEMPLATES, user_prompts
from tests.conftest import SMOLLM_GGUF

CUT = TEMPLATES.prefix_cut()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(adapter: bool = True, dropout: float = 0.05) -> LLMRecommender:
    torch.manual_seed(0)
    cfg = FinetuneConfig(lora_dropout=dropout)
    rec = LLMRecommender.from_backbone(
        ModelConfig(backbone="tiny"), finetune=cfg, trainable=adapter
    )
    if adapter:  # a LoRA whose B is not zero, so that the adapter changes the scores
        with torch.no_grad():
            for name, p in rec.net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return rec


def test_the_cut_falls_where_the_target_item_begins() -> None:
    prompt = prompt_of(TEMPLATES, "binary", '"A", "B"', "Toy Story", ("0101", "1100"))
    head, tail = prompt[: CUT(prompt)], prompt[CUT(prompt) :]
    assert head.endswith("enjoy the movie titled ") and "0101" in head
    assert tail.startswith('"Toy Story" with the feature 1100?')
    text = prompt_of(TEMPLATES, "text", '"A"', "Toy Story")
    assert text[CUT(text) :].startswith('"Toy Story"?')
    assert CUT("a prompt from some other template") == 0


def test_groups_are_prompts_with_identical_prefix_tokens() -> None:
    rec = tiny(adapter=False)
    prompts = user_prompts()
    tokens = tokenize_with_prefix(rec.tokenizer, prompts, 512, CUT)
    groups = group_by_prefix(tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(prompts)))
    assert sum(len(g) > 1 for g in groups) >= 3
    for group in groups:
        k = tokens.prefix_tokens[group[0]]
        heads = {tuple(tokens.ids[i][:k]) for i in group}
        assert len(heads) == 1 and all(len(tokens.ids[i]) > k for i in group)
        # Same user, same history: the same text before the cut.
        assert len({prompts[i][: CUT(prompts[i])] for i in group}) == 1
    # Without a cut nothing is shared.
    none = tokenize_with_prefix(rec.tokenizer, prompts, 512, None)
    assert group_by_prefix(none) == [[i] for i in range(len(prompts))]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("mode", ["binary", "text"])
def test_shared_scores_equal_whole_prompt_scores(batch_size: int, mode: str) -> None:
    rec = tiny()
    prompts = user_prompts(mode=mode)
    whole, lengths = Scorer(rec, 4, 512).score(prompts)
    scorer = Scorer(rec, batch_size, 512, prefix_cut=CUT)
    shared, shared_lengths = scorer.score(prompts)
    np.testing.assert_array_equal(lengths, shared_lengths)
    assert np.abs(whole - shared).max() <= 1e-4
    work = scorer.work
    assert work.shared_prompts > len(prompts) // 2 and work.computed_tokens < work.tokens
    # A second pass over the same prompts reuses nothing and scores the same.
    again, _ = scorer.score(prompts)
    np.testing.assert_allclose(again, shared, atol=1e-6)


def test_bfloat16_takes_the_same_path() -> None:
    """What a GPU run uses (``model.dtype: auto`` is bfloat16 on CUDA), here on the CPU."""
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny", dtype="bfloat16"))
    prompts = user_prompts(seed=6)
    whole, _ = Scorer(rec, 4, 512).score(prompts)
    scorer = Scorer(rec, 4, 512, prefix_cut=CUT)
    shared, _ = scorer.score(prompts)
    assert scorer.work.shared_prompts > 0
    assert np.abs(whole - shared).max() <= 0.05 * max(1.0, np.abs(whole).max())


def test_truncated_prompts_still_score_as_whole() -> None:
    rec = tiny()
    prompts = user_prompts(seed=3)
    whole, _ = Scorer(rec, 4, 40).score(prompts)
    shared, lengths = Scorer(rec, 4, 40, prefix_cut=CUT).score(prompts)
    assert lengths.max() == 40
    assert np.abs(whole - shared).max() <= 1e-4


def test_shared_batch_gives_the_loss_and_lora_gradients_of_whole_prompts() -> None:
    rec = tiny(dropout=0.0)
    rec.train(True)
    prompts = user_prompts(seed=1)[:12]
    labels = [i % 2 for i in range(len(prompts))]
    shared = collate(rec.tokenizer, prompts, labels, 512, CUT)
    whole = collate(rec.tokenizer, prompts, labels, 512)
    assert isinstance(shared, SharedPrefixBatch) and isinstance(whole, PromptBatch)
    assert shared.n_tokens == whole.n_tokens and shared.computed_tokens < whole.n_tokens

    def loss_and_grads(batch):
        for p in rec.trainable_parameters():
            p.grad = None
        loss = rec.loss(batch)
        loss.backward()
        named = rec.net.named_parameters()
        return float(loss), {n: p.grad.clone() for n, p in named if p.requires_grad}

    loss_whole, grads_whole = loss_and_grads(whole)
    loss_shared, grads_shared = loss_and_grads(shared)
    assert loss_shared == pytest.approx(loss_whole, abs=1e-5)
    assert grads_whole and grads_whole.keys() == grads_shared.keys()
    for name, grad in grads_whole.items():
        assert torch.allclose(grads_shared[name], grad, atol=1e-5), name
        assert grad.abs().max() > 0, name


def test_a_prompt_alone_in_a_shared_batch_is_a_group_of_one_with_the_same_loss() -> None:
    rec = tiny(dropout=0.0)
    a = prompt_of(TEMPLATES, "binary", '"A"', "book 1", ("0101", "1100"))
    b = prompt_of(TEMPLATES, "binary", '"A"', "book 2", ("0101", "0011"))
    c = prompt_of(TEMPLATES, "binary", '"B"', "book 3", ("1111", "0011"))
    batch = collate(rec.tokenizer, [a, c, b], [1, 0, 0], 512, CUT)
    assert isinstance(batch, SharedPrefixBatch)
    assert batch.group.tolist() == [0, 0, 1] and batch.labels.tolist() == [1, 0, 0]
    assert batch.computed_tokens < batch.n_tokens
    whole = collate(rec.tokenizer, [a, b, c], [1, 0, 0], 512)
    assert float(rec.loss(batch)) == pytest.approx(float(rec.loss(whole)), abs=1e-5)


def test_grouped_micro_batches_keep_a_users_prompts_together() -> None:
    prompts = user_prompts(seed=2)
    labels = list(range(len(prompts)))
    stream = prefix_grouped_batches(TaskRows(prompts, labels), 4, seed=0, cut=CUT)
    seen = []
    for _ in range(len(prompts) // 4):
        batch = next(stream)
        seen += batch.labels
        heads = [p[: CUT(p)] for p in batch.prompts]
        # Consecutive prompts of a batch change prefix at most as often as groups end.
        assert len(set(heads)) <= 4
    assert len(set(seen)) == len(seen)  # an epoch draws every prompt at most once
    groups = {}
    for i in seen:
        groups.setdefault(prompts[i][: CUT(prompts[i])], []).append(seen.index(i))
    # Each group's prompts are laid end to end.
    assert all(max(pos) - min(pos) == len(pos) - 1 for pos in groups.values())


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM_GGUF.exists(), reason=f"shared model not found at {SMOLLM_GGUF}")
def test_shared_scores_equal_whole_with_smollm() -> None:
    rec = LLMRecommender.from_backbone(ModelConfig(backbone=str(SMOLLM_GGUF)), trainable=True)
    prompts = user_prompts(seed=4, users=3)
    whole, _ = Scorer(rec, 8, 1024).score(prompts)
    shared, _ = Scorer(rec, 8, 1024, prefix_cut=CUT).score(prompts)
    assert np.abs(whole - shared).max() <= 1e-4
