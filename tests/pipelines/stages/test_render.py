"""Stage render on fake finished upstream stages (ingest, samples, encode written in the test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from binllm_core.llm.backbone import load_tokenizer
from binllm_core.storage import MANIFEST
from pipelines.runtime.stage import StageContext, run_stage
from pipelines.stages import render
from tests.builders import fake_upstream, make_cfg, read_prompts, stage
from tests.conftest import SMOLLM_GGUF

pytestmark = pytest.mark.slow  # the token-counting actor pool


def test_render_writes_prompts_per_mode_with_token_stats(tmp_path: Path, ray_session) -> None:
    cfg = make_cfg(
        tmp_path,
        "prompts.style=paper",
        "prompts.modes=[text,binary,dotdec,soft]",
        "prompts.soft_history=true",
    )
    fake_upstream(cfg, n_samples=50)
    manifest = run_stage(cfg, stage("render"))
    prompts = read_prompts(tmp_path)
    assert prompts.num_rows == 200
    assert prompts.column_names == [
        "sample_id",
        "split",
        "valid_small",
        "mode",
        "uid",
        "iid",
        "label",
        "not_cold",
        "warm",
        "prompt",
        "soft_ids",
        "n_tokens",
    ]
    by_mode = {r["mode"]: r for r in prompts.to_pylist() if r["sample_id"] == 0}
    # Soft prompts: a soft token after each history title and in the two code slots; their
    # ids in order of appearance (items 3, 1; user 1; target item 2); null in other modes.
    soft = by_mode["soft"]
    assert soft["prompt"].startswith(
        '#Question: A user has given high ratings to the following movies: "Title 3" '
        '<|item_emb|>, "Title 1" <|item_emb|>. Additionally'
    )
    assert "encoded in the feature <|user_emb|>." in soft["prompt"]
    assert '"Title 2" with the feature <|item_emb|>?' in soft["prompt"]
    assert soft["soft_ids"] == [3, 1, 1, 2] and by_mode["binary"]["soft_ids"] is None
    first = [by_mode["text"], by_mode["binary"], by_mode["dotdec"]]
    assert first[1]["prompt"] == (
        '#Question: A user has given high ratings to the following movies: "Title 3", '
        '"Title 1". Additionally, we have information about the user\'s preferences encoded in '
        "the feature 00111100. Using all available information, make a prediction about whether "
        'the user would enjoy the movie titled "Title 2" with the feature 01010101? Answer with '
        '"Yes" or "No". \\n#Answer:'
    )
    assert "feature 60." in first[2]["prompt"] and "feature 85?" in first[2]["prompt"]

    tokens = manifest["metrics"]["tokens_per_mode"]
    assert set(tokens) == {"text", "binary", "dotdec", "soft"}
    assert tokens["binary"]["mean"] > tokens["dotdec"]["mean"] > tokens["text"]["mean"] > 0
    assert tokens["binary"]["max"] >= tokens["binary"]["p95"] >= tokens["binary"]["mean"]
    assert tokens["soft"]["mean"] > tokens["text"]["mean"]
    rows = manifest["metrics"]["rows_per_mode"]
    assert rows == {"binary": 50, "dotdec": 50, "soft": 50, "text": 50}

    # Partitioned by mode and split, the columns kept in the files: a slice reads alone.
    folder = tmp_path / "t" / "render" / manifest["tables"]["prompts"]["path"]
    slices = sorted(p.relative_to(folder).as_posix() for p in folder.glob("mode=*/split=*"))
    assert slices == [
        f"mode={m}/split={s}"
        for m in ("binary", "dotdec", "soft", "text")
        for s in ("train", "valid")
    ]
    ctx = StageContext.open(cfg, "finetune")
    part = ctx.read_table("render", "prompts", part={"mode": "binary", "split": "valid"})
    assert set(part["mode"].to_pylist()) == {"binary"} and set(part["split"].to_pylist()) == {
        "valid"
    }
    assert ctx.read_dataset("render", "prompts", {"mode": "text"}).count() == 50


def test_render_stops_on_a_user_without_code(tmp_path: Path, ray_session) -> None:
    cfg = make_cfg(tmp_path)
    fake_upstream(cfg, n_samples=50, drop_user_code=1)
    with pytest.raises(Exception, match="user uid=1 has no binary code") as err:
        run_stage(cfg, stage("render"))
    assert "the encoder never saw it" in str(err.value)
    assert not (tmp_path / "t" / "render" / MANIFEST).exists()
    # Text prompts alone need no code.
    manifest = run_stage(make_cfg(tmp_path, "prompts.modes=[text]"), stage("render"))
    assert (
        json.loads((tmp_path / "t" / "render" / MANIFEST).read_text())["tables"]["prompts"]["rows"]
        == 50
    )
    assert manifest["metrics"]["modes"] == ["text"]


@pytest.mark.skipif(not SMOLLM_GGUF.exists(), reason=f"shared model not found at {SMOLLM_GGUF}")
def test_n_tokens_are_the_real_tokenizers_lengths_across_blocks(
    tmp_path: Path, ray_session, monkeypatch
) -> None:
    """With SmolLM2's tokenizer (counted word by word in the actors) every prompt's n_tokens is
    its length under the tokenizer's call, and the summary folded over many blocks matches."""
    monkeypatch.setattr(render, "BATCH_ROWS", 64)  # several blocks from 300 samples
    cfg = make_cfg(tmp_path, f"model.backbone={SMOLLM_GGUF}", "prompts.modes=[text,dotdec]")
    fake_upstream(cfg, n_samples=300)
    manifest = run_stage(cfg, stage("render"))
    prompts = read_prompts(tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    called = tokenizer(prompts["prompt"].to_pylist(), add_special_tokens=False)["input_ids"]
    assert prompts["n_tokens"].to_pylist() == [len(ids) for ids in called]
    modes = prompts["mode"].to_pylist()
    for mode in ("text", "dotdec"):
        lengths = np.array([len(c) for c, m in zip(called, modes, strict=True) if m == mode])
        stats = manifest["metrics"]["tokens_per_mode"][mode]
        assert stats == {
            "mean": round(float(lengths.mean()), 2),
            "p95": round(float(np.percentile(lengths, 95)), 2),
            "max": int(lengths.max()),
        }
