"""Stage render on fake finished upstream stages (ingest, samples, encode written in the test)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from binllm_core.codes import embeddings_table
from binllm_core.config import RunConfig, load_config
from binllm_core.llm.loading import load_tokenizer
from binllm_core.storage import MANIFEST, read_output
from pipelines.runtime.registry import STAGES
from pipelines.runtime.stage import Stage, StageContext, run_stage
from pipelines.stages import render
from tests.conftest import SMOLLM_GGUF

pytestmark = pytest.mark.slow  # the token-counting actor pool

N_ITEMS, N_USERS, TRAIN_ITEMS = 60, 20, 40
SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("timestamp", pa.int64()),
        ("split", pa.string()),
        ("valid_small", pa.bool_()),
        ("history", pa.list_(pa.int32())),
        ("not_cold", pa.bool_()),
        ("warm", pa.bool_()),
    ]
)


def make_cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    sets = [f"output_root={tmp_path}", "run_name=t", *overrides]
    return load_config("configs/tiny.yaml", sets)


def item_code(iid: int) -> str:
    return format((iid * 37 + 11) % 256, "08b")


def user_code(uid: int) -> str:
    return format((uid * 53 + 7) % 256, "08b")


def fake_upstream(cfg: RunConfig, n_samples: int = 600, drop_user_code: int = 0) -> None:
    """Finished ingest/samples/encode outputs of a task whose label is the first bit of the
    target item's code; valid items never occur in train, so only the code tells the label.
    Sample 0 is pinned: uid 1, iid 2, history [3, 1]."""
    rng = random.Random(0)
    rows = []
    for sample_id in range(n_samples):
        iid, uid = rng.randint(1, N_ITEMS), rng.randint(1, N_USERS)
        history = [rng.randint(1, N_ITEMS) for _ in range(rng.randint(0, 3))]
        if sample_id == 0:
            iid, uid, history = 2, 1, [3, 1]
        train = iid <= TRAIN_ITEMS
        rows.append(
            dict(
                sample_id=sample_id,
                uid=uid,
                iid=iid,
                label=int(item_code(iid)[0]),
                timestamp=sample_id,
                split="train" if train else "valid",
                valid_small=not train,
                history=history,
                not_cold=True,
                warm=train,
            )
        )
    samples = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    iids = pa.array(range(1, N_ITEMS + 1), pa.int32())
    items = pa.table(
        {
            "item": [f"m{i}" for i in range(1, N_ITEMS + 1)],
            "title": [f"Title {i}" for i in range(1, N_ITEMS + 1)],
        }
    )
    item_map = pa.table({"item": items["item"], "iid": iids})
    uids = pa.array(range(1, N_USERS + 1), pa.int32())
    user_map = pa.table({"user": [f"u{u}" for u in uids.to_pylist()], "uid": uids})
    users = [u for u in range(1, N_USERS + 1) if u != drop_user_code]
    codes = pa.table(
        {
            "entity": ["user"] * len(users) + ["item"] * N_ITEMS,
            "id": pa.array(users + list(range(1, N_ITEMS + 1)), pa.int32()),
            "bits": pa.array(
                [[int(b) for b in user_code(u)] for u in users]
                + [[int(b) for b in item_code(i)] for i in iids.to_pylist()],
                pa.list_(pa.uint8(), len(user_code(1))),
            ),
        }
    )

    def writer(tables: dict[str, pa.Table]):
        def fn(ctx: StageContext) -> dict:
            for name, table in tables.items():
                ctx.write_table(table, name)
            return {}

        return fn

    run_stage(cfg, Stage("ingest", writer({"items": items}), ("data",)))
    tables = {"samples": samples, "user_map": user_map, "item_map": item_map}
    run_stage(cfg, Stage("samples", writer(tables), ("protocol",)))
    run_stage(
        cfg,
        Stage("encode", writer({"codes": codes, "embeddings": embeddings(codes)}), ("encoder",)),
        force=True,
    )


def embeddings(codes: pa.Table) -> pa.Table:
    """The ``embeddings`` of the fake codes: ``relaxed`` = 0.9 x the signs (what the codes are
    the signs of), ``float`` = the signs plus a small seeded noise."""
    users = np.zeros((N_USERS + 1, len(user_code(1))), np.float32)
    items = np.zeros((N_ITEMS + 1, len(item_code(1))), np.float32)
    columns = (codes[c].to_pylist() for c in ("entity", "id", "bits"))
    for entity, i, bits in zip(*columns, strict=True):
        (users if entity == "user" else items)[i] = 2.0 * np.asarray(bits, np.float32) - 1.0
    rng = np.random.default_rng(0)
    noisy = tuple(v + 0.1 * rng.standard_normal(v.shape, np.float32) for v in (users, items))
    vectors = {"relaxed": (0.9 * users, 0.9 * items), "float": noisy}
    return embeddings_table(vectors)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def read_prompts(tmp_path: Path) -> pa.Table:
    return read_output(str(tmp_path / "t" / "render"), "prompts")


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
