"""Fine-tuning benchmark: whole prompts against prompts grouped by their shared user prefix.

With the shared SmolLM2-135M (GGUF) on MovieLens 100K and the quality config's step 2
(``configs/quality_ml100k.yaml``: binary prompts, batch 4, the ``max_train_samples`` subset drawn
as whole prefix groups), from a fresh LoRA:

1. builds (or reuses) the run's ingest -> samples -> encode -> render outputs;
2. trains ``--steps`` optimizer steps with :func:`binllm_core.llm.tuning.fit_plain` twice, each in a
   process of its own, on the same train samples, the same number of sequences and the same
   200 valid_small prompts, evaluated every ``--eval-every`` steps:
   * whole prompts: random micro-batches, each prompt run whole (the plain peft loop);
   * shared prefix: micro-batches of whole prefix groups, each prefix run once forward and
     backward (``finetune.batch_by_prefix``), evaluation with one prefix pass per group;
3. trains the same steps through stage ``finetune`` (Ray Train, 1 worker, shared prefix);

and writes sequences/s and tokens/s (whole-prompt tokens, training time only: no start-up, no
evaluation), peak RSS, and both valid-AUC curves to ``benchmarks/results/finetune.json`` and the
``finetune`` section of BENCHMARKS.md. A re-run reuses the finished stages of the run.

    python benchmarks/finetune.py [--steps 80] [--eval-every 20] [--cpus 2]
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
CONFIG = ROOT / "configs" / "quality_ml100k.yaml"
ARMS = {"whole": False, "shared": True}
"""Plain-loop arms: name -> ``finetune.batch_by_prefix``."""


def config(args: argparse.Namespace, batch_by_prefix: bool = True) -> Any:
    from binllm_core.config import load_config
    from binllm_core.modes import TEXT_AND_CODE_MODES as MODES

    return load_config(
        CONFIG,
        [
            f"output_root={args.output}",
            "run_name=ml100k",
            f"data.uri={ML100K}",
            f"model.backbone={GGUF}",
            f"prompts.modes=[{','.join(MODES)}]",
            "finetune.strategy=one_step",
            "finetune.code_mode=binary",
            f"finetune.step2.max_steps={args.steps}",
            f"finetune.step2.lr={args.lr!r}",
            f"finetune.eval_every={args.eval_every}",
            f"finetune.batch_by_prefix={str(batch_by_prefix).lower()}",
            "finetune.num_workers=1",
            f"finetune.cpus_per_worker={args.cpus}",
        ],
    )


def samples(cfg: Any) -> tuple[Any, Any]:
    """The binary train prompts (``TaskRows``) the stage tunes on (its group-drawn subset) and
    its valid prompts (the seeded ``max_valid_samples`` of valid_small)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from binllm_core.llm.tuning import EvalSet, TaskRows
    from binllm_core.prompts.templates import templates_from_config
    from binllm_core.storage import read_output
    from pipelines.stages.finetune import _subsample, prefix_groups, train_sample_ids

    prompts = read_output(f"{cfg.output_root}/{cfg.run_name}/render", "prompts")
    prompts = prompts.filter(pc.equal(prompts["mode"], "binary"))
    train = prompts.filter(pc.equal(prompts["split"], "train"))
    cut = templates_from_config(cfg.prompts).prefix_cut()
    ids = train_sample_ids(prompts, cfg.finetune, prefix_groups(train, cut))
    rows = train.filter(pc.is_in(train["sample_id"], pa.array(ids, pa.int64())))
    small = pc.and_(pc.equal(prompts["split"], "valid"), prompts["valid_small"])
    valid_ids = _subsample(prompts, small, cfg.finetune.max_valid_samples, cfg.finetune)
    valid = prompts.filter(pc.is_in(prompts["sample_id"], pa.array(valid_ids, pa.int64())))
    valid = valid.sort_by("sample_id")
    return TaskRows(rows["prompt"].to_pylist(), rows["label"].to_pylist()), EvalSet(
        valid["prompt"].to_pylist(), valid["label"].to_pylist(), valid["uid"].to_pylist()
    )


def arm(args: argparse.Namespace) -> None:
    """One plain-loop arm, in its own process: prints a JSON line with its numbers."""
    import torch

    from binllm_core.llm.recommender import LLMRecommender
    from binllm_core.llm.tuning import fit_plain
    from binllm_core.prompts.templates import templates_from_config

    torch.set_num_threads(args.cpus)
    cfg = config(args, ARMS[args.arm])
    train, valid = samples(cfg)
    recommender = LLMRecommender.from_backbone(cfg.model)
    cut = templates_from_config(cfg.prompts).prefix_cut()
    grouped = ARMS[args.arm]  # the whole-prompt arm is the plain loop: no prefix cut at all
    run = fit_plain(recommender, train, cfg.finetune.step2, cfg.finetune, valid,
                    prefix_cut=cut if grouped else None)
    state = run.state
    run.close()
    print(json.dumps({
        "steps": state.step,
        "sequences": state.sequences,
        "tokens": state.tokens,
        "train_seconds": state.train_seconds,
        "sequences_per_s": state.sequences / state.train_seconds,
        "tokens_per_s": state.tokens / state.train_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evals": state.evals,
        "n_train": len(train),
        "n_valid": len(valid.prompts),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="step-2 learning rate (benchmarks/quality.py chose 1e-3 on "
                             "valid_small)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        arm(args)
        return
    if not GGUF.exists() or not (ML100K / "ml-100k.inter").exists():
        sys.exit(f"needs {GGUF} and {ML100K}")

    from pipelines.runtime.registry import run_pipeline

    cfg = config(args)
    run_pipeline(cfg, ["ingest", "samples", "encode", "render"], log=print)
    import ray

    ray.shutdown()  # the plain arms run alone; the stage starts Ray again
    arms: dict[str, Any] = {}
    for name in ARMS:
        cmd = [sys.executable, __file__, f"--arm={name}", f"--steps={args.steps}",
               f"--eval-every={args.eval_every}", f"--lr={args.lr!r}", f"--cpus={args.cpus}",
               f"--output={args.output}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        arms[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, {k: v for k, v in arms[name].items() if k != "evals"}, flush=True)
    with measured() as stage_cost:
        manifests = run_pipeline(cfg, ["finetune"], force=True)
    stage = manifests["finetune"]["metrics"]["steps"]["step1"]
    whole, shared = arms["whole"], arms["shared"]
    result = {
        "model": GGUF.name,
        "steps": args.steps,
        "batch_size": cfg.finetune.step2.batch_size,
        "lr": args.lr,
        "cpus": args.cpus,
        "plain_whole": whole,
        "plain_shared": shared,
        "stage_shared": {**stage, "wall_s": stage_cost["wall_s"],
                         "tree_peak_gib": stage_cost["peak_rss_gib"]},
        "ratio_shared_vs_whole_sequences_per_s": shared["sequences_per_s"]
        / whole["sequences_per_s"],
        "ratio_stage_vs_whole_sequences_per_s": stage["sequences_per_s"]
        / whole["sequences_per_s"],
    }
    save("finetune", result, markdown(result, args))


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    whole, shared, stage = result["plain_whole"], result["plain_shared"], result["stage_shared"]
    base = whole["sequences_per_s"]

    def row(name: str, r: dict[str, Any], rss_mb: float) -> list[str]:
        return [name, f"{r['sequences_per_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                f"{r['sequences_per_s'] / base:.2f}", f"{rss_mb / 1024:.2f}"]

    speed = [
        row("plain peft loop, whole prompts", whole, whole["peak_rss_mb"]),
        row("plain loop, shared prefix", shared, shared["peak_rss_mb"]),
        row("stage finetune (Ray Train, 1 worker), shared prefix", stage,
            stage["peak_rss_mb_rank0"]),
    ]
    curve = [[e["step"], e["step"] * result["batch_size"], f"{e['auc']:.4f}",
              f"{s['auc']:.4f}", f"{e['uauc']:.4f}", f"{s['uauc']:.4f}"]
             for e, s in zip(whole["evals"], shared["evals"], strict=False)]
    return "\n\n".join([
        "## Fine-tuning (`benchmarks/finetune.py`)",
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32), "
        f"{args.cpus} CPU threads, the quality config's step 2 on binary prompts from a fresh "
        f"LoRA: {result['steps']} optimizer steps of {result['batch_size']} sequences at lr "
        f"{result['lr']:g}, the same {whole['n_train']} train samples (drawn as whole prefix "
        f"groups) and {whole['n_valid']} valid_small prompts on every side. Rates count the "
        "tokens of the whole prompts over training time only (no start-up, no evaluation); "
        "memory is the peak RSS of the training process (the plain process; the Ray worker).",
        table(["run", "sequences/s", "tokens/s", "× whole", "peak RSS GiB"], speed),
        "Valid AUC / UAUC at an equal number of sequences: random micro-batches of whole "
        "prompts against micro-batches of whole prefix groups (same user and history).",
        table(["step", "sequences", "AUC whole", "AUC grouped", "UAUC whole", "UAUC grouped"],
              curve),
    ])


if __name__ == "__main__":
    main()
