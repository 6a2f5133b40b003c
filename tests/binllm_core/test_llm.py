"""Backbone loading, the Yes-logit score, and a proof that codes in the prompt reach the model."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from binllm_core.backbone import (
    answer_token_id,
    load_backbone,
    load_tokenizer,
    resolve_source,
    score_prompts,
)
from binllm_core.config import FinetuneConfig, ModelConfig, PromptConfig, TuneStepConfig
from binllm_core.errors import ConfigError
from binllm_core.finetune import EvalSet, Schedule, attach_lora, fit_plain
from binllm_core.prompts import Lookups, render_table, templates_from_config
from tests.binllm_core.test_prompts import SAMPLE_SCHEMA
from tests.conftest import SMOLLM_GGUF

TINY = ModelConfig(backbone="tiny")


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two busy cores run the tiny model ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_tiny_backbone_is_deterministic_and_left_padded() -> None:
    first, second = load_backbone(TINY), load_backbone(TINY)
    assert first.tokenizer.padding_side == "left" and first.tokenizer.pad_token == "<pad>"
    assert first.tokenizer.convert_ids_to_tokens([first.yes_id]) == ["Yes"]
    prompts = ['#Question: a b c? Answer with "Yes" or "No".\n#Answer:', "movie 0 1 1 0 . 3"]
    together = score_prompts(first, prompts)
    alone = torch.cat([score_prompts(second, [p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_yes_minus_no_score_is_the_log_odds_of_the_two_answers() -> None:
    raw = load_backbone(TINY)
    odds = load_backbone(ModelConfig(backbone="tiny", answer_score="yes_minus_no"))
    assert odds.tokenizer.convert_ids_to_tokens([odds.answer.no_id]) == ["No"]
    prompts = ['#Question: a b c? Answer with "Yes" or "No".\n#Answer:', "movie 0 1 1 0 . 3"]
    enc = odds.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = odds.model(**enc).logits[:, -1]
    expected = last[:, odds.answer.yes_id] - last[:, odds.answer.no_id]
    torch.testing.assert_close(score_prompts(odds, prompts), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_prompts(raw, prompts), last[:, raw.yes_id])


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


def code_only_task(mode: str) -> tuple[tuple[list[str], list[int]], EvalSet]:
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
        (train["prompt"].to_pylist(), train["label"].to_pylist()),
        EvalSet(valid["prompt"].to_pylist(), valid["label"].to_pylist(), valid["uid"].to_pylist()),
    )


def test_codes_reach_the_model_and_a_saved_adapter_scores_the_same(tmp_path) -> None:
    cfg = FinetuneConfig(eval_every=60, patience=5, max_length=256)
    step = TuneStepConfig(lr=1e-2, min_lr=1e-4, warmup_steps=10, batch_size=16, max_steps=120)
    results = {}
    for mode in ("text", "binary"):
        train, valid = code_only_task(mode)
        torch.manual_seed(0)
        backbone = load_backbone(TINY)
        model = attach_lora(backbone.model, cfg)
        results[mode] = fit_plain(backbone, model, train, step, cfg, valid)
    assert results["binary"].best_auc > 0.9, results["binary"].evals
    assert results["text"].best_auc < 0.65, results["text"].evals

    # The adapter alone, saved and loaded onto a fresh base, gives the same scores.
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    before = score_prompts(backbone, valid.prompts[:32], model=model)
    fresh = load_backbone(TINY)
    reloaded = attach_lora(fresh.model, cfg, init_adapter=str(tmp_path / "adapter"))
    torch.testing.assert_close(score_prompts(fresh, valid.prompts[:32], model=reloaded), before)
