"""Fine-tuning benchmark: prompt lengths per mode, and the Ray Train stage against a plain loop.

With the shared SmolLM2-135M (GGUF) on MovieLens 100K:

1. runs ingest -> samples -> encode -> render (configs/ml100k.yaml) and reads the tokens per
   prompt of the text, binary and dotdec modes from the render manifest;
2. trains step 1 (text prompts) through stage ``finetune`` on 1 Ray Train worker;
3. trains the same prompts, batch size, steps and threads with :func:`fit_plain` (peft, no Ray)
   in a fresh process;

and writes sequences/s, tokens/s (real tokens, training time only) and peak memory side by side
to ``benchmarks/results/finetune.json`` and the ``finetune`` section of BENCHMARKS.md.

    python benchmarks/finetune.py [--steps 12] [--batch-size 8] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import SHARED, measured, save, table  # noqa: E402

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ML100K = SHARED / "data" / "ml-100k"


def config(args: argparse.Namespace) -> Any:
    from binllm_core.config import load_config

    step = (
        f"{{lr: 1.0e-3, warmup_steps: 2, batch_size: {args.batch_size}, max_steps: {args.steps}}}"
    )
    return load_config(
        ROOT / "configs" / "ml100k.yaml",
        [
            f"output_root={args.output}",
            "run_name=bench_finetune",
            f"data.uri={ML100K}",
            f"model.backbone={GGUF}",
            "finetune.strategy=text_only",
            f"finetune.step1={step}",
            f"finetune.eval_every={args.steps}",
            "finetune.max_valid_samples=16",
            f"finetune.max_train_samples={args.steps * args.batch_size}",
            "finetune.num_workers=1",
            f"finetune.cpus_per_worker={args.cpus}",
        ],
    )


def train_prompts(cfg: Any) -> tuple[list[str], list[int]]:
    """The text prompts of the samples the stage trains on (same seeded subsample)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from binllm_core.storage import read_output
    from pipelines.finetune import _subsample

    prompts = read_output(f"{cfg.output_root}/{cfg.run_name}/render", "prompts")
    train = pc.equal(prompts["split"], "train")
    ids = _subsample(prompts, train, cfg.finetune.max_train_samples, cfg.finetune)
    keep = pc.is_in(prompts["sample_id"], pa.array(ids, prompts["sample_id"].type))
    rows = prompts.filter(pc.and_(pc.equal(prompts["mode"], "text"), keep))
    return rows["prompt"].to_pylist(), rows["label"].to_pylist()


def plain(args: argparse.Namespace) -> None:
    """The plain peft loop, in its own process: prints a JSON line with its numbers."""
    import torch

    from binllm_core.recommender import LLMRecommender
    from binllm_core.tuning import fit_plain

    torch.set_num_threads(args.cpus)
    cfg = config(args)
    prompts, labels = train_prompts(cfg)
    recommender = LLMRecommender.load(cfg.model)
    result = fit_plain(recommender, (prompts, labels), cfg.finetune.step1, cfg.finetune).state
    print(
        json.dumps(
            {
                "steps": result.step,
                "sequences": result.sequences,
                "tokens": result.tokens,
                "train_seconds": result.train_seconds,
                "sequences_per_s": result.sequences / result.train_seconds,
                "tokens_per_s": result.tokens / result.train_seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--output", default="/tmp/binllm-bench-finetune")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain(args)
        return
    if not GGUF.exists() or not (ML100K / "ml-100k.inter").exists():
        sys.exit(f"needs {GGUF} and {ML100K}")

    from pipelines.registry import run_pipeline

    cfg = config(args)
    manifests = run_pipeline(cfg, ["ingest", "samples", "encode", "render"])
    tokens = manifests["render"]["metrics"]["tokens_per_mode"]
    with measured() as stage_cost:
        stage = run_pipeline(cfg, ["finetune"], force=True)["finetune"]["metrics"]["steps"]["step1"]
    cmd = [
        sys.executable,
        __file__,
        "--plain",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--cpus={args.cpus}",
        f"--output={args.output}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    base = json.loads(out.stdout.strip().splitlines()[-1])

    result = {
        "model": GGUF.name,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "cpus": args.cpus,
        "tokens_per_prompt": tokens,
        "stage": {
            **stage,
            "wall_s": stage_cost["wall_s"],
            "tree_peak_gib": stage_cost["peak_rss_gib"],
        },
        "plain": base,
        "ratio_sequences_per_s": stage["sequences_per_s"] / base["sequences_per_s"],
        "ratio_peak_rss": stage["peak_rss_mb_rank0"] / base["peak_rss_mb"],
    }
    rows = [[m, tokens[m]["mean"], tokens[m]["p95"], tokens[m]["max"]] for m in tokens]
    speed = [
        [
            "stage finetune (Ray Train, 1 worker)",
            f"{stage['sequences_per_s']:.3f}",
            f"{stage['tokens_per_s']:.1f}",
            f"{stage['peak_rss_mb_rank0'] / 1024:.2f}",
        ],
        [
            "plain peft loop",
            f"{base['sequences_per_s']:.3f}",
            f"{base['tokens_per_s']:.1f}",
            f"{base['peak_rss_mb'] / 1024:.2f}",
        ],
        [
            "stage / plain",
            f"{result['ratio_sequences_per_s']:.2f}",
            "",
            f"{result['ratio_peak_rss']:.2f}",
        ],
    ]
    markdown = "\n\n".join(
        [
            "## Fine-tuning (`benchmarks/finetune.py`)",
            "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32) on MovieLens 100K prompts. "
            "Tokens per prompt with its tokenizer (render manifest, all samples):",
            table(["mode", "mean", "p95", "max"], rows),
            f"LoRA step 1 (text prompts), {args.steps} optimizer steps of {args.batch_size} "
            f"sequences, {args.cpus} CPU threads, the same train prompts on both sides. Rates "
            "count real tokens over training time only (no start-up, no evaluation); memory is "
            "the peak RSS of the training process (the Ray worker; the plain process). Stage wall "
            "time "
            f"including Ray Train start-up and one small evaluation: {stage_cost['wall_s']:.0f} s.",
            table(["run", "sequences/s", "tokens/s", "peak RSS GiB"], speed),
        ]
    )
    print(json.dumps(result, indent=2, default=str))
    save("finetune", result, markdown)


if __name__ == "__main__":
    main()
