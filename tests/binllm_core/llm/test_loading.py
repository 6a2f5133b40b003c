"""The LLM recommender: loading, the answer score, one tuning loop, and a proof that codes in
the prompt reach the model."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from binllm_core.config import FinetuneConfig, ModelConfig, PromptConfig, TuneStepConfig
from binllm_core.errors import ConfigError
from binllm_core.llm.backbone import answer_token_id, load_tokenizer, resolve_source
from binllm_core.llm.batches import collate
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.tuning import (
    EvalSet,
    Schedule,
    TaskRows,
    TuningRun,
    fit_plain,
    shuffled_batches,
)
from binllm_core.prompts.render import Lookups, render_table
from binllm_core.prompts.templates import templates_from_config
from tests.builders import SAMPLE_SCHEMA
from tests.conftest import SMOLLM_GGUF

TINY = ModelConfig(backbone="tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sources_never_reach_for_the_network(tmp_path) -> None:
    assert resolve_source(ModelConfig(backbone="org/model")).kind == "hub"
    assert resolve_source(ModelConfig(backbone=str(tmp_path))).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    source = resolve_source(ModelConfig(backbone=str(gguf)))
    assert (source.kind, source.path, source.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    assert resolve_source(ModelConfig(backbone=str(tmp_path), gguf_file="m.gguf")).kind == "gguf"
    for missing in ("./no/such/folder", "/no/such.gguf", "no_such_dir"):
        with pytest.raises(ConfigError, match="is not there") as err:
            resolve_source(ModelConfig(backbone=missing))
        assert "\n" not in str(err.value)


def scores(rec: LLMRecommender, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    return torch.as_tensor(Scorer(rec, batch_size, 1024).score(prompts)[0]).float()


def test_tiny_backbone_is_deterministic_and_left_padded() -> None:
    first, second = LLMRecommender.from_backbone(TINY), LLMRecommender.from_backbone(TINY)
    assert first.tokenizer.padding_side == "left" and first.tokenizer.pad_token == "<pad>"
    assert first.tokenizer.convert_ids_to_tokens([first.lm.yes_id]) == ["Yes"]
    prompts = ['#Question: a b c? Answer with "Yes" or "No".\n#Answer:', "movie 0 1 1 0 . 3"]
    together = scores(first, prompts)
    alone = torch.cat([scores(second, [p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The batch collate builds is what the scorer scores: the same numbers.
    with torch.no_grad():
        direct = first.score(collate(first.tokenizer, prompts, None, 1024))
    torch.testing.assert_close(direct, together, atol=1e-5, rtol=1e-5)


def test_yes_minus_no_score_is_the_log_odds_of_the_two_answers() -> None:
    raw = LLMRecommender.from_backbone(TINY)
    odds = LLMRecommender.from_backbone(ModelConfig(backbone="tiny", answer_score="yes_minus_no"))
    answer = odds.lm.answer
    assert odds.tokenizer.convert_ids_to_tokens([answer.no_id]) == ["No"]
    prompts = ['#Question: a b c? Answer with "Yes" or "No".\n#Answer:', "movie 0 1 1 0 . 3"]
    enc = odds.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = odds.lm.model(**enc).logits[:, -1]
    expected = last[:, answer.yes_id] - last[:, answer.no_id]
    torch.testing.assert_close(scores(odds, prompts), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores(raw, prompts), last[:, raw.lm.yes_id], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # loads the real tokenizer from the GGUF file
@pytest.mark.skipif(not SMOLLM_GGUF.exists(), reason=f"shared model not found at {SMOLLM_GGUF}")
def test_smollm_answer_token_has_the_leading_space() -> None:
    tokenizer = load_tokenizer(ModelConfig(backbone=str(SMOLLM_GGUF)))
    yes = answer_token_id(tokenizer)
    assert tokenizer.decode([yes]) == " Yes"
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.truncation_side == "left"


def test_schedule_warms_up_over_global_steps_then_decays() -> None:
    schedule = Schedule(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=10, total_steps=110)
    assert schedule.lr_at(0) == pytest.approx(1e-5)
    assert schedule.lr_at(5) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(60) == pytest.approx(5.5e-4)
    assert schedule.lr_at(110) == pytest.approx(1e-4)


def code_only_task(mode: str) -> tuple[TaskRows, EvalSet]:
    """Label = first bit of the target item's code; validation items never appear in training,
    so only the code (not the title) can tell the label."""
    rng = random.Random(0)
    item_codes = {i: "".join(rng.choice("01") for _ in range(8)) for i in range(1, 61)}
    user_codes = {u: "".join(rng.choice("01") for _ in range(8)) for u in range(1, 21)}
    titles = {i: " ".join(rng.choice("abcdefgh") for _ in range(3)) for i in item_codes}
    lookups = Lookups(titles, {"binary": user_codes}, {"binary": item_codes})
    rows = []
    for sample_id in range(600):
        iid, uid = rng.randint(1, 60), rng.randint(1, 20)
        rows.append(
            dict(
                sample_id=sample_id,
                split="train" if iid <= 40 else "valid",
                valid_small=True,
                uid=uid,
                iid=iid,
                label=int(item_codes[iid][0]),
                not_cold=True,
                warm=True,
                history=[rng.randint(1, 60) for _ in range(2)],
            )
        )
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    prompts = render_table(table, lookups, templates_from_config(PromptConfig()), [mode], 10)
    train = prompts.filter(pa.compute.equal(prompts["split"], "train"))
    valid = prompts.filter(pa.compute.equal(prompts["split"], "valid"))
    return (
        TaskRows(train["prompt"].to_pylist(), train["label"].to_pylist()),
        EvalSet(valid["prompt"].to_pylist(), valid["label"].to_pylist(), valid["uid"].to_pylist()),
    )


@pytest.mark.slow  # trains a tiny LLM twice for 120 steps
def test_codes_reach_the_model_and_a_saved_adapter_scores_the_same(tmp_path) -> None:
    cfg = FinetuneConfig(eval_every=60, patience=5, max_length=256, seed=0)
    step = TuneStepConfig(lr=1e-2, min_lr=1e-4, warmup_steps=10, batch_size=16, max_steps=120)
    results = {}
    for mode in ("text", "binary"):
        train, valid = code_only_task(mode)
        rec = LLMRecommender.from_backbone(TINY)
        results[mode] = fit_plain(rec, train, step, cfg, valid).state
    assert results["binary"].best > 0.9, results["binary"].evals
    assert results["text"].best < 0.65, results["text"].evals

    # The adapter alone, saved and loaded onto a fresh base, gives the same scores.
    rec.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    before = scores(rec, valid.prompts[:32])
    reloaded = LLMRecommender.from_saved(TINY, tmp_path / "adapter")
    torch.testing.assert_close(scores(reloaded, valid.prompts[:32]), before)
    reloaded.merge_adapter()  # folded into the base for inference: the same scores
    torch.testing.assert_close(scores(reloaded, valid.prompts[:32]), before, atol=1e-4, rtol=0)


def test_a_run_resumed_from_its_checkpoint_continues_exactly(tmp_path) -> None:
    """Interrupted after 6 of 10 steps and resumed from the checkpoint, a run ends with the
    weights, evaluations and counters of the run that was never interrupted."""
    cfg = FinetuneConfig(eval_every=3, patience=10, max_length=256, lora_dropout=0.0)
    step = TuneStepConfig(lr=1e-2, warmup_steps=2, batch_size=8, max_steps=10)
    train, valid = code_only_task("binary")

    def drive(run: TuningRun, stream, until: int) -> None:
        while not run.done and run.state.step < until:
            run.train_step(stream)
            if run.due_for_eval:
                run.evaluate(valid)

    whole = TuningRun(LLMRecommender.from_backbone(TINY), cfg, step, len(train))
    whole.setup()
    drive(whole, shuffled_batches(train, 8, cfg.seed), 10)

    first = TuningRun(LLMRecommender.from_backbone(TINY), cfg, step, len(train))
    first.setup()
    stream = shuffled_batches(train, 8, cfg.seed)
    drive(first, stream, 6)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = TuningRun(LLMRecommender.from_backbone(TINY), cfg, step, len(train))
    resumed.setup(resume=str(tmp_path / "ckpt"))
    assert resumed.state.step == 6 and resumed.state.restarts == 1
    drive(resumed, stream, 10)  # the same data stream goes on

    assert resumed.done and whole.done
    assert [e["step"] for e in resumed.state.evals] == [e["step"] for e in whole.state.evals]
    for a, b in zip(resumed.state.evals, whole.state.evals, strict=True):
        assert a["auc"] == pytest.approx(b["auc"], abs=1e-6)
    assert resumed.state.sequences == whole.state.sequences == 80
    ours = dict(resumed.rec.net.named_parameters())
    for name, p in whole.rec.net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p, atol=1e-5, rtol=1e-4)
