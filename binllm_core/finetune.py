"""Plain-torch pieces of LoRA fine-tuning, shared by the Ray Train loop and plain loops.

Batching (tokenise + left pad), the BCE loss on the answer score with gradient accumulation,
AdamW with weight decay on matrices only, linear warm-up over *global* steps then cosine to a
minimum, validation AUC/UAUC and early stopping. :func:`fit_plain` strings them together in one
process (benchmarks, tests); ``pipelines/finetune.py`` does the same on Ray Train workers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from binllm_core.backbone import (
    AnswerScore,
    Backbone,
    answer_scores,
    bce_loss,
    encode,
    score_prompts,
)
from binllm_core.config import FinetuneConfig, TuneStepConfig
from binllm_core.metrics import auc, uauc


# ---- LoRA and optimiser ------------------------------------------------------------------------
def lora_config(cfg: FinetuneConfig) -> Any:
    """The peft ``LoraConfig`` of the run (official: r 8, alpha 16, dropout 0.05, q/v)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: torch.nn.Module, cfg: FinetuneConfig, init_adapter: str = "") -> Any:
    """Wrap the frozen base model with a trainable adapter: fresh, or loaded from a folder."""
    from peft import PeftModel, get_peft_model

    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    return get_peft_model(model, lora_config(cfg))


def make_optimizer(model: torch.nn.Module, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; decay only on weight matrices (as the official runner)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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


# ---- batches and the loss ---------------------------------------------------------------------
@dataclass
class Batch:
    """A tokenised micro-batch; ``n_tokens`` counts real (non-pad) tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.n_tokens,
        )


def collate(
    tokenizer: Any, prompts: Sequence[str], labels: Sequence[int], max_length: int
) -> Batch:
    """Tokenise and left-pad a micro-batch of prompts with their 0/1 labels."""
    enc = encode(tokenizer, list(prompts), max_length)
    return Batch(
        enc["input_ids"],
        enc["attention_mask"],
        torch.as_tensor(np.asarray(labels), dtype=torch.float32),
        int(enc["attention_mask"].sum()),
    )


def backward(
    model: torch.nn.Module, batch: Batch, answer: AnswerScore, grad_accum: int
) -> float:
    """Forward + backward of one micro-batch (loss scaled for accumulation); the raw loss."""
    logits = answer_scores(model, batch.input_ids, batch.attention_mask, answer)
    loss = bce_loss(logits, batch.labels)
    (loss / grad_accum).backward()
    return float(loss.detach())


# ---- model selection ---------------------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Track the best validation AUC; ``stop`` after ``patience`` evaluations without a better."""

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

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}


@dataclass
class EvalSet:
    """Validation prompts with labels and users."""

    prompts: list[str]
    labels: list[int]
    uids: list[int]

    def metrics(self, scores: Sequence[float]) -> dict[str, float]:
        return {"auc": auc(self.labels, scores), "uauc": uauc(self.uids, self.labels, scores)}


def evaluate(
    backbone: Backbone, model: torch.nn.Module, data: EvalSet, batch_size: int, max_length: int
) -> dict[str, float]:
    """AUC and UAUC of ``model`` (e.g. a peft wrapper of ``backbone.model``) on ``data``."""
    scores = score_prompts(backbone, data.prompts, batch_size, max_length, model=model)
    return data.metrics(scores.tolist())


# ---- a plain single-process loop ---------------------------------------------------------------
def batches(
    prompts: Sequence[str], labels: Sequence[int], batch_size: int, seed: int
) -> Iterator[tuple[list[str], list[int]]]:
    """Endless shuffled micro-batches (a fresh permutation every epoch; the last partial batch
    is dropped, as with ``drop_last``)."""
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    if len(order) < batch_size:
        raise ValueError(f"{len(order)} train prompts are fewer than one batch of {batch_size}")
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield [prompts[i] for i in idx], [labels[i] for i in idx]


@dataclass
class FitResult:
    """What a plain fit did: evaluations, best AUC and step, throughput counters."""

    evals: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = float("nan")
    best_step: int = -1
    steps: int = 0
    sequences: int = 0
    tokens: int = 0
    train_seconds: float = 0.0


def fit_plain(
    backbone: Backbone,
    model: torch.nn.Module,
    train: tuple[Sequence[str], Sequence[int]],
    step_cfg: TuneStepConfig,
    cfg: FinetuneConfig,
    valid: EvalSet | None = None,
    on_best: Callable[[torch.nn.Module], None] | None = None,
) -> FitResult:
    """Train ``model`` (peft-wrapped) in this process; evaluate every ``cfg.eval_every`` steps."""
    device = next(model.parameters()).device
    total = planned_steps(step_cfg, len(train[0]))
    schedule = Schedule.of(step_cfg, total)
    optimizer = make_optimizer(model, cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience)
    result = FitResult()
    stream = batches(train[0], train[1], step_cfg.batch_size, cfg.seed)
    model.train()
    for step in range(total):
        started = time.perf_counter()
        set_lr(optimizer, schedule.lr_at(step))
        for _ in range(step_cfg.grad_accum):
            prompts, labels = next(stream)
            batch = collate(backbone.tokenizer, prompts, labels, cfg.max_length).to(device)
            backward(model, batch, backbone.answer, step_cfg.grad_accum)
            result.sequences += len(prompts)
            result.tokens += batch.n_tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_seconds += time.perf_counter() - started
        result.steps = step + 1
        last = step + 1 == total
        if valid is not None and ((step + 1) % cfg.eval_every == 0 or last):
            metrics = evaluate(backbone, model, valid, cfg.eval_batch_size, cfg.max_length)
            result.evals.append({"step": step + 1, **metrics})
            if stopper.update(metrics["auc"], step + 1) and on_best is not None:
                on_best(model)
            if stopper.stop:
                break
    result.best_auc, result.best_step = stopper.best, stopper.best_step
    return result
