"""Scoring throughput on ml-100k: a plain Hugging Face loop, the stage scoring whole prompts,
and the stage computing each user's prompt prefix once (``score.share_prefix``).

Two workloads, made from a run of ``configs/quality_ml100k.yaml`` on the shared ml-100k (its
ingest, samples, encode and render stages, with every prompt mode; built here if missing and
skipped when done):

* (a) ``test``: the test split's ``--mode`` prompts of seeded random whole users, up to
  ``--test-prompts`` (a user's test samples share a prefix only where their histories agree);
* (b) ``rerank``: ``--candidates`` random items for each of ``--users`` users, rendered the way
  ``binllm score``/``nightly`` render candidates (the user's latest history, so all of a user's
  candidates share the prefix).

For each, three scorers with the same model (SmolLM2-135M-Instruct from the GGUF, saved once as
a float32 Hugging Face folder; CPU), the same fresh LoRA (q, v; r 8) and batch size 16:

* plain: one process, ``PeftModel`` unmerged, ``torch.no_grad``, whole prompts in their given
  order, left padding to the longest of each batch, full logits;
* stage, whole prompts: :func:`pipelines.ops.scoring.score_dataset` on a local Ray (one actor of two
  threads, merged LoRA, ``inference_mode``, batches ordered by length), ``share_prefix=false``;
* stage, shared prefix: the same with ``share_prefix=true``.

Prompts/s counts prompts over the wall time of the scoring call, model loading included on
every side. Peak RSS is that of the whole process tree (Ray workers included). The tokens that
the forward passes run are counted from the same tokenisation and grouping the scorer uses, and
the key/value cache one suffix pass expands (batch x tokens x layers x 2 x kv heads x head dim x
4 bytes) is given for the largest pass. Tokens per prompt of every mode come from the render
manifest.

    python benchmarks/score.py [--mode binary] [--test-prompts 400] [--users 50]
                               [--candidates 20] [--output-root runs/bench]
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
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``python benchmarks/score.py``

from benchmarks.common import SHARED, measured, save, table  # noqa: E402
from binllm_core.config import RunConfig, load_config  # noqa: E402

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


def fresh_adapter(cfg: RunConfig, folder: Path) -> str:
    from binllm_core.llm.recommender import LLMRecommender

    LLMRecommender.from_backbone(cfg.model, finetune=cfg.finetune, trainable=True).save(folder)
    return str(folder)


def plain_loop(cfg: RunConfig, adapter: str, prompts: list[str], batch_size: int) -> np.ndarray:
    """What one would write without the stage: PeftModel, no_grad, given order."""
    import torch
    from peft import PeftModel

    from binllm_core.llm.loading import load_language_model

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


def stage(cfg: RunConfig, adapter: str, prompts: list[str]) -> np.ndarray:
    import ray

    from pipelines.ops.scoring import score_dataset

    ds = ray.data.from_arrow(pa.table({"i": np.arange(len(prompts)), "prompt": prompts}))
    ds = ds.repartition(4)
    out = score_dataset(ds, cfg, adapter, dt.datetime.now(dt.UTC))
    table_ = pa.concat_tables(ray.get(out.materialize().to_arrow_refs())).sort_by("i")
    return table_["logit_yes"].to_numpy()


# ---- workloads -------------------------------------------------------------------------------
CONFIG = "configs/quality_ml100k.yaml"


def base_run(root: Path) -> RunConfig:
    """The run the workloads come from (ingest .. render, every prompt mode); finished stages
    are skipped."""
    from binllm_core.modes import TEXT_AND_CODE_MODES as MODES
    from pipelines.runtime.registry import run_pipeline

    cfg = load_config(CONFIG, [
        f"data.uri={SHARED / 'data' / 'ml-100k'}", f"model.backbone={GGUF}",
        f"output_root={root}", "run_name=ml100k", f"prompts.modes=[{','.join(MODES)}]",
    ])
    run_pipeline(cfg, ["ingest", "samples", "encode", "render"], log=print)
    return cfg


def test_workload(run: Path, mode: str, limit: int, seed: int = 2024) -> pl.DataFrame:
    """(uid, prompt) of every test sample of seeded random users, up to ``limit`` prompts."""
    from binllm_core.storage import read_output

    prompts = pl.from_arrow(read_output(str(run / "render"), "prompts")).filter(
        (pl.col("split") == "test") & (pl.col("mode") == mode)
    ).sort("sample_id")
    users = prompts.group_by("uid").len().sort("uid")
    order = np.random.default_rng(seed).permutation(users.height)
    counts = users["len"].to_numpy()[order]
    keep = users["uid"].to_numpy()[order][np.cumsum(counts) <= limit]
    return prompts.filter(pl.col("uid").is_in(keep.tolist())).select(["uid", "prompt"])


def rerank_workload(
    cfg: RunConfig, run: Path, mode: str, users: int, candidates: int, seed: int = 7
) -> pl.DataFrame:
    """(uid, prompt) of ``candidates`` random items for each of ``users`` random users."""
    from binllm_core.prompts.templates import templates_from_config
    from binllm_core.prompts.user_pairs import build_lookups, render_candidates, with_row_numbers
    from binllm_core.storage import read_output

    def read(stage: str, name: str) -> pa.Table:
        return read_output(str(run / stage), name)

    user_map, item_map = read("samples", "user_map"), read("samples", "item_map")
    lookups = build_lookups(read("ingest", "items"), user_map, item_map, read("encode", "codes"),
                            read("samples", "samples"), cfg.prompts.history_len)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(user_map["user"].to_numpy(zero_copy_only=False), users, replace=False)
    all_items = item_map["item"].to_numpy(zero_copy_only=False)
    pairs = pa.table({
        "user": [str(u) for u in chosen for _ in range(candidates)],
        "item": [str(i) for _ in chosen for i in rng.choice(all_items, candidates, False)],
        "label": pa.nulls(users * candidates, pa.int8()),
    })
    rendered = render_candidates(with_row_numbers(pairs), lookups, templates_from_config(
        cfg.prompts), mode, "text", cfg.prompts.history_len)
    return pl.from_arrow(rendered.select(["uid", "prompt"]))


def computed_tokens(model: Path, prompts: list[str], cfg: RunConfig) -> dict[str, Any]:
    """Tokens of the whole prompts, tokens the shared-prefix scorer runs, and the largest key/
    value cache one of its suffix passes expands (float32)."""
    from transformers import AutoConfig

    from binllm_core.config import ModelConfig
    from binllm_core.llm.backbone import load_tokenizer
    from binllm_core.llm.prefix_sharing import group_by_prefix, tokenize_with_prefix
    from binllm_core.prompts.templates import templates_from_config

    tokenizer = load_tokenizer(ModelConfig(backbone=str(model)))
    cut = templates_from_config(cfg.prompts).prefix_cut()
    tokens = tokenize_with_prefix(tokenizer, prompts, cfg.score.max_length, cut)
    groups = [g for g in group_by_prefix(tokens) if len(g) > 1]
    alone = set(range(len(prompts))) - {i for g in groups for i in g}
    lengths = tokens.lengths
    run = sum(int(lengths[i]) for i in alone)
    run += sum(tokens.prefix_tokens[g[0]] + int(sum(lengths[i] - tokens.prefix_tokens[g[0]]
                                                  for i in g)) for g in groups)
    mc = AutoConfig.from_pretrained(model)
    per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * (
        mc.hidden_size // mc.num_attention_heads) * 4
    longest = max((int(lengths[i]) for g in groups for i in g), default=0)
    return {
        "prompts": len(prompts),
        "mean_tokens": round(float(lengths.mean()), 1),
        "prefix_groups": len(groups),
        "prompts_in_groups": sum(len(g) for g in groups),
        "mean_group_size": round(sum(len(g) for g in groups) / max(len(groups), 1), 2),
        "tokens": int(lengths.sum()),
        "computed_tokens": run,
        "token_ratio": round(int(lengths.sum()) / run, 2),
        "max_expanded_cache_mib": round(cfg.score.batch_size * longest * per_token / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="binary")
    parser.add_argument("--test-prompts", type=int, default=400)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-root", default="runs/bench")
    args = parser.parse_args()
    if not GGUF.exists():
        raise SystemExit(f"benchmark model not found: {GGUF}")

    import ray

    from binllm_core.storage import read_manifest, resolve
    from pipelines.runtime.ray_helpers import ensure_ray

    root = Path(args.output_root).resolve()
    cfg = base_run(root)
    ray.shutdown()  # each workload starts its own after the plain loop has run alone
    run = root / cfg.run_name
    fs, path = resolve(str(run / "render"))
    tokens_per_mode = read_manifest(fs, path)["metrics"]["tokens_per_mode"]
    workloads = {
        "test": test_workload(run, args.mode, args.test_prompts),
        "rerank": rerank_workload(cfg, run, args.mode, args.users, args.candidates),
    }
    result: dict[str, Any] = {
        "mode": args.mode, "batch_size": args.batch_size, "adapter": "fresh LoRA (q,v; r=8)",
        "tokens_per_mode": tokens_per_mode, "workloads": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        # In a process of its own, so the dequantised GGUF does not count in the plain loop's RSS.
        convert = mp.get_context("spawn").Process(
            target=hf_folder, args=(GGUF, Path(tmp) / "model")
        )
        convert.start()
        convert.join()
        model = Path(tmp) / "model"
        sets = [f"data.uri={SHARED / 'data' / 'ml-100k'}", f"model.backbone={model}",
                f"score.batch_size={args.batch_size}", "score.num_actors=1",
                "score.cpus_per_actor=2"]
        whole_cfg = load_config(CONFIG, [*sets, "score.share_prefix=false"])
        shared_cfg = load_config(CONFIG, [*sets, "score.share_prefix=true"])
        adapter = fresh_adapter(whole_cfg, Path(tmp) / "adapter")
        for name, frame in workloads.items():
            prompts = frame["prompt"].to_list()
            entry: dict[str, Any] = {**computed_tokens(model, prompts, shared_cfg)}
            with measured() as m:
                plain = plain_loop(whole_cfg, adapter, prompts, args.batch_size)
            entry["plain HF loop"] = m
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ensure_ray()
            time.sleep(2)
            scores = {}
            for label, c in (("stage, whole prompts", whole_cfg),
                             ("stage, shared prefix", shared_cfg)):
                with measured() as m:
                    scores[label] = stage(c, adapter, prompts)
                entry[label] = {**m, "max_abs_logit_diff_vs_plain": float(
                    np.abs(scores[label] - plain).max())}
            ray.shutdown()
            for label in ("plain HF loop", *scores):
                entry[label]["prompts_per_s"] = len(prompts) / entry[label]["wall_s"]
                entry[label]["x_plain"] = entry["plain HF loop"]["wall_s"] / entry[label]["wall_s"]
            result["workloads"][name] = entry
            print(name, entry, flush=True)
    save("score", result, markdown(result, args))


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for name, w in result["workloads"].items():
        for label in ("plain HF loop", "stage, whole prompts", "stage, shared prefix"):
            m = w[label]
            rows.append([
                name, w["prompts"], label, f"{m['wall_s']:.1f}", f"{m['prompts_per_s']:.2f}",
                f"{m['x_plain']:.2f}", f"{m['peak_rss_gib']:.2f}",
                f"{m.get('max_abs_logit_diff_vs_plain', 0.0):.1e}",
            ])
    shares = [[name, w["mean_tokens"], w["prefix_groups"], w["mean_group_size"],
               f"{w['prompts_in_groups']}/{w['prompts']}", w["token_ratio"],
               w["max_expanded_cache_mib"]] for name, w in result["workloads"].items()]
    modes = [[m, t["mean"], t["p95"], t["max"]] for m, t in result["tokens_per_mode"].items()]
    return (
        "## Scoring (`benchmarks/score.py`)\n\n"
        f"ml-100k `{args.mode}` prompts (default style), SmolLM2-135M-Instruct (GGUF saved once as "
        "a float32 Hugging Face folder; CPU, 2 threads), a fresh LoRA (q,v; r=8), batch size "
        f"{args.batch_size}. `test`: every test sample of seeded random users, up to "
        f"{args.test_prompts}. `rerank`: {args.candidates} random candidates for each of "
        f"{args.users} users, rendered as `binllm score` does. Plain: PeftModel unmerged, "
        "`no_grad`, full logits, given order. Stage: `score_dataset` on a local Ray (1 actor, "
        "merged LoRA, `inference_mode`), whole prompts or `score.share_prefix`. Wall time "
        "includes model loading; peak RSS counts the Ray workers.\n\n"
        + table(["workload", "prompts", "scorer", "wall s", "prompts/s", "× plain",
                 "peak RSS GiB", "max |Δlogit| vs plain"], rows)
        + "\n\nWhat sharing saves (same tokenisation and grouping as the scorer): prompts that "
        "share a prefix, and whole-prompt tokens over the tokens the shared passes run. The "
        "cache column is the largest key/value cache one suffix pass expands (float32).\n\n"
        + table(["workload", "tokens/prompt", "prefix groups", "prompts/group",
                 "prompts shared", "token ratio", "expanded cache MiB"], shares)
        + "\n\nTokens per prompt of every mode (SmolLM2 tokenizer, all splits; the render "
        "manifest's `tokens_per_mode`):\n\n"
        + table(["mode", "mean", "p95", "max"], modes)
    )


if __name__ == "__main__":
    main()
