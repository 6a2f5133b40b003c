"""Scoring throughput: the ``score`` actor pool against a plain Hugging Face loop.

Same model (SmolLM2-135M-Instruct, GGUF, float32 on CPU), same adapter (a freshly initialised
LoRA on q/v unless ``--adapter`` names a trained one), same prompts, same batch size:

* stage: :func:`pipelines.score.score_dataset` on a local Ray, 1 actor and then 2 actors
  (merged LoRA, ``torch.inference_mode``, batches ordered by token length);
* plain: one process, ``PeftModel`` unmerged, ``torch.no_grad``, prompts in their given order,
  left padding to the longest prompt of each batch.

Prompts/s counts prompts over the wall time of the scoring call, model loading included on
both sides (the stage loads a model per actor); the GGUF file is first saved once as a plain
Hugging Face folder so that loading takes well under a second. Prompts are real ML-100K-style
prompts with random histories, so their lengths vary as in the pipeline.

    python -m benchmarks.score [--prompts 200] [--batch-size 16] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``python benchmarks/score.py``

from benchmarks.common import SHARED, measured, save, table  # noqa: E402
from binllm_core.config import PromptConfig, RunConfig, load_config  # noqa: E402
from binllm_core.prompts import fill, templates_from_config  # noqa: E402

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_folder(gguf: Path, folder: Path) -> Path:
    """The GGUF model saved once as a plain Hugging Face folder, which loads in a fraction of a
    second instead of ~20 s of dequantising, so the timings compare scoring, not loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Code prompts with 0-10 history titles (lengths vary like the pipeline's)."""
    rng = np.random.default_rng(seed)
    templates = templates_from_config(PromptConfig())
    titles = [f"Movie {i} ({1950 + i % 50})" for i in range(500)]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 11))
        history = ", ".join(f'"{titles[j]}"' for j in rng.choice(500, size=k, replace=False))
        code = lambda: "".join(rng.choice(["0", "1"], size=32))  # noqa: E731
        out.append(
            fill(
                templates.code,
                {
                    "<ItemTitleList>": history or templates.empty_history,
                    "<UserID>": code(),
                    "<TargetItemTitle>": f'"{titles[int(rng.integers(500))]}"',
                    "<TargetItemID>": code(),
                },
            )
        )
    return out


def fresh_adapter(cfg: RunConfig, folder: Path) -> str:
    from binllm_core.recommender import LLMRecommender

    LLMRecommender.load(cfg.model, finetune=cfg.finetune, trainable=True).save(folder)
    return str(folder)


def plain_loop(cfg: RunConfig, adapter: str, prompts: list[str], batch_size: int) -> np.ndarray:
    """What one would write without the stage: PeftModel, no_grad, given order."""
    import torch
    from peft import PeftModel

    from binllm_core.llm import load_language_model

    torch.set_num_threads(int(cfg.score.cpus_per_actor))
    lm = load_language_model(cfg.model)
    model = PeftModel.from_pretrained(lm.model, adapter).eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = lm.tokenizer(
                prompts[start : start + batch_size],
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=1024,
                return_tensors="pt",
            )
            out = model(**batch)  # full logits, as a plain loop does
            scores.append(lm.answer(out.logits[:, -1]))
    return torch.cat(scores).numpy()


def stage(cfg: RunConfig, adapter: str, prompts: list[str], actors: int) -> np.ndarray:
    import ray

    from pipelines.score import score_dataset

    ds = ray.data.from_arrow(pa.table({"i": np.arange(len(prompts)), "prompt": prompts}))
    ds = ds.repartition(max(4, actors * 4))
    out = score_dataset(ds, cfg, adapter, dt.datetime.now(dt.UTC), num_actors=actors)
    table_ = pa.concat_tables(ray.get(out.materialize().to_arrow_refs())).sort_by("i")
    return table_["logit_yes"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adapter", default="")
    args = parser.parse_args()
    if not GGUF.exists():
        raise SystemExit(f"benchmark model not found: {GGUF}")

    import ray

    from pipelines.runtime import ensure_ray

    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        # In a process of its own, so the dequantised GGUF does not count in the plain loop's RSS.
        convert = mp.get_context("spawn").Process(
            target=hf_folder, args=(GGUF, Path(tmp) / "model")
        )
        convert.start()
        convert.join()
        model = Path(tmp) / "model"
        base = [f"model.backbone={model}", f"score.batch_size={args.batch_size}",
                "score.sort_window=4"]
        cfg1 = load_config("configs/ml100k.yaml", [*base, "score.cpus_per_actor=2"])
        adapter = args.adapter or fresh_adapter(cfg1, Path(tmp) / "adapter")
        rows, result = (
            [],
            {
                "prompts": args.prompts,
                "batch_size": args.batch_size,
                "adapter": "trained" if args.adapter else "fresh LoRA (q,v; r=8)",
            },
        )
        with measured() as plain_m:
            plain_scores = plain_loop(cfg1, adapter, prompts, args.batch_size)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ensure_ray()
        time.sleep(2)
        with measured() as one_m:
            one = stage(cfg1, adapter, prompts, 1)
        cfg2 = load_config("configs/ml100k.yaml", [*base, "score.cpus_per_actor=1"])
        with measured() as two_m:
            two = stage(cfg2, adapter, prompts, 2)
        ray.shutdown()
    result["max_abs_logit_diff_2_actors_vs_1"] = float(np.max(np.abs(two - one)))
    diff = float(np.max(np.abs(one - plain_scores)))
    for name, m, threads in (
        ("plain HF loop", plain_m, 2),
        ("stage, 1 actor", one_m, 2),
        ("stage, 2 actors", two_m, 1),
    ):
        pps = args.prompts / m["wall_s"]
        result[name] = {**m, "prompts_per_s": pps, "threads_per_worker": threads}
        rows.append(
            [
                name,
                threads,
                f"{m['wall_s']:.1f}",
                f"{pps:.2f}",
                f"{pps / (args.prompts / plain_m['wall_s']):.2f}",
                f"{m['peak_rss_gib']:.2f}",
            ]
        )
    result["max_abs_logit_diff_stage_vs_plain"] = diff
    md = (
        "## Scoring (`benchmarks/score.py`)\n\n"
        f"{args.prompts} code prompts, SmolLM2-135M-Instruct (from the GGUF, saved once as a "
        "float32 Hugging Face folder; CPU), "
        f"{result['adapter']}, batch size {args.batch_size}. Plain: PeftModel unmerged, "
        "`no_grad`, full logits, prompts in given order. Stage: merged LoRA, `inference_mode`, "
        "`logits_to_keep=1`, batches ordered by length, on a Ray actor pool. Wall time includes "
        f"model loading. Largest |logit difference| stage vs plain: {diff:.2e}.\n\n"
        + table(
            ["scorer", "torch threads / worker", "wall s", "prompts/s", "× plain", "peak RSS GiB"],
            rows,
        )
    )
    save("score", result, md)
    print(md)


if __name__ == "__main__":
    main()
