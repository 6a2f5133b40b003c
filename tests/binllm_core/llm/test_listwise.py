"""The listwise objectives: whole groups, the liked item first; a shared prefix gives the scores,
loss and gradients of whole prompts; training on a group raises its liked item's share."""

from __future__ import annotations

import math

import pytest
import torch

from binllm_core.config import FinetuneConfig, ModelConfig, TuneStepConfig
from binllm_core.llm.batches import PromptBatch
from binllm_core.llm.objectives import OBJECTIVES, Examples, bpr_first, group_size, softmax_first
from binllm_core.llm.prefix_sharing import SharedPrefixBatch
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.strategies import TuneStep
from binllm_core.llm.tuning import EvalSet, TaskRows, fit_step, group_batches
from binllm_core.prompts.render import prompt_of
from binllm_core.ranking.metrics import group_metrics
from tests.builders import TEMPLATES

CUT = TEMPLATES.prefix_cut()

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny() -> LLMRecommender:
    """A tiny random LM with a LoRA whose B is not zero (so the adapter changes the scores)."""
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(
        ModelConfig(backbone="tiny"), finetune=FinetuneConfig(lora_dropout=0.0), trainable=True
    )
    with torch.no_grad():
        for name, p in rec.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return rec


def group(user: str, history: str, items: range) -> list[str]:
    """A group's prompts: one user, one history, the liked item first."""
    return [
        prompt_of(TEMPLATES, "binary", history, f"book {i}", (user, format(i * 37 % 256, "08b")))
        for i in items
    ]


def groups() -> tuple[list[str], list[int]]:
    """Three groups of four; the first and the last share user and history, so a shared-prefix
    batch runs them as one prefix group and its rows leave the input order."""
    a, b = ("0101100111010010", '"movie 1", "movie 2"'), ("1110001010110100", '"movie 3"')
    prompts = group(*a, range(1, 5)) + group(*b, range(5, 9)) + group(*a, range(9, 13))
    return prompts, [1, 0, 0, 0] * 3


def test_group_size_reads_whole_groups_that_begin_with_their_liked_item() -> None:
    assert group_size([1, 0, 0, 1, 0, 0]) == 3
    assert group_size([1, 1]) == 1
    for bad in ([0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0], [0, 0], []):
        with pytest.raises(ValueError):
            group_size(bad)


def test_the_losses_on_known_scores() -> None:
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    softmax = (
        -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (1 + math.e + 1 / math.e))
    ) / 2
    assert float(softmax_first(scores)) == pytest.approx(softmax, rel=1e-6)
    pairs = [2.0, 2.0, -1.0, 1.0]  # liked - candidate, row by row
    bpr = sum(math.log1p(math.exp(-d)) for d in pairs) / 4
    assert float(bpr_first(scores)) == pytest.approx(bpr, rel=1e-6)


@pytest.mark.parametrize("task", ["rank", "rank_pairs"])
def test_a_shared_prefix_gives_the_scores_loss_and_gradients_of_whole_prompts(task: str) -> None:
    rec = tiny()
    rec.train(True)
    prompts, labels = groups()
    objective = rec.model.objectives[task]
    examples = Examples(task, prompts, labels)
    shared = objective.collate(rec.tokenizer, examples, 512, CUT)
    whole = objective.collate(rec.tokenizer, examples, 512, None)
    assert isinstance(shared, SharedPrefixBatch) and isinstance(whole, PromptBatch)
    assert shared.computed_tokens < whole.n_tokens
    assert shared.order.tolist() != list(range(len(prompts)))  # the reordering is exercised

    def run(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        for p in rec.trainable_parameters():
            p.grad = None
        scores = rec.model(batch, task)
        loss = objective.loss(scores, batch)
        loss.backward()
        named = rec.net.named_parameters()
        return (
            scores.detach(),
            loss.detach(),
            {n: p.grad.clone() for n, p in named if p.grad is not None},
        )

    scores_whole, loss_whole, grads_whole = run(whole)
    scores_shared, loss_shared, grads_shared = run(shared)
    torch.testing.assert_close(scores_shared, scores_whole, atol=1e-5, rtol=1e-5)
    assert float(loss_shared) == pytest.approx(float(loss_whole), abs=1e-5)
    assert grads_whole and grads_whole.keys() == grads_shared.keys()
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_shared[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert grad.abs().max() > 0, name
    # The scores are the ones the recommender ranks by (``score``), prompt by prompt.
    with torch.no_grad():
        ranked = rec.score(OBJECTIVES["rec"].collate(rec.tokenizer, examples, 512, None))
    torch.testing.assert_close(scores_whole, ranked, atol=1e-5, rtol=1e-5)


def test_rows_that_are_not_whole_groups_are_refused() -> None:
    rec = tiny()
    prompts, _ = groups()
    with pytest.raises(ValueError, match="whole groups"):
        OBJECTIVES["rank"].collate(
            rec.tokenizer, Examples("rank", prompts[:6], [1, 0, 0, 0, 1, 0]), 512, CUT
        )


@pytest.mark.parametrize("task", ["rank", "rank_pairs"])
def test_training_on_a_group_raises_its_liked_items_share(task: str) -> None:
    rec = tiny()
    prompts = group("0101100111010010", '"movie 1", "movie 2"', range(20, 26))
    examples = Examples(task, prompts, [1, 0, 0, 0, 0, 0])
    batch = rec.model.objectives[task].collate(rec.tokenizer, examples, 512, CUT)

    def share() -> float:
        with torch.no_grad():
            return float(torch.softmax(rec.model(batch, task), 0)[0])

    before = share()
    with torch.no_grad():
        assert int(rec.model(batch, task).argmax()) != 0  # the random LM does not prefer it
    optimizer = torch.optim.Adam(rec.trainable_parameters(), lr=3e-2)
    rec.train(True)
    for _ in range(20):
        optimizer.zero_grad()
        rec.loss(batch, task).backward()
        optimizer.step()
    after = share()
    assert after > before + 0.05, (task, before, after)
    with torch.no_grad():
        assert int(rec.model(batch, task).argmax()) == 0  # the liked item now comes first


def test_group_batches_hold_whole_groups_in_order_and_shuffle_only_the_groups() -> None:
    rows = TaskRows([f"g{g}-{j}" for g in range(5) for j in range(3)], [1, 0, 0] * 5)
    stream = group_batches(rows, 2, seed=0, task="rank")
    epochs = []
    for _ in range(3):  # five groups: two batches of two an epoch, one group left over
        drawn = []
        for examples in (next(stream), next(stream)):
            assert examples.task == "rank" and examples.labels == [1, 0, 0] * 2
            for start in (0, 3):
                heads = {p.split("-")[0] for p in examples.prompts[start : start + 3]}
                tails = [p.split("-")[1] for p in examples.prompts[start : start + 3]]
                assert len(heads) == 1 and tails == ["0", "1", "2"]
                drawn.append(heads.pop())
        assert len(set(drawn)) == 4
        epochs.append(drawn)
    assert len({tuple(e) for e in epochs}) > 1  # a fresh order every epoch
    again = group_batches(rows, 2, seed=0, task="rank")  # seeded: the same first batch
    assert next(again).prompts == [f"{g}-{j}" for g in epochs[0][:2] for j in range(3)]
    with pytest.raises(ValueError):
        group_batches(TaskRows(rows.prompts[:5], rows.labels[:5]), 1, 0, "rank")


def test_a_listwise_step_keeps_the_adapter_of_its_best_valid_ndcg(tmp_path) -> None:
    """A ``rank`` step evaluates NDCG@10 and MRR of the valid groups (no AUC), stops and keeps
    its best adapter by NDCG@10; the kept adapter scores the valid groups to that figure."""
    prompts, labels = groups()
    valid_prompts = group("0011", '"movie 9"', range(30, 34)) + group("1100", "none", range(40, 44))
    valid = EvalSet(valid_prompts, [1, 0, 0, 0] * 2, [1] * 4 + [2] * 4, groups=True)
    cfg = FinetuneConfig(lora_dropout=0.0, eval_every=1, patience=10, max_length=256)
    budget = TuneStepConfig(lr=3e-2, warmup_steps=0, batch_size=1, max_steps=4)
    step = TuneStep("step1", "binary", budget, False, {}, task="rank")
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    run = fit_step(rec, step, cfg, TaskRows(prompts, labels), valid, prefix_cut=CUT)
    evals = run.state.evals
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    assert all("auc" not in e and 0 <= e["mrr"] <= 1 for e in evals)
    best = max(evals, key=lambda e: e["ndcg10"])  # the first of equals
    assert run.state.best == best["ndcg10"] and run.state.best_step == best["step"]
    assert run.state.planned_steps == 4 and run.state.task_sequences == {"rank": 16}
    saved = LLMRecommender.from_saved(ModelConfig(backbone="tiny"), run.best_dir)
    scores, _ = Scorer(saved, 8, 256).score(valid_prompts)
    kept = group_metrics(scores.reshape(2, 4))["ndcg10"]
    assert kept == pytest.approx(best["ndcg10"], abs=1e-6)
    run.close()
