"""Stage ``finetune`` (Ray Train): LoRA tuning on ``render/prompts``, one or two steps.

Each tuning step is one ``TorchTrainer`` run of :func:`train_loop`, which drives the same
:class:`binllm_core.llm.tuning.TuningRun` as the plain loop of the benchmarks and adds only the Ray
parts (data shards, DDP through ``prepare_model`` with gloo on CPU, evaluation gathered across
workers, checkpoints reported). A run is named ``step{n}-{stage hash}`` under
``{stage}/checkpoints``; the hash covers the config, the rendered prompts' identity, the model
and ``init_adapter``, so running the stage again on the same inputs finds that run's last
checkpoint and resumes it, and anything else starts fresh. A step whose ``fit`` returned leaves
``finished.json`` in its run folder, naming its last checkpoint: running the stage again takes
that checkpoint without starting workers (were the stage killed between the two, the step
resumes straight to its end instead). A checkpoint is the
adapter alone (safetensors), the best adapter so far, the optimizer state and a JSON of counters.
The best adapter of each step is copied to ``adapters/step{n}`` of the stage's new version (the
manifest records it relative to the run, so a copied run uses its own adapters); every
evaluation lands in the ``evals`` table.

A listwise step (strategies ``ranking``, ``one_step_ranking``) trains on ranking groups the
driver builds once per prompt mode (:func:`ranking_groups`): train groups from ``samples``' train
split and ``retrieve``'s full-protocol candidates, valid groups from the ``valid_small`` users'
valid likes, each group written as the run's prompts in the step's mode and shipped to the
workers as a Ray Dataset of one row per group (so that a shard never splits a group). Its
evaluations are the valid groups' NDCG@10 and MRR, which keep its best adapter; the manifest
counts what the groups hold (``steps.{name}.groups``).

Test-only fault point ``BINLLM_TEST_FAULT=finetune-step@N`` (:mod:`binllm_core.io.faults`): rank 0
raises after optimizer step N, once per stage run (a marker file named by the stage hash next to
the checkpoints records that it happened).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from binllm_core.config import AUX_TASKS, FinetuneConfig, TuneStepConfig
from binllm_core.errors import StageError
from binllm_core.io.faults import armed
from binllm_core.llm.backbone import fetch_adapter, is_adapter
from binllm_core.llm.objectives import REC
from binllm_core.llm.prefix_sharing import PrefixCut
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.soft import EntityVectors
from binllm_core.llm.strategies import RANKING_TASKS, STRATEGIES, TuneStep, plan
from binllm_core.llm.tuning import (
    STATE,
    EvalSet,
    TaskRows,
    TuningRun,
    micro_batches,
    planned_steps,
    prepare,
    with_curriculum,
)
from binllm_core.modes import MODES
from binllm_core.prompts.ranking_groups import (
    GroupSpec,
    RankingGroup,
    build_groups,
    group_prompts,
    held_out_negatives,
    sample_users,
    valid_groups,
)
from binllm_core.prompts.render import lookups_from_tables
from binllm_core.prompts.templates import templates_from_config
from binllm_core.prompts.truncation import count_truncated
from binllm_core.storage import join
from pipelines.ops.prompt_selection import prompt_index, rendered_modes
from pipelines.ops.retrieval import full_lists
from pipelines.ops.scoring import whole_groups
from pipelines.runtime.progress import Reporter, progress
from pipelines.runtime.ray_helpers import to_arrow
from pipelines.runtime.stage import StageContext
from pipelines.runtime.training import InterruptibleTrainer

FAULT_POINT = "finetune-step"
EVAL_COLUMNS = ["prompt", "label", "uid"]
AUX_COLUMNS = ["task", "prompt", "label", "answer"]
"""What a worker reads of the ``aux`` rows."""
TASKS = (REC, *AUX_TASKS, *RANKING_TASKS)


# ---- driver ----------------------------------------------------------------------------------
def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.finetune
    steps = plan(cfg)
    have = set(rendered_modes(ctx))
    for step in steps:
        if step.mode not in have:
            raise StageError(
                f"finetune needs {step.mode} prompts, render wrote only {sorted(have)}",
                ctx.uri(ctx.stage_path("render")),
                f"add {step.mode} to prompts.modes and re-run render",
            )
    cut = templates_from_config(ctx.cfg.prompts).prefix_cut()
    # The strategy's first mode, also when it starts at step 2: the same subset either way.
    first_mode = STRATEGIES[cfg.strategy](cfg)[0][1]
    train_groups = _prefix_groups(ctx, first_mode, cut) if cfg.batch_by_prefix else None
    index = prompt_index(ctx, steps[0].mode, ["train"], ["sample_id", "split"])
    train_ids = train_sample_ids(index, cfg, train_groups)
    index = prompt_index(ctx, steps[0].mode, ["valid"], ["sample_id", "split", "valid_small"])
    valid_mask = pc.and_(pc.equal(index["split"], "valid"), index["valid_small"])
    valid_ids = _subsample(index, valid_mask, cfg.max_valid_samples, cfg)
    if len(valid_ids) == 0:
        raise StageError("no valid_small prompts to select the adapter on", "render/prompts")
    pointwise = [s for s in steps if not s.listwise]  # a listwise step's prompts are its groups'
    truncated = _truncated(ctx, pointwise, train_ids, valid_ids)

    options = ctx.cfg.output_storage_options  # a URI's, where it lies: nothing downloaded
    if cfg.init_adapter and not is_adapter(cfg.init_adapter, options, "output_storage_options"):
        raise StageError(
            f"finetune.init_adapter {cfg.init_adapter} holds no saved adapter",
            todo="point it at an adapter folder such as runs/RUN/finetune/adapters/step1",
        )
    aux = _aux_rows(ctx, steps)
    groups = {s.mode: ranking_groups(ctx, s.mode) for s in steps if s.listwise}
    storage = ctx.scratch_path("checkpoints")
    previous: Checkpoint | None = None
    summary: dict[str, Any] = {}
    evals: list[dict[str, Any]] = []
    for step in steps:
        mine = groups.get(step.mode) if step.listwise else None
        n_train = len(train_ids) if mine is None else mine.train.num_rows
        n_valid = len(valid_ids) if mine is None else mine.valid.num_rows
        per_step = step.cfg.batch_size * step.cfg.grad_accum * cfg.num_workers
        what = "train samples" if mine is None else "train groups"
        if n_train < per_step:
            raise StageError(
                f"{step.name}: {n_train} {what} are fewer than one optimizer step "
                f"({per_step} {'sequences' if mine is None else 'groups'})",
                "render/prompts" if mine is None else "retrieve/candidates",
                "lower finetune batch_size/grad_accum/num_workers or use more samples",
            )
        if mine is not None and not n_valid:
            raise StageError(
                f"{step.name}: no valid group to select the adapter on",
                "samples/samples",
                "keep valid_small users with a valid like (protocol), or raise "
                "finetune.ranking.max_valid_users",
            )
        name = f"{step.name}-{ctx.digest}"
        started = time.time()
        checkpoint = _finished(ctx, join(storage, name))
        if checkpoint is None:
            total = planned_steps(step.cfg, n_train, cfg.num_workers)
            title = f"finetune {step.name} ({step.mode})"
            with progress(title, total, "step", _describe_step) as reporter:
                checkpoint = (
                    _trainer(
                        ctx,
                        cfg,
                        step,
                        name,
                        storage,
                        train_ids,
                        valid_ids,
                        previous if step.from_previous else None,
                        cut,
                        aux,
                        mine,
                        reporter,
                    )
                    .fit()
                    .checkpoint
                )
        state, adapter = _collect(ctx, checkpoint, step.name)
        _mark_finished(ctx, join(storage, name), checkpoint)
        previous = checkpoint
        evals += [{"step_name": step.name, **e} for e in state["evals"]]
        summary[step.name] = _step_summary(step, state, n_train, n_valid)
        if mine is not None:
            summary[step.name]["groups"] = mine.counts
        summary[step.name].update(
            adapter=adapter,
            run=ctx.relative(join(storage, name)),
            wall_time_s=round(time.time() - started, 2),
        )
    ctx.write_table(pa.Table.from_pylist(evals, schema=EVALS_SCHEMA), "evals")
    return {
        "strategy": cfg.strategy,
        "code_mode": cfg.code_mode,
        "num_workers": cfg.num_workers,
        "steps": summary,
        "adapters": {k: v["adapter"] for k, v in summary.items()},
        "final_adapter": summary[steps[-1].name]["adapter"],
        "truncated": truncated,
    }


def _truncated(
    ctx: StageContext, steps: list[TuneStep], train_ids: np.ndarray, valid_ids: np.ndarray
) -> dict[str, dict[str, int]]:
    """Per prompt mode the steps train on, how many of the drawn train and valid prompts are
    longer than ``finetune.max_length`` (a training prompt with its answer token) and lose their
    beginning; said on the console, refused when it is most of them."""
    max_length = ctx.cfg.finetune.max_length
    out = {}
    for mode in dict.fromkeys(step.mode for step in steps):
        index = prompt_index(ctx, mode, ["train", "valid"], ["sample_id", "n_tokens"])
        ids, lengths = index["sample_id"].to_numpy(), index["n_tokens"].to_numpy()
        counts = {}
        for split, chosen, answer in (("train", train_ids, 1), ("valid", valid_ids, 0)):
            drawn = lengths[np.isin(ids, chosen)] + answer
            what = f"{split} prompts ({mode})"
            counts[split] = count_truncated(drawn, max_length, "finetune.max_length", what)
        out[mode] = counts
        if counts["train"] or counts["valid"]:
            print(
                f"[binllm] finetune: {counts['train']:,} of {len(train_ids):,} train and "
                f"{counts['valid']:,} of {len(valid_ids):,} valid {mode} prompts are longer than "
                f"finetune.max_length = {max_length} tokens and lose their beginning"
            )
    return out


EVALS_SCHEMA = pa.schema(
    [
        ("step_name", pa.string()),
        ("step", pa.int64()),
        ("auc", pa.float64()),
        ("uauc", pa.float64()),
        ("ndcg10", pa.float64()),
        ("mrr", pa.float64()),
        ("train_loss", pa.float64()),
        ("lr", pa.float64()),
        *[(f"loss_{task}", pa.float64()) for task in TASKS],
    ]
)
"""``auc``/``uauc``: a pointwise step's valid figures, ``ndcg10``/``mrr`` a listwise step's (of
its valid groups; each null for the other kind of step). ``train_loss``: the mean loss of rank
0's micro-batches since the previous evaluation (with
aux tasks a mix of BCE and token cross-entropy, not comparable with a run without them);
``loss_{task}``: that of each task (null when the step did not train it)."""


def _aux_rows(ctx: StageContext, steps: list[TuneStep]) -> pa.Table | None:
    """The auxiliary rows the steps mix in (``render``'s table ``aux``; the config's checks
    make render write every task ``finetune.aux`` names), checked: each task in each step's
    mode has at least one micro-batch per worker."""
    wanted = {(task, step.mode, step.cfg.batch_size) for step in steps for task in step.aux}
    if not wanted:
        return None
    table = ctx.read_table("render", "aux", columns=["mode", *AUX_COLUMNS])
    workers = ctx.cfg.finetune.num_workers
    for task, mode, batch_size in sorted(wanted):
        mine = pc.and_(pc.equal(table["task"], task), pc.equal(table["mode"], mode))
        n = pc.sum(mine.cast(pa.int64())).as_py() or 0
        if n < batch_size * workers:
            raise StageError(
                f"{n} {task} rows in {mode} mode are fewer than one micro-batch per worker "
                f"({batch_size} x {workers})",
                ctx.uri(ctx.stage_path("render")),
                "raise prompts.aux.rows_per_user or lower the batch size",
            )
    return table


def _subsample(
    index: pa.Table,
    mask: pa.Array,
    limit: int,
    cfg: FinetuneConfig,
    groups: pa.Table | None = None,
) -> np.ndarray:
    """Sorted sample ids under ``mask``; a seeded random ``limit`` of them when limit > 0,
    drawn as whole prefix groups (``groups``: sample_id, group) when given, so that the prompts
    of a user with the same history stay together (at least one group)."""
    ids = np.unique(index.filter(mask)["sample_id"].to_numpy())
    if not 0 < limit < len(ids):
        return ids
    rng = np.random.default_rng(cfg.seed)
    if groups is None:
        return np.sort(rng.choice(ids, size=limit, replace=False))
    groups = groups.filter(pc.is_in(groups["sample_id"], pa.array(ids, pa.int64())))
    keys = groups["group"].to_numpy(zero_copy_only=False)
    return np.sort(whole_groups(groups["sample_id"].to_numpy(), keys, limit, rng))


def _prefix_groups(ctx: StageContext, mode: str, cut: PrefixCut) -> pa.Table:
    """(sample_id, group) of the ``mode`` train prompts, keyed where the prompts are read: 16
    bytes a prompt reach the driver, never the prompts' text."""
    prompts = ctx.read_dataset("render", "prompts", {"mode": mode, "split": "train"})
    keyed = prompts.select_columns(["sample_id", "prompt"]).map_batches(
        prefix_groups, fn_kwargs={"cut": cut}, batch_format="pyarrow"
    )
    return to_arrow(keyed, pa.schema([("sample_id", pa.int64()), ("group", pa.uint64())]))


def prefix_groups(prompts: pa.Table, cut: PrefixCut) -> pa.Table:
    """(sample_id, group) of prompts (sample_id, prompt): prompts with the same text up to the
    prefix cut (the same user and history) are one group, keyed by a 64-bit BLAKE2b digest of
    that text (two prefixes sharing a key would only be drawn together)."""
    keys = [_digest(p[: cut(p)]) for p in prompts["prompt"].to_pylist()]
    sample_ids = prompts["sample_id"].cast(pa.int64())
    return pa.table({"sample_id": sample_ids, "group": pa.array(keys, pa.uint64())})


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def train_sample_ids(index: pa.Table, cfg: FinetuneConfig, groups: pa.Table | None) -> np.ndarray:
    """The train samples a run tunes on (``index``: sample_id, split); see :func:`_subsample`."""
    mask = pc.equal(index["split"], "train")
    return _subsample(index, mask, cfg.max_train_samples, cfg, groups)


def _rows(ctx: StageContext, mode: str, split: str, ids: np.ndarray) -> ray.data.Dataset:
    """The ``ids`` of one partition of the rendered prompts (only that slice is read)."""
    keep = pa.array(ids, pa.int64())
    columns = ["sample_id", *EVAL_COLUMNS, *(["soft_ids"] if MODES[mode].soft else [])]

    def select(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch["sample_id"], keep)).select(columns)

    prompts = ctx.read_dataset("render", "prompts", {"mode": mode, "split": split})
    return prompts.map_batches(select, batch_format="pyarrow").materialize()


# ---- ranking groups (listwise steps) ------------------------------------------------------------
GROUP_COLUMNS = ["sample_id", "uid", "prompt", "label"]
"""A group row: ``sample_id`` (the group's number), its user, its prompts (the liked item's
first) and their labels (and ``soft_ids``, for soft prompts); workers flatten them."""
CANDIDATE_SPLITS = ("valid", "test", "train")
"""Of a user's full-protocol lists, the one train groups draw from: the first of these splits
the retriever made one for (the valid list leaves out only what the user rated in train, as
the groups do)."""


@dataclass(frozen=True)
class Groups:
    """A listwise step's train and valid groups in one prompt mode (rows of
    :data:`GROUP_COLUMNS`) and what they hold (the manifest's ``groups``)."""

    train: pa.Table
    valid: pa.Table
    counts: dict[str, int]
    """Users drawn and groups made (a drawn user without a group had too short a history or
    too few items to draw negatives from), users without candidates, negatives that are a
    user's held-out (valid or test) item, valid users without a valid list."""


def ranking_groups(ctx: StageContext, mode: str) -> Groups:
    """The train and valid groups of ``finetune.ranking`` in ``mode``, built on the driver from
    ``samples``, ``retrieve/candidates`` (protocol ``full``), the titles and codes
    (:mod:`binllm_core.prompts.ranking_groups`): train groups of a seeded ``max_users`` of the
    train users against their candidates (a user the retriever did not cover: catalog
    negatives only), valid groups of a seeded ``max_valid_users`` of the ``valid_small`` users
    with a valid like, against their valid list (else their train-time list)."""
    cfg, ranking = ctx.cfg.finetune, ctx.cfg.finetune.ranking
    columns = ["sample_id", "uid", "iid", "label", "timestamp", "split", "valid_small", "history"]
    samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=columns))
    train = samples.filter(pl.col("split") == "train")
    lists = full_lists(ctx)
    pool: dict[int, np.ndarray] = {}
    for split in reversed(CANDIDATE_SPLITS):  # the first split's list wins
        pool.update(lists.get(split, {}))
    catalog = ctx.read_table("samples", "item_map", columns=["iid"])["iid"].to_numpy()

    users = sample_users(train["uid"].to_numpy(), ranking.max_users, cfg.seed)
    spec = GroupSpec(
        ranking.size, ranking.per_user, ranking.min_history, ranking.pool, ranking.uniform_share
    )
    mine = train.filter(pl.col("uid").is_in(users.tolist()))
    train_groups = build_groups(mine, pool, catalog, spec, cfg.seed)

    liked = samples.filter(
        (pl.col("split") == "valid") & pl.col("valid_small") & (pl.col("label") == 1)
    )
    valid_users = sample_users(liked["uid"].to_numpy(), ranking.max_valid_users, cfg.seed)
    valid = samples.filter((pl.col("split") == "valid") & pl.col("uid").is_in(valid_users.tolist()))
    valid_set = valid_groups(train, valid, pool, catalog, ranking.size, cfg.seed)

    held = samples.filter(pl.col("split") != "train").group_by("uid").agg(pl.col("iid"))
    held_out = {u: set(i) for u, i in held.iter_rows()}
    covered = {g.uid for g in train_groups if g.uid in pool}
    counts = {
        "train_users_drawn": len(users),
        "train_groups": len(train_groups),
        "train_users": len({g.uid for g in train_groups}),
        "train_users_without_candidates": len({g.uid for g in train_groups} - covered),
        "train_held_out_negatives": held_out_negatives(train_groups, held_out),
        "valid_users_drawn": len(valid_users),
        "valid_groups": len(valid_set),
        "valid_users_without_valid_list": sum(
            g.uid not in lists.get("valid", {}) for g in valid_set
        ),
        "valid_held_out_negatives": held_out_negatives(valid_set, held_out),
        "size": ranking.size,
    }
    if counts["train_users_without_candidates"]:
        print(
            f"[binllm] finetune: {counts['train_users_without_candidates']:,} of "
            f"{counts['train_users']:,} train users have no retrieved candidates; their groups "
            "take catalog negatives only"
        )
    render = _group_renderer(ctx, mode)
    return Groups(render(train_groups), render(valid_set), counts)


def _group_renderer(ctx: StageContext, mode: str) -> Any:
    """Groups -> their rows of :data:`GROUP_COLUMNS` in ``mode``, written as the run's prompts."""
    codes = None
    if MODES[mode].has_codes:
        codes = ctx.read_table("encode", "codes", columns=["entity", "id", "bits"])
    lookups = lookups_from_tables(
        ctx.read_table("ingest", "items", columns=["item", "title"]),
        ctx.read_table("samples", "item_map", columns=["item", "iid"]),
        codes,
    )
    templates = templates_from_config(ctx.cfg.prompts)
    history_len = ctx.cfg.prompts.history_len

    def render(groups: list[RankingGroup]) -> pa.Table:
        written = [group_prompts(g, lookups, templates, mode, history_len) for g in groups]
        table = {
            "sample_id": pa.array(range(len(groups)), pa.int64()),
            "uid": pa.array([g.uid for g in groups], pa.int32()),
            "prompt": pa.array([w.prompts for w in written], pa.list_(pa.string())),
            "label": pa.array([w.labels for w in written], pa.list_(pa.int8())),
        }
        if MODES[mode].soft:
            kind = pa.list_(pa.list_(pa.int32()))
            table["soft_ids"] = pa.array([w.soft for w in written], kind)
        return pa.table(table)

    return render


def _trainer(
    ctx: StageContext,
    cfg: FinetuneConfig,
    step: TuneStep,
    name: str,
    storage: str,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    init: Checkpoint | None,
    cut: PrefixCut,
    aux: pa.Table | None,
    groups: Groups | None,
    reporter: Reporter,
) -> TorchTrainer:
    if groups is not None:  # one row per group: a worker's shard holds whole groups
        train = ray.data.from_arrow(groups.train)
        valid = ray.data.from_arrow(groups.valid)
    else:
        train = _rows(ctx, step.mode, "train", train_ids)
        valid = _rows(ctx, step.mode, "valid", valid_ids)
    if MODES[step.mode].soft and cfg.soft.curriculum and groups is None:  # with its text version
        plain = _rows(ctx, "text", "train", train_ids).select_columns(["sample_id", "prompt"])
        plain = plain.rename_columns({"prompt": "plain"})
        train = train.join(plain, "inner", num_partitions=1, on=("sample_id",))
    train = train.random_shuffle(seed=cfg.seed).materialize()
    datasets = {"train": train, "valid": valid}
    for task in step.aux:  # one dataset per task: each worker gets its share of every task
        assert aux is not None
        mine = pc.and_(pc.equal(aux["mode"], step.mode), pc.equal(aux["task"], task))
        rows = ray.data.from_arrow(aux.filter(mine).select(AUX_COLUMNS))
        datasets[f"aux_{task}"] = rows.random_shuffle(seed=cfg.seed).materialize()
    loop_config = {
        "finetune": cfg,
        "step": step.cfg,
        "model": ctx.cfg.model,
        "n_train": len(train_ids) if groups is None else groups.train.num_rows,
        "init": init,
        "init_adapter": "" if init is not None or step.name != cfg.start_step else cfg.init_adapter,
        "init_storage_options": ctx.cfg.output_storage_options,
        "prefix_cut": cut,
        "aux": step.aux,
        "tune_step": step,
        "soft": _soft_inputs(ctx, step),
        "progress": reporter,
        "fault": armed(
            FAULT_POINT, ctx.uri(join(storage, f"fault-injected-{ctx.digest}")), raises=True
        ),
    }
    return InterruptibleTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=ctx.arrow_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[n for n in datasets if n != "valid"]),
    )


@dataclass(frozen=True)
class SoftInputs:
    """What a soft step's workers need besides the prompts (bounded by users and items): the
    encoder's vectors and, for the contrastive terms, the item titles."""

    vectors: EntityVectors
    titles: dict[int, str] | None


def _soft_inputs(ctx: StageContext, step: TuneStep) -> SoftInputs | None:
    if not MODES[step.mode].soft:
        return None
    soft = ctx.cfg.finetune.soft
    vectors = EntityVectors.from_table(ctx.read_table("encode", "embeddings"), soft.vectors)
    titles = None
    if step.contrastive and soft.item_title_weight > 0:
        lookups = lookups_from_tables(
            ctx.read_table("ingest", "items", columns=["item", "title"]),
            ctx.read_table("samples", "item_map", columns=["item", "iid"]),
            None,
        )
        titles = dict(lookups.titles)
    return SoftInputs(vectors, titles)


def _resources(cfg: FinetuneConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


FINISHED = "finished.json"
"""In a step's run folder once its ``fit`` returned: ``{"checkpoint": name}``, its last
checkpoint (a folder name next to it, so that a copied run finds its own)."""


def _finished(ctx: StageContext, run_folder: str) -> Checkpoint | None:
    """The last checkpoint of a step that finished on these same inputs, if any."""
    marker = join(run_folder, FINISHED)
    if not ctx.fs.exists(marker):
        return None
    path = join(run_folder, json.loads(ctx.fs.cat_file(marker))["checkpoint"])
    return Checkpoint(path, filesystem=ctx.arrow_fs) if ctx.fs.exists(path) else None


def _mark_finished(ctx: StageContext, run_folder: str, checkpoint: Checkpoint) -> None:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    ctx.fs.pipe_file(join(run_folder, FINISHED), json.dumps({"checkpoint": name}).encode())


def _collect(
    ctx: StageContext, checkpoint: Checkpoint | None, step_name: str
) -> tuple[dict[str, Any], str]:
    """Read the last checkpoint's state and copy its best adapter to ``adapters/{step}`` of the
    new version; the adapter's path relative to the run."""
    if checkpoint is None:
        raise StageError(f"finetune {step_name} ended without a checkpoint")
    target = join(ctx.output_path("adapters"), step_name)
    with checkpoint.as_directory() as folder:
        state = json.loads(Path(folder, STATE).read_text())
        ctx.fs.makedirs(ctx.output_path("adapters"), exist_ok=True)
        ctx.fs.put(os.path.join(folder, "best"), target, recursive=True)
    return state, ctx.relative(target)


def _step_summary(step: TuneStep, state: dict[str, Any], n_train: int, n_valid: int) -> dict:
    seconds = max(state["train_seconds"], 1e-9)
    best = next((e for e in state["evals"] if e["step"] == state["best_step"]), {})
    return {
        "mode": step.mode,
        "n_train": n_train,
        "n_valid": n_valid,
        "planned_steps": state["planned_steps"],
        "steps": state["step"],
        "stopped_early": state["step"] < state["planned_steps"],
        "best_step": state["best_step"],
        "task": step.task,
        "selected_by": step.selects,
        **{f"best_valid_{key}": best.get(key) for key in ("auc", "uauc", "ndcg10", "mrr")},
        f"best_valid_{step.selects}": state["best"],
        "sequences": state["sequences"],
        "aux": step.aux,
        "task_sequences": state.get("task_sequences", {}),
        "task_losses_at_best": {k[5:]: v for k, v in best.items() if k.startswith("loss_")},
        "tokens": state["tokens"],
        "train_seconds": round(state["train_seconds"], 2),
        "sequences_per_s": round(state["sequences"] / seconds, 3),
        "tokens_per_s": round(state["tokens"] / seconds, 1),
        "peak_rss_mb_rank0": state.get("peak_rss_mb"),
        "restarts": state.get("restarts", 0),
    }


# ---- workers ---------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """One tuning step on a Ray Train worker: the shared :class:`TuningRun`, fed from this
    worker's data shard, with DDP, evaluation gathered across workers and checkpoints reported."""
    ft: FinetuneConfig = config["finetune"]
    step_cfg: TuneStepConfig = config["step"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    step: TuneStep = config["tune_step"]
    rec = LLMRecommender.from_backbone(config["model"], device=device)
    soft: SoftInputs | None = config["soft"]
    vectors, titles = (soft.vectors, soft.titles) if soft is not None else (None, None)
    curriculum = prepare(rec, step, ft, vectors, titles)  # before the checkpoint's adapter
    run = TuningRun(
        rec,
        ft,
        step_cfg,
        config["n_train"],
        rank,
        world,
        config["prefix_cut"],
        step.train_lora,
        step.task,
    )
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            run.setup(resume=folder)
    elif config["init"] is not None:
        with config["init"].as_directory() as folder:
            run.setup(start_from=os.path.join(folder, "best"))
    elif config["init_adapter"]:  # a remote one fetched once per node into the model cache
        options = config.get("init_storage_options")
        run.setup(start_from=fetch_adapter(config["model"], config["init_adapter"], options))
    else:
        run.setup()
    # The fixed vectors are buffers, the same on every worker: nothing to broadcast each pass.
    # Under a curriculum, a micro-batch of text prompts leaves the projector out.
    rec.forward_net = ray.train.torch.prepare_model(
        rec.model,
        parallel_strategy_kwargs={
            "broadcast_buffers": False,
            "find_unused_parameters": curriculum,
        },
    )
    if rank != 0:  # rank 0 carries the totals of the checkpoint; the others count from zero
        _set_counters(run, [0] * len(_counters(run)))
    valid = _eval_slice(rank, world)
    gather = _gather(world) if world > 1 else None
    rows = _shard_rows()
    aux = {task: _aux_shard(task) for task in config["aux"]}
    group_by = run.prefix_cut if ft.batch_by_prefix else None
    seed = ft.seed + rank
    stream = micro_batches(rows, step_cfg.batch_size, seed, group_by, aux, config["aux"], step.task)
    if curriculum:
        stream = with_curriculum(stream, run.progress, f"{seed}/curriculum")
    stream = run.resume_stream(stream)
    reported = False
    speed = _Speed(run, world)
    while not run.done:
        loss = run.train_step(stream)
        if rank == 0 and config["fault"] is not None:
            config["fault"].reached(run.state.step)
        if rank == 0:
            config["progress"].post(done=run.state.step, loss=loss, tokens_per_s=speed.now())
        if not run.due_for_eval:
            continue
        record = run.evaluate(valid, gather)
        if rank == 0:
            config["progress"].post(done=run.state.step, valid=(run.selects, record[run.selects]))
        _report(run, record, device)
        reported = True
    if not reported:
        # Resumed a step that had finished: report again so this run's result has a checkpoint.
        _report(run, run.state.evals[-1], device)
    if rank == 0:
        config["progress"].flush()
    run.close()


class _Speed:
    """Training tokens per second of this run so far (this worker's, times the workers)."""

    def __init__(self, run: TuningRun, world: int) -> None:
        self.run, self.world = run, world
        self.tokens, self.seconds = run.state.tokens, run.state.train_seconds

    def now(self) -> float:
        s = self.run.state
        seconds = s.train_seconds - self.seconds
        return (s.tokens - self.tokens) * self.world / seconds if seconds > 0 else 0.0


def _describe_step(fields: dict[str, Any]) -> str:
    parts = []
    if "loss" in fields:
        parts.append(f"loss {fields['loss']:.4f}")
    if "tokens_per_s" in fields:
        parts.append(f"{fields['tokens_per_s']:,.0f} tok/s")
    name, value = fields.get("valid", ("auc", None))
    label = {"auc": "AUC", "ndcg10": "NDCG@10"}.get(name, name)
    known = value is not None and not math.isnan(value)
    parts.append(f"valid {label} {value:.4f}" if known else f"valid {label} -")
    return ", ".join(parts)


def _gather(world: int) -> Any:
    def gather(mine: tuple) -> list[tuple]:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        return parts

    return gather


def _shard_rows() -> TaskRows:
    """This worker's train shard (prompts, labels and soft ids of soft prompts), read once: the
    micro-batches are drawn from it in memory (about 1 KB per prompt), as the plain loop draws
    them."""
    rows, soft, plain = TaskRows([], []), [], []
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow"):
        batch = _flat(batch)
        rows.prompts += batch["prompt"].to_pylist()
        rows.labels += batch["label"].to_pylist()
        if "soft_ids" in batch.column_names:
            soft += batch["soft_ids"].to_pylist()
        if "plain" in batch.column_names:
            plain += batch["plain"].to_pylist()
    rows.soft, rows.plain = soft or None, plain or None
    return rows


def _aux_shard(task: str) -> TaskRows:
    """This worker's shard of one auxiliary task's rows (prompts, labels, answers)."""
    rows = TaskRows([], [], [])
    for batch in ray.train.get_dataset_shard(f"aux_{task}").iter_batches(batch_format="pyarrow"):
        rows.prompts += batch["prompt"].to_pylist()
        rows.labels += batch["label"].to_pylist()
        rows.answers += batch["answer"].to_pylist()
    return rows


def _eval_slice(rank: int, world: int) -> EvalSet:
    """This worker's share (every ``world``-th row) of the whole ``valid`` dataset."""
    rows = pa.concat_tables(
        list(ray.train.get_dataset_shard("valid").iter_batches(batch_format="pyarrow"))
    )
    rows = rows.sort_by("sample_id")
    take = pa.array(range(rank, rows.num_rows, world), pa.int64())
    groups = pa.types.is_list(rows.schema.field("prompt").type)
    part = _flat(rows.take(take))
    soft = part["soft_ids"].to_pylist() if "soft_ids" in part.column_names else None
    return EvalSet(
        part["prompt"].to_pylist(),
        part["label"].to_pylist(),
        part["uid"].to_pylist(),
        soft,
        groups,
    )


def _flat(rows: pa.Table) -> pa.Table:
    """Rows of ranking groups (:data:`GROUP_COLUMNS`, lists of prompts) as prompt rows, each
    group whole and in order; prompt rows as they are."""
    if not pa.types.is_list(rows.schema.field("prompt").type):
        return rows
    parent = pc.list_parent_indices(rows["prompt"])
    columns = {"uid": rows["uid"].take(parent)}
    for name in ("prompt", "label", "soft_ids"):
        if name in rows.column_names:
            columns[name] = pc.list_flatten(rows[name])
    return pa.table(columns)


def _all_sum(values: list[float], device: Any) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return round(peak, 1)


def _counters(run: TuningRun) -> list[int]:
    """The counters a checkpoint sums over workers: sequences, tokens, sequences per task."""
    s = run.state
    return [s.sequences, s.tokens, *(s.task_sequences.get(t, 0) for t in TASKS)]


def _set_counters(run: TuningRun, values: list[float]) -> None:
    s = run.state
    s.sequences, s.tokens = int(values[0]), int(values[1])
    s.task_sequences = {t: int(v) for t, v in zip(TASKS, values[2:], strict=True) if v}


def _report(run: TuningRun, record: dict[str, Any], device: Any) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint, whose counters
    are the sums over all workers."""
    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if run.rank != 0:
        _all_sum(_counters(run), device)
        ray.train.report(metrics)
        return
    local = _counters(run)
    _set_counters(run, _all_sum(local, device))
    run.state.peak_rss_mb = _peak_rss_mb()
    folder = run.workdir / f"ckpt-{run.state.step}"
    run.save_checkpoint(folder)
    _set_counters(run, local)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
    shutil.rmtree(folder, ignore_errors=True)
