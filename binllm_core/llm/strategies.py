"""Tuning strategies: which steps ``finetune.strategy`` runs, each with its prompt mode, budget and
options (:class:`TuneStep`). The finetune stage's Ray Train workers and the plain loop of the
benchmarks read the same plan.

A step trains one task: ``rec`` (pointwise Yes/No on rated items) or a listwise loss of
:data:`RANKING_TASKS` on groups of a liked item and the retriever's candidates
(:mod:`binllm_core.prompts.ranking_groups`). The task also says which valid metric keeps the
step's best adapter and stops it early (:attr:`TuneStep.selects`): AUC for ``rec``, the groups'
NDCG@10 for a listwise step, the figure of the lists it is trained to order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from binllm_core.modes import SOFT

REC = "rec"
RANKING_TASKS = ("rank", "rank_pairs")
"""The listwise tasks, torch-free (config checks ``finetune.ranking.loss`` against them): the
:class:`~binllm_core.llm.objectives.ListRanking` entries of
:data:`binllm_core.llm.objectives.OBJECTIVES` (a test checks both agree)."""
SELECTS = {REC: "auc", **dict.fromkeys(RANKING_TASKS, "ndcg10")}
"""Task -> the valid metric that keeps a step's best adapter and stops it early."""

if TYPE_CHECKING:  # config checks strategy names against STRATEGIES: no import back at run time
    from binllm_core.config import FinetuneConfig, TuneStepConfig


@dataclass(frozen=True)
class TuneStep:
    """One tuning step of the strategy: its name, prompt mode, budget, starting adapter, the
    shares of its micro-batches that auxiliary tasks take (``finetune.aux``), whether the LoRA
    adapter learns (else only the projector of soft prompts), whether the contrastive terms
    of ``finetune.soft`` join the loss, and the task it trains (``rec``, or a listwise loss of
    :data:`RANKING_TASKS`, whose ``cfg.batch_size`` counts groups)."""

    name: str
    mode: str
    cfg: TuneStepConfig
    from_previous: bool
    aux: dict[str, float]
    train_lora: bool = True
    contrastive: bool = False
    task: str = REC

    @property
    def listwise(self) -> bool:
        """Trained on ranking groups (:mod:`binllm_core.prompts.ranking_groups`)."""
        return self.task in RANKING_TASKS

    @property
    def selects(self) -> str:
        """The valid metric that keeps the best adapter and stops the step early."""
        return SELECTS[self.task]


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


def _ranking(cfg: FinetuneConfig) -> list[tuple]:
    return [("step1", cfg.code_mode, cfg.ranking.step, {"task": cfg.ranking.loss})]


def _one_step_ranking(cfg: FinetuneConfig) -> list[tuple]:
    (rank,) = _ranking(cfg)
    return [*_one_step(cfg), ("step2", *rank[1:])]


STRATEGIES = {
    "two_step": _two_step,
    "one_step": _one_step,
    "text_only": _text_only,
    "collm": _collm,
    "rsllm": _rsllm,
    "ranking": _ranking,
    "one_step_ranking": _one_step_ranking,
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
