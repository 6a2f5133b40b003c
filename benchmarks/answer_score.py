"""Benchmark: which answer score does a short LoRA budget learn from? Chosen on valid_small.

The official BinLLM trains BCE on the raw logit of ``Yes``. A pretrained LM's raw ``Yes`` logit
after ``#Answer:`` sits far from 0 (about +14 for SmolLM2-135M), so the first steps of a short
budget go into pulling one offset down rather than into ranking. ``Yes`` minus ``No`` (the
log-odds of the two answers) starts near 0. This script trains step 1 of a config (text prompts,
the finetune stage's seeded train subsample) once per ``model.answer_score`` from the same fresh
LoRA in one plain process, and evaluates each on the stage's valid_small subsample before
training and every ``--eval-every`` steps. The test split is never read.

Results: ``benchmarks/results/answer-score-<config>.json`` and a table in BENCHMARKS.md.

    python benchmarks/answer_score.py [--config configs/quality_ml100k.yaml] [--steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED, save, table  # noqa: E402
from binllm_core.config import RunConfig, load_config  # noqa: E402

HEADS = ("yes_logit", "yes_minus_no")


def prompts_of(cfg: RunConfig) -> tuple[Any, Any]:
    """Text prompts of the finetune stage's train subsample (``TaskRows``) and its valid_small
    EvalSet."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from binllm_core.llm.tuning import EvalSet, TaskRows
    from binllm_core.storage import read_output
    from pipelines.stages.finetune import _subsample, train_sample_ids

    table_ = read_output(f"{cfg.output_root}/{cfg.run_name}/render", "prompts")
    table_ = table_.filter(pc.equal(table_["mode"], "text"))
    small = pc.and_(pc.equal(table_["split"], "valid"), table_["valid_small"])
    ids = _subsample(table_, small, cfg.finetune.max_valid_samples, cfg.finetune)
    valid = table_.filter(pc.is_in(table_["sample_id"], pa.array(ids, table_["sample_id"].type)))
    train_ids = pa.array(train_sample_ids(table_, cfg.finetune, None), pa.int64())
    train = table_.filter(pc.and_(pc.equal(table_["split"], "train"),
                                  pc.is_in(table_["sample_id"], train_ids)))
    return TaskRows(train["prompt"].to_pylist(), train["label"].to_pylist()), EvalSet(
        valid["prompt"].to_pylist(), valid["label"].to_pylist(), valid["uid"].to_pylist()
    )


def fit(cfg: RunConfig, head: str, train: Any, valid: Any, steps: int, every: int) -> dict:
    import torch

    from binllm_core.llm.recommender import LLMRecommender
    from binllm_core.llm.scoring import Scorer
    from binllm_core.llm.tuning import fit_plain

    ft = dataclasses.replace(cfg.finetune, eval_every=every, patience=10**6)
    step = dataclasses.replace(ft.step1, max_steps=steps)
    model = dataclasses.replace(cfg.model, answer_score=head)
    torch.manual_seed(ft.seed)  # the fresh adapter fit_plain starts from
    fresh = LLMRecommender.from_backbone(model, finetune=ft, trainable=True)
    start = torch.as_tensor(
        Scorer(fresh, ft.eval_batch_size, ft.max_length).score(valid.prompts)[0]
    ).float()
    start_loss = float(
        torch.nn.functional.binary_cross_entropy_with_logits(
            start, torch.as_tensor(valid.labels).float()
        )
    )
    result = fit_plain(LLMRecommender.from_backbone(model), train, step, ft, valid=valid).state
    return {
        "answer_score": head,
        "start_mean_score": float(start.mean()),
        "start_valid_bce": start_loss,
        "evals": [{"step": 0, **valid.metrics(start.tolist())}, *result.evals],
        "best_valid_auc": result.best,
        "best_step": result.best_step,
        "sequences": result.sequences,
        "train_s": round(result.train_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quality_ml100k.yaml")
    parser.add_argument("--output-root", default="runs/quality")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from pipelines.runtime.registry import run_pipeline

    torch.set_num_threads(args.threads)
    stem = Path(args.config).stem
    sets = [
        f"data.uri={SHARED / 'data' / 'ml-100k'}",
        f"model.backbone={SHARED / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
        f"output_root={Path(args.output_root).resolve()}",
        f"run_name={stem}-base",
    ]
    cfg = load_config(args.config, sets)
    run_pipeline(cfg, ["ingest", "samples", "encode", "render"])
    train, valid = prompts_of(cfg)
    runs = [fit(cfg, head, train, valid, args.steps, args.eval_every) for head in HEADS]
    chosen = max(runs, key=lambda r: r["best_valid_auc"])["answer_score"]
    s1 = cfg.finetune.step1
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    header = ["answer score", "start mean score", "start valid BCE",
              *[f"valid AUC @{s}" for s in steps], "train s"]
    body = [
        [r["answer_score"] + (" (chosen)" if r["answer_score"] == chosen else ""),
         f"{r['start_mean_score']:.2f}", f"{r['start_valid_bce']:.3f}",
         *[f"{e['auc']:.4f}" for e in r["evals"]], f"{r['train_s']:.0f}"]
        for r in runs
    ]
    markdown = "\n".join([
        f"## Answer score (`benchmarks/answer_score.py --config {args.config}`)",
        "",
        f"SmolLM2-135M-Instruct (GGUF, float32, CPU, plain peft loop): step 1 of the config on "
        f"text prompts, {args.steps} x {s1.batch_size} at lr {s1.lr}, the same fresh LoRA for "
        f"each score; AUC on the finetune stage's {len(valid.prompts)} valid_small prompts "
        "(step 0 = before training). The better best valid AUC is the one the quality config "
        "uses.",
        "",
        table(header, body),
    ])
    save(f"answer-score-{stem}", {"config": args.config, "overrides": sets, "runs": runs,
                                  "chosen": chosen}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
