"""One tuning run of the LLM recommender: the LoRA loop every caller drives.

:class:`TuningRun` has the lifecycle of a torchtune recipe — ``setup`` (fresh, from a saved
adapter, or resumed from a checkpoint), ``train_step`` (one optimizer step over gradient-
accumulated micro-batches), ``evaluate`` (validation AUC/UAUC, or a listwise step's NDCG@10
and MRR of valid groups; early stopping and the best adapter follow the step's metric),
``save_checkpoint`` — and both the plain single-process loop (:func:`fit_plain`: the
benchmarks and tests) and the Ray Train worker (``pipelines/stages/finetune.py``) drive it, the way
both drive :class:`binllm_core.encoder.training.EncoderTraining`. The Ray side adds only data
shards, DDP, gathering evaluation scores across workers and reporting checkpoints.

The optimiser is AdamW with weight decay on matrices only; the learning rate warms up linearly
over *global* steps, then decays on a cosine to a minimum (:class:`Schedule`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binllm_core.config import FinetuneConfig, TuneStepConfig
from binllm_core.errors import ConfigError
from binllm_core.evaluation.metrics import auc, uauc
from binllm_core.llm.batches import Batch, TargetBatch
from binllm_core.llm.objectives import OBJECTIVES, REC, Examples, SoftContrastive, group_size
from binllm_core.llm.prefix_sharing import PrefixCut
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.soft import EntityVectors
from binllm_core.llm.strategies import SELECTS, TuneStep
from binllm_core.modes import MODES
from binllm_core.ranking.metrics import group_metrics

STATE = "state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
"""The worker's torch random state (dropout) in a checkpoint: a resumed step draws on."""


# ---- the pieces ------------------------------------------------------------------------------
def make_optimizer(params: Iterable[torch.nn.Parameter], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; decay only on weight matrices (as the official runner)."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over global steps, then cosine to ``min_lr``
    at ``total_steps``. (The official runner restarts warm-up each epoch; this one does not.)"""

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def of(cls, step: TuneStepConfig, total_steps: int) -> Schedule:
        return cls(step.lr, step.min_lr, step.warmup_lr, step.warmup_steps, total_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(step: TuneStepConfig, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps of a tuning step: the smaller of ``max_steps`` and ``epochs`` passes."""
    per_step = step.batch_size * step.grad_accum * world_size
    bounds = []
    if step.max_steps > 0:
        bounds.append(step.max_steps)
    if step.epochs > 0:
        bounds.append(max(1, int(step.epochs * (n_train // per_step))))
    if not bounds:
        raise ValueError("a tuning step needs max_steps > 0 or epochs > 0")
    return min(bounds)


@dataclass
class EarlyStopping:
    """Track the best validation figure (the step's metric); ``stop`` after ``patience``
    evaluations without a better."""

    patience: int
    best: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when it is the best so far (NaN never is)."""
        if not math.isnan(value) and value > self.best:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_evals >= self.patience


@dataclass
class EvalSet:
    """Validation prompts with labels and users (and soft ids, for soft prompts); with
    ``groups``, whole listwise groups laid end to end, each its liked item first (label 1)."""

    prompts: list[str]
    labels: list[int]
    uids: list[int]
    soft: list[list[int]] | None = None
    groups: bool = False

    def metrics(self, scores: Sequence[float]) -> dict[str, float]:
        """AUC and UAUC of prompts; of groups, NDCG@10 and MRR of each group's order by score
        (:func:`binllm_core.ranking.metrics.group_metrics`)."""
        if self.groups:
            found = group_metrics(np.reshape(scores, (-1, group_size(self.labels))))
            return {"ndcg10": found["ndcg10"], "mrr": found["mrr"]}
        return {"auc": auc(self.labels, scores), "uauc": uauc(self.uids, self.labels, scores)}


@dataclass
class TuningState:
    """Everything a resumed run needs besides the weights; a checkpoint's ``state.json``."""

    planned_steps: int
    step: int = 0
    finished: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    sequences: int = 0
    """Sequences trained on, all workers (the Ray side sums them before it reports)."""
    task_sequences: dict[str, int] = field(default_factory=dict)
    """Of :attr:`sequences`, those of each task (``rec`` and the auxiliary ones)."""
    tokens: int = 0
    train_seconds: float = 0.0
    restarts: int = 0
    peak_rss_mb: float | None = None


Gather = Callable[[tuple[list[float], list[int], list[int]]], list[tuple]]
"""Collects every worker's (scores, labels, uids) of its evaluation share (Ray: all_gather)."""


# ---- the run ---------------------------------------------------------------------------------
class TuningRun:
    """One tuning step of the recommender, driven step by step by its caller."""

    def __init__(
        self,
        recommender: LLMRecommender,
        cfg: FinetuneConfig,
        step_cfg: TuneStepConfig,
        n_train: int,
        rank: int = 0,
        world: int = 1,
        prefix_cut: PrefixCut | None = None,
        train_lora: bool = True,
        task: str = REC,
    ) -> None:
        self.rec = recommender
        self.selects = SELECTS[task]
        """The valid metric early stopping and the kept adapter follow (the task's)."""
        self.train_lora = train_lora
        """False: the adapter is frozen and only the extra modules learn (CoLLM's step 2)."""
        self.prefix_cut = prefix_cut
        """Where prompts stop depending on the user alone: micro-batch prompts that share
        their prefix tokens run it once (training and evaluation); None runs prompts whole."""
        self.cfg = cfg
        self.step_cfg = step_cfg
        self.rank, self.world = rank, world
        self.state = TuningState(planned_steps(step_cfg, n_train, world))
        self.stopper = EarlyStopping(cfg.patience)
        self.schedule = Schedule.of(step_cfg, self.state.planned_steps)
        self.optimizer: torch.optim.Optimizer | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="binllm-tune-"))
        self.best_dir = self.workdir / "best"
        """The best adapter so far (rank 0 writes it)."""
        self.lr = 0.0
        self._losses: dict[str, list[float]] = {}
        """Micro-batch losses per task since the last evaluation."""

    # ---- setup -----------------------------------------------------------------------------
    def setup(self, start_from: str = "", resume: str = "") -> None:
        """Attach the adapter and the optimiser: resumed from the checkpoint folder ``resume``
        (weights, best adapter, optimiser and counters), else starting from the adapter saved in
        ``start_from`` (an earlier step's best, ``finetune.init_adapter``), else fresh."""
        torch.manual_seed(self.cfg.seed)  # a fresh adapter's initial weights
        if resume:
            folder = Path(resume)
            self.rec.attach_adapter(str(folder / "adapter"), self.cfg)
            self._make_optimizer()
            assert self.optimizer is not None
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER))
            self.state = TuningState(**json.loads((folder / STATE).read_text()))
            self.state.restarts += 1
            shutil.copytree(folder / "best", self.best_dir)
        else:
            self.rec.attach_adapter(start_from, self.cfg)
            self._make_optimizer()
        s = self.state
        self.stopper = EarlyStopping(self.cfg.patience, s.best, s.best_step, s.bad_evals)
        self.schedule = Schedule.of(self.step_cfg, s.planned_steps)
        self.rec.train(True)
        # Dropout differs per worker, reproducibly; a resumed step draws on where it stopped
        # (rank 0's state is in the checkpoint; other ranks reseed from the step they resume).
        torch.manual_seed(self.cfg.seed + self.rank + 1000 * s.step)
        if resume and self.rank == 0 and (Path(resume) / RNG).exists():
            saved = torch.load(Path(resume) / RNG)
            torch.set_rng_state(saved["cpu"])
            if saved.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda"])

    def resume_stream(self, micro_batches: Iterator[Examples]) -> Iterator[Examples]:
        """``micro_batches`` past those the steps before a resumed checkpoint drew (none for a
        fresh run), so that a resumed step trains on what the uninterrupted one would."""
        for _ in range(self.state.step * self.step_cfg.grad_accum):
            next(micro_batches)
        return micro_batches

    def _make_optimizer(self) -> None:
        if not self.train_lora:
            for p in self.rec.net.parameters():
                p.requires_grad_(False)
        params = self.rec.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: the adapter is frozen and there is no projector")
        self.optimizer = make_optimizer(params, self.cfg.weight_decay)

    # ---- training --------------------------------------------------------------------------
    def progress(self) -> float:
        """How far the step is: the optimizer step about to run over the planned steps."""
        return self.state.step / max(1, self.state.planned_steps - 1)

    @property
    def done(self) -> bool:
        return self.state.finished or self.state.step >= self.state.planned_steps

    def _batch(self, examples: Examples) -> Batch | TargetBatch:
        """A training micro-batch of one task's examples on the model's device."""
        objective = OBJECTIVES[examples.task]
        batch = objective.collate(
            self.rec.tokenizer, examples, self.cfg.max_length, self.prefix_cut
        )
        return batch.to(self.rec.device)

    def train_step(self, micro_batches: Iterator[Examples]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches from ``micro_batches`` (each
        of one task, its loss from the recommender); gradients are synchronised across workers
        on the last micro-batch only. The mean loss."""
        assert self.optimizer is not None, "call setup() first"
        started = time.perf_counter()
        self.lr = self.schedule.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        accum = self.step_cfg.grad_accum
        losses = []
        for micro in range(accum):
            examples = next(micro_batches)
            batch = self._batch(examples)
            net = self.rec.forward_net
            sync = micro == accum - 1 or self.world == 1 or net is None
            with nullcontext() if sync else net.no_sync():
                loss = self.rec.loss(batch, examples.task)
                (loss / accum).backward()
            losses.append(float(loss.detach()))
            self._losses.setdefault(examples.task, []).append(losses[-1])
            s = self.state
            s.sequences += len(batch)
            s.task_sequences[examples.task] = s.task_sequences.get(examples.task, 0) + len(batch)
            s.tokens += batch.n_tokens
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.train_seconds += time.perf_counter() - started
        return sum(losses) / len(losses)

    @property
    def due_for_eval(self) -> bool:
        """Every ``eval_every`` steps, and after the last planned step."""
        s = self.state
        return s.step % self.cfg.eval_every == 0 or s.step >= s.planned_steps

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, valid: EvalSet, gather: Gather | None = None) -> dict[str, Any]:
        """Score this worker's ``valid`` share, gather every share, update early stopping and
        keep the best adapter; the evaluation record (also appended to the state)."""
        scorer = Scorer(
            self.rec, self.cfg.eval_batch_size, self.cfg.max_length, False, self.prefix_cut
        )
        scores, _ = scorer.score(valid.prompts, valid.soft)
        mine = (scores.tolist(), list(valid.labels), list(valid.uids))
        parts = gather(mine) if gather is not None else [mine]
        labels, uids = [y for p in parts for y in p[1]], [u for p in parts for u in p[2]]
        whole = EvalSet([], labels, uids, groups=valid.groups)
        metrics = whole.metrics([x for p in parts for x in p[0]])
        if self.selects not in metrics:
            raise ValueError(f"a step selected by {self.selects} evaluated {sorted(metrics)}")
        if self.stopper.update(metrics[self.selects], self.state.step) and self.rank == 0:
            shutil.rmtree(self.best_dir, ignore_errors=True)
            self.rec.save(self.best_dir)
        every = [x for losses in self._losses.values() for x in losses]
        record = {
            "step": self.state.step,
            **metrics,
            "train_loss": sum(every) / max(len(every), 1),
            "lr": self.lr,
            **{f"loss_{task}": sum(x) / len(x) for task, x in sorted(self._losses.items())},
        }
        self._losses = {}
        s = self.state
        s.evals = [*s.evals, record]
        s.best, s.best_step, s.bad_evals = (
            self.stopper.best,
            self.stopper.best_step,
            self.stopper.bad_evals,
        )
        s.finished = self.stopper.stop or s.step >= s.planned_steps
        return record

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> None:
        """The current adapter, the best one, the optimiser and the state, under ``folder``."""
        assert self.optimizer is not None
        folder = Path(folder)
        self.rec.save(folder / "adapter")
        if (
            not self.best_dir.exists()
        ):  # no valid figure yet (e.g. one class): the current stands in
            self.rec.save(self.best_dir)
        shutil.copytree(self.best_dir, folder / "best")
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, folder / RNG)
        (folder / STATE).write_text(json.dumps(asdict(self.state)))

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---- what a step trains on ----------------------------------------------------------------------
@dataclass
class TaskRows:
    """The training rows of one task: prompts with labels, or with the answers to write (and
    each prompt's soft ids, for soft prompts)."""

    prompts: list[str]
    labels: list[int]
    answers: list[str] = field(default_factory=list)
    soft: list[list[int]] | None = None
    plain: list[str] | None = None
    """Of soft prompts, the same samples' prompts in words (for a curriculum)."""

    def __len__(self) -> int:
        return len(self.prompts)


def shuffled_batches(
    rows: TaskRows, batch_size: int, seed: int | str, task: str = REC
) -> Iterator[Examples]:
    """Endless shuffled micro-batches (a fresh permutation every epoch; the last partial batch
    is dropped, as with ``drop_last``)."""
    return _batches([[i] for i in range(len(rows))], rows, batch_size, seed, task)


def prefix_grouped_batches(
    rows: TaskRows, batch_size: int, seed: int, cut: PrefixCut
) -> Iterator[Examples]:
    """Endless micro-batches in which prompts with the same prefix (``prompt[:cut(prompt)]``)
    come together: every epoch shuffles the groups and the prompts within each, lays them end
    to end and cuts ``batch_size`` at a time (a group may straddle two batches)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(rows.prompts):
        groups.setdefault(prompt[: cut(prompt)], []).append(i)
    return _batches(list(groups.values()), rows, batch_size, seed, REC)


def group_batches(
    rows: TaskRows, groups_per_batch: int, seed: int | str, task: str
) -> Iterator[Examples]:
    """Endless micro-batches of whole listwise groups (``rank`` tasks): ``rows`` holds groups
    of one size laid end to end, each its liked item first (label 1, as
    :func:`binllm_core.prompts.ranking_groups.group_prompts` writes them); every epoch shuffles
    the groups, never the prompts within one, and cuts ``groups_per_batch`` groups at a time."""
    size = group_size(rows.labels)
    groups = [list(range(start, start + size)) for start in range(0, len(rows), size)]
    return _batches(groups, rows, size * groups_per_batch, seed, task, shuffle_members=False)


def micro_batches(
    rows: TaskRows,
    batch_size: int,
    seed: int,
    cut: PrefixCut | None,
    aux: Mapping[str, TaskRows] | None = None,
    shares: Mapping[str, float] | None = None,
    task: str = REC,
) -> Iterator[Examples]:
    """The micro-batches a tuning run trains on: recommendation prompts (grouped by prefix when
    ``cut`` is given), and with ``aux`` rows the tasks in turn, each its ``shares`` of the
    micro-batches (the recommendation task the rest; see :func:`interleave`). A listwise
    ``task``: ``batch_size`` whole groups of ``rows`` at a time (:func:`group_batches`; no
    aux rows)."""
    if task != REC:
        if aux:
            raise ValueError(f"aux rows of {sorted(aux)} in a {task} step")
        return group_batches(rows, batch_size, seed, task)
    rec = (
        shuffled_batches(rows, batch_size, seed)
        if cut is None
        else prefix_grouped_batches(rows, batch_size, seed, cut)
    )
    if not aux:
        return rec
    shares = dict(shares or {})
    if set(shares) != set(aux):
        raise ValueError(f"aux rows of {sorted(aux)} for the shares of {sorted(shares)}")
    streams = {REC: rec}
    for task, task_rows in sorted(aux.items()):
        streams[task] = shuffled_batches(task_rows, batch_size, f"{seed}/{task}", task)
    return interleave(streams, {REC: 1.0 - sum(shares.values()), **shares})


def with_curriculum(
    stream: Iterator[Examples], progress: Callable[[], float], seed: int | str
) -> Iterator[Examples]:
    """LLaRA's curriculum over soft micro-batches: each prompt stays soft with probability
    ``progress()`` (0 at the first optimizer step, 1 at the last), else it is replaced by the
    same sample's prompt in words (``Examples.plain``, no soft ids), drawn per prompt from a
    seeded generator."""
    rng = random.Random(seed)
    for examples in stream:
        if examples.soft is None or examples.plain is None:
            yield examples
            continue
        share = min(1.0, max(0.0, progress()))
        keep = [rng.random() < share for _ in examples.prompts]
        yield Examples(
            examples.task,
            [s if k else p for s, p, k in zip(examples.prompts, examples.plain, keep, strict=True)],
            examples.labels,
            examples.answers,
            [ids if k else [] for ids, k in zip(examples.soft, keep, strict=True)],
        )


def interleave(
    streams: Mapping[str, Iterator[Examples]], shares: Mapping[str, float]
) -> Iterator[Examples]:
    """Micro-batches from each stream in turn by smooth weighted round-robin: every turn adds
    each task's share to its credit and the task with the most credit (the first on a tie) gives
    the next micro-batch and pays 1, so after ``n`` turns each task has given its share of ``n``
    within one micro-batch, spread evenly (no randomness)."""
    credit = dict.fromkeys(streams, 0.0)
    while True:
        for task in credit:
            credit[task] += shares[task]
        task = max(credit, key=credit.__getitem__)
        credit[task] -= 1.0
        yield next(streams[task])


def _batches(
    groups: list[list[int]],
    rows: TaskRows,
    batch_size: int,
    seed: int | str,
    task: str,
    shuffle_members: bool = True,
) -> Iterator[Examples]:
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} train {task} rows are fewer than one batch of {batch_size}")
    rng = random.Random(seed)
    while True:
        rng.shuffle(groups)
        for members in groups if shuffle_members else ():
            rng.shuffle(members)
        order = [i for members in groups for i in members]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield Examples(
                task,
                [rows.prompts[i] for i in idx],
                [rows.labels[i] for i in idx] if rows.labels else [],
                [rows.answers[i] for i in idx] if rows.answers else [],
                None if rows.soft is None else [rows.soft[i] for i in idx],
                None if rows.plain is None else [rows.plain[i] for i in idx],
            )


# ---- the plain single-process driver -----------------------------------------------------------
def prepare(
    rec: LLMRecommender,
    step: TuneStep,
    cfg: FinetuneConfig,
    vectors: EntityVectors | None = None,
    titles: dict[int, str] | None = None,
) -> bool:
    """Set ``rec`` up for the strategy's ``step``, before any adapter is attached (a saved
    adapter's projector weights then load into the fresh projector): a soft step gets a fresh
    projector of ``finetune.soft.projector`` over the encoder's ``vectors`` (seeded, so every
    worker starts from the same weights; ``titles`` feed the item-title term), a contrastive
    step (rsllm) the contrastive objective. Whether the step's micro-batches follow the
    curriculum of :func:`with_curriculum`. The Ray Train worker and :func:`fit_plain` both call
    this, so a strategy's step runs the same in both."""
    soft = cfg.soft
    if MODES[step.mode].soft:
        if vectors is None:
            raise ConfigError(f"tuning step {step.name} is soft: it needs the encoder's vectors")
        torch.manual_seed(cfg.seed)  # a fresh projector's initial weights
        rec.attach_soft(vectors, soft.projector, titles, soft.vectors)
    if step.contrastive:
        rec.model.objectives[REC] = SoftContrastive(
            soft.user_item_weight, soft.item_title_weight, soft.temperature
        )
    return MODES[step.mode].soft and soft.curriculum


def fit_step(
    recommender: LLMRecommender,
    step: TuneStep,
    cfg: FinetuneConfig,
    train: TaskRows,
    valid: EvalSet | None = None,
    vectors: EntityVectors | None = None,
    titles: dict[int, str] | None = None,
    start_from: str = "",
    prefix_cut: PrefixCut | None = None,
    aux: Mapping[str, TaskRows] | None = None,
) -> TuningRun:
    """One step of a strategy (:func:`binllm_core.llm.strategies.plan`) in this process, set up
    by :func:`prepare` as the Ray Train worker sets it up: :func:`fit_plain` with the step's
    budget, adapter training, curriculum and task (a listwise step: ``train`` and ``valid``
    hold whole groups; its best adapter is the one of the best valid NDCG@10)."""
    curriculum = prepare(recommender, step, cfg, vectors, titles)
    return fit_plain(
        recommender,
        train,
        step.cfg,
        cfg,
        valid,
        start_from,
        prefix_cut,
        aux,
        step.train_lora,
        curriculum,
        step.task,
    )


def fit_plain(
    recommender: LLMRecommender,
    train: TaskRows,
    step_cfg: TuneStepConfig,
    cfg: FinetuneConfig,
    valid: EvalSet | None = None,
    start_from: str = "",
    prefix_cut: PrefixCut | None = None,
    aux: Mapping[str, TaskRows] | None = None,
    train_lora: bool = True,
    curriculum: bool = False,
    task: str = REC,
) -> TuningRun:
    """Tune ``recommender`` in this process; evaluate every ``cfg.eval_every`` steps when
    ``valid`` is given; with ``prefix_cut``, shared prefixes run once (on prefix-grouped
    micro-batches under ``cfg.batch_by_prefix``); with ``aux`` rows, their tasks take
    ``cfg.aux`` of the micro-batches; ``train_lora`` False trains the extra modules alone;
    ``curriculum`` swaps soft prompts for ``train.plain`` as :func:`with_curriculum`; a
    listwise ``task`` trains on whole groups and selects by NDCG@10 (:class:`TuningRun`). The
    finished run (its ``state`` holds the evaluations and counters; its ``best_dir`` the best
    adapter until ``close``)."""
    n_train = len(train) // group_size(train.labels) if task != REC else len(train)
    run = TuningRun(
        recommender, cfg, step_cfg, n_train, prefix_cut=prefix_cut, train_lora=train_lora, task=task
    )
    run.setup(start_from=start_from)
    group_by = prefix_cut if cfg.batch_by_prefix else None
    stream = micro_batches(train, step_cfg.batch_size, cfg.seed, group_by, aux, cfg.aux, task)
    if curriculum:
        stream = with_curriculum(stream, run.progress, f"{cfg.seed}/curriculum")
    while not run.done:
        run.train_step(stream)
        if valid is not None and run.due_for_eval:
            run.evaluate(valid)
    run.rec.train(False)
    return run
