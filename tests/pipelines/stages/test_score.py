"""Scoring: length-sorted batches give the plain scores in row order; a killed actor is replaced
and every row comes out exactly once; which adapter scores which mode."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from binllm_core.config import ModelConfig, load_config
from binllm_core.errors import StageError
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from pipelines.ops import scoring
from pipelines.stages import score
from tests.builders import lineage

WORDS = "A user has given high ratings to the following movies Yes No 0 1 2 3 4 5 6 7".split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) + "\n#Answer:" for _ in range(n)
    ]


def test_length_sorted_scores_equal_plain_scores_in_order():
    texts = prompts(37)
    scorer = scoring.PromptScorer(
        ModelConfig(backbone="tiny"), "", lineage(), batch_size=8, max_length=1024
    )
    got, lengths = scorer.logits(texts)
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    plain, _ = Scorer(rec, batch_size=8, max_length=1024, sort_by_length=False).score(texts)
    np.testing.assert_allclose(got, plain, atol=1e-4)
    out = scorer(pa.table({"sample_id": list(range(37)), "prompt": texts}))
    assert out.column_names[:2] == ["sample_id", "n_tokens"] and "prompt" not in out.column_names
    assert out["sample_id"].to_pylist() == list(range(37))
    p = out["p_yes"].to_numpy()
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-out["logit_yes"].to_numpy())))
    assert out["n_tokens"].to_pylist() == lengths.tolist()


def random_adapter(folder: Path) -> LLMRecommender:
    """The tiny model with a random (not zero-initialised) LoRA, saved in ``folder``."""
    from peft import LoraConfig, get_peft_model

    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    rec.net = get_peft_model(rec.lm.model, config)
    rec.save(folder)
    return rec


def test_merged_lora_adapter_scores_like_the_peft_model(tmp_path: Path):
    rec = random_adapter(tmp_path / "adapter")
    texts = prompts(10, seed=3)
    expected, _ = Scorer(rec, batch_size=4, max_length=1024).score(texts)
    scorer = scoring.PromptScorer(
        ModelConfig(backbone="tiny"),
        str(tmp_path / "adapter"),
        lineage(),
        batch_size=4,
        max_length=1024,
    )
    assert not any("lora" in n for n, _ in scorer.recommender.net.named_modules())  # merged
    np.testing.assert_allclose(scorer.logits(texts)[0], expected, atol=1e-4)


def test_actor_sharing_user_prefixes_scores_like_whole_prompts(tmp_path: Path):
    from binllm_core.config import PromptConfig
    from binllm_core.prompts.templates import templates_from_config
    from tests.builders import user_prompts

    rec = random_adapter(tmp_path / "adapter")
    texts = user_prompts(seed=5)
    expected, _ = Scorer(rec, batch_size=4, max_length=1024).score(texts)
    cut = templates_from_config(PromptConfig()).prefix_cut()
    scorer = scoring.PromptScorer(
        ModelConfig(backbone="tiny"),
        str(tmp_path / "adapter"),
        lineage(),
        batch_size=4,
        max_length=1024,
        prefix_cut=cut,
    )
    got = scorer(pa.table({"sample_id": list(range(len(texts))), "prompt": texts}))
    assert got["sample_id"].to_pylist() == list(range(len(texts)))
    np.testing.assert_allclose(got["logit_yes"].to_numpy(), expected, atol=1e-4)
    assert scorer.scorer.work.shared_prompts > len(texts) // 2


@pytest.mark.slow  # an actor pool, killed and restarted
def test_killed_actor_is_replaced_and_every_row_is_scored_once(
    tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BINLLM_TEST_FAULT", f"{scoring.FAULT_POINT}@3")
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"output_root={tmp_path}",
            "score.batch_size=4",
            "score.sort_window=2",
            "score.max_restarts=2",
        ],
    )
    n = 96
    ds = ray.data.from_arrow(pa.table({"sample_id": list(range(n)), "prompt": prompts(n)}))
    ds = ds.repartition(12)
    out = scoring.score_dataset(ds, cfg, "", dt.datetime.now(dt.UTC)).materialize()
    ids = sorted(out.to_pandas()["sample_id"].tolist())
    assert ids == list(range(n))
    markers = list(Path(__import__("tempfile").gettempdir()).glob("binllm-scorer-fault-*"))
    assert markers, "the fault switch did not fire"
    for m in markers:
        m.unlink(missing_ok=True)


def test_adapter_plan_defaults_and_overrides(tmp_path: Path):
    cfg = load_config("configs/tiny.yaml", [f"output_root={tmp_path}"])
    finetune = {
        "steps": {
            "step1": {"mode": "text", "adapter": "finetune/v-1/adapters/step1"},
            "step2": {"mode": "binary", "adapter": "finetune/v-1/adapters/step2"},
        },
        "final_adapter": "finetune/v-1/adapters/step2",
    }

    def locate(path: str) -> str:  # run-relative -> inside the run being scored
        return f"/runs/copy/{path}"

    a1, a2 = "/runs/copy/finetune/v-1/adapters/step1", "/runs/copy/finetune/v-1/adapters/step2"
    assert scoring.default_modes(cfg, finetune) == ["text", "binary"]
    assert scoring.adapter_plan(cfg, ["text", "binary", "dotdec"], finetune, locate) == {
        "text": a1,
        "binary": a2,
        "dotdec": a2,
    }
    cfg.score.adapters = {"text": "step2", "binary": "none", "dotdec": "s3://b/a"}
    assert scoring.adapter_plan(cfg, ["text", "binary", "dotdec"], finetune, locate) == {
        "text": a2,
        "binary": "",
        "dotdec": "s3://b/a",
    }
    cfg.score.adapters = {}
    with pytest.raises(StageError, match="finetune has not finished"):
        scoring.adapter_plan(cfg, ["text"], None, locate)

    # Step 2 alone from a step-1 adapter made elsewhere: text prompts (cold users) use that one.
    step2_only = load_config(
        "configs/tiny.yaml",
        [
            f"output_root={tmp_path}",
            "finetune.strategy=collm",
            "prompts.modes=[text,soft]",
            "finetune.start_step=step2",
            "finetune.init_adapter=/adapters/tallrec",
        ],
    )
    soft_only = {
        "steps": {"step2": {"mode": "soft", "adapter": "finetune/v-1/adapters/step2"}},
        "final_adapter": "finetune/v-1/adapters/step2",
    }
    assert scoring.adapter_plan(step2_only, ["soft", "text"], soft_only, locate) == {
        "soft": a2,
        "text": "/adapters/tallrec",
    }


def test_subsample_by_users_keeps_whole_users_and_is_seeded():
    # 3 modes x (test: users 0..9 with 1..10 samples each; valid: 5 samples of user 0).
    rows = [(sid, "test", u) for sid, u in enumerate(u for u in range(10) for _ in range(u + 1))]
    rows += [(100 + k, "valid", 0) for k in range(5)]
    index = pa.table(
        {
            "sample_id": [r[0] for r in rows for _ in range(3)],
            "split": [r[1] for r in rows for _ in range(3)],
            "mode": [m for _ in rows for m in ("text", "binary", "dotdec")],
            "uid": [r[2] for r in rows for _ in range(3)],
        }
    )
    uid_of = {r[0]: r[2] for r in rows}
    sc = load_config(
        "configs/tiny.yaml", ["score.max_rows=20", "score.sample_by=users", "score.splits=[test]"]
    )
    ids = score.pick_samples(index, sc.score)
    users = {uid_of[i] for i in ids}
    assert 0 < len(ids) <= 20
    assert sorted(ids) == [r[0] for r in rows if r[2] in users and r[1] == "test"]
    assert np.array_equal(ids, score.pick_samples(index, sc.score))
    by_rows = load_config("configs/tiny.yaml", ["score.max_rows=20", "score.splits=[test]"]).score
    picked = score.pick_samples(index, by_rows)
    assert len(picked) == 20 and len(set(picked)) == 20
