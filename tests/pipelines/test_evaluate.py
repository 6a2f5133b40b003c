"""Stage evaluate on fake finished score and encode stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core import metrics
from binllm_core.config import load_config
from binllm_core.storage import read_output
from pipelines.registry import STAGES
from pipelines.stage import run_stage
from tests.jobs.fake_run import publish_stage


def fake(run: Path, stage: str, metrics_: dict, tables: dict[str, pa.Table]) -> None:
    publish_stage(run, stage, tables, metrics_)


def test_evaluate_writes_metrics_report_and_roc(tmp_path: Path):
    cfg = load_config("configs/tiny.yaml", [f"output_root={tmp_path}", "run_name=e"])
    rng = np.random.default_rng(0)
    n = 120
    label = rng.integers(0, 2, n)
    scores = pa.table(
        {
            "sample_id": pa.array(np.tile(np.arange(n // 2), 2), pa.int64()),
            "split": ["test"] * n,
            "mode": ["text"] * (n // 2) + ["binary"] * (n // 2),
            "uid": pa.array(rng.integers(1, 10, n), pa.int32()),
            "label": pa.array(label, pa.int8()),
            "warm": rng.random(n) < 0.5,
            "not_cold": rng.random(n) < 0.7,
            "logit_yes": label + rng.normal(size=n),
            "adapter": ["a"] * n,
        }
    )
    run = tmp_path / "e"
    fake(run, "score", {"max_rows": 60}, {"scores": scores})
    fake(run, "encode", {"codes": {"test": {"auc": 0.66, "uauc": 0.6, "warm_auc": 0.7}}}, {})
    stage = next(s for s in STAGES if s.name == "evaluate")
    manifest = run_stage(cfg, stage)
    out = run / "evaluate"
    table = pl.from_arrow(read_output(str(out), "metrics"))
    assert table["scorer"].to_list() == ["llm", "llm", "codes"]
    text = scores.slice(0, n // 2)
    assert table["auc"][0] == metrics.auc(text["label"].to_numpy(), text["logit_yes"].to_numpy())
    assert table["auc"][2] == 0.66 and table["cold_auc"][2] is None
    folder = (run / manifest["metrics"]["report"]).parent  # recorded relative to the run
    assert folder.parent.parent == out and folder.parent.name == manifest["version"]
    report = (folder / "report.md").read_text()
    assert "| codes | codes |" in report and "score.max_rows" in report
    assert (folder / "roc_test.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((folder / "metrics.json").read_text())
    assert "warm" in data["definitions"] and len(data["rows"]) == 3
    assert manifest["metrics"]["rows"][0]["mode"] == "text"
