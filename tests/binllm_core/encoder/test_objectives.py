"""Encoder objectives: drawn negatives avoid what the user rated, the rated objective keeps the
paper's batches, the implicit ones learn lists and keep the epoch of the best valid NDCG@10."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from binllm_core.config import EncoderConfig
from binllm_core.encoder.data import Rows, split_samples
from binllm_core.encoder.model import BINARY, FLOAT
from binllm_core.encoder.objectives import (
    OBJECTIVES,
    Batch,
    Seen,
    distill_loss,
    draw_negatives,
    list_ndcg,
)
from binllm_core.encoder.training import EncoderTraining, fit
from binllm_core.errors import ConfigError
from binllm_core.ranking.metrics import METRICS
from tests.builders import planted_samples

PLANTED = EncoderConfig(
    dim=16, lr=3e-2, float_lr=3e-2, batch_size=256, max_epochs=25, patience=25, beta_step=0.1
)


def rows(users, items, labels) -> Rows:
    return Rows(np.array(users, np.int64), np.array(items, np.int64), np.array(labels, np.float32))


def test_drawn_negatives_avoid_rated_items_and_hard_ones_are_dislikes() -> None:
    train = rows([1, 1, 1, 2, 2], [1, 2, 3, 4, 5], [1, 0, 1, 1, 0])
    seen = Seen.of(train, 3, 8)
    rng = np.random.default_rng(0)
    users = np.array([1, 2] * 200)
    drawn = draw_negatives(users, 3, False, seen, rng)
    assert drawn.shape == (400, 3) and drawn.min() >= 1 and drawn.max() <= 7
    assert not seen.contains(np.repeat(users, 3), drawn.reshape(-1)).any()
    hard = draw_negatives(users, 3, True, seen, rng)
    assert (hard[users == 1, 0] == 2).all() and (hard[users == 2, 0] == 5).all()
    np.testing.assert_array_equal(seen.items_of(1), [1, 2, 3])


def test_the_rated_objective_is_the_papers_bce_over_a_seeded_permutation() -> None:
    data = split_samples(planted_samples())
    cfg = EncoderConfig(batch_size=100)
    gen = torch.Generator().manual_seed(5)
    batches = list(
        OBJECTIVES["rated"].batches(data["train"], cfg, 100, gen, np.random.default_rng(0), None)
    )
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(5))
    users = torch.cat([b.users for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert torch.equal(users, torch.from_numpy(data["train"].users)[order])
    assert torch.equal(labels, torch.from_numpy(data["train"].labels)[order])
    assert all(b.positives == 0 for b in batches)
    logits = torch.randn(len(batches[0].users))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batches[0].labels)
    assert torch.equal(OBJECTIVES["rated"].loss(logits, batches[0], cfg), expected)


def test_list_ndcg_is_the_metric_over_each_users_unseen_items() -> None:
    # Two users, five items; user 1 saw item 1, likes 2 in valid; user 2 likes 5.
    train = rows([1, 2], [1, 3], [1, 1])
    valid = rows([1, 2, 2], [2, 5, 4], [1, 1, 0])
    seen = Seen.of(train, 3, 6)
    users = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0, 0], [9, 0], [1, 0], [0, 5], [0, 4], [0, 3]], dtype=torch.float32)
    popularity = np.zeros(6, np.int64)
    found = list_ndcg(users, items, valid, seen, popularity, k=2)
    # user 1: item 1 seen -> list [2, 3...]: hit at rank 1; user 2: item 3 seen -> [4, 5]: rank 2
    hits = np.array([[True, False], [False, True]])
    expected = METRICS["ndcg"].per_user(hits, np.array([1, 1])).mean()
    assert found == pytest.approx(expected)


@pytest.mark.parametrize("objective", ["implicit", "mixed"])
@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_implicit_objectives_learn_lists_and_keep_the_best_ndcg_epoch(objective, loss) -> None:
    data = split_samples(planted_samples())
    cfg = dataclasses.replace(PLANTED, objective=objective, implicit_loss=loss, negatives=4)
    untrained = EncoderTraining(cfg, 101, 61, seen=data["train"])
    before = untrained.list_ndcg(untrained.models.models[BINARY], data["valid"])
    training = fit(cfg, data, 101, 61)
    for name in (BINARY, FLOAT):
        best = training.best[name]
        history = [h[f"{name}_valid_ndcg"] for h in training.history]
        assert best["valid"]["ndcg"] == max(history)
        assert history.index(max(history)) == best["epoch"]
    assert training.best[BINARY]["valid"]["ndcg"] > max(0.5, before + 0.2)


def test_an_implicit_objective_needs_every_train_row_and_sane_settings() -> None:
    with pytest.raises(Exception, match="needs every train row"):
        EncoderTraining(EncoderConfig(objective="implicit"), 3, 3)
    for bad in ({"objective": "implicit", "negatives": 0}, {"implicit_weight": 1.0}):
        with pytest.raises(ConfigError) as err:
            EncoderConfig(**bad).check("encoder")
        assert "\n" not in str(err.value)


def test_distillation_is_zero_at_the_teachers_order_and_pulls_the_codes_towards_it() -> None:
    # Two liked items, each with three drawn ones, laid out as a Batch: positives first, then
    # negative j of positive b at 2 * (1 + j) + b.
    batch = Batch(torch.zeros(8), torch.zeros(8), torch.zeros(0), positives=2, negatives=3)
    teacher = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 3.0])
    assert distill_loss(teacher + 5.0, teacher, batch, 2.0) == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(8, requires_grad=True)
    loss = distill_loss(student, teacher, batch, 1.0)
    loss.backward()
    # Each group's gradient is (softmax(student) - softmax(teacher)) / groups: the liked item
    # of group 0 (teacher 3 of [3, 2, 1, 0]) goes up, the one of group 1 (1 of [1, 0, 2, 3])
    # down, as the teacher orders them.
    group0 = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0)
    assert student.grad[0] == pytest.approx(float((0.25 - group0[0]) / 2))
    assert student.grad[0] < 0 < student.grad[1]
    rated_only = Batch(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    assert distill_loss(torch.randn(4), torch.randn(4), rated_only, 1.0) == 0.0


def test_distilled_codes_train_and_the_float_model_is_the_same_as_without() -> None:
    data = split_samples(planted_samples())
    cfg = dataclasses.replace(PLANTED, objective="implicit", negatives=4, max_epochs=6)
    untrained = EncoderTraining(cfg, 101, 61, seen=data["train"])
    before = untrained.list_ndcg(untrained.models.models[BINARY], data["valid"])
    plain = fit(cfg, data, 101, 61)
    distilled = fit(dataclasses.replace(cfg, distill_weight=1.0), data, 101, 61)
    # The term reaches the codes alone: the float model trains exactly as without it.
    for name, weight in plain.models.models[FLOAT].state_dict().items():
        assert torch.equal(weight, distilled.models.models[FLOAT].state_dict()[name])
    assert distilled.history[-1]["loss"] != plain.history[-1]["loss"]
    assert distilled.best[BINARY]["valid"]["ndcg"] > before + 0.05


def test_distillation_needs_codes_and_drawn_items() -> None:
    for bad in (
        {"distill_weight": 1.0},
        {"objective": "implicit", "distill_weight": 1.0, "binary": False},
        {"objective": "implicit", "distill_weight": -1.0},
        {"objective": "implicit", "distill_weight": 1.0, "distill_temperature": 0.0},
    ):
        with pytest.raises(ConfigError) as err:
            EncoderConfig(**bad).check("encoder")
        assert "\n" not in str(err.value)
