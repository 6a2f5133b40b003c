"""GPU stages: every stage of ``configs/ml100k_gpu.yaml`` on this machine's GPUs, timed.

Runs the config's stages one at a time through :func:`pipelines.runtime.registry.run_pipeline` (what
``binllm run`` calls), each with ``force`` (so nothing is skipped and no checkpoint is resumed),
on a local Ray started beforehand (its start is timed apart), with the data and model given here
(``--data``, ``--model``: the shared MovieLens 100K and SmolLM2-135M GGUF by default). Before
the stages, the model is loaded once on the GPU, which converts the GGUF to a model folder in
the weights' dtype (once per node, ``model.cache_dir``): the stages' workers and actors then load
that folder, as on any node that ran binllm before; the conversion is timed apart.

Per stage: its wall time from its manifest (``wall_time_s``) and that of the whole call (lock,
checks, Ray start-up of the stage), the rows of each table it wrote, and, sampled every 0.5 s
with ``nvidia-smi`` when there is one, the peak GPU memory in use (all GPUs, every process: the
driver's CUDA context included) and the mean GPU utilisation; the finetune steps' and the score
modes' own rates. Only the resource fields are fitted to the machine (workers and actors: at most
one per GPU; CPUs per worker and actor: at most half the machine's), which never change a stage's
result. ``--quick`` also cuts the budgets (:data:`QUICK`) so that a run fits about 8 minutes on
one H100.

Results: ``benchmarks/results/gpu_stages.json`` and the ``gpu_stages`` section of BENCHMARKS.md.
Without CUDA it refuses in one line (exit 2) and runs nothing.

    python benchmarks/gpu_stages.py [--quick] [--data ../shared/data/ml-100k]
        [--model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--output runs/bench-gpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``python benchmarks/...``

from benchmarks.common import ROOT, SHARED, save, table  # noqa: E402

NAME = "gpu_stages"
CONFIG = ROOT / "configs" / "ml100k_gpu.yaml"
DATA = SHARED / "data" / "ml-100k"
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUICK = [
    "encoder.max_epochs=30",
    "finetune.step1.max_steps=150",
    "finetune.step1.warmup_steps=20",
    "finetune.step2.max_steps=150",
    "finetune.step2.warmup_steps=20",
    "finetune.max_valid_samples=1000",
    "score.max_rows=3000",
    "rerank.max_users=200",
]
"""The budgets ``--quick`` cuts: 150 optimizer steps per LoRA step (evaluated every 50 on 1000
valid_small prompts), 30 encoder epochs, 3000 test samples scored per mode, 200 users
re-ranked (every test user retrieved)."""


def refuse(message: str) -> int:
    print(f"gpu_stages: {message}", file=sys.stderr)
    return 2


class GpuSampler:
    """Peak memory in use (GiB, summed over the GPUs) and mean utilisation (%) while in the
    block, from ``nvidia-smi`` every ``interval_s``; both None without ``nvidia-smi``."""

    QUERY = ["--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, interval_s: float = 0.5) -> None:
        self.smi = shutil.which("nvidia-smi")
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.utils: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        try:
            out = subprocess.run(
                [self.smi, *self.QUERY], capture_output=True, text=True, timeout=10
            ).stdout
            gpus = [[float(x) for x in line.split(",")] for line in out.strip().splitlines()]
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        if gpus:
            self.peak_mib = max(self.peak_mib, sum(g[0] for g in gpus))
            self.utils.append(sum(g[1] for g in gpus) / len(gpus))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuSampler:
        if self.smi:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.smi:
            self._stop.set()
            self._thread.join()
            self._sample()

    def result(self) -> dict[str, float | None]:
        if not self.utils:
            return {"gpu_peak_mem_gib": None, "gpu_util_mean_pct": None}
        return {
            "gpu_peak_mem_gib": round(self.peak_mib / 1024, 2),
            "gpu_util_mean_pct": round(sum(self.utils) / len(self.utils), 1),
        }


def overrides(args: argparse.Namespace, gpus: int) -> list[str]:
    """The ``--set`` pairs of this run: paths, output, the budgets of ``--quick`` and the
    resource fields fitted to this machine (at most one worker or actor per GPU)."""
    from binllm_core.config import load_config

    sets = [
        f"output_root={args.output}",
        f"run_name=ml100k_gpu{'_quick' if args.quick else ''}",
        f"data.uri={args.data}",
        f"model.backbone={args.model}",
        *(QUICK if args.quick else []),
    ]
    cfg = load_config(CONFIG, sets)
    cpus = max(1, (os.cpu_count() or 2) // 2)  # the rest for Ray Data's tasks beside them
    return [
        *sets,
        f"finetune.num_workers={max(1, min(cfg.finetune.num_workers, gpus))}",
        f"finetune.cpus_per_worker={min(cfg.finetune.cpus_per_worker, cpus)}",
        f"score.num_actors={max(1, min(cfg.score.num_actors, gpus))}",
        f"score.cpus_per_actor={min(cfg.score.cpus_per_actor, cpus)}",
    ]


def detail(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The stage's own rates worth keeping next to its time."""
    if name == "finetune":
        keep = ("steps", "sequences", "sequences_per_s", "tokens_per_s", "best_valid_auc")
        return {step: {k: s.get(k) for k in keep} for step, s in metrics.get("steps", {}).items()}
    if name == "score":
        return {
            mode: {k: m[k] for k in ("rows", "prompts_per_s")}
            for mode, m in metrics.get("modes", {}).items()
        }
    return {}


def run_stages(cfg: Any) -> tuple[list[dict[str, Any]], float]:
    """Every stage the config needs, one ``run_pipeline`` call each (forced), timed; and the
    seconds Ray took to start."""
    from pipelines.runtime.ray_helpers import ensure_ray
    from pipelines.runtime.registry import run_pipeline, select

    started = time.perf_counter()
    ensure_ray()
    ray_start_s = time.perf_counter() - started
    rows = []
    for stage in select(None, cfg):
        with GpuSampler() as gpu:
            started = time.perf_counter()
            manifest = run_pipeline(cfg, [stage.name], force=True)[stage.name]
            call_s = time.perf_counter() - started
        tables = manifest.get("tables", {})
        rows.append(
            {
                "stage": stage.name,
                "wall_time_s": manifest["wall_time_s"],
                "call_s": round(call_s, 2),
                "rows": {t: v["rows"] for t, v in tables.items() if v.get("schema")},
                **gpu.result(),
                "detail": detail(stage.name, manifest.get("metrics", {})),
            }
        )
        print(f"[gpu_stages] {rows[-1]}", flush=True)
    return rows, ray_start_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cut the budgets (~8 min, 1 H100)")
    parser.add_argument("--data", default=str(DATA), help="MovieLens 100K (../shared/data/...)")
    parser.add_argument("--model", default=str(MODEL), help="backbone (../shared/models/...)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench-gpu"))
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        return refuse("needs a CUDA GPU (torch.cuda.is_available() is False); run it on one")
    for what, path in (("--data", args.data), ("--model", args.model)):
        if "://" not in path and not Path(path).exists():
            return refuse(f"{what} {path} is not there")

    from binllm_core.config import load_config
    from binllm_core.llm.loading import load_language_model

    gpus = torch.cuda.device_count()
    sets = overrides(args, gpus)
    cfg = load_config(CONFIG, sets)
    started = time.perf_counter()
    load_language_model(cfg.model, "cuda")  # converts the GGUF once per node and dtype
    torch.cuda.empty_cache()
    prepare_s = time.perf_counter() - started

    stages, ray_start_s = run_stages(cfg)
    result = {
        "config": str(CONFIG.relative_to(ROOT)),
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "overrides": sets,
        "model_prepare_s": round(prepare_s, 2),
        "ray_start_s": round(ray_start_s, 2),
        "total_wall_time_s": round(sum(s["wall_time_s"] for s in stages), 2),
        "stages": stages,
    }
    save(NAME, result, markdown(result, cfg))
    return 0


def markdown(result: dict[str, Any], cfg: Any) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    def rates(stage: dict[str, Any]) -> str:
        if stage["stage"] == "finetune":
            return "; ".join(
                f"{k}: {v['steps']} steps, {v['sequences_per_s']:.1f} seq/s"
                for k, v in stage["detail"].items()
            )
        if stage["stage"] == "score":
            return "; ".join(
                f"{k}: {v['prompts_per_s']:.0f} prompts/s" for k, v in stage["detail"].items()
            )
        return ""

    rows = [
        [
            s["stage"],
            f"{s['wall_time_s']:.1f}",
            f"{s['call_s']:.1f}",
            ", ".join(f"{t} {n:,}" for t, n in s["rows"].items()),
            num(s["gpu_peak_mem_gib"], ".2f"),
            num(s["gpu_util_mean_pct"], ".0f"),
            rates(s),
        ]
        for s in result["stages"]
    ]
    rows.append(["all stages", f"{result['total_wall_time_s']:.1f}", "", "", "", "", ""])
    ft, sc = cfg.finetune, cfg.score

    def kind(use_gpu: bool) -> str:
        return "GPU" if use_gpu else "CPU"

    budget = (
        "`--quick` budgets (" + ", ".join(f"`{q}`" for q in QUICK) + ")"
        if result["quick"]
        else "the config's own budgets"
    )
    return "\n\n".join(
        [
            "## GPU stages (`benchmarks/gpu_stages.py`)",
            f"`{result['config']}` on {result['gpus']} × {result['device']} (torch "
            f"{result['torch']}, CUDA {result['cuda']}), MovieLens 100K and SmolLM2-135M-Instruct "
            f"(GGUF Q4_1; `model.dtype: {cfg.model.dtype}`, bfloat16 on GPU), with {budget}; "
            f"finetune on {ft.num_workers} {kind(ft.use_gpu)} worker(s) of {ft.cpus_per_worker} "
            f"CPUs, encoder on {kind(cfg.encoder.use_gpu)}, score and rerank on {sc.num_actors} "
            f"actor(s) of {sc.num_gpus:g} GPU and {sc.cpus_per_actor:g} CPUs. Each stage forced, "
            "one `run_pipeline` call each on a local Ray started beforehand "
            f"({result['ray_start_s']:.1f} s, not counted); the GGUF converted to a bf16 folder "
            f"beforehand ({result['model_prepare_s']:.1f} s, not counted). **Wall**: the stage's "
            "manifest `wall_time_s`; **call**: the whole call (lock, checks, stage). GPU memory: "
            "the peak in use on all GPUs by every process (`nvidia-smi`, every 0.5 s).",
            table(
                [
                    "stage",
                    "wall s",
                    "call s",
                    "rows",
                    "peak GPU mem GiB",
                    "mean GPU util %",
                    "rates",
                ],
                rows,
            ),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
