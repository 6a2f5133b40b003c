"""Stages ``encode`` and ``encode_retrieval``: train a binarized collaborative encoder with Ray
Train (``encoder``: the prompts' codes; ``retrieval_encoder``: the codes ``retrieve`` ranks by,
where a run sets it), export its codes.

Tables: ``codes`` (bits and their text formats per user and item, :func:`codes_table`) and
``embeddings`` (per user and item the ``relaxed`` vector tanh(proj(e)) the codes are the signs
of, and the ``float`` baseline's embedding; :func:`embeddings_table`): each model's weights at
its own best valid score (kept in every checkpoint, read from the last one).

A ``TorchTrainer`` runs :func:`train_loop` on ``encoder.num_workers`` workers (DDP; gloo on CPU).
The ``samples`` table feeds it as Ray datasets: ``train`` is split across the workers, ``valid``
and ``test`` (and, for a backbone that ``needs_graph`` such as LightGCN, the ``graph`` of train
positives) reach every worker whole, so each worker computes the same validation AUC and the
workers stop together.

Rank 0 reports a checkpoint whenever the binary valid AUC improves, every
``encoder.checkpoint_every`` epochs and at the end (each report costs Ray Train about 2 s, so not
every epoch). A checkpoint (``model.safetensors``, ``kept.safetensors``: each model's best weights
so far, ``optimizer.safetensors``, ``state.json``)
lands in ``{stage folder}/checkpoints/encoder-{stage hash}``: the hash covers the encoder
config (resource fields aside) and the identity of the samples it trains on, so only a re-run on
the same samples resumes it, and ``--force`` removes it. Ray keeps the checkpoint with the best
valid AUC of the primary model and the latest one. A worker that dies is replaced up to
``encoder.max_failures`` times and training goes on from the latest checkpoint; running the stage
again after a crash (same config, same samples) resumes the same way, and a finished run is not
trained again. The codes come from the binary model's kept weights, the ``float`` embeddings from
the float model's.

Test-only fault point ``BINLLM_TEST_FAULT=encode-epoch@N`` (:mod:`binllm_core.io.faults`): rank 0
exits its process at the start of epoch ``N`` (0-based), once per run: the marker file
``_fault_injected`` in the run's checkpoint folder records that it happened, so the replacement
worker, or a re-run, goes on.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, ScalingConfig

from binllm_core.codes import codes_table, embeddings_table, signs_from_bits
from binllm_core.config import EncoderConfig, to_dict
from binllm_core.encoder.data import Rows, train_graph
from binllm_core.encoder.objectives import AUC, NDCG
from binllm_core.encoder.training import (
    EncoderTraining,
    check_config,
    epoch_limit,
    needs_graph,
    needs_seen,
    read_state,
)
from binllm_core.errors import StageError
from binllm_core.evaluation.metrics import score_report
from binllm_core.io.faults import armed
from binllm_core.storage import is_local, join, jsonable, resolve
from pipelines.runtime.progress import Reporter, progress
from pipelines.runtime.stage import StageContext
from pipelines.runtime.training import InterruptibleTrainer

SERVED_LABELS = {AUC: "AUC", NDCG: "NDCG@10"}
FAULT_POINT = "encode-epoch"
FAULT_MARKER = "_fault_injected"
_SAMPLES_READ = ["sample_id", "uid", "iid", "label", "split", "warm", "not_cold"]
EVAL_COLUMNS = ["sample_id", "uid", "iid", "label", "warm", "not_cold"]


def run(ctx: StageContext) -> dict[str, Any]:
    """Stage ``encode``: the prompts' codes (``encoder``)."""
    return train_and_export(ctx, ctx.cfg.encoder)


def run_retrieval(ctx: StageContext) -> dict[str, Any]:
    """Stage ``encode_retrieval``: the codes ``retrieve`` ranks by (``retrieval_encoder``)."""
    assert ctx.cfg.retrieval_encoder is not None  # the stage is needed only then
    return train_and_export(ctx, ctx.cfg.retrieval_encoder)


def train_and_export(ctx: StageContext, cfg: EncoderConfig) -> dict[str, Any]:
    """Train the encoder ``cfg`` on the run's samples; write its ``codes`` and ``embeddings``
    into this stage's output."""
    check_config(cfg)
    samples_manifest = ctx.manifest_of("samples")
    user_num = int(samples_manifest["metrics"]["user_num"])
    item_num = int(samples_manifest["metrics"]["item_num"])
    datasets = _datasets(ctx, cfg)
    for split in ("train", "valid"):
        if datasets[split].count() == 0:
            raise StageError(
                f"the {split} split of the samples is empty",
                ctx.uri(ctx.stage_path("samples")),
                "check the protocol's split settings",
            )

    name = f"encoder-{ctx.digest}"
    storage = ctx.scratch_path("checkpoints")
    started = time.time()
    with progress(ctx.stage, epoch_limit(cfg), "epoch", _describe_epoch) as reporter:
        trainer = _trainer(ctx, cfg, datasets, name, storage, user_num, item_num, reporter)
        result = trainer.fit()
    train_time = time.time() - started
    if not result.best_checkpoints or result.checkpoint is None:
        raise StageError("encoder training reported no checkpoint", ctx.uri(join(storage, name)))
    best_checkpoint, best_metrics = max(
        result.best_checkpoints, key=lambda cm: (cm[1]["valid_score"], -cm[1]["epoch"])
    )

    graph = train_graph(_rows(datasets["graph"])) if needs_graph(cfg) else None
    seen = _rows(datasets["seen"]) if "seen" in datasets else None
    training = EncoderTraining(cfg, user_num, item_num, graph, seen=seen)
    with result.checkpoint.as_directory() as folder:  # the last: every model's best is kept
        training.load(folder, weights_only=True)
        state = read_state(folder)
    training.restore_kept()
    codes = codes_table(*training.signs())
    ctx.write_table(codes, "codes")
    ctx.write_table(embeddings_table(training.vectors()), "embeddings")

    continuous = state["best"]["continuous"]
    return jsonable(
        {
            "user_num": user_num,
            "item_num": item_num,
            "dim": cfg.dim,
            "bits": cfg.code_bits,
            "backbone": cfg.backbone,
            "objective": cfg.objective,
            "selected_by": training.objective.serves,
            "codes_from": training.primary,
            "codes": {
                "valid": code_report(codes, _rows(datasets["valid"])),
                "test": code_report(codes, _rows(datasets["test"])),
                "best_epoch": int(best_metrics["epoch"]),
                # 0 side by side; with float_first, the epoch after the float model's last
                "started_at_epoch": state.get("codes_start", 0),
            },
            "continuous": {
                "valid": continuous["valid"],
                "test": continuous["test"],
                "best_epoch": continuous["epoch"],
            },
            "epochs_run": state["epoch"] + 1,
            "best_epoch": int(best_metrics["epoch"]),
            "resumed_at": state["resumed_at"],
            "train_time_s": round(train_time, 3),
            "epoch_train_time_s": round(sum(h["seconds"] for h in state["history"]), 3),
            "num_workers": cfg.num_workers,
            "use_gpu": cfg.use_gpu,
            "checkpoint": _run_relative(ctx, best_checkpoint.path),
        }
    )


def _rows(ds: ray.data.Dataset) -> Rows:
    """One of the materialized split datasets as :class:`Rows` in ``sample_id`` order (only
    that split's narrow columns reach this process)."""
    blocks = [t for t in ray.get(ds.to_arrow_refs()) if t.num_columns]
    table = pa.concat_tables(blocks) if blocks else ds.schema().base_schema.empty_table()
    return Rows.from_arrow(table.sort_by("sample_id"))


def _describe_epoch(fields: dict[str, Any]) -> str:
    text = f"loss {fields['loss']:.4f}" if "loss" in fields else ""
    if fields.get("valid") is not None:
        text += f", valid {fields['metric']} {fields['valid']:.4f}"
    if fields.get("best") is not None:
        text += f" (best {fields['best']:.4f})"
    return text


def _run_relative(ctx: StageContext, path: str) -> str:
    """A checkpoint path as the manifest records it: relative to the run folder."""
    _, plain = resolve(path, ctx.cfg.output_storage_options) if "://" in path else (None, path)
    return ctx.relative(plain)


def code_report(codes: pa.Table, rows: Rows) -> dict[str, float]:
    """AUC/UAUC (overall, warm, cold) of code inner products, from the ``codes`` table alone."""
    tables = {}
    for entity in ("user", "item"):
        part = codes.filter(pc.equal(codes["entity"], entity))
        ids = part["id"].to_numpy()
        bits = np.array(part["bits"].combine_chunks().flatten().to_numpy()).reshape(len(ids), -1)
        table = np.zeros((ids.max() + 1 if len(ids) else 1, bits.shape[1]), np.float32)
        table[ids] = signs_from_bits(bits)
        tables[entity] = table
    users, items = tables["user"], tables["item"]
    scores = (users[rows.users] * items[rows.items]).sum(-1)
    return score_report(rows.users, rows.labels, scores, rows.warm, rows.not_cold)


def _datasets(ctx: StageContext, cfg: EncoderConfig) -> dict[str, ray.data.Dataset]:
    """The samples the workers read, by split (and, for a backbone that ``needs_graph``, the
    ``graph`` of train positives; for an implicit objective, ``seen``: the whole train split,
    unsplit), materialized now: before the workers hold their CPUs (on a
    small machine they can take every CPU and leave none for read tasks). These narrow columns
    are small."""
    samples = ctx.read_dataset("samples", "samples").select_columns(_SAMPLES_READ)
    datasets = {
        "train": samples.filter(expr="split == 'train'").select_columns(EVAL_COLUMNS[:4]),
        "valid": samples.filter(expr="split == 'valid'").select_columns(EVAL_COLUMNS),
        "test": samples.filter(expr="split == 'test'").select_columns(EVAL_COLUMNS),
    }
    if needs_graph(cfg):
        positives = samples.filter(expr="split == 'train' and label == 1")
        datasets["graph"] = positives.select_columns(EVAL_COLUMNS[:4])
    if needs_seen(cfg):  # every worker draws negatives around all of train, not its shard
        datasets["seen"] = datasets["train"]
    return {k: ds.materialize() for k, ds in datasets.items()}


def _trainer(
    ctx: StageContext,
    cfg: EncoderConfig,
    datasets: dict[str, ray.data.Dataset],
    name: str,
    storage: str,
    user_num: int,
    item_num: int,
    reporter: Reporter,
) -> ray.train.torch.TorchTrainer:
    loop_config = {
        "encoder": to_dict(cfg),
        "user_num": user_num,
        "item_num": item_num,
        "progress": reporter,
        "fault": armed(
            FAULT_POINT,
            ctx.uri(join(storage, name, FAULT_MARKER)),
            ctx.cfg.output_storage_options,
        ),
    }
    local = is_local(ctx.fs)
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        storage_filesystem=None if local else ctx.arrow_fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="valid_score", checkpoint_score_order="max"
        ),
    )
    return InterruptibleTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=run_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load its data, resume if a checkpoint exists, train to the end."""
    cfg = EncoderConfig(**config["encoder"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = _shard_rows("train")
    valid, test = _shard_rows("valid"), _shard_rows("test")
    graph = train_graph(_shard_rows("graph")) if needs_graph(cfg) else None
    seen = _shard_rows("seen") if needs_seen(cfg) else None
    training = EncoderTraining(
        cfg, config["user_num"], config["item_num"], graph, ray.train.torch.get_device(), seen
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            training.load(folder)
        if training.finished:
            return
        training.resumed_at.append(training.epoch + 1)
    # With float_first, a step trains one of the two models: DDP must expect unused weights.
    training.forward_module = ray.train.torch.prepare_model(
        training.models, parallel_strategy_kwargs={"find_unused_parameters": cfg.float_first}
    )
    while not training.finished:
        if rank == 0 and config["fault"] is not None:
            config["fault"].reached(training.epoch + 1)
        loss = training.train_epoch(train, rank, world)
        improved = training.validate(valid, test)
        if rank == 0:
            _post_epoch(config["progress"], training, loss)
        periodic = (training.epoch + 1) % cfg.checkpoint_every == 0
        if not _agree(improved or periodic or training.finished, world):
            continue
        auc, score = training.valid_auc, training.valid_score
        metrics = {
            "epoch": training.epoch,
            "loss": loss,
            "beta": training.history[-1]["beta"],
            "valid_auc": auc if auc is not None and not math.isnan(auc) else 0.0,
            "valid_score": score if score is not None and not math.isnan(score) else 0.0,
        }
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                training.save(folder)
            report_checkpoint = Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report(metrics, checkpoint=report_checkpoint)
    if rank == 0:
        config["progress"].flush()


def _post_epoch(reporter: Reporter, training: EncoderTraining, loss: float) -> None:
    """The epoch's valid figure that the kept checkpoint is chosen by (AUC or NDCG@10)."""
    served = training.objective.serves
    score = training.valid_score
    best = training.best.get(training.primary, {}).get("valid", {}).get(served)
    reporter.post(
        done=training.epoch + 1,
        loss=loss,
        metric=SERVED_LABELS[served],
        valid=None if score is None or math.isnan(score) else score,
        best=None if best is None or math.isnan(best) else best,
    )


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision on every rank: ``ray.train.report`` must be called by all or none."""
    if world == 1:
        return flag
    value = torch.tensor([1 if flag else 0])
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


def _shard_rows(name: str) -> Rows:
    """This worker's part of a dataset as rows in ``sample_id`` order (a fixed order, whatever
    order the blocks arrive in, so that a seed fixes the run)."""
    batches = list(ray.train.get_dataset_shard(name).iter_batches(batch_format="pyarrow"))
    if not batches:
        return Rows.from_arrow(pa.table({c: pa.array([], pa.int64()) for c in EVAL_COLUMNS[:4]}))
    return Rows.from_arrow(pa.concat_tables(batches).sort_by("sample_id"))
