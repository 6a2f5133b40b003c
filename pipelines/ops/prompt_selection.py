"""Which rendered prompts a stage reads: the ``render/prompts`` slice of one mode and split, and
the modes a render version holds (finetune and score both select their prompts this way).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from pipelines.runtime.stage import StageContext


def prompt_index(
    ctx: StageContext, mode: str, splits: Sequence[str], columns: list[str]
) -> pa.Table:
    """``columns`` of the ``mode`` prompts of ``splits``, read partition by partition (every
    mode holds the same samples, so one mode's index is every mode's); a split render wrote no
    prompts of adds no rows."""
    written = ctx.manifest_of("render")["metrics"]["rows_per_split"]
    parts = [
        ctx.read_table("render", "prompts", columns, {"mode": mode, "split": split})
        for split in splits
        if written.get(split)
    ]
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})


def rendered_modes(ctx: StageContext) -> list[str]:
    """The prompt modes render wrote."""
    return list(ctx.manifest_of("render")["metrics"]["rows_per_mode"])
