"""Scoring prompts on a Ray Data actor pool, one model copy per actor: prompts -> P(Yes), for
stage ``score``, stage ``rerank`` and the commands.

Scoring runs :class:`PromptScorer` in ``map_batches`` on a fixed actor pool
(``ActorPoolStrategy(size=score.num_actors)``, ``score.num_gpus`` per actor). Each actor loads the
backbone and the adapter once, merges the LoRA weights into the base (``merge_and_unload``) and
scores under ``torch.inference_mode`` with :class:`binllm_core.llm.scoring.Scorer`. It takes
``batch_size * sort_window`` prompts at a time; under ``score.share_prefix`` the prompts among
them that share a user prefix (same user and history, as the run's templates cut them) run it
once, the others are ordered by token length so each forward pass pads little; the scores go
back in row order. A dead actor is restarted (``score.max_restarts``) and the batches it
had not finished are retried on it, so every input row comes out exactly once.

Outputs:

* stage ``score``: table ``scores`` of ``{run}/score/`` — one row per scored sample and mode:
  sample_id, split, mode, uid, iid, label, warm, not_cold, n_tokens, logit_yes, p_yes and the
  lineage columns
  (``logit_yes`` is the answer score: the ``Yes`` logit, or ``Yes`` minus ``No`` under
  ``model.answer_score: yes_minus_no``, where ``p_yes`` is then P(Yes) of the two answers).
* pair scoring and nightly (:mod:`pipelines.pairs`, :mod:`pipelines.nightly`) use
  :func:`score_dataset` too.

Lineage columns on every row: ``model`` (backbone), ``adapter`` (URI, or ``none``),
``adapter_hash`` (the adapter folder's content identity, the same wherever the folder lies;
``none`` without one), ``run_name``,
``scored_at`` (UTC start of the scoring call).

Test-only fault point ``BINLLM_TEST_FAULT=scorer-batch@N`` (:mod:`binllm_core.io.faults`): an actor
exits its process at its N-th batch, once per scoring call (a marker file in the temp folder
records that it happened).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from binllm_core.config import (
    ModelConfig,
    RunConfig,
)
from binllm_core.errors import ConfigError, StageError
from binllm_core.io.artifacts import exists
from binllm_core.io.faults import Fault, armed
from binllm_core.llm.backbone import ADAPTER_CONFIG, fetch_adapter, is_adapter
from binllm_core.llm.prefix_sharing import PrefixCut
from binllm_core.llm.soft import SOFT_SPEC, EntityVectors, SoftSpec
from binllm_core.prompts.templates import templates_from_config
from binllm_core.storage import content_identity, join, resolve
from pipelines.runtime.progress import Reporter, progress
from pipelines.runtime.stage import StageContext


def default_modes(cfg: RunConfig, finetune: Mapping[str, Any] | None) -> list[str]:
    if cfg.score.modes:  # checked against the modes when the config was loaded
        return list(cfg.score.modes)
    if finetune is None:
        return list(cfg.prompts.modes)
    return list(dict.fromkeys(s["mode"] for s in finetune.get("steps", {}).values()))


FAULT_POINT = "scorer-batch"
OPTIONS = "output_storage_options"
"""The storage options adapters are read with (those of the run's outputs)."""
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
        fault: Fault | None = None,
        prefix_cut: PrefixCut | None = None,
        reporter: Reporter | None = None,
        soft: EntityVectors | None = None,
    ) -> None:
        import torch

        from binllm_core.llm.recommender import LLMRecommender
        from binllm_core.llm.scoring import Scorer

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        if adapter:  # a remote one fetched once per node into the model cache
            folder = fetch_adapter(model_cfg, adapter, storage_options, OPTIONS)
            self.recommender = LLMRecommender.from_saved(model_cfg, folder, soft, device)
            self.recommender.merge_adapter()
        else:
            self.recommender = LLMRecommender.from_backbone(model_cfg, device=device)
        self.recommender.train(False)  # a bare backbone too: no dropout when scoring
        self.scorer = Scorer(self.recommender, batch_size, max_length, sort_by_length, prefix_cut)
        self.lineage = lineage
        self.fault = fault
        self.reporter = reporter or Reporter()
        self.calls = 0

    def logits(
        self, prompts: list[str], soft: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Answer scores (``Yes`` logits by default) and token counts of ``prompts`` (soft
        prompts: with their soft ids), in order."""
        return self.scorer.score(prompts, soft)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.fault is not None:
            self.fault.reached(self.calls)
        soft = None
        if self.recommender.model.soft is not None:
            soft = batch["soft_ids"].to_pylist()
        logits, lengths = self.logits(batch["prompt"].to_pylist(), soft)
        n = batch.num_rows
        out = batch.drop_columns([c for c in ("prompt", "soft_ids") if c in batch.column_names])
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
        self.reporter.post(advance=n)
        return out


def adapter_hash(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The adapter folder's content identity (16 hex; the same wherever the folder lies);
    ``none`` without one. A folder (local or at any URI) that holds no saved adapter is a
    one-line error, found before any actor starts."""
    if not uri:
        return NONE
    if not is_adapter(uri, storage_options, OPTIONS):
        if exists(uri, storage_options, "adapter folder", OPTIONS):
            raise ConfigError(
                f"adapter folder {uri} holds no saved adapter ({ADAPTER_CONFIG})",
                todo="check score.adapters",
            )
        raise ConfigError(f"adapter folder {uri} is not there", todo="check score.adapters")
    fs, path = resolve(uri, storage_options)
    return content_identity(fs, path)


def score_dataset(
    ds: ray.data.Dataset,
    cfg: RunConfig,
    adapter: str,
    scored_at: dt.datetime,
    sort_by_length: bool = True,
    num_actors: int | None = None,
    reporter: Reporter | None = None,
) -> ray.data.Dataset:
    """``ds`` (with a ``prompt`` column) scored on an actor pool; lazy, call ``materialize``
    (or :func:`score_now`, which also shows the progress).

    The input is materialized first: an actor pool that reserves every CPU of a small cluster
    (2 cores, one actor of 2 threads) would otherwise starve the read tasks that feed it, and
    the prompts are small next to the model. Under ``score.share_prefix``, an input larger than
    one actor batch is ordered by prompt text, so that prompts with the same prefix reach an
    actor in the same batch and share their prefix pass (the output order is then not the
    input's; rows keep their ids).
    """
    ds = ds.materialize()
    sc = cfg.score
    soft = soft_vectors(cfg, adapter, ds)
    if soft is None and sc.share_prefix and ds.count() > sc.batch_size * max(1, sc.sort_window):
        ds = ds.sort("prompt").materialize()
    lineage = {
        "model": model_id(cfg.model),
        "adapter": adapter or NONE,
        "adapter_hash": adapter_hash(adapter, cfg.output_storage_options),
        "run_name": cfg.run_name,
        "scored_at": scored_at,
    }
    marker = os.path.join(tempfile.gettempdir(), f"binllm-scorer-fault-{uuid.uuid4().hex}")
    fault = armed(FAULT_POINT, marker)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet and flags **ray_remote_args as
        # deprecated; without them the pool restarts actors without bound (Ray Data's default).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return _map_scorer(
            ds, cfg, adapter, lineage, sort_by_length, fault, num_actors, reporter, soft
        )


def score_now(
    ds: ray.data.Dataset, cfg: RunConfig, adapter: str, scored_at: dt.datetime, title: str
) -> ray.data.Dataset:
    """:func:`score_dataset`, materialized, with a progress bar titled ``title`` (prompts, the
    rate and the ETA) while it runs."""
    ds = ds.materialize()
    with progress(title, ds.count(), "prompt") as reporter:
        return score_dataset(ds, cfg, adapter, scored_at, reporter=reporter).materialize()


def _map_scorer(
    ds: ray.data.Dataset,
    cfg: RunConfig,
    adapter: str,
    lineage: dict[str, Any],
    sort_by_length: bool,
    fault: Fault | None,
    num_actors: int | None,
    reporter: Reporter | None,
    soft: EntityVectors | None,
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
            "prefix_cut": _prefix_cut(cfg),
            "reporter": reporter,
            "soft": soft,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors or sc.num_actors),
        batch_size=sc.batch_size * max(1, sc.sort_window),
        batch_format="pyarrow",
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.num_gpus,
        max_restarts=sc.max_restarts,
        max_task_retries=sc.max_restarts,
    )


def soft_vectors(cfg: RunConfig, adapter: str, ds: ray.data.Dataset) -> EntityVectors | None:
    """The vectors the projector of ``adapter`` reads (the run's ``encode/embeddings``, the
    column the adapter was trained on), when ``ds`` holds soft prompts; None for prompts in
    words. Soft prompts with an adapter that has no projector are a one-line error."""
    if "soft_ids" not in ds.schema().names:
        return None
    first = ds.select_columns(["soft_ids"]).take(1)  # a call scores one mode
    if not first or first[0]["soft_ids"] is None:
        return None
    if not adapter:
        raise ConfigError(
            "soft prompts need an adapter with a projector, and this mode is scored with none",
            todo="score soft prompts with the adapter of a collm/rsllm step (score.adapters)",
        )
    fs, path = resolve(adapter, cfg.output_storage_options)
    spec_path = join(path, SOFT_SPEC)
    if not fs.exists(spec_path):
        raise ConfigError(
            f"adapter {adapter} has no projector ({SOFT_SPEC}): it was not trained on soft prompts",
            todo="score soft prompts with the adapter of a collm/rsllm step (score.adapters)",
        )
    spec = SoftSpec.parse(fs.cat_file(spec_path))
    table = StageContext.open(cfg, "score").read_table("encode", "embeddings")
    return EntityVectors.from_table(table, spec.vectors)


def _prefix_cut(cfg: RunConfig) -> PrefixCut | None:
    return templates_from_config(cfg.prompts).prefix_cut() if cfg.score.share_prefix else None


def model_id(cfg: ModelConfig) -> str:
    return f"{cfg.backbone}/{cfg.gguf_file}" if cfg.gguf_file else cfg.backbone


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# ---- which adapter scores which mode -----------------------------------------------------------
def adapter_plan(
    cfg: RunConfig,
    modes: list[str],
    finetune: Mapping[str, Any] | None,
    locate: Callable[[str], str],
) -> dict:
    """``{mode: adapter URI ('' = bare backbone)}``: ``score.adapters`` first, else the last
    finetune step trained on the mode, else the final adapter. ``locate`` turns the run-relative
    paths of the finetune manifest into URIs of the run being scored (a copied run scores with
    its own adapters)."""
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
            plan[mode] = locate(steps[choice]["adapter"])
            continue
        trained = [s for s in steps.values() if s.get("mode") == mode]
        if not trained and mode == "text" and cfg.finetune.start_step == "step2":
            plan[mode] = cfg.finetune.init_adapter  # the step-1 text adapter step 2 began from
            continue
        plan[mode] = locate(trained[-1]["adapter"] if trained else finetune["final_adapter"])
    return plan


def whole_groups(
    ids: np.ndarray, keys: np.ndarray, max_rows: int, rng: np.random.Generator
) -> np.ndarray:
    """Every id of the groups ``keys`` names (users, prefix groups), groups taken in a seeded
    random order while they fit in ``max_rows`` (at least one group)."""
    groups, counts = np.unique(keys, return_counts=True)
    order = rng.permutation(len(groups))
    fits = np.cumsum(counts[order]) <= max_rows
    fits[0] = True
    return ids[np.isin(keys, groups[order][fits])]
