"""The listwise strategies' plans: which steps, in which mode, from which adapter, trained on
which task and selected by which valid metric."""

from __future__ import annotations

from binllm_core.config import load_config
from binllm_core.llm.objectives import OBJECTIVES, ListRanking
from binllm_core.llm.strategies import RANKING_TASKS, SELECTS, plan


def test_ranking_tasks_are_the_listwise_objectives() -> None:
    listwise = tuple(k for k, v in OBJECTIVES.items() if isinstance(v, ListRanking))
    assert RANKING_TASKS == listwise
    assert set(SELECTS) == {"rec", *RANKING_TASKS}


def test_ranking_is_one_listwise_step_from_a_fresh_adapter() -> None:
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "finetune.strategy=ranking",
            "finetune.ranking.loss=rank_pairs",
            "finetune.code_mode=dotdec",
        ],
    ).finetune
    (step,) = plan(cfg)
    assert (step.name, step.mode, step.task, step.from_previous) == (
        "step1",
        "dotdec",
        "rank_pairs",
        False,
    )
    assert step.listwise and step.selects == "ndcg10" and step.cfg == cfg.ranking.step
    assert step.aux == {} and cfg.listwise_steps == ["step1"]


def test_one_step_ranking_starts_the_listwise_step_from_the_pointwise_adapter() -> None:
    cfg = load_config("configs/tiny.yaml", ["finetune.strategy=one_step_ranking"]).finetune
    pointwise, listwise = plan(cfg)
    assert (pointwise.name, pointwise.mode, pointwise.task) == ("step1", "binary", "rec")
    assert pointwise.cfg == cfg.step2 and pointwise.selects == "auc" and not pointwise.listwise
    assert (listwise.name, listwise.mode, listwise.task) == ("step2", "binary", "rank")
    assert listwise.from_previous and listwise.cfg == cfg.ranking.step
    assert cfg.listwise_steps == ["step2"]
    # Starting at the listwise step from a pointwise adapter made elsewhere.
    later = load_config(
        "configs/tiny.yaml",
        [
            "finetune.strategy=one_step_ranking",
            "finetune.start_step=step2",
            "finetune.init_adapter=x",
        ],
    ).finetune
    assert [s.name for s in plan(later)] == ["step2"]
