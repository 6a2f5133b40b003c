"""Stage finetune on Ray Train: 2 CPU workers, two steps (text, then soft prompts with the
projector), a worker failure, adapter and projector reload.

One test on purpose: every TorchTrainer start costs ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from binllm_core.evaluation.metrics import auc
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.soft import EntityVectors
from binllm_core.llm.tuning import interleave
from binllm_core.prompts.templates import templates_from_config
from binllm_core.storage import MANIFEST, read_output
from pipelines.ops.prompt_selection import prompt_index
from pipelines.ops.retrieval import CANDIDATES_SCHEMA
from pipelines.runtime.stage import StageContext, run_stage
from pipelines.stages.finetune import FAULT_POINT, FINISHED, _prefix_groups, train_sample_ids
from tests.builders import fake_upstream, make_cfg, publish_stage, read_prompts, stage

pytestmark = pytest.mark.slow  # Ray Train

OVERRIDES = [
    "finetune.strategy=rsllm",
    "prompts.modes=[text,soft]",
    "finetune.soft.vectors=relaxed",
    # The label is one coordinate of the item vector: at the default weights (0.1) the InfoNCE
    # terms pull the tiny model's projector elsewhere and valid AUC stays near 0.5 in 100 steps
    # (plain loop, measured); at 0.01 it learns, the terms still in the loss.
    "finetune.soft.user_item_weight=0.01",
    "finetune.soft.item_title_weight=0.01",
    "finetune.num_workers=2",
    "finetune.eval_every=20",
    "finetune.patience=3",
    "finetune.max_length=256",
    "finetune.step1={lr: 1.0e-2, warmup_steps: 5, batch_size: 8, max_steps: 20}",
    "finetune.step2={lr: 1.0e-2, warmup_steps: 5, batch_size: 8, max_steps: 100}",
]


def test_two_steps_on_two_workers_survive_a_failure(
    tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path, *OVERRIDES)
    fake_upstream(cfg)
    run_stage(cfg, stage("render"))
    # Step 2 (soft prompts: projector, LoRA, contrastive terms) fails after its step 30, past
    # its checkpoint at 20: the projector's and the optimizer's state must come back.
    monkeypatch.setenv("BINLLM_TEST_FAULT", f"{FAULT_POINT}@30")
    manifest = run_stage(cfg, stage("finetune"))
    metrics = manifest["metrics"]
    step1, step2 = metrics["steps"]["step1"], metrics["steps"]["step2"]
    out = tmp_path / "t" / "finetune"

    assert step1["restarts"] == 0 and step1["steps"] == 20 and step1["mode"] == "text"
    assert step2["mode"] == "soft" and step2["restarts"] == 1 and step2["steps"] > 30
    adapters = out / manifest["version"] / "adapters"
    for name in ("step1", "step2"):
        assert (adapters / name / "adapter_model.safetensors").exists()
        assert not list((adapters / name).glob("*.bin"))
        # recorded relative to the run, so that a copied run uses its own adapters
        assert metrics["adapters"][name] == f"finetune/{manifest['version']}/adapters/{name}"
    assert step1["sequences_per_s"] > 0 and step2["tokens_per_s"] > 0
    evals = json.loads((out / MANIFEST).read_text())["tables"]["evals"]
    assert evals["rows"] >= 3

    assert (adapters / "step2" / "extra_modules.safetensors").exists()
    assert not (adapters / "step1" / "extra_modules.safetensors").exists()

    # Only the embeddings tell the label: text-only stays near chance, the soft tokens learn it.
    assert step1["best_valid_auc"] < 0.7
    assert step2["best_valid_auc"] > 0.85, step2

    # The saved step-2 adapter and projector, loaded on a fresh base with the run's vectors,
    # reproduce the best validation AUC.
    prompts = read_prompts(tmp_path)
    valid = prompts.filter(pc.and_(pc.equal(prompts["mode"], "soft"), prompts["valid_small"]))
    torch.set_num_threads(1)
    vectors = EntityVectors.from_table(
        read_output(str(tmp_path / "t" / "encode"), "embeddings"), "relaxed"
    )
    rec = LLMRecommender.from_saved(cfg.model, adapters / "step2", vectors)
    scores, _ = Scorer(rec, 64, 256).score(
        valid["prompt"].to_pylist(), valid["soft_ids"].to_pylist()
    )
    assert auc(valid["label"].to_pylist(), scores.tolist()) == pytest.approx(
        step2["best_valid_auc"], abs=1e-6
    )

    # Run again as after a driver crash before the publish (the manifest never written): step 1
    # is taken from the checkpoint its finished.json names, starting no worker (no restart);
    # step 2, as if killed before its finished.json was written, resumes from its last
    # checkpoint, which says it is finished. Nothing trains again and the result is the same.
    (out / MANIFEST).unlink()
    runs = {p.name.split("-")[0]: p for p in (out / "checkpoints").glob("step*")}
    assert (runs["step1"] / FINISHED).exists()
    (runs["step2"] / FINISHED).unlink()
    again = run_stage(cfg, stage("finetune"))["metrics"]["steps"]
    assert again["step1"]["restarts"] == step1["restarts"] == 0
    assert again["step2"]["restarts"] == step2["restarts"] + 1
    for name, before in (("step1", step1), ("step2", step2)):
        assert again[name]["steps"] == before["steps"]
        assert again[name]["best_valid_auc"] == before["best_valid_auc"]


def test_init_adapter_that_is_not_an_adapter_is_one_line(tmp_path: Path, ray_session) -> None:
    cfg = make_cfg(tmp_path, *OVERRIDES, f"finetune.init_adapter={tmp_path}")
    fake_upstream(cfg)
    run_stage(cfg, stage("render"))
    with pytest.raises(Exception, match="holds no saved adapter") as err:
        run_stage(cfg, stage("finetune"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "t" / "finetune" / MANIFEST).exists()


def test_aux_tasks_train_by_their_shares_on_two_workers(tmp_path: Path, ray_session) -> None:
    cfg = make_cfg(
        tmp_path,
        "finetune.strategy=text_only",
        "finetune.num_workers=2",
        "finetune.eval_every=6",
        "finetune.max_length=256",
        "finetune.step1={lr: 1.0e-2, warmup_steps: 2, batch_size: 4, max_steps: 12}",
        "prompts.modes=[text,binary]",
        "prompts.aux={tasks: [mim, bpr], rows_per_user: 4, history_len: 5}",
        "finetune.aux={mim: 0.25, bpr: 0.25}",
    )
    fake_upstream(cfg)
    aux = run_stage(cfg, stage("render"))["metrics"]["aux"]
    assert aux["rows_per_task"] == {"bpr": 80, "mim": 80} and aux["users_per_task"]["bpr"] == 20
    assert aux["tokens"]["mim"]["binary"]["mean"] > aux["tokens"]["mim"]["text"]["mean"] > 0

    # Every listed, hidden or preferred item is a train positive of the row's user.
    rows = read_output(str(tmp_path / "t" / "render"), "aux").to_pylist()
    samples = read_output(str(tmp_path / "t" / "samples"), "samples").to_pylist()
    liked = {(s["uid"], s["iid"]) for s in samples if s["split"] == "train" and s["label"]}
    assert {r["task"] for r in rows} == {"mim", "bpr"} and {r["mode"] for r in rows} == {
        "text",
        "binary",
    }
    for row in rows:
        used = [*row["hidden"], *(i for i in row["shown"] if i != row["negative"])]
        assert all((row["uid"], i) in liked for i in used)

    # Each of the two workers trains 12 micro-batches of 4: half rec, a quarter each aux task.
    handler = signal.getsignal(signal.SIGINT)
    step1 = run_stage(cfg, stage("finetune"))["metrics"]["steps"]["step1"]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C still Python's after Ray Train
    assert step1["task_sequences"] == {"rec": 48, "mim": 24, "bpr": 24}
    assert step1["sequences"] == 96 and step1["aux"] == {"mim": 0.25, "bpr": 0.25}
    evals = read_output(str(tmp_path / "t" / "finetune"), "evals").to_pylist()
    assert [e["step"] for e in evals] == [6, 12]
    # train_loss: the mean over rank 0's micro-batches since the last evaluation, whose tasks
    # are the turns of the shares.
    turns = interleave(
        {t: iter(lambda t=t: t, None) for t in ("rec", "bpr", "mim")},
        {"rec": 0.5, "bpr": 0.25, "mim": 0.25},
    )
    for record in evals:
        window = [next(turns) for _ in range(6)]
        mean = sum(record[f"loss_{t}"] for t in window) / 6
        assert record["train_loss"] == pytest.approx(mean, rel=1e-6)
        assert record["loss_mim"] > record["loss_bpr"] > 0 and record["loss_rec"] > 0


def test_prefix_groups_are_keyed_where_the_prompts_are_and_drawn_whole(
    tmp_path: Path, ray_session
) -> None:
    """``batch_by_prefix``: the driver gets (sample_id, key) of every train prompt, one key per
    distinct prefix text, and the budget takes whole groups."""
    cfg = make_cfg(
        tmp_path,
        "prompts.modes=[text]",
        "finetune.strategy=text_only",
        "finetune.batch_by_prefix=true",
        "finetune.max_train_samples=40",
    )
    fake_upstream(cfg)
    run_stage(cfg, stage("render"))
    ctx = StageContext.open(cfg, "finetune")
    cut = templates_from_config(cfg.prompts).prefix_cut()
    groups = _prefix_groups(ctx, "text", cut)

    prompts = read_prompts(tmp_path)
    train = prompts.filter(pc.equal(prompts["split"], "train")).to_pylist()
    prefix = {r["sample_id"]: r["prompt"][: cut(r["prompt"])] for r in train}
    keys = dict(zip(groups["sample_id"].to_pylist(), groups["group"].to_pylist(), strict=True))
    assert sorted(keys) == sorted(prefix)
    texts_of: dict[int, set[str]] = {}
    for sample, key in keys.items():
        texts_of.setdefault(key, set()).add(prefix[sample])
    assert all(len(t) == 1 for t in texts_of.values())  # one prefix text per key
    assert len(texts_of) == len(set(prefix.values())) > 5  # and one key per prefix text

    index = prompt_index(ctx, "text", ["train"], ["sample_id", "split"])
    drawn = set(train_sample_ids(index, cfg.finetune, groups).tolist())
    assert 0 < len(drawn) <= 40
    for key in {keys[s] for s in drawn}:  # every group drawn is drawn whole
        assert {s for s, k in keys.items() if k == key} <= drawn


def test_a_step_resumed_after_a_failure_ends_with_the_uninterrupted_adapter(
    tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that fails after a checkpoint is restarted from it: the same micro-batches
    follow, the same dropout draws, optimizer and schedule, so the adapter is byte for byte
    the one an uninterrupted run writes."""
    overrides = [
        "finetune.strategy=text_only",
        "prompts.modes=[text]",
        "finetune.num_workers=1",
        "finetune.eval_every=4",
        "finetune.patience=10",
        "finetune.lora_dropout=0.2",
        "finetune.max_length=256",
        "finetune.step1={lr: 1.0e-2, warmup_steps: 2, batch_size: 4, max_steps: 10}",
    ]
    adapters = []
    for name, fault in (("whole", ""), ("resumed", f"{FAULT_POINT}@6")):
        cfg = make_cfg(tmp_path / name, *overrides)
        fake_upstream(cfg)
        run_stage(cfg, stage("render"))
        monkeypatch.setenv("BINLLM_TEST_FAULT", fault)
        metrics = run_stage(cfg, stage("finetune"))["metrics"]
        assert metrics["steps"]["step1"]["restarts"] == (1 if fault else 0)
        # The weights after the last step (the published adapter is the best one, which may
        # come from before the failure), from the checkpoint finished.json names.
        runs = tmp_path / name / "t" / "finetune" / "checkpoints"
        (run,) = runs.glob("step1-*")
        last = json.loads((run / FINISHED).read_text())["checkpoint"]
        adapters.append((run / last / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]


def fake_candidates(run: Path, covered: range) -> None:
    """Full-protocol valid lists of the ``covered`` users: the valid-only items first (some of
    each user's own valid items among them), then train items."""
    rows = []
    for uid in covered:
        items = [41 + (uid + r) % 20 for r in range(10)] + [1 + (uid + r) % 40 for r in range(10)]
        for r, iid in enumerate(items):
            rows.append(
                dict(protocol="full", split="valid", uid=uid, iid=iid, user=f"u{uid}",
                     item=f"m{iid}", rank=r + 1, hamming=r, tie=0.0, source="hamming")
            )  # fmt: skip
    publish_stage(run, "retrieve", {"candidates": pa.Table.from_pylist(rows, CANDIDATES_SCHEMA)})


def test_a_listwise_step_trains_on_groups_and_keeps_its_best_valid_ndcg(
    tmp_path: Path, ray_session
) -> None:
    """Strategy ``ranking`` on Ray Train: groups built from samples and the retriever's lists
    (users 16-20 without any get catalog negatives, counted), the evaluations' NDCG@10 and MRR,
    the adapter kept by the best NDCG@10."""
    cfg = make_cfg(
        tmp_path,
        "prompts.modes=[binary]",
        "finetune.strategy=ranking",
        "finetune.eval_every=1",
        "finetune.max_length=256",
        "finetune.ranking={size: 4, pool: 3, per_user: 2, max_valid_users: 6, "
        "step: {lr: 1.0e-2, warmup_steps: 0, batch_size: 2, max_steps: 3}}",
    )
    fake_upstream(cfg)
    fake_candidates(tmp_path / "t", range(1, 16))
    run_stage(cfg, stage("render"))
    manifest = run_stage(cfg, stage("finetune"))
    metrics = manifest["metrics"]
    step = metrics["steps"]["step1"]
    groups = step["groups"]

    samples = read_output(str(tmp_path / "t" / "samples"), "samples").to_pylist()
    liked: dict[int, int] = {}
    for row in samples:
        if row["split"] == "train" and row["label"]:
            liked[row["uid"]] = liked.get(row["uid"], 0) + 1
    expected = {u: min(2, n - 1) for u, n in liked.items() if n >= 2}  # points after 1 like
    assert groups["train_groups"] == sum(expected.values()) == step["n_train"]
    assert groups["train_users"] == len(expected)
    assert groups["train_users_without_candidates"] == len([u for u in expected if u > 15]) > 0
    assert groups["train_held_out_negatives"] > 0  # valid items lead the lists
    valid_users = {r["uid"] for r in samples if r["split"] == "valid" and r["label"]}
    assert groups["valid_groups"] == min(6, len(valid_users)) == step["n_valid"]
    assert groups["valid_held_out_negatives"] == 0  # a valid group never holds a valid item

    assert step["task"] == "rank" and step["selected_by"] == "ndcg10" and step["steps"] == 3
    assert step["task_sequences"] == {"rank": 3 * 2 * 4}
    evals = read_output(str(tmp_path / "t" / "finetune"), "evals").to_pylist()
    assert [e["step"] for e in evals] == [1, 2, 3]
    assert all(e["auc"] is None and 0 <= e["mrr"] <= 1 for e in evals)
    best = max(evals, key=lambda e: e["ndcg10"])
    assert step["best_valid_ndcg10"] == best["ndcg10"] and step["best_step"] == best["step"]
    assert step["best_valid_auc"] is None
    adapter = tmp_path / "t" / metrics["final_adapter"]
    assert (adapter / "adapter_model.safetensors").exists()
