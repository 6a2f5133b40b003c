"""The GPU lane: the GPU code paths end to end on the tiny config and the tiny random Llama.

Run on a machine with CUDA (skipped without one, with the reason)::

    python -m pytest -m gpu tests/gpu -v

* a whole ``binllm run configs/tiny.yaml`` with bf16 weights, the encoder and finetune on the
  GPU (Ray Train, NCCL) and the scoring/re-ranking actors holding ``score.num_gpus=1``;
* LoRA merge on the GPU: the same scores before and after ``merge_adapter()``;
* CPU against GPU: the same adapter and prompts through the scoring actor's class
  (:class:`pipelines.ops.scoring.PromptScorer`), on CPU float32 and on the GPU.

The tolerances are stated in each test's docstring. Every score here is the answer score of
``model.answer_score: yes_minus_no`` (the ``Yes`` logit less the ``No`` logit). The tiny
model's scores span a few tenths, so each comparison also checks that the adapter moves the
scores by at least :data:`SIGNAL` times its tolerance: a path that dropped or mis-merged the
adapter cannot pass. Measured on CPU with bf16 weights: merge differences ~4e-3, bf16 against
float32 ~4e-3; the adapter moves scores by up to ~0.7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from binllm_core.config import FinetuneConfig, ModelConfig, PromptConfig
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.prompts.templates import templates_from_config
from binllm_core.storage import MANIFEST, read_output
from tests.builders import lineage, user_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); run with -m gpu on one",
    ),
]

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_DATA = REPO / "tests" / "fixtures" / "tiny"

MERGE_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
"""Largest |score before merge - score after merge| on the GPU, per weights dtype."""
DEVICE_TOL = {"float32": 1e-3, "bfloat16": 5e-2}
"""Largest |GPU score - CPU float32 score|, per dtype of the GPU's weights."""
SIGNAL = 5
"""The adapter must move some score by at least this many times the tolerance."""
ADAPTER_SEED = 3
"""Its random adapter moves the tiny model's scores by up to 0.74 (measured on CPU)."""


def model_cfg(dtype: str) -> ModelConfig:
    return ModelConfig(backbone="tiny", dtype=dtype, answer_score="yes_minus_no")


def random_adapter(dtype: str, device: str) -> LLMRecommender:
    """The tiny model in ``dtype`` on ``device`` with a fresh adapter of the run's default shape
    (q/v, r 8, alpha 16) whose B matrices are random instead of zero (so that it moves the
    scores); both drawn from seeded CPU generators, so every device gets the same adapter."""
    torch.manual_seed(ADAPTER_SEED)  # the A matrices (peft draws them on the CPU)
    rec = LLMRecommender.from_backbone(
        model_cfg(dtype), finetune=FinetuneConfig(), trainable=True, device=device
    )
    generator = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name, p in rec.net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return rec


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Prompts of the default template, several sharing a user prefix."""
    return user_prompts(seed=7, users=8)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random LoRA (the run's default shape: q/v, r 8, alpha 16) on the tiny model, saved."""
    rec = random_adapter("float32", "cpu")
    folder = tmp_path_factory.mktemp("gpu") / "adapter"
    rec.save(folder)
    return str(folder)


# ---- a: the whole pipeline ---------------------------------------------------------------------
GPU_RUN = [
    "model.dtype=bfloat16",
    "encoder.use_gpu=true",
    "encoder.max_epochs=5",
    "finetune.use_gpu=true",
    "finetune.num_workers=1",
    "finetune.eval_every=5",
    "finetune.patience=3",
    "finetune.step1={lr: 1.0e-2, warmup_steps: 2, batch_size: 8, max_steps: 10}",
    "finetune.step2={lr: 1.0e-2, warmup_steps: 2, batch_size: 8, max_steps: 10}",
    "score.num_gpus=1",
    "score.num_actors=1",
]


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / MANIFEST).read_text())


def test_tiny_run_on_the_gpu_writes_finite_scores_and_records_the_gpu_settings(
    tmp_path: Path, ray_session
) -> None:
    """``binllm run configs/tiny.yaml`` with bf16 weights, the encoder and both LoRA steps on
    the GPU and scoring actors of ``num_gpus=1`` runs every stage (exit 0); every score is
    finite and every P(Yes) in [0, 1]; the fine-tuning losses and AUCs are finite (bf16 did not
    overflow); the manifests record dtype, ``use_gpu`` and ``num_gpus``."""
    import ray

    from jobs.cli import main
    from pipelines.runtime.registry import STAGES

    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray sees no GPU: the actors would wait"
    sets = [f"output_root={tmp_path / 'runs'}", f"data.uri={TINY_DATA}", *GPU_RUN]
    assert main(["run", str(TINY_CONFIG), *[a for s in sets for a in ("--set", s)]]) == 0

    run = tmp_path / "runs" / "tiny"
    for stage in STAGES:
        assert (run / stage.name / MANIFEST).exists(), f"stage {stage.name} did not finish"

    encode, finetune = manifest(run, "encode"), manifest(run, "finetune")
    score, rerank = manifest(run, "score"), manifest(run, "rerank")
    assert encode["config"]["encoder"]["use_gpu"] is True
    assert finetune["config"]["finetune"]["use_gpu"] is True
    for m in (finetune, score, rerank):
        assert m["config"]["model"]["dtype"] == "bfloat16"
    for m in (score, rerank):
        assert m["config"]["score"]["num_gpus"] == 1
    assert score["metrics"]["num_gpus_per_actor"] == 1

    steps = finetune["metrics"]["steps"]
    assert set(steps) == {"step1", "step2"}
    for name, step in steps.items():
        assert step["steps"] == 10, (name, step)
        assert 0.0 <= step["best_valid_auc"] <= 1.0, (name, step)
    evals = read_output(str(run / "finetune"), "evals")
    assert evals.num_rows >= 4
    aucs = evals["auc"].drop_null().to_numpy()
    assert len(aucs) and np.isfinite(aucs).all()
    losses = evals["train_loss"].drop_null().to_numpy()
    assert len(losses) and np.isfinite(losses).all()

    scores = read_output(str(run / "score"), "scores")
    assert scores.num_rows == score["tables"]["scores"]["rows"] > 0
    assert set(scores["mode"].to_pylist()) == {"text", "binary"}
    logit = scores["logit_yes"].to_numpy()
    p_yes = scores["p_yes"].to_numpy()
    assert np.isfinite(logit).all() and np.isfinite(p_yes).all()
    assert ((p_yes >= 0) & (p_yes <= 1)).all()
    assert np.unique(logit).size > 1  # not one constant (a NaN-free but dead model)

    recs = read_output(str(run / "rerank"), "recommendations")
    assert recs.num_rows > 0 and np.isfinite(recs["score"].to_numpy()).all()
    assert manifest(run, "evaluate")["metrics"]


# ---- b: LoRA merge on the GPU ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_lora_scores_like_the_unmerged_adapter_on_the_gpu(
    dtype: str, prompts: list[str]
) -> None:
    """A fresh adapter attached on the GPU (random B), then ``merge_adapter()``: the scores of
    the same prompts before and after the merge agree within 1e-4 (float32 weights) or 2e-2
    (bfloat16: the merged weights are rounded to bf16) absolute; the adapter itself moves some
    score by at least 5x that tolerance, and no LoRA module is left after the merge."""
    rec = random_adapter(dtype, "cuda")
    assert rec.device.type == "cuda"
    assert rec.lm.model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    scorer = Scorer(rec, batch_size=8, max_length=512)
    before, _ = scorer.score(prompts)
    with rec.net.disable_adapter():
        bare, _ = scorer.score(prompts)
    rec.merge_adapter()
    assert not any("lora" in name for name, _ in rec.net.named_modules())
    after, _ = Scorer(rec, batch_size=8, max_length=512).score(prompts)

    tol = MERGE_TOL[dtype]
    assert np.isfinite(after).all()
    assert np.abs(before - bare).max() > SIGNAL * tol, "the adapter barely moves the scores"
    np.testing.assert_allclose(after, before, rtol=0, atol=tol)


# ---- c: CPU against GPU ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_scoring_actor_agrees_with_cpu_float32(
    dtype: str, adapter: str, prompts: list[str]
) -> None:
    """The scoring actor's class with the same saved adapter and prompts: on CPU in float32
    (whole prompts) and on the GPU in ``dtype`` (merged LoRA, user prefixes shared, as the
    ``score`` stage runs). The answer scores (Yes-No logits) agree within 1e-3 absolute for
    float32 on the GPU, 5e-2 for bfloat16; P(Yes) within a quarter of that (the sigmoid's
    slope is at most 1/4); the adapter moves some CPU score by at least 5x the tolerance."""
    from pipelines.ops.scoring import PromptScorer

    cut = templates_from_config(PromptConfig()).prefix_cut()
    args = {"lineage": lineage(), "batch_size": 8, "max_length": 512}
    cpu = PromptScorer(model_cfg("float32"), adapter, use_gpu=False, **args)
    gpu = PromptScorer(model_cfg(dtype), adapter, use_gpu=True, prefix_cut=cut, **args)
    bare = PromptScorer(model_cfg("float32"), "", use_gpu=False, **args)
    assert cpu.recommender.device.type == "cpu" and gpu.recommender.device.type == "cuda"
    assert next(gpu.recommender.net.parameters()).dtype == getattr(torch, dtype)

    table = pa.table({"sample_id": list(range(len(prompts))), "prompt": prompts})
    want, got = cpu(table), gpu(table)
    assert gpu.scorer.work.shared_prompts > 0  # the prefix-sharing path ran on the GPU
    assert got["sample_id"].to_pylist() == list(range(len(prompts)))

    tol = DEVICE_TOL[dtype]
    ref = want["logit_yes"].to_numpy()
    unadapted = bare.logits(prompts)[0]
    assert np.abs(ref - unadapted).max() > SIGNAL * tol, "the adapter barely moves the scores"
    np.testing.assert_allclose(got["logit_yes"].to_numpy(), ref, rtol=0, atol=tol)
    p_gpu = got["p_yes"].to_numpy()
    assert ((p_gpu >= 0) & (p_gpu <= 1)).all()
    np.testing.assert_allclose(p_gpu, want["p_yes"].to_numpy(), rtol=0, atol=tol / 4)
