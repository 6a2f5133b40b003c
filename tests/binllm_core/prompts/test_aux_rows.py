"""Auxiliary task rows: train split only, masks hidden, negatives never the user's, A/B balanced;
and the objectives that train on them (a tiny model learns the BPR answer from the titles)."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest
import torch

from binllm_core.config import (
    AuxConfig,
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    PromptConfig,
    TuneStepConfig,
    load_config,
)
from binllm_core.llm.batches import pad_left, tokenize, with_targets
from binllm_core.llm.objectives import Examples
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.tuning import TaskRows, TuningRun, interleave, micro_batches, shuffled_batches
from binllm_core.prompts.aux_rows import (
    LETTERS,
    AuxTemplates,
    build_rows,
    render_rows,
    repeated_rows,
)
from binllm_core.prompts.render import Lookups

N_USERS, N_ITEMS = 30, 80
TINY = ModelConfig(backbone="tiny")


def samples(seed: int = 0) -> pl.DataFrame:
    """Per user: 8 train interactions in time order, then 2 valid and 2 test; about two thirds
    liked. Valid and test items (81-100) never occur in train, so any of them in a row is a
    leak."""
    rng = random.Random(seed)
    rows, sample_id = [], 0
    for uid in range(1, N_USERS + 1):
        items = rng.sample(range(1, N_ITEMS + 1), 8) + rng.sample(range(N_ITEMS + 1, 101), 4)
        for k, iid in enumerate(items):
            split = "train" if k < 8 else ("valid" if k < 10 else "test")
            label = int(rng.random() < 0.67)
            rows.append(
                dict(
                    sample_id=sample_id,
                    uid=uid,
                    iid=iid,
                    label=label,
                    timestamp=1000 * uid + k,
                    split=split,
                )
            )
            sample_id += 1
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)


def lookups(titles: dict[int, str] | None = None) -> Lookups:
    titles = titles or {i: f"Film {i}" for i in range(1, N_ITEMS + 1)}
    bits = {i: format(i * 37 % 256, "08b") for i in range(1, N_ITEMS + 1)}
    users = {u: format(u * 53 % 256, "08b") for u in range(1, N_USERS + 1)}
    return Lookups(titles, {"binary": users}, {"binary": bits})


def aux_cfg(**fields) -> AuxConfig:
    return AuxConfig(**{"tasks": ["mim", "bpr"], "rows_per_user": 3, "history_len": 5, **fields})


def test_rows_use_the_train_split_only_and_negatives_are_never_rated_in_train() -> None:
    frame = samples()
    train = frame.filter(pl.col("split") == "train")
    liked = {(u, i) for u, i, y in train.select("uid", "iid", "label").iter_rows() if y == 1}
    rated = {(u, i) for u, i in train.select("uid", "iid").iter_rows()}
    rows = build_rows(frame, aux_cfg())
    assert {r.task for r in rows} == {"mim", "bpr"}
    for row in rows:
        assert all(i <= N_ITEMS for i in [*row.listed, *row.shown]), row  # never valid/test
        listed = [*row.listed, *([row.positive] if row.positive is not None else [])]
        assert all((row.uid, i) in liked for i in listed), row  # liked in train
        if row.task == "bpr":
            assert (row.uid, row.negative) not in rated
            assert row.positive not in row.listed  # the pair's liked item comes after the list
        else:
            assert 1 <= len(row.mask_at) < len(row.listed) <= 5
    # Seeded per (seed, task, user): the same rows from the samples in another order.
    assert build_rows(samples().sample(fraction=1.0, shuffle=True, seed=7), aux_cfg()) == rows
    assert build_rows(frame, aux_cfg(seed=1)) != rows


def test_a_masked_title_is_never_visible_in_its_own_prompt() -> None:
    # Two items share a title: the second is dropped from the liked lists, so a window never
    # shows one of them while the other is hidden.
    titles = {i: f"Film {i}" for i in range(1, N_ITEMS + 1)}
    titles[2] = titles[1]
    cfg = aux_cfg(tasks=["mim"], rows_per_user=4, mask_fraction=0.4, min_positives=5)
    rows = build_rows(samples(), cfg, titles)
    table = render_rows(
        rows, lookups(titles), AuxTemplates.of(PromptConfig(aux=cfg)), ["text", "binary"]
    ).to_pylist()
    assert len(table) == 2 * len(rows)
    for row in table:
        hidden = [f'"{titles[i]}"' for i in row["hidden"]]
        assert len(hidden) == 2  # 40 % of 5 titles
        assert not any(h in row["prompt"] for h in hidden), row
        assert row["answer"] == " " + ", ".join(hidden)
        assert row["prompt"].count("[MASK]") == len(hidden) + 1  # and once in the question
        if row["mode"] == "binary":
            assert "feature " + format(row["uid"] * 53 % 256, "08b") in row["prompt"]


def test_bpr_letters_are_balanced_and_the_answer_names_the_liked_item() -> None:
    cfg = aux_cfg(tasks=["bpr"])
    rows = build_rows(samples(), cfg)
    labels = [r.label for r in rows]
    assert abs(sum(labels) - len(labels) / 2) <= 0.5
    table = render_rows(rows, lookups(), AuxTemplates.of(PromptConfig(aux=cfg)), ["text"])
    for row in table.to_pylist():
        first = row["prompt"].split("(A) ")[1].split(" or (B)")[0]
        liked = f'"Film {row["positive"]}"'
        assert (first == liked) == (row["label"] == 1)
        assert row["answer"] == " " + LETTERS[0 if row["label"] else 1]


def test_own_templates_need_their_placeholders() -> None:
    with pytest.raises(ConfigError, match="bpr_template lacks the placeholder <CandidateB>"):
        AuxConfig(bpr_template="<ItemTitleList> <CandidateA>").check("prompts.aux")
    with pytest.raises(ConfigError, match="finetune.aux has mim, which prompts.aux.tasks"):
        load_config("configs/tiny.yaml", ["finetune.aux={mim: 0.2}"])
    with pytest.raises(ConfigError, match="finetune.aux shares sum to 1"):
        FinetuneConfig(aux={"mim": 0.5, "bpr": 0.5}).check("finetune")


def test_interleaving_gives_each_task_its_share_evenly() -> None:
    def stream(task: str):
        while True:
            yield Examples(task, ["p"])

    tasks = ("rec", "mim", "bpr")
    picks = interleave({t: stream(t) for t in tasks}, {"rec": 0.5, "mim": 0.3, "bpr": 0.2})
    seen = [next(picks).task for _ in range(100)]
    assert [seen.count(t) for t in tasks] == [50, 30, 20]
    assert max(len(run) for run in "".join(t[0] for t in seen).split("m")) <= 3  # spread out
    only_rec = micro_batches(TaskRows(["a", "b"], [0, 1]), 2, 0, None)
    assert all(sorted(next(only_rec).labels) == [0, 1] for _ in range(10))
    with pytest.raises(ValueError, match="aux rows of"):
        micro_batches(TaskRows(["a"], [0]), 1, 0, None, {"mim": TaskRows(["b"], [1])}, {})


def test_answer_loss_covers_the_answer_tokens_only(one_thread) -> None:
    rec = LLMRecommender.from_backbone(TINY)
    tok = rec.tokenizer
    batch = with_targets(tok, ["a b c", "a"], [" 1 2", " 3"], max_length=4)
    # The longer answer keeps both tokens and the prompt loses its start; pads are -100.
    assert batch.targets.tolist() == [tok(" 1 2")["input_ids"], [-100, *tok(" 3")["input_ids"]]]
    assert batch.input_ids.shape[1] == 4
    loss = rec.loss(batch, "mim")
    logits = rec.net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    picked = torch.log_softmax(logits[:, -3:-1].float(), -1)
    expected = (
        -(
            picked[0, 0, batch.targets[0, 0]]
            + picked[0, 1, batch.targets[0, 1]]
            + picked[1, 1, batch.targets[1, 1]]
        )
        / 3
    )
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # trains a tiny LLM for 150 steps
def test_a_tiny_model_learns_the_bpr_answer_from_the_titles(one_thread) -> None:
    """Liked items are titled with digits 1-4, the others with 6-9: only the titles tell which
    candidate the user prefers, and held-out titles are new digit strings."""
    rng = random.Random(0)

    def title(liked: bool) -> str:
        return " ".join(str(rng.choice("1234" if liked else "6789")) for _ in range(3))

    def rows(n: int) -> TaskRows:
        cfg = PromptConfig(aux=AuxConfig(tasks=["bpr"]))
        question = AuxTemplates.of(cfg).questions["bpr", False]
        out = TaskRows([], [], [])
        for k in range(n):
            good, bad = f'"{title(True)}"', f'"{title(False)}"'
            label = k % 2
            a, b = (good, bad) if label else (bad, good)
            out.prompts.append(
                question.replace("<ItemTitleList>", f'"{title(True)}"')
                .replace("<CandidateA>", a)
                .replace("<CandidateB>", b)
            )
            out.labels.append(label)
            out.answers.append(" " + LETTERS[0 if label else 1])
        return out

    train, held_out = rows(800), rows(100)
    rec = LLMRecommender.from_backbone(TINY)
    cfg = FinetuneConfig(max_length=256, seed=0)
    step = TuneStepConfig(lr=1e-2, min_lr=1e-4, warmup_steps=10, batch_size=16, max_steps=150)
    run = TuningRun(rec, cfg, step, len(train))
    run.setup()
    stream = shuffled_batches(train, step.batch_size, cfg.seed, task="bpr")
    while not run.done:
        run.train_step(stream)
    assert run.state.task_sequences == {"bpr": 150 * 16}
    rec.train(False)
    with torch.no_grad():
        batch = pad_left(tokenize(rec.tokenizer, held_out.prompts, 256), rec.tokenizer.pad_token_id)
        scores = rec.model(batch, "bpr")
    accuracy = np.mean((scores.numpy() > 0) == np.asarray(held_out.labels, bool))
    assert accuracy > 0.9, accuracy


def test_rows_that_repeat_an_earlier_row_of_their_user_are_counted() -> None:
    """Two liked items make one mim window: of 3 rows per user with one hidden item there are
    at most 2 distinct rows, so each such user repeats at least one."""
    rows = build_rows(samples(), aux_cfg(rows_per_user=3, history_len=2, min_positives=2))
    repeated = repeated_rows(rows)
    keys = {
        (r.task, r.uid, tuple(r.listed), tuple(r.mask_at), r.positive, r.negative) for r in rows
    }
    assert sum(repeated.values()) == len(rows) - len(keys) > 0
    assert repeated["mim"] > 0
    assert repeated_rows(rows[:1]) == {rows[0].task: 0}
