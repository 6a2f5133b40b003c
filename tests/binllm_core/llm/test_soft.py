"""Soft tokens: the tiny LM learns from projected embeddings what text cannot tell it; a saved
adapter and projector score the same; placeholders and ids must agree; CoLLM trains the
projector alone; RSLLM's contrastive terms; the config's rules for soft steps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from binllm_core.config import (
    FinetuneConfig,
    ModelConfig,
    PromptConfig,
    TuneStepConfig,
    load_config,
)
from binllm_core.errors import ConfigError, DataError
from binllm_core.evaluation.metrics import auc
from binllm_core.llm.batches import collate
from binllm_core.llm.objectives import REC, SoftContrastive
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.soft import EntityVectors, info_nce
from binllm_core.llm.strategies import plan
from binllm_core.llm.tuning import (
    TaskRows,
    fit_plain,
    fit_step,
    shuffled_batches,
    with_curriculum,
)
from binllm_core.modes import ITEM_TOKEN, USER_TOKEN
from binllm_core.prompts.templates import templates_from_config

N_USERS, N_ITEMS, DIM = 20, 40, 8
RNG = np.random.default_rng(0)
USERS = RNG.normal(size=(N_USERS + 1, DIM)).astype(np.float32)
ITEMS = RNG.normal(size=(N_ITEMS + 1, DIM)).astype(np.float32)
VECTORS = EntityVectors(USERS, ITEMS)
SOFT_PROMPT = f"#Question: user {USER_TOKEN} movie {ITEM_TOKEN} ? #Answer:"
TEXT_PROMPT = "#Question: user movie ? #Answer:"


def rows(n: int, seed: int, soft: bool = True) -> TaskRows:
    """Prompts about random (user, item) pairs whose label, the sign of the item vector's first
    coordinate, only the vectors carry (every text prompt reads the same)."""
    rng = np.random.default_rng(seed)
    uids, iids = rng.integers(1, N_USERS + 1, n), rng.integers(1, N_ITEMS + 1, n)
    return TaskRows(
        [SOFT_PROMPT if soft else TEXT_PROMPT] * n,
        [int(ITEMS[i, 0] > 0) for i in iids],
        soft=[[int(u), int(i)] for u, i in zip(uids, iids, strict=True)] if soft else None,
    )


def tuned(soft: bool, train_lora: bool = True, steps: int = 60) -> LLMRecommender:
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    if soft:
        rec.attach_soft(VECTORS, "collm")
    cfg = FinetuneConfig(eval_every=1000, max_length=64, lora_dropout=0.0)
    step = TuneStepConfig(lr=1e-2, warmup_steps=2, batch_size=16, max_steps=steps)
    fit_plain(rec, rows(256, 1, soft), step, cfg, train_lora=train_lora).close()
    return rec


def test_a_label_only_the_embeddings_carry_is_learned_through_soft_tokens_not_text(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    valid = rows(128, 2)
    rec = tuned(soft=True)
    scores, _ = Scorer(rec, 32, 64).score(valid.prompts, valid.soft)
    assert auc(valid.labels, scores.tolist()) > 0.9

    text = rows(128, 2, soft=False)
    plain = tuned(soft=False)
    assert auc(text.labels, Scorer(plain, 32, 64).score(text.prompts)[0].tolist()) < 0.7

    # The adapter and the projector (never the base, never the vectors) reproduce the scores
    # on a fresh base, merged as the scoring actors merge it.
    rec.save(tmp_path / "adapter")
    assert {"adapter_model.safetensors", "extra_modules.safetensors", "soft.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    fresh = LLMRecommender.from_saved(ModelConfig(backbone="tiny"), tmp_path / "adapter", VECTORS)
    fresh.merge_adapter()
    again, _ = Scorer(fresh, 32, 64).score(valid.prompts, valid.soft)
    np.testing.assert_allclose(again, scores, atol=1e-4)


def test_collm_step_trains_the_projector_and_leaves_the_adapter_as_it_was() -> None:
    torch.set_num_threads(1)
    rec = tuned(soft=True, train_lora=False, steps=5)
    lora = {n: p for n, p in rec.net.named_parameters() if "lora_B" in n}
    assert lora and all(not p.requires_grad and not p.abs().sum() for p in lora.values())
    projector = rec.model.soft.projector
    assert all(p.requires_grad for p in projector.parameters())
    fresh = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    torch.manual_seed(0)
    fresh.attach_soft(VECTORS, "collm")
    moved = [
        not torch.equal(a, b)
        for a, b in zip(
            projector.parameters(), fresh.model.soft.projector.parameters(), strict=True
        )
    ]
    assert any(moved)


def test_placeholders_and_soft_ids_must_agree_in_one_line() -> None:
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    rec.attach_soft(VECTORS, "llara")
    scorer = Scorer(rec, 4, 64)
    lacking = f"#Question: user {USER_TOKEN} movie ? #Answer:"  # no item soft token
    with pytest.raises(DataError, match="holds 1 placeholder tokens for 2 soft ids") as err:
        scorer.score([lacking], [[1, 2]])
    assert "\n" not in str(err.value) and "<TargetItemID>" in str(err.value)
    with pytest.raises(DataError, match="soft item id 99 has no embedding"):
        scorer.score([SOFT_PROMPT], [[1, 99]])
    # A prompt truncated from the left loses its first soft tokens and their ids with them.
    long = f"#Question: {ITEM_TOKEN} " + "a " * 80 + SOFT_PROMPT
    whole, _ = scorer.score([SOFT_PROMPT], [[3, 4]])
    cut, _ = Scorer(rec, 4, len(SOFT_PROMPT.split()) + 3).score([long], [[7, 3, 4]])
    assert np.isfinite(cut).all() and np.isfinite(whole).all()


def test_soft_prompts_need_an_adapter_with_a_projector(tmp_path: Path) -> None:
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"), trainable=True)
    rec.save(tmp_path / "text")
    with pytest.raises(ConfigError, match="has no projector") as err:
        LLMRecommender.from_saved(ModelConfig(backbone="tiny"), tmp_path / "text", VECTORS)
    assert "\n" not in str(err.value)


def test_contrastive_terms_join_the_loss_and_reach_the_projector() -> None:
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"), trainable=True)
    titles = {i: f"movie {i % 7}" for i in range(1, N_ITEMS + 1)}
    rec.attach_soft(VECTORS, "collm", titles)
    batch_rows = rows(16, 3)
    batch_rows.labels = [1] * 8 + [0] * 8
    batch = collate(rec.tokenizer, batch_rows.prompts, batch_rows.labels, 64, None, batch_rows.soft)
    plain = rec.loss(batch)
    rec.model.objectives[REC] = SoftContrastive(1.0, 1.0, 0.1)
    total = rec.loss(batch)
    assert float(total) > float(plain) > 0
    total.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in rec.model.soft.projector.parameters()
    )
    # Aligned pairs score a lower InfoNCE than shuffled ones.
    x = torch.randn(8, 5)
    assert info_nce(x, x, 0.1) < info_nce(x, x.roll(1, 0), 0.1)
    assert float(info_nce(x[:1], x[:1], 0.1)) == 0.0
    # Rows of the same entity are no negatives of each other: masked, a duplicate costs nothing.
    twice = torch.cat([x[:1], x])
    same = torch.zeros(9, 9, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert info_nce(twice, twice, 0.1, same) < info_nce(twice, twice, 0.1)


def test_soft_ids_follow_the_templates_placeholders_in_order() -> None:
    templates = templates_from_config(PromptConfig(soft_history=True))
    assert templates.soft_ids([5, 6, 7], 2, uid=1, iid=9) == [6, 7, 1, 9]
    own = "<TargetItemID> for <UserID>: <ItemTitleList> <TargetItemTitle>?\n#Answer:"
    reordered = templates_from_config(PromptConfig(code_template=own))
    assert reordered.soft_ids([5, 6, 7], 2, uid=1, iid=9) == [9, 1]


def test_config_rules_of_soft_steps() -> None:
    with pytest.raises(ConfigError, match="trains on soft prompts, which prompts.modes"):
        load_config("configs/tiny.yaml", ["finetune.strategy=collm"])
    with pytest.raises(ConfigError, match="start_step = step2 needs the step-1 adapter"):
        load_config("configs/tiny.yaml", ["finetune.start_step=step2"])
    with pytest.raises(ConfigError, match="aux rows are written in words only"):
        load_config(
            "configs/tiny.yaml",
            [
                "finetune.strategy=rsllm",
                "prompts.modes=[text,soft]",
                "prompts.aux={tasks: [mim]}",
                "finetune.aux={mim: 0.25}",
            ],
        )
    cfg = load_config(
        "configs/tiny.yaml",
        ["finetune.strategy=one_step", "finetune.code_mode=soft", "prompts.modes=[text,soft]"],
    )
    assert cfg.finetune.soft_step == "step1"
    with pytest.raises(ConfigError, match="score.modes has soft, and no finetune step trains"):
        load_config("configs/tiny.yaml", ["prompts.modes=[text,soft]", "score.modes=[soft]"])
    # Candidates (binllm score, nightly, recommend) are rendered in the last step's mode.
    from pipelines.pairs import candidate_mode

    collm = load_config(
        "configs/tiny.yaml", ["finetune.strategy=collm", "prompts.modes=[text,soft]"]
    )
    assert candidate_mode(collm) == "soft" and candidate_mode(cfg) == "soft"
    assert candidate_mode(load_config("configs/tiny.yaml", [])) == "binary"


def test_curriculum_moves_from_text_to_soft_prompts() -> None:
    train = rows(64, 4)
    train.plain = [TEXT_PROMPT] * len(train)
    progress = [0.0]
    stream = with_curriculum(shuffled_batches(train, 16, seed=1), lambda: progress[0], seed="c")
    first = next(stream)
    assert first.prompts == [TEXT_PROMPT] * 16 and first.soft == [[]] * 16
    progress[0] = 1.0
    last = next(stream)
    assert last.prompts == [SOFT_PROMPT] * 16 and all(len(ids) == 2 for ids in last.soft)
    progress[0] = 0.5
    mixed = [p == SOFT_PROMPT for _ in range(20) for p in next(stream).prompts]
    assert 0.35 < sum(mixed) / len(mixed) < 0.65
    # A batch mixing both kinds runs (text rows carry no soft ids), contrastive terms included.
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"), trainable=True)
    rec.attach_soft(VECTORS, "collm", {i: f"movie {i}" for i in range(1, N_ITEMS + 1)})
    rec.model.objectives[REC] = SoftContrastive(1.0, 1.0, 0.1)
    examples = next(stream)
    batch = collate(rec.tokenizer, examples.prompts, examples.labels, 64, None, examples.soft)
    assert torch.isfinite(rec.loss(batch))


@pytest.mark.parametrize("strategy", ["collm", "rsllm"])
def test_a_soft_strategy_step_runs_in_one_process_as_the_ray_worker_sets_it_up(strategy) -> None:
    """fit_step prepares the step as the finetune stage's workers do (a fresh projector; the
    contrastive objective for rsllm; the adapter frozen for collm) and learns what only the
    vectors carry."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = FinetuneConfig(strategy=strategy, eval_every=1000, max_length=64, lora_dropout=0.0)
    budget = TuneStepConfig(lr=1e-2, warmup_steps=2, batch_size=16, max_steps=60)
    step = replace(plan(cfg)[-1], cfg=budget)
    titles = {i: f"movie {i % 7}" for i in range(1, N_ITEMS + 1)}
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    run = fit_step(rec, step, cfg, rows(256, 1), vectors=VECTORS, titles=titles)
    contrastive = isinstance(rec.model.objectives[REC], SoftContrastive)
    assert contrastive == (strategy == "rsllm")
    lora = [p for n, p in rec.net.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad == (strategy == "rsllm") for p in lora)
    valid = rows(128, 2)
    scores, _ = Scorer(rec, 32, 64).score(valid.prompts, valid.soft)
    assert auc(valid.labels, scores.tolist()) > 0.8
    run.close()
