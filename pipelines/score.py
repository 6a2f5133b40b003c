"""Stage ``score`` (Ray Data) and scoring of arbitrary candidates (``binllm score``/``nightly``).

Scoring runs :class:`PromptScorer` in ``map_batches`` on a fixed actor pool
(``ActorPoolStrategy(size=score.num_actors)``, ``score.num_gpus`` per actor). Each actor loads the
backbone and the adapter once, merges the LoRA weights into the base (``merge_and_unload``) and
scores under ``torch.inference_mode``. It takes ``batch_size * sort_window`` prompts at a time,
orders them by token length so each forward pass of ``batch_size`` pads little, and puts the
scores back in row order. A dead actor is restarted (``score.max_restarts``) and the batches it
had not finished are retried on it, so every input row comes out exactly once.

Outputs:

* stage ``score``: ``{run}/score/scores/`` — one row per scored sample and mode: sample_id, split,
  mode, uid, iid, label, warm, not_cold, n_tokens, logit_yes, p_yes and the lineage columns.
* candidates (:func:`score_candidates`): any table of (user, item) source ids -> the same score
  and lineage columns plus user, item, row (input position) and ``cold``.
* nightly (:func:`run_nightly`): candidates -> ``{run}/scores/date=YYYY-MM-DD/`` with its own
  ``_manifest.json``; the partition is built in a staging folder and swapped in whole.

Lineage columns on every row: ``model`` (backbone), ``adapter`` (URI, or ``none``),
``adapter_hash`` (16 hex of SHA-256 over the adapter files, ``none`` without one), ``run_name``,
``scored_at`` (UTC start of the scoring call).

Test-only fault switch: ``BINLLM_TEST_KILL_SCORER_AT_BATCH=N`` in the environment of the process
that starts scoring makes an actor exit its process (``os._exit(1)``) at its N-th batch, once per
scoring call (a marker file in the temp folder records that it happened).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from binllm_core.candidates import (
    CANDIDATE_SCHEMA,
    RunLookups,
    build_lookups,
    check_pairs,
    distinct_pairs,
    render_candidates,
    summary,
    with_row_numbers,
)
from binllm_core.config import (
    ModelConfig,
    RunConfig,
    ScoreConfig,
    apply_override,
    build,
    config_hash,
)
from binllm_core.errors import ConfigError, DataError, StageError
from binllm_core.prompts import CODE_MODES, MODES, Templates, templates_from_config
from binllm_core.storage import is_local, join, resolve
from pipelines.stage import MANIFEST, StageContext, package_versions

FAULT_ENV = "BINLLM_TEST_KILL_SCORER_AT_BATCH"
NONE = "none"
LINEAGE = ["model", "adapter", "adapter_hash", "run_name", "scored_at"]
SCORE_FIELDS = [
    ("n_tokens", pa.int32()),
    ("logit_yes", pa.float64()),
    ("p_yes", pa.float64()),
    ("model", pa.string()),
    ("adapter", pa.string()),
    ("adapter_hash", pa.string()),
    ("run_name", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
]
STAGE_INPUT = ["sample_id", "split", "mode", "uid", "iid", "label", "warm", "not_cold", "prompt"]
SCORES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("split", pa.string()),
        ("mode", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("warm", pa.bool_()),
        ("not_cold", pa.bool_()),
        *SCORE_FIELDS,
    ]
)
"""The ``scores`` table of stage ``score``."""
CANDIDATE_SCORES_SCHEMA = pa.schema(
    [f for f in CANDIDATE_SCHEMA if f.name != "prompt"] + SCORE_FIELDS + [("carried", pa.bool_())]
)
"""Scores of candidates (jobs.score, nightly): ``carried`` marks rows taken over from an earlier
nightly partition (same prompt, model and adapter) instead of being scored again."""
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---- the scorer (one per actor) ----------------------------------------------------------------
class PromptScorer:
    """Callable class for ``map_batches``: a ``pyarrow`` batch with ``prompt`` -> the batch
    without ``prompt`` plus the score and lineage columns."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        adapter: str,
        lineage: dict[str, Any],
        batch_size: int,
        max_length: int,
        threads: int = 1,
        use_gpu: bool = False,
        sort_by_length: bool = True,
        storage_options: dict[str, Any] | None = None,
        fault: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from binllm_core.backbone import load_backbone

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.backbone = load_backbone(model_cfg, device)
        self.model = self.backbone.model
        if adapter:
            from peft import PeftModel

            with local_copy(adapter, storage_options) as folder:
                peft_model = PeftModel.from_pretrained(self.model, folder)
            self.model = peft_model.merge_and_unload()
        self.model.eval()
        self.device = torch.device(device)
        self.pad_id = self.backbone.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length
        self.lineage = lineage
        self.fault = fault or {}
        self.calls = 0

    def logits(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``Yes`` logits and token counts of ``prompts``, in their order."""
        import torch

        from binllm_core.backbone import yes_logits

        ids = self.backbone.tokenizer(
            prompts, add_special_tokens=False, truncation=True, max_length=self.max_length
        )["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        order = np.argsort(lengths, kind="stable") if self.sort_by_length else np.arange(len(ids))
        out = np.empty(len(ids), np.float64)
        with torch.inference_mode():
            for start in range(0, len(ids), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = int(lengths[idx].max())
                input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):  # left padding: the answer cue in the last column
                    n = int(lengths[i])
                    input_ids[j, width - n :] = torch.as_tensor(ids[i], dtype=torch.long)
                    mask[j, width - n :] = 1
                logits = yes_logits(
                    self.model,
                    input_ids.to(self.device),
                    mask.to(self.device),
                    self.backbone.yes_id,
                )
                out[idx] = logits.cpu().numpy()
        return out, lengths

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        self._maybe_die()
        logits, lengths = self.logits(batch["prompt"].to_pylist())
        n = batch.num_rows
        out = batch.drop_columns(["prompt"])
        columns = {
            "n_tokens": pa.array(lengths, pa.int32()),
            "logit_yes": pa.array(logits, pa.float64()),
            "p_yes": pa.array(1.0 / (1.0 + np.exp(-logits)), pa.float64()),
            "model": pa.array([self.lineage["model"]] * n, pa.string()),
            "adapter": pa.array([self.lineage["adapter"]] * n, pa.string()),
            "adapter_hash": pa.array([self.lineage["adapter_hash"]] * n, pa.string()),
            "run_name": pa.array([self.lineage["run_name"]] * n, pa.string()),
            "scored_at": pa.array([self.lineage["scored_at"]] * n, pa.timestamp("us", tz="UTC")),
        }
        for name, values in columns.items():
            if name in out.column_names:
                out = out.drop_columns([name])
            out = out.append_column(name, values)
        return out

    def _maybe_die(self) -> None:
        """The test-only fault switch (see the module docstring)."""
        marker = self.fault.get("marker")
        if not marker or self.calls != self.fault.get("at_batch") or os.path.exists(marker):
            return
        with open(marker, "w") as fh:
            fh.write(f"scorer killed at batch {self.calls}\n")
        os._exit(1)


class local_copy:  # noqa: N801 - a context manager used like a function
    """A local folder holding ``uri`` (the folder itself when it is local)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.path = resolve(uri, storage_options)
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        if is_local(self.fs):
            if not self.fs.isdir(self.path):
                raise ConfigError(f"adapter folder {self.path} is not there")
            return self.fs._strip_protocol(self.path)
        self.tmp = tempfile.TemporaryDirectory(prefix="binllm-adapter-")
        self.fs.get(self.path.rstrip("/") + "/", self.tmp.name, recursive=True)
        return self.tmp.name

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def adapter_hash(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """16 hex of SHA-256 over the adapter's files (names and bytes); ``none`` without one."""
    if not uri:
        return NONE
    fs, path = resolve(uri, storage_options)
    if not fs.isdir(path):
        raise ConfigError(f"adapter folder {uri} is not there", todo="check score.adapters")
    digest = hashlib.sha256()
    for f in sorted(fs.find(path)):
        name = f[len(path.rstrip("/")) + 1 :]
        if name.endswith((".safetensors", ".json", ".bin")):
            digest.update(name.encode())
            digest.update(fs.cat_file(f))
    return digest.hexdigest()[:16]


def score_dataset(
    ds: ray.data.Dataset,
    cfg: RunConfig,
    adapter: str,
    scored_at: dt.datetime,
    sort_by_length: bool = True,
    num_actors: int | None = None,
) -> ray.data.Dataset:
    """``ds`` (with a ``prompt`` column) scored on an actor pool; lazy, call ``materialize``."""
    lineage = {
        "model": model_id(cfg.model),
        "adapter": adapter or NONE,
        "adapter_hash": adapter_hash(adapter, cfg.output_storage_options),
        "run_name": cfg.run_name,
        "scored_at": scored_at,
    }
    at_batch = int(os.environ.get(FAULT_ENV, "0") or 0)
    fault = None
    if at_batch:
        marker = os.path.join(tempfile.gettempdir(), f"binllm-scorer-fault-{uuid.uuid4().hex}")
        fault = {"at_batch": at_batch, "marker": marker}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet and flags **ray_remote_args as
        # deprecated; without them the pool restarts actors without bound (Ray Data's default).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return _map_scorer(ds, cfg, adapter, lineage, sort_by_length, fault, num_actors)


def _map_scorer(
    ds: ray.data.Dataset,
    cfg: RunConfig,
    adapter: str,
    lineage: dict[str, Any],
    sort_by_length: bool,
    fault: dict[str, Any] | None,
    num_actors: int | None,
) -> ray.data.Dataset:
    sc = cfg.score
    return ds.map_batches(
        PromptScorer,
        fn_constructor_kwargs={
            "model_cfg": cfg.model,
            "adapter": adapter,
            "lineage": lineage,
            "batch_size": sc.batch_size,
            "max_length": sc.max_length,
            "threads": int(max(1, sc.cpus_per_actor)),
            "use_gpu": sc.num_gpus > 0,
            "sort_by_length": sort_by_length,
            "storage_options": cfg.output_storage_options,
            "fault": fault,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors or sc.num_actors),
        batch_size=sc.batch_size * max(1, sc.sort_window),
        batch_format="pyarrow",
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.num_gpus,
        max_restarts=sc.max_restarts,
        max_task_retries=sc.max_restarts,
    )


def model_id(cfg: ModelConfig) -> str:
    return f"{cfg.backbone}/{cfg.gguf_file}" if cfg.gguf_file else cfg.backbone


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# ---- which adapter scores which mode -----------------------------------------------------------
def adapter_plan(cfg: RunConfig, modes: list[str], finetune: Mapping[str, Any] | None) -> dict:
    """``{mode: adapter URI ('' = bare backbone)}``: ``score.adapters`` first, else the last
    finetune step trained on the mode, else the final adapter."""
    plan = {}
    steps = (finetune or {}).get("steps", {})
    for mode in modes:
        choice = cfg.score.adapters.get(mode, "")
        if choice == NONE:
            plan[mode] = ""
            continue
        if choice and choice not in steps:
            plan[mode] = choice  # a folder or URI of its own
            continue
        if finetune is None:
            raise StageError(
                f"scoring {mode} prompts needs a finetuned adapter, and finetune has not finished",
                todo=f"run the finetune stage, or set score.adapters.{mode}=none or a folder",
            )
        if choice:
            plan[mode] = steps[choice]["adapter"]
            continue
        trained = [s for s in steps.values() if s.get("mode") == mode]
        plan[mode] = trained[-1]["adapter"] if trained else finetune["final_adapter"]
    return plan


def default_modes(cfg: RunConfig, finetune: Mapping[str, Any] | None) -> list[str]:
    if cfg.score.modes:
        bad = [m for m in cfg.score.modes if m not in MODES]
        if bad:
            raise ConfigError(f"score.modes has {bad[0]}", todo=f"choose among {', '.join(MODES)}")
        return list(cfg.score.modes)
    if finetune is None:
        return list(cfg.prompts.modes)
    return list(dict.fromkeys(s["mode"] for s in finetune.get("steps", {}).values()))


def candidate_mode(cfg: RunConfig) -> str:
    mode = cfg.score.candidate_mode or (
        "text" if cfg.finetune.strategy == "text_only" else cfg.finetune.code_mode
    )
    if mode not in MODES:
        raise ConfigError(f"score.candidate_mode {mode} is not one of {', '.join(MODES)}")
    return mode


# ---- stage ``score`` ---------------------------------------------------------------------------
def run(ctx: StageContext) -> dict[str, Any]:
    cfg, sc = ctx.cfg, ctx.cfg.score
    finetune = ctx.manifest_of("finetune")["metrics"]
    modes = default_modes(cfg, finetune)
    plan = adapter_plan(cfg, modes, finetune)
    index = ctx.read_table("render", "prompts", columns=["sample_id", "split", "mode"])
    have = set(index["mode"].unique().to_pylist())
    for mode in modes:
        if mode not in have:
            raise StageError(
                f"score needs {mode} prompts, render wrote only {sorted(have)}",
                ctx.uri(ctx.stage_path("render")),
                f"add {mode} to prompts.modes or drop it from score.modes",
            )
    ids = pick_samples(index, sc)
    if len(ids) == 0:
        raise StageError(
            f"no prompts in the splits {sc.splits} to score", ctx.uri(ctx.stage_path("render"))
        )
    prompts = ctx.read_dataset("render", "prompts")
    scored_at = _now()
    parts, per_mode = [], {}
    for mode, adapter in plan.items():
        started = time.time()
        part = score_dataset(_select(prompts, mode, ids), cfg, adapter, scored_at).materialize()
        seconds = time.time() - started
        rows = part.count()
        per_mode[mode] = {
            "adapter": adapter or NONE,
            "rows": rows,
            "wall_time_s": round(seconds, 2),
            "prompts_per_s": round(rows / max(seconds, 1e-9), 3),
        }
        parts.append(part)
    scores = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ctx.write_dataset(scores, "scores")
    return {
        "modes": per_mode,
        "splits": list(sc.splits),
        "samples": int(len(ids)),
        "max_rows": sc.max_rows,
        "model": model_id(cfg.model),
        "num_actors": sc.num_actors,
        "num_gpus_per_actor": sc.num_gpus,
        "batch_size": sc.batch_size,
        "scored_at": scored_at.isoformat(),
    }


def pick_samples(index: pa.Table, sc: ScoreConfig) -> np.ndarray:
    """Sorted sample ids of ``sc.splits``; a seeded random ``max_rows`` of each split."""
    chosen = []
    for split in sc.splits:
        ids = np.unique(index.filter(pc.equal(index["split"], split))["sample_id"].to_numpy())
        if 0 < sc.max_rows < len(ids):
            ids = np.random.default_rng(sc.seed).choice(ids, size=sc.max_rows, replace=False)
        chosen.append(ids)
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], np.int64)


def _select(prompts: ray.data.Dataset, mode: str, ids: np.ndarray) -> ray.data.Dataset:
    keep = pa.array(ids, pa.int64())

    def select(batch: pa.Table) -> pa.Table:
        mask = pc.and_(pc.equal(batch["mode"], mode), pc.is_in(batch["sample_id"], keep))
        return batch.filter(mask).select(STAGE_INPUT)

    return prompts.map_batches(select, batch_format="pyarrow")


# ---- a trained run, from its config or its folder ----------------------------------------------
RUN_STAGES = ("ingest", "samples", "encode", "render", "finetune", "score")


def open_run(ref: str, overrides: list[str] | None = None) -> RunConfig:
    """The config of a trained run: a YAML config file, or a run folder (local or a URI) whose
    stage manifests hold the config sections they ran with (``--set`` overrides either)."""
    from binllm_core.config import load_config

    if ref.endswith((".yaml", ".yml")):
        return load_config(ref, overrides)
    fs, path = resolve(ref)
    path = path.rstrip("/")
    if not fs.exists(join(path, "render", MANIFEST)):
        raise ConfigError(
            f"{ref} is neither a YAML config nor a run folder with a finished render stage",
            todo="give configs/NAME.yaml or {output_root}/{run_name}",
        )
    raw: dict[str, Any] = {}
    for stage in RUN_STAGES:
        manifest_path = join(path, stage, MANIFEST)
        if fs.exists(manifest_path):
            raw.update(json.loads(fs.cat_file(manifest_path)).get("config", {}))
    parent, _, name = path.rpartition("/")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    root = parent if is_local(fs) else f"{protocol}://{parent}"
    raw.update(run_name=name, output_root=root or ".")
    for item in overrides or []:
        apply_override(raw, item)
    return build(RunConfig, raw, ref)


def load_lookups(ctx: StageContext, mode: str) -> RunLookups:
    """Titles, id maps, histories and codes of the run (read once, on the driver)."""
    codes = None
    if mode in CODE_MODES:
        codes = ctx.read_table(
            "encode", "codes", columns=["entity", "id", "code_binary", "code_dotdec"]
        )
    return build_lookups(
        ctx.read_table("ingest", "items", columns=["item", "title"]),
        ctx.read_table("samples", "user_map", columns=["user", "uid"]),
        ctx.read_table("samples", "item_map", columns=["item", "iid"]),
        codes,
        ctx.read_table(
            "samples", "samples", columns=["sample_id", "uid", "iid", "label", "timestamp"]
        ),
        ctx.cfg.prompts.history_len,
    )


def read_pairs(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A candidates table (Parquet file or folder of them) with ``user``/``item`` columns."""
    fs, path = resolve(uri, storage_options)
    if not fs.exists(path):
        raise DataError(f"candidates {uri} not found", todo="give a Parquet file or folder")
    files = (
        [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    )
    if not files:
        raise DataError(f"no Parquet files under {uri}")
    tables = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh))
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot read {f} as Parquet ({err})".split("\n")[0]) from None
    return check_pairs(pa.concat_tables(tables, promote_options="default"), uri)


def _render(batch: pa.Table, **kwargs: Any) -> pa.Table:
    return render_candidates(batch, **kwargs)


def score_pairs(
    cfg: RunConfig,
    pairs: pa.Table,
    where: str,
    carry: pl.DataFrame | None = None,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Render and score (user, item) pairs with a trained run; the scored dataset (materialized,
    :data:`CANDIDATE_SCORES_SCHEMA`) and counts. ``carry`` holds earlier scores (prompt_hash,
    adapter_hash, model, n_tokens, logit_yes, p_yes, scored_at): rows whose prompt, model and
    adapter match one of them take that score instead of being scored again."""
    from pipelines.runtime import ensure_ray

    ensure_ray()
    ctx = StageContext.open(cfg, "score")
    mode = candidate_mode(cfg)
    finetune = _manifest_or_none(ctx, "finetune")
    plan = adapter_plan(cfg, list(dict.fromkeys([mode, "text"])), finetune)
    lookups = load_lookups(ctx, mode)
    templates: Templates = templates_from_config(cfg.prompts)
    pairs = with_row_numbers(pairs)
    started = time.time()
    rendered = (
        ray.data.from_arrow(pairs)
        .map_batches(
            _render,
            fn_kwargs={
                "lookups": lookups,
                "templates": templates,
                "mode": mode,
                "unknown": cfg.score.unknown,
                "history_len": cfg.prompts.history_len,
                "where": where,
            },
            batch_format="pyarrow",
            batch_size=4096,
        )
        .materialize()
    )
    meta = _to_arrow(
        rendered.drop_columns(["prompt"]),
        CANDIDATE_SCHEMA.remove(CANDIDATE_SCHEMA.get_field_index("prompt")),
    )
    stats = summary(meta, pairs.num_rows)
    scored_at = _now()
    model = model_id(cfg.model)
    hashes = {m: adapter_hash(a, cfg.output_storage_options) for m, a in plan.items()}

    carried = _carried(meta, carry, model, hashes) if carry is not None else None
    carried_rows = (
        carried["row"] if carried is not None and carried.num_rows else pa.array([], pa.int64())
    )
    parts = []
    per_mode = {}
    for m in dict.fromkeys(meta["mode"].to_pylist()):
        subset = rendered.map_batches(
            _rows_of_mode, fn_kwargs={"mode": m, "skip": carried_rows}, batch_format="pyarrow"
        ).materialize()
        n = subset.count()
        per_mode[m] = {"adapter": plan[m] or NONE, "scored_rows": n}
        if n == 0:
            continue
        t0 = time.time()
        part = score_dataset(subset, cfg, plan[m], scored_at).materialize()
        per_mode[m]["prompts_per_s"] = round(n / max(time.time() - t0, 1e-9), 3)
        parts.append(
            part.map_batches(_mark_carried, fn_kwargs={"value": False}, batch_format="pyarrow")
        )
    if carried is not None and carried.num_rows:
        parts.append(ray.data.from_arrow(carried))
    if not parts:
        out = ray.data.from_arrow(CANDIDATE_SCORES_SCHEMA.empty_table())
    else:
        out = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    out = out.map_batches(_conform, batch_format="pyarrow").materialize()
    stats.update(
        mode=mode,
        modes=per_mode,
        carried_rows=int(carried.num_rows) if carried is not None else 0,
        model=model,
        adapters={m: plan[m] or NONE for m in plan},
        adapter_hashes=hashes,
        scored_at=scored_at.isoformat(),
        wall_time_s=round(time.time() - started, 2),
    )
    return out, stats


def _manifest_or_none(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    try:
        return ctx.manifest_of(stage)["metrics"]
    except StageError:
        return None


def _to_arrow(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    blocks = ray.get(ds.to_arrow_refs())
    blocks = [b for b in blocks if b.num_rows]
    return pa.concat_tables(blocks) if blocks else schema.empty_table()


def _rows_of_mode(batch: pa.Table, mode: str, skip: pa.Array) -> pa.Table:
    mask = pc.and_(pc.equal(batch["mode"], mode), pc.invert(pc.is_in(batch["row"], skip)))
    return batch.filter(mask)


def _mark_carried(batch: pa.Table, value: bool) -> pa.Table:
    return batch.append_column("carried", pa.array([value] * batch.num_rows, pa.bool_()))


def _conform(batch: pa.Table) -> pa.Table:
    return batch.select(CANDIDATE_SCORES_SCHEMA.names).cast(CANDIDATE_SCORES_SCHEMA)


def _carried(meta: pa.Table, carry: pl.DataFrame, model: str, hashes: dict[str, str]) -> pa.Table:
    """Rows of ``meta`` whose (prompt, model, adapter) was scored before, with those scores."""
    frame = pl.from_arrow(meta).with_columns(
        pl.col("mode").replace_strict(hashes, default=None).alias("adapter_hash"),
        pl.lit(model).alias("model"),
    )
    previous = carry.select(
        "prompt_hash",
        "adapter_hash",
        "model",
        "adapter",
        "run_name",
        "n_tokens",
        "logit_yes",
        "p_yes",
        "scored_at",
    ).unique(subset=["prompt_hash", "adapter_hash", "model"], keep="first", maintain_order=True)
    joined = frame.join(previous, on=["prompt_hash", "adapter_hash", "model"], how="inner")
    joined = joined.with_columns(pl.lit(True).alias("carried")).sort("row")
    return joined.to_arrow().select(CANDIDATE_SCORES_SCHEMA.names).cast(CANDIDATE_SCORES_SCHEMA)


# ---- candidates: ``binllm score`` / ``python -m jobs.score`` -----------------------------------
def score_candidates(
    cfg: RunConfig, input_uri: str, output_uri: str = "", log: Any = print
) -> dict[str, Any]:
    """Score every row of a (user, item) table with the trained run ``cfg``; write Parquet and a
    manifest to ``output_uri`` (default ``{run}/scored/{input name}``), replacing it whole."""
    pairs = read_pairs(input_uri, cfg.output_storage_options)
    ctx = StageContext.open(cfg, "score")
    if not output_uri:
        stem = input_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet") or "candidates"
        output_uri = ctx.uri(join(ctx.run_path, "scored", stem))
    log(f"[binllm] score: {pairs.num_rows:,} candidates from {input_uri}")
    out, stats = score_pairs(cfg, pairs, input_uri)
    manifest = {"kind": "candidates", "input": input_uri, **_manifest_base(cfg), "metrics": stats}
    manifest = publish(out, output_uri, manifest, cfg.output_storage_options)
    log(
        f"[binllm] score: {stats['rendered_rows']:,} rows ({stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {output_uri}"
    )
    return {**manifest, "output": output_uri}


def _manifest_base(cfg: RunConfig) -> dict[str, Any]:
    return {
        "run_name": cfg.run_name,
        "config_hash": config_hash(cfg.score, cfg.model, cfg.prompts),
        "config": {"score": _plain(cfg.score), "model": _plain(cfg.model)},
        "packages": package_versions(),
    }


def _plain(section: Any) -> Any:
    from binllm_core.config import to_dict

    return to_dict(section)


# ---- publishing a folder whole -----------------------------------------------------------------
def publish(
    ds: ray.data.Dataset,
    uri: str,
    manifest: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``ds`` and ``manifest`` to a staging folder beside ``uri``, then swap it in.

    Readers never see a mix of old and new files: the old folder stays whole until the new one is
    complete (manifest written last), then the old one is renamed away, the new one renamed in,
    and the old one deleted. A failure before the swap removes the staging folder and leaves the
    old folder as it was. (On object stores a rename is a copy, so there the swap is short but not
    atomic; a reader that finds no ``_manifest.json`` must ignore the folder.)"""
    fs, path = resolve(uri, storage_options)
    path = path.rstrip("/")
    if is_local(fs):
        path = fs._strip_protocol(path)
    parent, _, name = path.rpartition("/")
    token = uuid.uuid4().hex[:8]
    staging = join(parent, f"_staging-{name}-{token}")
    arrow_fs = None
    if not is_local(fs):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        arrow_fs = PyFileSystem(FSSpecHandler(fs))
    try:
        fs.makedirs(staging, exist_ok=True)
        if ds.count():
            ds.write_parquet(staging, filesystem=arrow_fs)
        else:
            with fs.open(join(staging, "part-00000.parquet"), "wb") as fh:
                pq.write_table(ds.schema().base_schema.empty_table(), fh)
        rows = 0
        for f in fs.find(staging):
            if f.endswith(".parquet"):
                with fs.open(f, "rb") as fh:
                    rows += pq.read_metadata(fh).num_rows
        manifest = {
            **manifest,
            "rows": rows,
            "path": uri,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with fs.open(join(staging, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
        _swap(fs, staging, path, join(parent, f"_replaced-{name}-{token}"))
        return manifest
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise


def _swap(fs: Any, staging: str, final: str, old: str) -> None:
    """Put ``staging`` in the place of ``final`` (see :func:`publish`)."""
    had_old = fs.exists(final)
    if had_old:
        fs.mv(final, old, recursive=True)
    try:
        fs.mv(staging, final, recursive=True)
    except BaseException:
        if had_old and not fs.exists(final):
            fs.mv(old, final, recursive=True)
        raise
    if had_old:
        fs.rm(old, recursive=True)


# ---- nightly ----------------------------------------------------------------------------------
def nightly_root(cfg: RunConfig) -> tuple[Any, str]:
    ctx = StageContext.open(cfg, "score")
    return ctx.fs, join(ctx.run_path, "scores")


def run_nightly(
    cfg: RunConfig,
    candidates_uri: str,
    date: str = "",
    incremental: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Score the candidates of one night into ``{run}/scores/date=YYYY-MM-DD/`` (replaced whole).

    The same date again replaces the partition (no duplicates); a failure leaves the previous
    partition as it was. ``incremental`` takes over the score of every pair whose prompt, model
    and adapter match a row of an existing partition (newest date first) instead of scoring it
    again (``carried`` = true)."""
    date = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    if not DATE_RE.match(date):
        raise ConfigError(f"date {date!r} is not YYYY-MM-DD")
    pairs = distinct_pairs(read_pairs(candidates_uri, cfg.output_storage_options))
    fs, root = nightly_root(cfg)
    carry = previous_scores(fs, root) if incremental else None
    log(
        f"[binllm] nightly {date}: {pairs.num_rows:,} distinct candidates from {candidates_uri}"
        + (
            f", {0 if carry is None else carry.height:,} earlier scores to carry"
            if incremental
            else ""
        )
    )
    out, stats = score_pairs(cfg, pairs, candidates_uri, carry)
    target = join(root, f"date={date}")
    ctx = StageContext.open(cfg, "score")
    manifest = {
        "kind": "nightly",
        "date": date,
        "candidates": candidates_uri,
        "incremental": incremental,
        **_manifest_base(cfg),
        "metrics": stats,
    }
    manifest = publish(out, ctx.uri(target), manifest, cfg.output_storage_options)
    log(
        f"[binllm] nightly {date}: {stats['rendered_rows']:,} rows "
        f"({stats['carried_rows']:,} carried, {stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {ctx.uri(target)}"
    )
    return {**manifest, "output": ctx.uri(target)}


def committed_partitions(fs: Any, root: str) -> list[str]:
    """Dates of the partitions under ``root`` that have a manifest, newest first."""
    if not fs.exists(root):
        return []
    dates = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("date=") and fs.exists(join(entry, MANIFEST)):
            dates.append(name.removeprefix("date="))
    return sorted(dates, reverse=True)


def previous_scores(fs: Any, root: str) -> pl.DataFrame:
    """Earlier nightly scores (newest partition first) for carrying over."""
    frames = []
    columns = [
        "prompt_hash",
        "adapter_hash",
        "model",
        "adapter",
        "run_name",
        "n_tokens",
        "logit_yes",
        "p_yes",
        "scored_at",
    ]
    for date in committed_partitions(fs, root):
        folder = join(root, f"date={date}")
        for f in sorted(p for p in fs.find(folder) if p.endswith(".parquet")):
            with fs.open(f, "rb") as fh:
                frames.append(pl.from_arrow(pq.read_table(fh, columns=columns)))
    if not frames:
        schema = pa.schema([CANDIDATE_SCORES_SCHEMA.field(c) for c in columns])
        return pl.from_arrow(schema.empty_table())
    return pl.concat(frames, how="vertical_relaxed")


def read_nightly(cfg: RunConfig, date: str) -> pa.Table:
    """One committed nightly partition (for tests and readers in Python)."""
    fs, root = nightly_root(cfg)
    folder = join(root, f"date={date}")
    if not fs.exists(join(folder, MANIFEST)):
        raise StageError(f"no committed nightly partition for {date}", folder)
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


__all__ = [
    "CANDIDATE_SCORES_SCHEMA",
    "SCORES_SCHEMA",
    "PromptScorer",
    "adapter_plan",
    "open_run",
    "publish",
    "read_nightly",
    "run",
    "run_nightly",
    "score_candidates",
    "score_dataset",
    "score_pairs",
]
