"""Stage ``score``: ``render/prompts`` of the scored modes and splits -> table ``scores`` of
``{run}/score/``, one row per scored sample and mode, with the adapters of ``finetune`` (or
``score.adapters``) on the actor pool of :mod:`pipelines.ops.scoring`. Prompts longer than
``finetune.max_length`` are counted (manifest ``truncated``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.config import (
    ScoreConfig,
)
from binllm_core.errors import StageError
from binllm_core.prompts.truncation import count_truncated
from pipelines.ops.prompt_selection import prompt_index, rendered_modes
from pipelines.ops.scoring import (
    NONE,
    adapter_plan,
    default_modes,
    model_id,
    now_utc,
    score_now,
    whole_groups,
)
from pipelines.runtime.stage import StageContext

STAGE_INPUT = [
    "sample_id",
    "split",
    "mode",
    "uid",
    "iid",
    "label",
    "warm",
    "not_cold",
    "prompt",
    "soft_ids",
]


# ---- stage ``score`` ---------------------------------------------------------------------------
def run(ctx: StageContext) -> dict[str, Any]:
    cfg, sc = ctx.cfg, ctx.cfg.score
    finetune = ctx.manifest_of("finetune")["metrics"]
    modes = default_modes(cfg, finetune)
    plan = adapter_plan(cfg, modes, finetune, ctx.run_uri)
    have = set(rendered_modes(ctx))
    for mode in modes:
        if mode not in have:
            raise StageError(
                f"score needs {mode} prompts, render wrote only {sorted(have)}",
                ctx.uri(ctx.stage_path("render")),
                f"add {mode} to prompts.modes or drop it from score.modes",
            )
    index = prompt_index(ctx, modes[0], sc.splits, ["sample_id", "split", "uid"])
    ids = pick_samples(index, sc)
    if len(ids) == 0:
        raise StageError(
            f"no prompts in the splits {sc.splits} to score", ctx.uri(ctx.stage_path("render"))
        )
    scored_at = now_utc()
    parts, per_mode = [], {}
    for mode, adapter in plan.items():
        truncated = _truncated(ctx, mode, ids)
        started = time.time()
        part = score_now(_select(ctx, mode, ids), cfg, adapter, scored_at, f"score {mode}")
        seconds = time.time() - started
        rows = part.count()
        per_mode[mode] = {
            "adapter": adapter or NONE,
            "rows": rows,
            "wall_time_s": round(seconds, 2),
            "prompts_per_s": round(rows / max(seconds, 1e-9), 3),
            "truncated": truncated,
        }
        parts.append(part)
    scores = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ctx.write_dataset(scores, "scores")
    return {
        "modes": per_mode,
        "splits": list(sc.splits),
        "samples": int(len(ids)),
        "max_rows": sc.max_rows,
        "sample_by": sc.sample_by,
        "model": model_id(cfg.model),
        "num_actors": sc.num_actors,
        "num_gpus_per_actor": sc.num_gpus,
        "batch_size": sc.batch_size,
        "scored_at": scored_at.isoformat(),
    }


def _truncated(ctx: StageContext, mode: str, ids: np.ndarray) -> int:
    """How many of the ``mode`` prompts to score are longer than ``score.max_length`` and lose
    their beginning; said on the console, refused when it is most of them."""
    max_length = ctx.cfg.score.max_length
    index = prompt_index(ctx, mode, ctx.cfg.score.splits, ["sample_id", "n_tokens"])
    lengths = index["n_tokens"].to_numpy()[np.isin(index["sample_id"].to_numpy(), ids)]
    cut = count_truncated(lengths, max_length, "score.max_length", f"{mode} prompts to score")
    if cut:
        print(
            f"[binllm] score: {cut:,} of {len(lengths):,} {mode} prompts are longer than "
            f"score.max_length = {max_length} tokens and lose their beginning"
        )
    return cut


def pick_samples(index: pa.Table, sc: ScoreConfig) -> np.ndarray:
    """Sorted sample ids of ``sc.splits``; a seeded random subset of at most ``max_rows`` of
    each split, drawn as single samples or as whole users (``sc.sample_by``)."""
    chosen = []
    for split in sc.splits:
        part = index.filter(pc.equal(index["split"], split)).select(["sample_id", "uid"])
        ids, first = np.unique(part["sample_id"].to_numpy(), return_index=True)
        if 0 < sc.max_rows < len(ids):
            rng = np.random.default_rng(sc.seed)
            if sc.sample_by == "users":
                ids = whole_groups(ids, part["uid"].to_numpy()[first], sc.max_rows, rng)
            else:
                ids = rng.choice(ids, size=sc.max_rows, replace=False)
        chosen.append(ids)
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], np.int64)


def _select(ctx: StageContext, mode: str, ids: np.ndarray) -> ray.data.Dataset:
    """The rendered prompts of ``mode`` (only that partition is read) whose ids are ``ids``."""
    keep = pa.array(ids, pa.int64())

    def select(batch: pa.Table) -> pa.Table:
        present = [c for c in STAGE_INPUT if c in batch.column_names]  # soft_ids: newer renders
        return batch.filter(pc.is_in(batch["sample_id"], keep)).select(present)

    prompts = ctx.read_dataset("render", "prompts", {"mode": mode})
    return prompts.map_batches(select, batch_format="pyarrow")
