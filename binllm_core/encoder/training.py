"""Training the encoder: one loop body every caller drives.

The loss is BCE-with-logits. Training mixes continuous and binary codes element-wise (``o = z``
if ``rand > beta`` else ``sign(z)``), with ``beta`` rising by ``beta_step`` every 2 epochs up to
1. Evaluation always uses the binary codes. By default the binary model and the float baseline
on the same backbone are trained side by side in one pass over the data
(:class:`EncoderTraining`), so a stage gets both from one run. Each model keeps its own best
weights by its own valid score (the float baseline is measured at its best, not at the codes'),
and training stops when neither improves any more; the checkpoint Ray keeps follows the
*primary* model (the binary one, or the float one when ``binary`` is off). With
``ema_decay``, what is validated and kept is a moving average of the weights. With
``float_first`` the two train one after the other instead: the float model to its best epoch,
then the codes from its tables (:attr:`EncoderTraining.codes_start`).

:class:`EncoderTraining` is the loop body: the Ray Train worker drives it epoch by epoch with
checkpoints, and :func:`fit` is the same loop in one process (benchmarks, tests).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from binllm_core.config import EncoderConfig, to_dict
from binllm_core.encoder.data import Rows, normalized_adjacency, train_graph
from binllm_core.encoder.model import BACKBONES, BINARY, FLOAT, CollabModel, EncoderSet
from binllm_core.encoder.objectives import (
    NDCG,
    OBJECTIVES,
    Batch,
    Seen,
    distill_loss,
    list_ndcg,
)
from binllm_core.errors import StageError
from binllm_core.evaluation.metrics import score_report
from binllm_core.storage import jsonable

WEIGHTS_FILE, KEPT_FILE, OPTIMIZER_FILE, STATE_FILE = (
    "model.safetensors",
    "kept.safetensors",
    "optimizer.safetensors",
    "state.json",
)
AVERAGE_PREFIX = "average."
"""Key prefix of the moving average's weights in :data:`WEIGHTS_FILE`."""


def beta_at(epoch: int, beta_step: float) -> float:
    """Chance that a code element is binary during ``epoch`` (0-based).

    The official loop raises beta after every epoch with ``epoch % 2 == 0``, so epoch 0 trains
    with 0, epochs 1-2 with one step, 3-4 with two, ...; capped at 1 (fully binary).
    """
    return min(1.0, beta_step * ((epoch + 1) // 2))


def lr_factor(epoch: int, cfg: EncoderConfig) -> float:
    """The share of each learning rate used in ``epoch`` (0-based): 1 (``constant``), or a
    half cosine from 1 at the first epoch to 0 at ``max_epochs`` (``cosine``). A function of
    the epoch alone, so a resumed run continues the same schedule."""
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.max_epochs))


def epoch_limit(cfg: EncoderConfig) -> int:
    """The most epochs a run can take: ``max_epochs``, or twice that with ``float_first``
    (each model's phase has the limit)."""
    return cfg.max_epochs * (2 if cfg.float_first else 1)


def ema_decay_at(step: int, decay: float) -> float:
    """The moving average's decay after ``step`` optimizer steps (1-based): ``decay``, lower
    early on (``(1+t)/(10+t)``) so that the average is not held at the initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step))


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """Torch's deterministic kernels for the duration, on CPU. With more than one thread the
    embedding tables' backward adds its scattered gradients in an order that varies from
    process to process, and through the sign flips two runs of one seed drift apart (ml-100k,
    64-bit codes, 2 threads: other codes after 15 epochs; the same with this, at about 15 % more
    time per epoch). Not on GPUs, where some kernels (LightGCN's sparse product) have no
    deterministic form."""
    if device.type != "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_config(cfg: EncoderConfig) -> None:
    """The encoder's rules (:meth:`EncoderConfig.check`, also run when a config is loaded), for
    a config built in code; a bad value is a one-line :class:`ConfigError`."""
    cfg.check("encoder")


def needs_seen(cfg: EncoderConfig) -> bool:
    """Whether the configured objective reads every train row (its negatives, its lists)."""
    objective = OBJECTIVES[cfg.objective]
    return objective.implicit or objective.serves == NDCG


def needs_graph(cfg: EncoderConfig) -> bool:
    """Whether the configured backbone is built with the train graph (the train positives)."""
    return BACKBONES[cfg.backbone].needs_graph


# ---- training --------------------------------------------------------------------------------
class EncoderTraining:
    """Models, optimizer and the early-stopping state of one encoder training run.

    Drive it with :meth:`train_epoch` then :meth:`validate` per epoch until :attr:`finished`;
    :meth:`save` / :meth:`load` write and read a checkpoint folder (safetensors + JSON) that
    resumes the run exactly: every epoch draws its shuffle and its code mix from a generator
    seeded by ``(seed, epoch, rank)``, not from a running random state.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        user_num: int,
        item_num: int,
        graph: tuple[np.ndarray, np.ndarray] | None = None,
        device: torch.device | str = "cpu",
        seen: Rows | None = None,
    ) -> None:
        """``seen``: every train row (all workers'), which the implicit objectives draw their
        negatives around and leave out of the valid lists; needed by those objectives."""
        check_config(cfg)
        self.cfg = cfg
        self.objective = OBJECTIVES[cfg.objective]
        self.seen: Seen | None = None
        self.popularity = np.zeros(item_num, np.int64)
        if needs_seen(cfg):
            if seen is None:
                raise StageError(f"the {cfg.objective} objective needs every train row")
            self.seen = Seen.of(seen, user_num, item_num)
            liked = seen.items[seen.labels > 0.5]
            self.popularity = np.bincount(liked, minlength=item_num)[:item_num]
        self.user_num, self.item_num = user_num, item_num
        self.device = torch.device(device)
        seed_everything(cfg.seed)
        backbone = BACKBONES[cfg.backbone]
        adjacency = None
        if backbone.needs_graph:
            if graph is None:
                raise StageError(f"the {cfg.backbone} backbone needs the train graph")
            adjacency = normalized_adjacency(user_num, item_num, *graph).to(self.device)
        names = [BINARY, FLOAT] if cfg.binary else [FLOAT]
        self.models = EncoderSet(
            {
                name: CollabModel(
                    backbone(user_num, item_num, cfg, adjacency),
                    cfg.dim,
                    binary=name == BINARY,
                    shared_projection=cfg.shared_projection,
                    prior_bits=cfg.prior_bits,
                    logit_scale=cfg.logit_scale,
                    bits=cfg.bits,
                )
                for name in names
            }
        ).to(self.device)
        if cfg.float_init_std != 1.0:
            backbone = self.models.models[FLOAT].backbone
            with torch.no_grad():
                for table in (backbone.user_emb.weight, backbone.item_emb.weight):
                    table.normal_(0.0, cfg.float_init_std)
                    table[0] = 0.0  # padding
        self.primary = names[0]
        self.codes_start: int | None = None if cfg.float_first else 0
        """The epoch the codes began training at: 0 side by side; with ``float_first`` None
        while the float model trains alone, then the epoch after its last."""
        self.averaged: EncoderSet | None = None
        """A moving average of :attr:`models` (``ema_decay`` > 0): what is validated, kept
        and exported."""
        if cfg.ema_decay > 0:
            self.averaged = copy.deepcopy(self.models).requires_grad_(False)
        self.steps = 0
        """Optimizer steps taken so far (the moving average's warm-up)."""
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        """Each model's weights (as validated) at its best valid score so far."""
        groups = []
        for name, model in self.models.models.items():
            lr, wd = (
                (cfg.lr, cfg.weight_decay)
                if name == BINARY
                else (cfg.float_lr, cfg.float_weight_decay)
            )
            groups.append({"params": list(model.parameters()), "lr": lr, "weight_decay": wd})
        self.optimizer = torch.optim.Adam(groups)
        self.base_lrs = [group["lr"] for group in groups]
        self.forward_module: nn.Module = self.models
        self.epoch = -1  # last finished epoch
        self.best: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.resumed_at: list[int] = []
        """Epochs at which the run went on from a checkpoint (after a failure or a re-run)."""
        self.finished = False

    # ---- one epoch ---------------------------------------------------------------------------
    @property
    def in_training(self) -> tuple[str, ...]:
        """The models this epoch trains and validates: both side by side; with ``float_first``
        the float model, then the binary one."""
        if self.codes_start is None:
            return (FLOAT,)
        if self.cfg.float_first:
            return (BINARY,)
        return tuple(self.models.models)

    def phase_epoch(self, epoch: int) -> int:
        """``epoch`` counted from the start of the models in training (beta, learning rates)."""
        return epoch - (self.codes_start or 0)

    def epoch_generator(self, epoch: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch * 1_009 + rank)

    def train_epoch(self, rows: Rows, rank: int = 0, world_size: int = 1) -> float:
        """One pass over ``rows`` (this worker's shard) in batches of ``batch_size / world``.

        Shards must have equal lengths across workers (DDP steps in lockstep).
        """
        epoch = self.epoch + 1
        beta = beta_at(self.phase_epoch(epoch), self.cfg.beta_step)
        gen = self.epoch_generator(epoch, rank)
        rng = np.random.default_rng([self.cfg.seed, epoch, rank])
        batch_size = max(1, self.cfg.batch_size // world_size)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_factor(self.phase_epoch(epoch), self.cfg)
        started = time.perf_counter()
        self.models.train()
        with deterministic_kernels(self.device):
            total, steps = self._steps(rows, batch_size, beta, gen, rng)
        self.epoch = epoch
        seconds = round(time.perf_counter() - started, 4)
        record = {"epoch": epoch, "beta": beta, "loss": total / max(steps, 1), "seconds": seconds}
        self.history.append(record)
        return total / max(steps, 1)

    def _steps(
        self,
        rows: Rows,
        batch_size: int,
        beta: float,
        gen: torch.Generator,
        rng: np.random.Generator,
    ) -> tuple[float, int]:
        """The optimizer steps of one epoch: the summed loss and the number of steps."""
        total, steps = 0.0, 0
        for batch in self.objective.batches(rows, self.cfg, batch_size, gen, rng, self.seen):
            batch.users, batch.items = batch.users.to(self.device), batch.items.to(self.device)
            batch.labels = batch.labels.to(self.device)
            logits = self.forward_module(
                batch.users, batch.items, beta, gen, names=self.in_training
            )
            loss = sum(self.objective.loss(x, batch, self.cfg) for x in logits.values())
            if self.cfg.distill_weight and BINARY in logits:
                teacher = self._teacher(batch, logits)
                term = distill_loss(logits[BINARY], teacher, batch, self.cfg.distill_temperature)
                loss = loss + self.cfg.distill_weight * term
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            self._update_average()
            total += float(loss.detach())
            steps += 1
        return total, steps

    @torch.no_grad()
    def _teacher(self, batch: Batch, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float model's logits of the batch, carrying no gradient: trained beside the codes
        in this step, or held at its kept weights (``float_first``)."""
        if FLOAT in logits:
            return logits[FLOAT].detach()
        return self.models.models[FLOAT](batch.users, batch.items)

    @torch.no_grad()
    def _update_average(self) -> None:
        if self.averaged is None:
            return
        weight = 1.0 - ema_decay_at(self.steps, self.cfg.ema_decay)
        for average, live in zip(self.averaged.parameters(), self.models.parameters(), strict=True):
            average.lerp_(live.detach(), weight)

    @property
    def evaluated(self) -> EncoderSet:
        """The models as validated, kept and exported: the moving average, or the live ones."""
        return self.averaged if self.averaged is not None else self.models

    def validate(self, valid: Rows, test: Rows | None = None) -> bool:
        """Score the epoch on ``valid``; on a model's best valid score so far also on ``test``.
        The score is the one the objective's codes serve: AUC, or NDCG@10 of the lists.

        Returns whether the primary model improved, or the float model while it trains alone
        (the weights to keep: the stage checkpoints them). Sets
        :attr:`finished` when every model in training has gone ``patience`` epochs without a
        better valid score, or at ``max_epochs`` (with ``float_first``, the float model's end
        starts the codes instead: :meth:`_start_codes`).
        """
        self.evaluated.eval()
        improved = False
        record = self.history[-1]
        served = self.objective.serves
        for name in self.in_training:
            model = self.evaluated.models[name]
            report = evaluate(model, valid)
            if served == NDCG:
                report[NDCG] = self.list_ndcg(model, valid)
                record[f"{name}_valid_{NDCG}"] = report[NDCG]
            record[f"{name}_valid_auc"] = report["auc"]
            best = self.best.get(name)
            if best is None or _gt(report[served], best["valid"][served]):
                test_report = evaluate(model, test) if test is not None else {}
                self.best[name] = {"epoch": self.epoch, "valid": report, "test": test_report}
                self.kept[name] = _snapshot(model)
                # While the float model trains alone its best is the one to keep (and resume).
                improved |= name == self.primary or self.codes_start is None
        # Each model has its own patience; the run ends when none of them improves any more.
        since_best = min(self.epoch - self.best[name]["epoch"] for name in self.in_training)
        ran = self.phase_epoch(self.epoch) + 1
        if since_best >= self.cfg.patience or ran >= self.cfg.max_epochs:
            if self.codes_start is None:
                self._start_codes()
            else:
                self.finished = True
        return improved

    @torch.no_grad()
    def _start_codes(self) -> None:
        """Hold the float model at its kept weights and start the binary model's embedding
        tables from them (live and averaged); the codes train from the next epoch."""
        kept = self.kept[FLOAT]
        for models in {id(m): m for m in (self.models, self.evaluated)}.values():
            teacher = models.models[FLOAT]
            teacher.load_state_dict(kept)
            student = models.models[BINARY].backbone
            student.user_emb.weight.copy_(teacher.backbone.user_emb.weight)
            student.item_emb.weight.copy_(teacher.backbone.item_emb.weight)
        self.codes_start = self.epoch + 1

    @property
    def valid_auc(self) -> float:
        """Valid AUC of the primary model at the last epoch (None where it was not trained)."""
        return self.history[-1].get(f"{self.primary}_valid_auc")

    @property
    def valid_score(self) -> float:
        """The primary model's valid score at the last epoch that its best epoch is chosen by:
        AUC, or NDCG@10 of the lists (None where it was not trained)."""
        return self.history[-1].get(f"{self.primary}_valid_{self.objective.serves}")

    def list_ndcg(self, model: CollabModel, valid: Rows) -> float:
        """NDCG@10 of ``model``'s valid lists: by its ±1 codes (binary) or embeddings (float)."""
        assert self.seen is not None
        users, items = model.signs() if model.binary else model.backbone.tables()
        return list_ndcg(users.detach(), items.detach(), valid, self.seen, self.popularity)

    @property
    def best_epoch(self) -> int:
        return self.best[self.primary]["epoch"]

    def restore_kept(self) -> None:
        """Put each model's kept weights (those of its best valid score) in place to export."""
        for name, weights in self.kept.items():
            self.evaluated.models[name].load_state_dict(weights)

    def signs(self) -> tuple[np.ndarray, np.ndarray]:
        """±1 codes (numpy float32) of every user and item id from the primary model."""
        self.evaluated.eval()
        users, items = self.evaluated.models[self.primary].signs()
        return users.cpu().numpy(), items.cpu().numpy()

    def vectors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Continuous (user, item) tables by id: ``relaxed``, the primary model's pre-sign
        vectors; ``float``, the embeddings of the continuous model (the same for a float-only
        encoder)."""
        self.evaluated.eval()
        out = {}
        for name, model in (("relaxed", self.primary), ("float", FLOAT)):
            users, items = self.evaluated.models[model].relaxed()
            out[name] = (users.detach().cpu().numpy(), items.detach().cpu().numpy())
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The live weights, and the moving average's under :data:`AVERAGE_PREFIX`."""
        out = _snapshot(self.models)
        if self.averaged is not None:
            out.update({AVERAGE_PREFIX + k: v for k, v in _snapshot(self.averaged).items()})
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        live = {k: v for k, v in weights.items() if not k.startswith(AVERAGE_PREFIX)}
        self.models.load_state_dict(live)
        if self.averaged is not None:
            n = len(AVERAGE_PREFIX)
            average = {k[n:]: v for k, v in weights.items() if k.startswith(AVERAGE_PREFIX)}
            self.averaged.load_state_dict(average)

    def save(self, folder: str | Path) -> None:
        """Write weights, optimizer state and the run state into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.weights(), str(folder / WEIGHTS_FILE))
        kept = {f"{name}.{k}": v for name, weights in self.kept.items() for k, v in weights.items()}
        save_file(kept, str(folder / KEPT_FILE))
        opt = self.optimizer.state_dict()
        flat = {
            f"{idx}.{key}": value.detach().cpu().reshape(value.shape).clone()
            for idx, state in opt["state"].items()
            for key, value in state.items()
        }
        save_file(flat, str(folder / OPTIMIZER_FILE))
        state = {
            "config": to_dict(self.cfg),
            "user_num": self.user_num,
            "item_num": self.item_num,
            "epoch": self.epoch,
            "steps": self.steps,
            "codes_start": self.codes_start,
            "finished": self.finished,
            "best": self.best,
            "history": self.history,
            "resumed_at": self.resumed_at,
            "param_groups": opt["param_groups"],
        }
        (folder / STATE_FILE).write_text(json.dumps(jsonable(state), indent=1))

    def load(self, folder: str | Path, weights_only: bool = False) -> None:
        """Restore a checkpoint written by :meth:`save` (only the weights, live and kept, if
        ``weights_only``)."""
        folder = Path(folder)
        state = read_state(folder)
        if (state["user_num"], state["item_num"]) != (self.user_num, self.item_num):
            raise StageError(
                f"checkpoint {folder} was trained for {state['user_num']} users and "
                f"{state['item_num']} items, the samples have {self.user_num} and {self.item_num}",
                todo="run the encode stage with --force or a new output_root",
            )
        self.load_weights(load_file(str(folder / WEIGHTS_FILE), device=str(self.device)))
        self.kept = {}
        for key, value in load_file(str(folder / KEPT_FILE), device=str(self.device)).items():
            name, param = key.split(".", 1)
            self.kept.setdefault(name, {})[param] = value
        if weights_only:
            return
        flat = load_file(str(folder / OPTIMIZER_FILE), device=str(self.device))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        for entry in opt_state.values():
            if "step" in entry:
                entry["step"] = entry["step"].cpu()
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.epoch, self.finished = state["epoch"], state["finished"]
        self.steps = state["steps"]
        self.codes_start = state.get("codes_start", 0)
        self.best, self.history = state["best"], state["history"]
        self.resumed_at = state["resumed_at"]


def read_state(folder: str | Path) -> dict[str, Any]:
    """The JSON run state of a checkpoint folder."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def evaluate(model: CollabModel, rows: Rows) -> dict[str, float]:
    """AUC/UAUC overall, warm and cold of a model's evaluation scores on ``rows``."""
    scores = model.predict(rows.users, rows.items)
    warm = rows.warm if rows.warm is not None else np.zeros(len(rows), bool)
    not_cold = rows.not_cold if rows.not_cold is not None else np.ones(len(rows), bool)
    return score_report(rows.users, rows.labels, scores, warm, not_cold)


def fit(
    cfg: EncoderConfig,
    data: dict[str, Rows],
    user_num: int,
    item_num: int,
    after_epoch: Callable[[EncoderTraining], None] | None = None,
) -> EncoderTraining:
    """The whole training in this process; returns it with each model's kept weights in place.
    ``after_epoch`` sees the training after each epoch is validated (its record:
    ``training.history[-1]``)."""
    graph = train_graph(data["train"]) if needs_graph(cfg) else None
    training = EncoderTraining(cfg, user_num, item_num, graph, seen=data["train"])
    while not training.finished:
        training.train_epoch(data["train"])
        training.validate(data["valid"], data.get("test"))
        if after_epoch is not None:
            after_epoch(training)
    training.restore_kept()
    return training


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _gt(a: float | None, b: float | None) -> bool:
    """``a > b`` where an undefined AUC (nan, or null read back from JSON) loses to any number."""
    if a is None or math.isnan(a):
        return False
    return b is None or math.isnan(b) or a > b
