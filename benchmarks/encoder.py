"""Benchmark: stage ``encode`` on MovieLens 100K — quality of the codes and the cost of Ray Train.

Runs ingest + samples once (``configs/ml100k.yaml``, the shared ML-100K files), then:

* the ``encode`` stage (1 Ray Train worker) with the MF backbone and with LightGCN: valid/test
  AUC and UAUC of the binary codes and of the float (continuous) model trained beside them;
* the same MF training as a plain single-process loop (:func:`binllm_core.encoder.training.fit`) on
  the same samples: the same numbers (same seed, same order) and the wall time, as a ratio.

Model selection uses the valid split only; test numbers are reported, never used.

    python benchmarks/encoder.py [--data ../shared/data/ml-100k] [--config configs/ml100k.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, SHARED, measured, save, table  # noqa: E402
from binllm_core.config import load_config  # noqa: E402
from binllm_core.encoder.data import split_samples
from binllm_core.encoder.model import BINARY, FLOAT
from binllm_core.encoder.training import fit
from pipelines.runtime.registry import run_pipeline
from pipelines.runtime.stage import Stage, StageContext, run_stage
from pipelines.stages import encode

ENCODE = Stage("encode", encode.run, ("encoder",), ("samples",))
REFERENCE = (
    "binary MF d=32 lr 1e-2 wd 1e-3 beta_step 0.05: test AUC 0.745 / UAUC 0.656; "
    "float MF lr 1e-3: test AUC 0.739"
)


def run_encode(cfg: Any) -> dict[str, Any]:
    with measured() as cost:
        manifest = run_stage(cfg, ENCODE, force=True)
    return {**manifest["metrics"], "stage_wall_s": round(cost["wall_s"], 2)}


def run_plain(cfg: Any) -> dict[str, Any]:
    ctx = StageContext.open(cfg, "encode")
    metrics = ctx.manifest_of("samples")["metrics"]
    with measured() as cost:
        samples = ctx.read_table("samples", "samples", columns=encode.SAMPLE_COLUMNS)
        training = fit(
            cfg.encoder, split_samples(samples), metrics["user_num"], metrics["item_num"]
        )
    return {
        "wall_s": round(cost["wall_s"], 2),
        "epochs_run": training.epoch + 1,
        "epoch_train_time_s": round(sum(h["seconds"] for h in training.history), 3),
        BINARY: training.best[BINARY],
        FLOAT: training.best[FLOAT],
    }


def quality_row(name: str, valid: dict, test: dict, best: int, epochs: int, secs: float) -> list:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return [
        name,
        f(valid["auc"]),
        f(valid["uauc"]),
        f(test["auc"]),
        f(test["uauc"]),
        f(test["warm_auc"]),
        f(test["cold_auc"]),
        best,
        epochs,
        f"{secs:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(SHARED / "data" / "ml-100k"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="binllm-bench-encoder-")
    cfg = load_config(args.config, [f"data.uri={args.data}", f"output_root={out}"])
    cfg.encoder.num_workers = 1
    run_pipeline(cfg, ["ingest", "samples"])

    mf = run_encode(cfg)
    gcn_cfg = dataclasses.replace(
        cfg, encoder=dataclasses.replace(cfg.encoder, backbone="lightgcn")
    )
    gcn = run_encode(gcn_cfg)
    plain = run_plain(cfg)

    rows = []
    for label, m in (("MF", mf), ("LightGCN", gcn)):
        c = m["continuous"]
        rows.append(
            quality_row(
                f"float {label} (stage)",
                c["valid"],
                c["test"],
                c["best_epoch"],
                m["epochs_run"],
                m["train_time_s"],
            )
        )
        k = m["codes"]
        rows.append(
            quality_row(
                f"binary {label} (stage)",
                k["valid"],
                k["test"],
                k["best_epoch"],
                m["epochs_run"],
                m["train_time_s"],
            )
        )
    b = plain[BINARY]
    rows.append(
        quality_row(
            "binary MF (plain loop)",
            b["valid"],
            b["test"],
            b["epoch"],
            plain["epochs_run"],
            plain["wall_s"],
        )
    )
    quality = table(
        [
            "model",
            "valid AUC",
            "valid UAUC",
            "test AUC",
            "test UAUC",
            "test warm AUC",
            "test cold AUC",
            "best epoch",
            "epochs",
            "train s",
        ],
        rows,
    )
    speed = table(
        ["run (MF, same data, same seed)", "wall s", "in-loop train s", "epochs"],
        [
            [
                "stage encode, Ray Train, 1 worker",
                mf["stage_wall_s"],
                mf["epoch_train_time_s"],
                mf["epochs_run"],
            ],
            [
                "plain single-process loop",
                plain["wall_s"],
                plain["epoch_train_time_s"],
                plain["epochs_run"],
            ],
            [
                "ratio stage / plain",
                round(mf["stage_wall_s"] / plain["wall_s"], 2),
                round(mf["epoch_train_time_s"] / max(plain["epoch_train_time_s"], 1e-9), 2),
                "",
            ],
        ],
    )
    enc = cfg.encoder
    markdown = f"""## Encoder (`benchmarks/encoder.py`)

MovieLens 100K, `configs/ml100k.yaml` (per-user temporal split 80/10/10, label = rating >= 4),
d = {enc.dim}; binary: lr {enc.lr:g}, wd {enc.weight_decay:g}, beta_step {enc.beta_step:g};
float: lr {enc.float_lr:g}, wd {enc.float_weight_decay:g}; batch {enc.batch_size}, patience
{enc.patience}. The float model of each row pair is trained beside the binary one in the same
pass; selection on valid AUC only. Cold = user or item without a train row.

{quality}

Reference ({REFERENCE}).

{speed}

"train s" is the stage's `TorchTrainer.fit` wall time (worker start-up, Ray Data ingest,
checkpoint reports included) or the plain loop's wall time; "in-loop train s" counts only
the optimisation steps of all epochs.
"""
    save(
        "encoder",
        {"config": dataclasses.asdict(enc), "mf": mf, "lightgcn": gcn, "plain_mf": plain},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
