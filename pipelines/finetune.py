"""Stage ``finetune`` (Ray Train): LoRA tuning on ``render/prompts``, one or two steps.

Each tuning step is one ``TorchTrainer`` run of :func:`train_loop` (our own loop: DDP through
``prepare_model``, gloo on CPU) named ``step{n}-{stage hash}`` under ``{stage}/checkpoints``;
the hash covers the config, the rendered prompts' identity, the model and ``init_adapter``, so
running the stage again on the same inputs finds that run's last checkpoint and resumes it (a
finished step resumes straight to its end), and anything else starts fresh. A checkpoint is the
adapter alone (safetensors), the best adapter so far, the optimizer state and a JSON of counters.
The best adapter of each step is copied to ``adapters/step{n}`` of the stage's new version (the
manifest records it relative to the run, so a copied run uses its own adapters); every
evaluation lands in the ``evals`` table.

Test-only fault switch: ``BINLLM_FAIL_AT_STEP=N`` makes rank 0 raise once at optimizer step N
(a marker file next to the checkpoints keeps it to once per stage folder).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from binllm_core.backbone import load_backbone, score_prompts
from binllm_core.config import FinetuneConfig, ModelConfig, TuneStepConfig
from binllm_core.errors import StageError
from binllm_core.finetune import (
    EarlyStopping,
    EvalSet,
    Schedule,
    attach_lora,
    backward,
    collate,
    make_optimizer,
    planned_steps,
    set_lr,
)
from binllm_core.storage import join
from pipelines.stage import StageContext

FAIL_ENV = "BINLLM_FAIL_AT_STEP"
STATE = "state.json"
EVAL_COLUMNS = ["prompt", "label", "uid"]


@dataclass(frozen=True)
class TuneStep:
    """One tuning step of the strategy: its name, prompt mode, budget and starting adapter."""

    name: str
    mode: str
    cfg: TuneStepConfig
    from_previous: bool


def plan(cfg: FinetuneConfig) -> list[TuneStep]:
    if cfg.strategy == "one_step":
        return [TuneStep("step1", cfg.code_mode, cfg.step2, False)]
    first = TuneStep("step1", "text", cfg.step1, False)
    if cfg.strategy == "text_only":
        return [first]
    return [first, TuneStep("step2", cfg.code_mode, cfg.step2, True)]


# ---- driver ----------------------------------------------------------------------------------
def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.finetune
    steps = plan(cfg)
    index = ctx.read_table(
        "render", "prompts", columns=["sample_id", "split", "valid_small", "mode"]
    )
    have = set(index["mode"].unique().to_pylist())
    for step in steps:
        if step.mode not in have:
            raise StageError(
                f"finetune needs {step.mode} prompts, render wrote only {sorted(have)}",
                ctx.uri(ctx.stage_path("render")),
                f"add {step.mode} to prompts.modes and re-run render",
            )
    train_ids = _subsample(index, pc.equal(index["split"], "train"), cfg.max_train_samples, cfg)
    valid_mask = pc.and_(pc.equal(index["split"], "valid"), index["valid_small"])
    valid_ids = _subsample(index, valid_mask, cfg.max_valid_samples, cfg)
    if len(valid_ids) == 0:
        raise StageError("no valid_small prompts to select the adapter on", "render/prompts")

    if cfg.init_adapter and not Path(cfg.init_adapter, "adapter_config.json").exists():
        raise StageError(
            f"finetune.init_adapter {cfg.init_adapter} holds no saved adapter",
            todo="point it at an adapter folder such as runs/RUN/finetune/adapters/step1",
        )
    storage = ctx.scratch_path("checkpoints")
    prompts = ctx.read_dataset("render", "prompts")
    previous: Checkpoint | None = None
    summary: dict[str, Any] = {}
    evals: list[dict[str, Any]] = []
    for step in steps:
        per_step = step.cfg.batch_size * step.cfg.grad_accum * cfg.num_workers
        if len(train_ids) < per_step:
            raise StageError(
                f"{step.name}: {len(train_ids)} train samples are fewer than one optimizer step "
                f"({per_step} sequences)",
                "render/prompts",
                "lower finetune batch_size/grad_accum/num_workers or use more samples",
            )
        name = f"{step.name}-{ctx.digest}"
        started = time.time()
        result = _trainer(
            ctx,
            cfg,
            step,
            name,
            storage,
            prompts,
            train_ids,
            valid_ids,
            previous if step.from_previous else None,
        ).fit()
        state, adapter = _collect(ctx, result.checkpoint, step.name)
        previous = result.checkpoint
        evals += [{"step_name": step.name, **e} for e in state["evals"]]
        summary[step.name] = _step_summary(step, state, len(train_ids), len(valid_ids))
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
    }


EVALS_SCHEMA = pa.schema(
    [
        ("step_name", pa.string()),
        ("step", pa.int64()),
        ("auc", pa.float64()),
        ("uauc", pa.float64()),
        ("train_loss", pa.float64()),
        ("lr", pa.float64()),
    ]
)


def _subsample(index: pa.Table, mask: pa.Array, limit: int, cfg: FinetuneConfig) -> np.ndarray:
    """Sorted sample ids under ``mask``; a seeded random ``limit`` of them when limit > 0."""
    ids = np.unique(index.filter(mask)["sample_id"].to_numpy())
    if 0 < limit < len(ids):
        ids = np.sort(np.random.default_rng(cfg.seed).choice(ids, size=limit, replace=False))
    return ids


def _rows(prompts: ray.data.Dataset, mode: str, ids: np.ndarray) -> ray.data.Dataset:
    keep = pa.array(ids, pa.int64())

    def select(batch: pa.Table) -> pa.Table:
        mask = pc.and_(pc.equal(batch["mode"], mode), pc.is_in(batch["sample_id"], keep))
        return batch.filter(mask).select(["sample_id", *EVAL_COLUMNS])

    return prompts.map_batches(select, batch_format="pyarrow").materialize()


def _trainer(
    ctx: StageContext,
    cfg: FinetuneConfig,
    step: TuneStep,
    name: str,
    storage: str,
    prompts: ray.data.Dataset,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    init: Checkpoint | None,
) -> TorchTrainer:
    train = _rows(prompts, step.mode, train_ids).random_shuffle(seed=cfg.seed).materialize()
    valid = _rows(prompts, step.mode, valid_ids)
    fail_at = int(os.environ.get(FAIL_ENV, "0") or 0)
    loop_config = {
        "finetune": cfg,
        "step": step.cfg,
        "model": ctx.cfg.model,
        "n_train": len(train_ids),
        "init": init,
        "init_adapter": "" if init is not None or step.name != "step1" else cfg.init_adapter,
        "fail_at_step": fail_at,
        "fail_marker": os.path.join(storage, "fault-injected") if fail_at else "",
    }
    return TorchTrainer(
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
        datasets={"train": train, "valid": valid},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def _resources(cfg: FinetuneConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


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
        "best_valid_auc": state["best"],
        "best_valid_uauc": best.get("uauc"),
        "sequences": state["sequences"],
        "tokens": state["tokens"],
        "train_seconds": round(state["train_seconds"], 2),
        "sequences_per_s": round(state["sequences"] / seconds, 3),
        "tokens_per_s": round(state["tokens"] / seconds, 1),
        "peak_rss_mb_rank0": state.get("peak_rss_mb"),
        "restarts": state.get("restarts", 0),
    }


# ---- workers ---------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """One tuning step on a Ray Train worker: resume or start, train, evaluate, checkpoint."""
    ft: FinetuneConfig = config["finetune"]
    step_cfg: TuneStepConfig = config["step"]
    model_cfg: ModelConfig = config["model"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(ft.seed)
    backbone = load_backbone(model_cfg, device)
    workdir = Path(tempfile.mkdtemp(prefix="binllm-ft-"))
    best_dir = workdir / "best"
    state = _fresh_state(planned_steps(step_cfg, config["n_train"], world))
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            model = attach_lora(backbone.model, ft, os.path.join(folder, "adapter"))
            optimizer = make_optimizer(model, ft.weight_decay)
            optimizer.load_state_dict(torch.load(Path(folder, "optimizer.pt")))
            state = json.loads(Path(folder, STATE).read_text())
            state["restarts"] = state.get("restarts", 0) + 1
            shutil.copytree(Path(folder, "best"), best_dir)
    elif config["init"] is not None:
        with config["init"].as_directory() as folder:
            model = attach_lora(backbone.model, ft, os.path.join(folder, "best"))
        optimizer = make_optimizer(model, ft.weight_decay)
    elif config["init_adapter"]:
        model = attach_lora(backbone.model, ft, config["init_adapter"])
        optimizer = make_optimizer(model, ft.weight_decay)
    else:
        model = attach_lora(backbone.model, ft)
        optimizer = make_optimizer(model, ft.weight_decay)
    torch.manual_seed(ft.seed + rank + 1000 * state["step"])
    ddp = ray.train.torch.prepare_model(model)
    stopper = EarlyStopping(ft.patience, state["best"], state["best_step"], state["bad_evals"])
    schedule = Schedule.of(step_cfg, state["planned_steps"])
    valid = _eval_slice(rank, world)
    stream = _micro_batches(step_cfg.batch_size, ft.seed + rank)
    # Counters since this (re)start; rank 0 carries the totals from the checkpoint.
    carried = {k: state[k] if rank == 0 else 0 for k in ("sequences", "tokens")}
    local = {"sequences": 0, "tokens": 0}
    loss_sum, loss_n = 0.0, 0
    done = state["finished"]
    step = state["step"]
    reported = False
    while not done:
        started = time.perf_counter()
        lr = schedule.lr_at(step)
        set_lr(optimizer, lr)
        for micro in range(step_cfg.grad_accum):
            prompts, labels = next(stream)
            batch = collate(backbone.tokenizer, prompts, labels, ft.max_length).to(device)
            last = micro == step_cfg.grad_accum - 1
            sync = nullcontext() if last or world == 1 else ddp.no_sync()
            with sync:
                loss_sum += backward(ddp, batch, backbone.answer, step_cfg.grad_accum)
            loss_n += 1
            local["sequences"] += len(prompts)
            local["tokens"] += batch.n_tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state["train_seconds"] += time.perf_counter() - started
        _maybe_fail(config, rank, step)
        if step % ft.eval_every and step < state["planned_steps"]:
            continue
        metrics = _evaluate(backbone, model, valid, ft, world, device)
        if stopper.update(metrics["auc"], step) and rank == 0:
            shutil.rmtree(best_dir, ignore_errors=True)
            model.save_pretrained(best_dir)
        totals = _all_sum(
            [carried["sequences"] + local["sequences"], carried["tokens"] + local["tokens"]], device
        )
        record = {"step": step, **metrics, "train_loss": loss_sum / max(loss_n, 1), "lr": lr}
        loss_sum, loss_n = 0.0, 0
        done = stopper.stop or step >= state["planned_steps"]
        state.update(
            step=step,
            finished=done,
            evals=[*state["evals"], record],
            sequences=int(totals[0]),
            tokens=int(totals[1]),
            peak_rss_mb=_peak_rss_mb(),
            **stopper.state(),
        )
        _report(state, record, model, optimizer, best_dir, workdir, rank)
        reported = True
    if not reported:
        # Resumed a step that had finished: report again so this run's result has a checkpoint.
        _report(state, state["evals"][-1], model, optimizer, best_dir, workdir, rank)
    shutil.rmtree(workdir, ignore_errors=True)


def _fresh_state(planned: int) -> dict[str, Any]:
    return {
        "step": 0,
        "planned_steps": planned,
        "finished": False,
        "evals": [],
        "best": float("-inf"),
        "best_step": -1,
        "bad_evals": 0,
        "sequences": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "restarts": 0,
    }


def _micro_batches(batch_size: int, seed: int) -> Iterator[tuple[list[str], list[int]]]:
    """Endless micro-batches of this worker's train shard, a new local shuffle each epoch.
    Shards are equal-sized, so every worker turns the epoch at the same step."""
    shard = ray.train.get_dataset_shard("train")
    epoch = 0
    while True:
        got = False
        for batch in shard.iter_batches(
            batch_size=batch_size,
            drop_last=True,
            batch_format="pyarrow",
            local_shuffle_buffer_size=batch_size * 8,
            local_shuffle_seed=seed + epoch,
        ):
            got = True
            yield batch["prompt"].to_pylist(), batch["label"].to_pylist()
        if not got:
            raise RuntimeError("this worker's train shard holds less than one batch")
        epoch += 1


def _eval_slice(rank: int, world: int) -> EvalSet:
    """This worker's share (every ``world``-th row) of the whole ``valid`` dataset."""
    rows = pa.concat_tables(
        list(ray.train.get_dataset_shard("valid").iter_batches(batch_format="pyarrow"))
    )
    rows = rows.sort_by("sample_id")
    take = pa.array(range(rank, rows.num_rows, world), pa.int64())
    part = rows.take(take)
    return EvalSet(part["prompt"].to_pylist(), part["label"].to_pylist(), part["uid"].to_pylist())


def _evaluate(
    backbone: Any, model: Any, valid: EvalSet, ft: FinetuneConfig, world: int, device: Any
) -> dict[str, float]:
    scores = score_prompts(backbone, valid.prompts, ft.eval_batch_size, ft.max_length, model=model)
    mine = (scores.tolist(), valid.labels, valid.uids)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    whole = EvalSet([], [y for p in parts for y in p[1]], [u for p in parts for u in p[2]])
    return whole.metrics([s for p in parts for s in p[0]])


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


def _report(
    state: dict[str, Any],
    record: dict[str, Any],
    model: Any,
    optimizer: torch.optim.Optimizer,
    best_dir: Path,
    workdir: Path,
    rank: int,
) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if rank != 0:
        ray.train.report(metrics)
        return
    folder = workdir / f"ckpt-{state['step']}"
    model.save_pretrained(folder / "adapter")
    if not best_dir.exists():  # no valid AUC yet (one class only): the current adapter stands in
        model.save_pretrained(best_dir)
    shutil.copytree(best_dir, folder / "best")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / STATE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
    shutil.rmtree(folder, ignore_errors=True)


def _maybe_fail(config: dict[str, Any], rank: int, step: int) -> None:
    marker = config["fail_marker"]
    if rank != 0 or step != config["fail_at_step"] or not marker or os.path.exists(marker):
        return
    Path(marker).write_text(f"failed once at step {step}\n")
    raise RuntimeError(f"{FAIL_ENV}: injected worker failure at step {step}")
