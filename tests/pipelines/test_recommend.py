"""``binllm recommend`` and ``nightly --topk`` on a fake finished run: K rows per user, never an
item the user has, users without a code by ``score.unknown``, the blend's weight forced, chosen
by stage rerank or the retriever's; one identical partition per date; candidates in ``soft``
mode scored with the adapter's projector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from binllm_core.errors import DataError
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from binllm_core.llm.soft import EntityVectors
from binllm_core.prompts.templates import templates_from_config
from binllm_core.prompts.user_pairs import render_candidates, with_row_numbers
from binllm_core.storage import MANIFEST
from jobs.cli import main
from pipelines.pairs import read_pairs, score_pairs
from pipelines.recommend import read_recommendations, recommend
from pipelines.runtime.runs import load_lookups
from pipelines.runtime.stage import StageContext
from tests.builders import candidates, fake_run, publish_stage

pytestmark = pytest.mark.slow  # retrieval and scoring actor pools

DATE = "2026-11-23"
IDENTITY = ["user", "item", "rank", "score", "blend_rank", "retrieval_rank", "hamming", "source"]
IDENTITY += ["cold"]


def users_file(path: Path) -> Path:
    pq.write_table(pa.table({"user": ["u1", "u2", "u3", "u9", "u2", "u10"]}), path)  # u9, u10: new
    return path


def seen_items(cfg) -> dict[str, set[str]]:
    run = Path(cfg.output_root) / cfg.run_name
    samples = pl.read_parquet(run / "samples" / "v-*" / "samples" / "*.parquet")
    items = {i + 1: f"i{i + 1}" for i in range(12)}
    out: dict[str, set[str]] = {}
    for uid, iid in samples.select("uid", "iid").iter_rows():
        out.setdefault(f"u{uid}", set()).add(items[iid])
    return out


def test_recommend_gives_k_unseen_items_per_user_and_cold_users_by_policy(
    tmp_path: Path, ray_session
):
    cfg = fake_run(tmp_path, "score.batch_size=8", "score.sort_window=2", "rerank.alpha=1")
    users = users_file(tmp_path / "users.parquet")
    result = recommend(cfg, str(users), k=3, log=lambda _: None)
    lists = pl.from_arrow(read_recommendations(cfg, "users"))
    assert result["metrics"]["users"] == 5 and result["metrics"]["cold_users"] == 2
    assert result["metrics"]["alpha"] == 1 and result["metrics"]["alpha_from"] == "rerank.alpha"
    assert sorted(lists["user"].unique().to_list()) == ["u1", "u10", "u2", "u3", "u9"]
    for (user,), part in lists.group_by(["user"]):
        assert part.height == 3 and sorted(part["rank"].to_list()) == [1, 2, 3]
        assert not set(part["item"].to_list()) & seen_items(cfg).get(user, set())
        ordered = part.sort("rank")["score"].to_list()
        assert ordered == sorted(ordered, reverse=True)  # the LLM's order: alpha 1, forced
        assert part["blend_rank"].to_list() == part["rank"].to_list()
    cold = lists.filter(pl.col("user").is_in(["u9", "u10"]))  # one list each, not one shared
    assert cold["cold"].all() and cold["source"].unique().to_list() == ["popularity"]
    warm = lists.filter(~pl.col("user").is_in(["u9", "u10"]))
    assert not warm["cold"].any() and warm["source"].unique().to_list() == ["hamming"]

    skip = fake_run(tmp_path / "skip", "score.unknown=skip")
    out = recommend(skip, str(users), k=2, log=lambda _: None)
    assert out["metrics"]["skipped_users"] == 2 and out["metrics"]["rows"] == 3 * 2
    # No stage rerank to choose a weight: the retriever's first two, whatever the LLM says.
    assert out["metrics"]["alpha"] == 0
    assert out["metrics"]["alpha_from"].endswith("stage rerank has not run")
    for _, part in pl.from_arrow(read_recommendations(skip, "users")).group_by(["user"]):
        assert sorted(part["retrieval_rank"].to_list()) == [1, 2]
        assert part.sort("blend_rank")["retrieval_rank"].to_list() == [1, 2]
    with pytest.raises(DataError, match="'u9' was never seen by the encoder"):
        recommend(fake_run(tmp_path / "err", "score.unknown=error"), str(users), k=2)


def test_nightly_topk_twice_for_one_date_gives_one_identical_partition(
    tmp_path: Path, ray_session, capsys: pytest.CaptureFixture
):
    sets = [f"output_root={tmp_path}", "run_name=f", "score.adapters={text: none, binary: none}"]
    cfg = fake_run(tmp_path)
    publish_stage(tmp_path / "f", "render", {})  # the CLI opens only a run that has rendered
    chosen = {"alpha": 0.5, "chosen_by": "valid NDCG@10"}
    union = {"places": 1, "window_days": 30, "chosen_by": "valid Recall@5"}
    metrics = {"blend": {"binary": chosen}, "top_n": 5, "popular_union": union}
    publish_stage(tmp_path / "f", "rerank", {}, metrics)
    run = ["--run", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    args = ["nightly", *run, "--topk", "5", "--date", DATE]
    assert main(args) == 0
    one = pl.from_arrow(read_recommendations(cfg, f"date={DATE}")).sort("user", "rank")
    assert one.height == 8 * 5  # every user of the run (u8 has no code: popular items)
    # The rerank stage gave popular items the last place: each coded user's fifth candidate is
    # the most liked train item the user never had (every train row is in the 30-day window).
    samples = pl.read_parquet(tmp_path / "f" / "samples" / "v-*" / "samples" / "*.parquet")
    liked = samples.filter((pl.col("split") == "train") & (pl.col("label") == 1))["iid"]
    counts = np.bincount(liked.to_numpy(), minlength=13)[1:12]  # item 12 has no code
    order = [f"i{i + 1}" for i in np.lexsort((np.arange(11), -counts))]
    seen = seen_items(cfg)
    coded = one.filter(pl.col("user") != "u8")
    for (user,), part in coded.group_by(["user"]):
        part = part.sort("retrieval_rank")
        head = part["item"].to_list()[:4]  # the codes' first four stay
        assert part["source"].to_list()[:4] == ["hamming"] * 4
        first = [i for i in order if i not in seen[user] and i not in head][0]
        # The fifth: that item, added (or the codes' own, where they had it there too).
        assert part["item"][4] == first and part["source"][4] in ("popular", "hamming")
    assert coded.filter(pl.col("source") == "popular").height > 0
    assert main(args) == 0
    two = pl.from_arrow(read_recommendations(cfg, f"date={DATE}")).sort("user", "rank")
    assert two.select(IDENTITY).equals(one.select(IDENTITY))
    folder = tmp_path / "f" / "recommendations" / f"date={DATE}"
    assert len(list(folder.glob("v-*"))) == 1  # the second version replaced the first whole
    stats = json.loads((folder / MANIFEST).read_text())["metrics"]
    assert stats["alpha"] == 0.5 and stats["alpha_from"] == "stage rerank (valid NDCG@10)"
    assert stats["popular_places"] == 1
    assert stats["popular_places_from"] == "stage rerank (valid Recall@5)"
    assert main(["nightly", *run, "--date", DATE]) == 2
    assert "either --candidates PAIRS or --topk K" in capsys.readouterr().err


def test_soft_candidates_score_with_the_projector_and_cold_ones_in_text(
    tmp_path: Path, ray_session
):
    adapter = tmp_path / "soft-adapter"
    cfg = fake_run(
        tmp_path,
        "prompts.modes=[text,soft]",
        "score.candidate_mode=soft",
        f"score.adapters={{text: none, soft: {adapter}}}",
    )
    ctx = StageContext.open(cfg, "score")
    vectors = EntityVectors.from_table(ctx.read_table("encode", "embeddings"), "float")
    torch.manual_seed(0)
    rec = LLMRecommender.from_backbone(cfg.model, trainable=True)
    rec.attach_soft(vectors, "collm")  # a fresh projector: the scores depend on the vectors
    rec.save(adapter)

    pairs = read_pairs(str(candidates(tmp_path / "c.parquet")))
    out, stats = score_pairs(cfg, pairs, "c")
    scored = sorted(out.take_all(), key=lambda r: r["row"])
    assert stats["rows_per_mode"] == {"soft": 30, "text": 10}
    for r in scored:  # u8 and i12 have no code, hence no embedding; u9 is new: text prompts
        cold = r["user"] in ("u8", "u9") or r["item"] == "i12"
        assert r["cold"] == cold == (r["mode"] == "text")

    rendered = render_candidates(
        with_row_numbers(pairs),
        load_lookups(ctx, "soft"),
        templates_from_config(cfg.prompts),
        "soft",
        "text",
        cfg.prompts.history_len,
    )
    soft = rendered.filter(pc.equal(rendered["mode"], "soft"))
    expected, _ = Scorer(rec, 8, cfg.score.max_length).score(
        soft["prompt"].to_pylist(), soft["soft_ids"].to_pylist()
    )
    got = {r["row"]: r["logit_yes"] for r in scored if r["mode"] == "soft"}
    np.testing.assert_allclose([got[r] for r in soft["row"].to_pylist()], expected, atol=1e-4)
