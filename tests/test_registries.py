"""Every entry of every registry runs on a tiny fixture and does what its kind promises, so a new
entry is tested by adding it (RecBole's test_model_auto); config fields that name an entry are
checked against the registry at load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from binllm_core import codes
from binllm_core.config import (
    ENCODER_BACKBONES,
    ENCODER_OBJECTIVES,
    SOFT_PROJECTORS,
    EncoderConfig,
    FinetuneConfig,
    ModelConfig,
    PromptConfig,
    load_config,
)
from binllm_core.encoder.data import split_samples
from binllm_core.encoder.model import BACKBONES
from binllm_core.encoder.objectives import OBJECTIVES as ENCODER_OBJECTIVE_REGISTRY
from binllm_core.encoder.training import fit
from binllm_core.errors import ConfigError
from binllm_core.llm.objectives import OBJECTIVES, Examples
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.soft import PROJECTORS
from binllm_core.llm.strategies import STRATEGIES, plan
from binllm_core.modes import MODES
from binllm_core.ranking.metrics import METRICS, RANKING_KEYS, user_metrics
from binllm_core.ranking.retrieval import BACKENDS, Catalog, backend, tie_score
from tests.builders import planted_samples

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_torch_free_name_lists_are_the_registries_keys() -> None:
    assert ENCODER_BACKBONES == tuple(BACKBONES)
    assert ENCODER_OBJECTIVES == tuple(ENCODER_OBJECTIVE_REGISTRY)
    assert SOFT_PROJECTORS == tuple(PROJECTORS)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_learns_planted_groups(name: str) -> None:
    cfg = EncoderConfig(
        backbone=name, dim=16, float_lr=3e-2, batch_size=256, max_epochs=4, beta_step=0.1, seed=7
    )
    training = fit(cfg, split_samples(planted_samples()), 101, 61)
    losses = [h["loss"] for h in training.history]
    assert losses[-1] < losses[0]
    users, items = training.signs()
    assert users.shape == (101, 16) and items.shape == (61, 16)
    assert set(np.unique(users)) <= {-1.0, 1.0}


@pytest.mark.parametrize("name", list(ENCODER_OBJECTIVE_REGISTRY))
def test_every_encoder_objective_lowers_its_loss_and_keeps_the_epoch_it_serves(name: str) -> None:
    cfg = EncoderConfig(
        objective=name, dim=16, lr=3e-2, float_lr=3e-2, batch_size=256, max_epochs=4, seed=7
    )
    training = fit(cfg, split_samples(planted_samples()), 101, 61)
    losses = [h["loss"] for h in training.history]
    assert losses[-1] < losses[0]
    served = ENCODER_OBJECTIVE_REGISTRY[name].serves
    scores = [h[f"binary_valid_{served}"] for h in training.history]
    assert training.best["binary"]["epoch"] == scores.index(max(scores))


# Hits at ranks 2 and 4 of a list of 5; 2 positives (3 and 7), one of them (7) at rank 4.
RANKED, POSITIVES = np.array([5, 3, 9, 7, 8]), np.array([3, 7])
EXPECTED_AT_3 = {
    "recall": 1 / 2,
    "ndcg": (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
    "hr": 1.0,
    "mrr": 1 / 2,
}


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_has_its_hand_computed_value_and_a_report_column(name: str) -> None:
    assert name in EXPECTED_AT_3, f"add the hand-computed value of {name} to this test"
    assert user_metrics(RANKED, POSITIVES, 3)[name] == pytest.approx(EXPECTED_AT_3[name])
    assert user_metrics(RANKED, np.array([42]), 3)[name] == 0.0
    from binllm_core.evaluation.report import RANKING_COLUMNS

    assert [k for m, k in RANKING_COLUMNS if m == name] == list(METRICS[name].report_ks)
    assert RANKING_KEYS == tuple(METRICS)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_plans_steps_in_rendered_modes(name: str) -> None:
    cfg = FinetuneConfig(strategy=name)
    steps = plan(cfg)
    assert steps and [s.name for s in steps] == [f"step{i + 1}" for i in range(len(steps))]
    rendered = (*PromptConfig().modes, "soft")
    assert all(s.mode in rendered for s in steps)
    assert [s.from_previous for s in steps] == [False] + [True] * (len(steps) - 1)
    assert cfg.soft_step == next((s.name for s in steps if s.mode == "soft"), "")


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_every_projector_maps_vectors_to_the_hidden_size_and_learns(name: str) -> None:
    torch.manual_seed(0)
    projector = PROJECTORS[name](8, 24)
    x, target = torch.randn(32, 8), torch.randn(32, 24)
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(projector(x), target)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert projector(x).shape == (32, 24) and float(loss.detach()) < first


PROMPTS = [f"a user liked {t}. will they like it? #Answer:" for t in ("x", "yy", "z z", "w")]
OBJECTIVE_EXAMPLES = {
    "rec": Examples("rec", PROMPTS, labels=[1, 0, 1, 0]),
    "bpr": Examples("bpr", [f"(A) or (B)? {p}" for p in PROMPTS], labels=[1, 0, 0, 1]),
    "mim": Examples("mim", PROMPTS, answers=["y", "q", "y", "q"]),
    "rank": Examples("rank", PROMPTS, labels=[1, 0, 1, 0]),
    "rank_pairs": Examples("rank_pairs", PROMPTS, labels=[1, 0, 1, 0]),
}
"""Distinct prompts, so that a few steps on them can lower every objective's loss."""


@pytest.mark.parametrize("task", list(OBJECTIVES))
def test_every_objective_gives_a_loss_that_training_lowers(task: str) -> None:
    assert task in OBJECTIVE_EXAMPLES, f"add examples of {task} to this test"
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    examples = OBJECTIVE_EXAMPLES[task]
    batch = OBJECTIVES[task].collate(rec.tokenizer, examples, 64, None)
    optimizer = torch.optim.Adam(rec.net.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = rec.loss(batch, task)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_ranks_by_hamming_distance(name: str) -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (50, 16), dtype=np.uint8)
    items = Catalog.build(np.arange(1, 51), bits, np.zeros(50))
    tie = tie_score("id", items, None)
    found = backend(name, items, tie).search(np.arange(3), bits[:3], 10, [np.array([], int)] * 3)
    for user in range(3):
        distance = (bits[user][None, :] != bits).sum(1)
        expected = sorted(range(50), key=lambda p: (distance[p], p + 1))[:10]
        assert found.items[user].tolist() == expected


@pytest.mark.parametrize("name", list(codes.CODE_FORMATS))
def test_every_code_format_round_trips(name: str) -> None:
    fmt = codes.CODE_FORMATS[name]
    bits = np.random.default_rng(1).integers(0, 2, (5, 32)).astype(np.uint8)
    np.testing.assert_array_equal(fmt.from_text(fmt.to_text(bits)), bits)
    assert name in MODES and MODES[name].code_format == name


@pytest.mark.parametrize(
    "key",
    ["encoder.backbone", "finetune.strategy", "finetune.soft.projector", "retrieve.backend"],
)
def test_an_unknown_name_is_refused_at_load_in_one_line(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [f"{key}=bogus"])
    assert f"{key} = 'bogus' is not known" in str(err.value)
    assert "choose among:" in str(err.value) and "\n" not in str(err.value)
