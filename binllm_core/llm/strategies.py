"""Tuning strategies: which steps ``finetune.strategy`` runs, each with its prompt mode, budget and
options (:class:`TuneStep`). The finetune stage's Ray Train workers and the plain loop of the
benchmarks read the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from binllm_core.modes import SOFT

if TYPE_CHECKING:  # config checks strategy names against STRATEGIES: no import back at run time
    from binllm_core.config import FinetuneConfig, TuneStepConfig


@dataclass(frozen=True)
class TuneStep:
    """One tuning step of the strategy: its name, prompt mode, budget, starting adapter, the
    shares of its micro-batches that auxiliary tasks take (``finetune.aux``), whether the LoRA
    adapter learns (else only the projector of soft prompts) and whether the contrastive terms
    of ``finetune.soft`` join the loss."""

    name: str
    mode: str
    cfg: TuneStepConfig
    from_previous: bool
    aux: dict[str, float]
    train_lora: bool = True
    contrastive: bool = False


def _one_step(cfg: FinetuneConfig) -> list[tuple]:
    return [("step1", cfg.code_mode, cfg.step2, {})]


def _text_only(cfg: FinetuneConfig) -> list[tuple]:
    return [("step1", "text", cfg.step1, {})]


def _two_step(cfg: FinetuneConfig) -> list[tuple]:
    return [*_text_only(cfg), ("step2", cfg.code_mode, cfg.step2, {})]


def _collm(cfg: FinetuneConfig) -> list[tuple]:
    return [*_text_only(cfg), ("step2", SOFT, cfg.step2, {"train_lora": False})]


def _rsllm(cfg: FinetuneConfig) -> list[tuple]:
    return [*_text_only(cfg), ("step2", SOFT, cfg.step2, {"contrastive": True})]


STRATEGIES = {
    "two_step": _two_step,
    "one_step": _one_step,
    "text_only": _text_only,
    "collm": _collm,
    "rsllm": _rsllm,
}
"""``finetune.strategy`` -> its steps as (name, prompt mode, budget, TuneStep options); each
step starts from the one before it. A new strategy is an entry here (``finetune.strategy`` is
checked against it at load; the soft step and the one-step rule are read from the steps)."""


def plan(cfg: FinetuneConfig) -> list[TuneStep]:
    """The tuning steps the stage runs: the strategy's, from ``finetune.start_step`` on."""
    steps = []
    for name, mode, budget, options in STRATEGIES[cfg.strategy](cfg):
        aux = dict(cfg.aux) if name in cfg.aux_steps else {}
        steps.append(TuneStep(name, mode, budget, bool(steps), aux, **options))
    names = [s.name for s in steps]
    return steps[names.index(cfg.start_step) :]
