"""Benchmark: the quality table. Do codes as text beat text-only and codes-only on ml-100k?

Runs the pipeline's own stages (``run_pipeline``) for each row, on one split, one backbone, one
budget per tuning step and fixed seeds; the test split is only scored, never used to choose:

* ``base`` run (``text_only``): the encoder gives the float MF and binary MF rows; its step-1
  adapter is the text-only row (TALLRec-style, BinLLM-TO) and the start of every two-step row;
* step 2 on binary prompts from that adapter once per learning rate (the config's and each
  ``--step2-lr``), trained and evaluated on valid_small only; the best valid AUC is the
  BinLLM binary two-step row, and only it is scored on test;
* step 2 at the chosen rate on dot-decimal prompts (BinLLM dot-decimal, two-step) and on text
  prompts again (text-only with the two-step budget: do codes beat more text steps?);
* ``onestep``: binary prompts from a fresh adapter, as many training sequences as step 1 and
  step 2 together, with step 1's batch size and learning rate (intuitive tuning, BinLLM-IT);
* one more binary and one more dot-decimal two-step row whose step 2 runs ``--long-steps``
  steps: outside the equal budget, their valid curves show what more steps give.

* the ranking table (also alone with ``--ranking-only``): one two-step run at that rate through
  ``retrieve`` (the tie rule chosen on valid_small by the codes' NDCG@10), ``rerank`` and
  ``evaluate``: popularity, float MF and the codes' Hamming lists on every test user, and with
  their LLM re-ranking (text and binary) on the config's ``rerank.max_users`` seeded test
  users, full and sampled protocols.

* the soft-token rows (also alone with ``--soft-only``): CoLLM (``collm``: projector only,
  LoRA frozen) and RSLLM-style (``rsllm``: projector and LoRA, contrastive terms), step 2
  alone from the same step-1 adapter at the chosen rate, on ``soft`` prompts.

Variants reuse the base run's ingest, samples, encode and render outputs (copied; their
manifests match, so those stages are skipped). Every LLM row is scored on the same test
subsample (``score.max_rows``, ``score.sample_by``); the codes rows are given on that subsample
and on the whole test split. Valid-AUC curves of every finetune run go into the JSON.
Results: ``benchmarks/results/quality-<config>.json`` and a table in BENCHMARKS.md. A re-run
with the same output root skips every finished stage.

    python benchmarks/quality.py [--config configs/quality_ml100k.yaml] [--output-root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, save, table  # noqa: E402
from binllm_core.config import RunConfig, load_config, to_dict  # noqa: E402
from binllm_core.evaluation.metrics import score_report
from binllm_core.evaluation.report import RANKING_COLUMNS  # noqa: E402
from binllm_core.storage import read_output  # noqa: E402

SHARED_STAGES = ("ingest", "samples", "encode", "render")
METRICS = ("auc", "uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc")


NO_RANKING = "retrieve.top_n=0"
"""The pointwise table's runs retrieve nothing: the ranking table is one run of its own."""


def base_overrides() -> list[str]:
    return ["finetune.strategy=text_only", "score.modes=[text]", NO_RANKING]


def from_step1(mode: str, adapter: str, lr: float) -> list[str]:
    """Step 2 alone, on ``mode`` prompts from the base run's step-1 adapter, at ``lr``."""
    return ["finetune.strategy=one_step", f"finetune.code_mode={mode}",
            f"finetune.init_adapter={adapter}", f"finetune.step2.lr={float(lr)!r}",
            f"score.modes=[{mode}]"]


def onestep_overrides(cfg: RunConfig) -> list[str]:
    """Binary prompts from a fresh adapter for step 1 + step 2's sequences, at step 1's rate."""
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    steps = -(-(s1.max_steps * s1.batch_size + s2.max_steps * s2.batch_size) // s1.batch_size)
    return ["finetune.strategy=one_step", "finetune.code_mode=binary",
            f"finetune.step2={json.dumps({**to_dict(s1), 'max_steps': steps})}",
            "score.modes=[binary]"]


def run_variant(
    config: str, sets: list[str], root: Path, name: str, base: Path | None,
    stages: list[str] | None = None,
) -> tuple[RunConfig, dict[str, Any], dict[str, float]]:
    from pipelines.runtime.registry import run_pipeline

    cfg = load_config(config, [*sets, f"output_root={root}", f"run_name={name}"])
    if base is not None:
        for stage in SHARED_STAGES:
            target = root / name / stage
            if not target.exists():
                shutil.copytree(base / stage, target, ignore=shutil.ignore_patterns("checkpoints"))
    manifests = run_pipeline(cfg, stages, log=lambda m: print(f"[{name}] {m}", flush=True))
    # Stage wall times from the manifests: a re-run that skips finished stages still counts them.
    stages = {s: m["wall_time_s"] for s, m in manifests.items()
              if base is None or s not in SHARED_STAGES}
    return cfg, manifests, stages


def scored(root: Path, name: str) -> pl.DataFrame:
    return pl.from_arrow(read_output(str(root / name / "score"), "scores")).filter(
        pl.col("split") == "test"
    )


@dataclass
class Tuned:
    """One finetune run of the table: its run folder, its stage manifests, and the run whose
    step-1 adapter it started from (None for a fresh adapter)."""

    name: str
    manifests: dict[str, Any]
    before: Tuned | None = None
    step_name: str = "step1"

    @property
    def step(self) -> dict[str, Any]:
        return self.manifests["finetune"]["metrics"]["steps"][self.step_name]

    def total(self, key: str) -> float:
        return self.step[key] + (self.before.total(key) if self.before else 0)


def curve(root: Path, name: str) -> list[dict[str, Any]]:
    """Valid_small AUC/UAUC at every evaluation of a finetune run."""
    evals = pl.from_arrow(read_output(str(root / name / "finetune"), "evals"))
    return evals.select(["step_name", "step", "auc", "uauc", "train_loss"]).to_dicts()


def llm_row(label: str, root: Path, run: Tuned, mode: str, render: dict[str, Any],
            codes: pl.DataFrame) -> dict:
    scores = scored(root, run.name).filter(pl.col("mode") == mode)
    report = score_report(
        scores["uid"].to_numpy(), scores["label"].to_numpy(), scores["logit_yes"].to_numpy(),
        scores["warm"].to_numpy(), scores["not_cold"].to_numpy(),
    )
    return {
        "row": label, "mode": mode, "run": run.name, "test_rows": scores.height, **report,
        "valid_auc": run.step["best_valid_auc"], "valid_uauc": run.step["best_valid_uauc"],
        "rho_codes": agreement(scores, codes), "training_sequences": int(run.total("sequences")),
        "tokens_per_prompt": render["metrics"]["tokens_per_mode"][mode]["mean"],
        "train_s": run.total("wall_time_s"),
        "score_s": run.manifests["score"]["metrics"]["modes"][mode]["wall_time_s"],
        "curve": curve(root, run.name),
    }


def code_scores(root: Path, name: str) -> pl.DataFrame:
    """The binary MF score (inner product of the +-1 codes) of every test sample the base run
    scored: columns sample_id, codes."""
    codes = pl.from_arrow(read_output(str(root / name / "encode"), "codes"))
    bits = {
        entity: dict(zip(part["id"].to_list(), np.asarray(part["bits"].to_list(), np.float32),
                         strict=True))
        for (entity,), part in codes.group_by(["entity"])
    }
    subset = scored(root, name).filter(pl.col("mode") == "text")
    signs = [float((2 * bits["user"][u] - 1) @ (2 * bits["item"][i] - 1))
             for u, i in zip(subset["uid"], subset["iid"], strict=True)]
    return subset.select("sample_id").with_columns(codes=pl.Series(signs))


def agreement(scores: pl.DataFrame, codes: pl.DataFrame) -> float:
    """Spearman correlation of an LLM row's scores with the codes' own scores on the same
    samples: how far the LLM ranks like the collaborative model it was shown."""
    both = scores.select("sample_id", "logit_yes").join(codes, on="sample_id")
    return float(both.select(pl.corr("logit_yes", "codes", method="spearman")).item())


def codes_rows(root: Path, name: str, manifests: dict[str, Any]) -> list[dict[str, Any]]:
    """Float and binary MF on the whole test split (encode manifest) and binary MF on the LLM
    rows' test subsample (inner products of the exported codes)."""
    enc = manifests["encode"]["metrics"]
    rows = [
        {"row": "float MF (all test)", "mode": "codes", **enc["continuous"]["test"],
         "valid_auc": enc["continuous"]["valid"]["auc"]},
        {"row": "binary MF (all test)", "mode": "codes", **enc["codes"]["test"],
         "valid_auc": enc["codes"]["valid"]["auc"]},
    ]
    subset = scored(root, name).filter(pl.col("mode") == "text").join(
        code_scores(root, name), on="sample_id")
    report = score_report(
        subset["uid"].to_numpy(), subset["label"].to_numpy(), subset["codes"].to_numpy(),
        subset["warm"].to_numpy(), subset["not_cold"].to_numpy(),
    )
    rows.append({"row": "binary MF (LLM test subsample)", "mode": "codes",
                 "test_rows": subset.height, **report, "valid_auc": enc["codes"]["valid"]["auc"]})
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# ---- the ranking table ------------------------------------------------------------------------
def choose_tie_rule(root: Path, name: str, cfg: RunConfig) -> dict[str, float]:
    """Codes-only NDCG@10 on valid_small for each tie rule (the test split is never read)."""
    from binllm_core.codes import id_table
    from binllm_core.ranking.metrics import ranking_metrics
    from binllm_core.ranking.retrieval import (
        TIE_BREAKS,
        Catalog,
        backend,
        tie_score,
        users_for_splits,
    )

    run = root / name
    samples = pl.from_arrow(read_output(str(run / "samples"), "samples"))
    valid = samples.filter((pl.col("split") != "valid") | pl.col("valid_small"))
    users = users_for_splits(valid, ["valid"], ["train"])
    codes = read_output(str(run / "encode"), "codes")
    vectors = read_output(str(run / "encode"), "embeddings")
    item_bits, user_bits = id_table(codes, "item", "bits"), id_table(codes, "user", "bits")
    train = samples.filter((pl.col("split") == "train") & (pl.col("label") == 1))
    popularity = np.bincount(train["iid"].to_numpy(), minlength=len(item_bits))
    catalog = Catalog.build(np.arange(1, len(item_bits)), item_bits[1:], popularity[1:],
                            id_table(vectors, "item", "relaxed")[1:])
    uids = users["uid"].to_numpy()
    excluded = [catalog.positions(np.asarray(e)) for e in users["exclude"]]
    positives = {int(u): np.asarray(p) for u, p in zip(uids, users["positives"], strict=True)}
    found = {}
    for rule in TIE_BREAKS:
        tie = tie_score(rule, catalog, id_table(vectors, "user", "relaxed"))
        top = backend("numpy", catalog, tie).search(uids, user_bits[uids], 10, excluded)
        lists = {int(u): catalog.iids[t] for u, t in zip(uids, top.items, strict=True)}
        found[rule] = ranking_metrics(lists, positives, [10])[10]["ndcg"]
    return found


def ranking_table(args: argparse.Namespace, shared: list[str], root: Path, stem: str) -> None:
    """One two-step run (step 2 at the rate the quality table chose, when it has run) through
    retrieve, rerank and evaluate; its ranking table goes to BENCHMARKS.md."""
    from pipelines.runtime.registry import run_pipeline

    chosen = RESULTS / f"quality-{stem}.json"
    lr = None
    if chosen.exists():
        lr = next(x["step2_lr"] for x in json.loads(chosen.read_text())["step2_lr_selection"]
                  if x["chosen"])
    name = f"{stem}-ranking"
    sets = [
        "finetune.strategy=two_step", "finetune.code_mode=binary", "prompts.modes=[text,binary]",
        *([f"finetune.step2.lr={lr!r}"] if lr is not None else []),
        *shared, f"output_root={root}", f"run_name={name}",
    ]
    started = time.perf_counter()
    cfg = load_config(args.config, sets)
    log = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    run_pipeline(cfg, ["ingest", "samples", "encode"], log=log)
    ties = choose_tie_rule(root, name, cfg)
    rule = max(ties, key=lambda r: ties[r])
    cfg = load_config(args.config, [*sets, f"retrieve.tie_break={rule}"])
    manifests = run_pipeline(cfg, log=log)
    ranking = pl.from_arrow(read_output(str(root / name / "evaluate"), "ranking"))
    header = ["protocol", "method", "mode", "users", "n",
              *[f"{m.upper()}@{k}" for m, k in RANKING_COLUMNS]]
    body = []
    for key, part in ranking.group_by(["protocol", "method", "mode", "users"],
                                      maintain_order=True):
        by_k = {r["k"]: r for r in part.to_dicts()}
        body.append([*key, fmt(part["n_users"][0]),
                     *[fmt(by_k[k][m]) if k in by_k else "–" for m, k in RANKING_COLUMNS]])
    full = ranking.filter((pl.col("protocol") == "full") & (pl.col("method") == "codes")
                          & (pl.col("users") == "all") & pl.col("k").is_in([20, 50, 100]))
    retriever = ", ".join(f"Recall@{k} {fmt(v)}" for k, v in full.select("k", "recall").rows())
    rerank = manifests["rerank"]["metrics"]
    speed = "; ".join(f"{m}: {v['rows']:,} prompts in {v['wall_time_s']:.0f} s"
                      for m, v in rerank["modes"].items())
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    markdown = "\n".join([
        f"## Ranking on {cfg.protocol.name} (`benchmarks/quality.py --ranking-only`)",
        "",
        f"`{Path(cfg.model.backbone).name}` (float32, CPU), run `{name}`: step 1 "
        f"{s1.max_steps} x {s1.batch_size} text prompts at lr {s1.lr}, step 2 {s2.max_steps} x "
        f"{s2.batch_size} binary prompts at lr {s2.lr:g}; the text rows re-rank with the step-1 "
        "adapter, the binary rows with the step-2 adapter. "
        "Every test user with a test positive (the LLM: "
        f"{cfg.rerank.max_users or 'all'} seeded ones, rerank.seed {cfg.rerank.seed}); "
        f"candidates: the {cfg.retrieve.top_n} nearest items by Hamming distance "
        f"without the user's train and valid items, ties by `{rule}` (codes-only NDCG@10 on "
        "valid_small: " + ", ".join(f"{r} {v:.4f}" for r, v in ties.items()) + "), then id; "
        f"the LLM re-ranks the first {cfg.rerank.top_n}. **full**: the whole catalog; "
        "**sampled**: the first test positive among "
        f"{cfg.retrieve.sampled_negatives} random unseen items. Users **all** / **reranked** / "
        "**retrieved** (reranked, positive among the re-ranked candidates). "
        "Retriever (codes, full): " + retriever +
        f". Re-ranking: {speed}. Whole run {(time.perf_counter() - started) / 60:.0f} min "
        "(stages already finished are skipped on a re-run).",
        "",
        table(header, body),
    ])
    save(f"quality-ranking-{stem}", {
        "config": args.config, "overrides": sets, "tie_rule_valid_small_ndcg10": ties,
        "tie_rule": rule, "ranking": ranking.to_dicts(), "rerank": rerank,
    }, markdown)
    print(markdown)


# ---- the auxiliary-task table -----------------------------------------------------------------
AUX_SHARES = {"mim": 0.25, "bpr": 0.25}
"""The aux rows' mixture: half of every step's sequences recommendation prompts, a quarter each
task (binllm's choice; the paper's mixture is not public)."""


def manifests_of(run: Path) -> dict[str, Any]:
    """The current manifest of every stage of a run folder."""
    return {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/_manifest.json")}


def aux_table(args: argparse.Namespace, root: Path, stem: str) -> None:
    """The ranking run's two steps again with the auxiliary tasks mixed in (``AUX_SHARES`` of
    every step's sequences, the same steps x batch), on its ingest, samples, encode and retrieve
    outputs: pointwise AUC/UAUC on the same test users and NDCG/Recall on the same candidates,
    next to the ranking run's own rows (read from its folder, not re-run)."""
    from pipelines.runtime.registry import run_pipeline

    before = json.loads((RESULTS / f"quality-ranking-{stem}.json").read_text())
    plain_name, name = f"{stem}-ranking", f"{stem}-aux"
    plain = root / plain_name
    shares = json.dumps(AUX_SHARES).replace('"', "")
    sets = [*[o for o in before["overrides"] if not o.startswith(("output_root=", "run_name="))],
            *args.overrides, "prompts.aux.tasks=[mim,bpr]", f"finetune.aux={shares}",
            f"retrieve.tie_break={before['tie_rule']}", f"output_root={root}", f"run_name={name}"]
    cfg = load_config(args.config, sets)
    if not args.tables_only:
        for stage in ("ingest", "samples", "encode", "retrieve"):
            if not (root / name / stage).exists():
                shutil.copytree(plain / stage, root / name / stage)
        run_pipeline(cfg, log=lambda m: print(f"[{name}] {m}", flush=True))
    runs = {plain_name: manifests_of(plain), name: manifests_of(root / name)}
    trained = ("finetune", "score", "rerank", "evaluate")
    minutes = sum(runs[name][s]["wall_time_s"] for s in ("render", *trained)) / 60
    codes = code_scores(root, plain_name)
    rows = []
    for run, label in ((plain_name, ""), (name, " + aux")):
        m = runs[run]
        step1 = Tuned(run, m)
        step2 = Tuned(run, m, step1, "step2")
        ranking = pl.from_arrow(read_output(str(root / run / "evaluate"), "ranking")).filter(
            (pl.col("method") == "codes+llm") & (pl.col("users") == "reranked")
            & (pl.col("k") == 10))
        for tuned, mode, row_name in ((step1, "text", "TALLRec (text, step 1)"),
                                      (step2, "binary", "BinLLM binary, two-step")):
            row = llm_row(row_name + label, root, tuned, mode, m["render"], codes)
            for protocol in ("full", "sampled"):
                at = ranking.filter((pl.col("mode") == mode) & (pl.col("protocol") == protocol))
                row[f"ndcg10_{protocol}"] = at["ndcg"][0]
                row[f"recall10_{protocol}"] = at["recall"][0]
            row["task_sequences"] = {
                t: sum(s.step.get("task_sequences", {"rec": s.step["sequences"]}).get(t, 0)
                       for s in _chain(tuned))
                for t in ("rec", *AUX_SHARES)}
            row["aux_losses_at_best"] = tuned.step.get("task_losses_at_best", {})
            rows.append(row)
    header = ["row", "test rows", "AUC", "UAUC", "warm AUC", "warm UAUC", "valid AUC",
              "rho codes", "NDCG@10 full", "Recall@10 full", "NDCG@10 sampled",
              "train seqs (rec/mim/bpr)", "finetune s", "score s"]
    body = [[r["row"], fmt(r["test_rows"]), *[fmt(r[k]) for k in METRICS[:4]],
             fmt(r["valid_auc"]), fmt(r["rho_codes"], 2), fmt(r["ndcg10_full"]),
             fmt(r["recall10_full"]), fmt(r["ndcg10_sampled"]),
             "/".join(f"{r['task_sequences'][t]:,}" for t in ("rec", *AUX_SHARES)),
             fmt(r["train_s"], 0), fmt(r["score_s"], 0)] for r in rows]
    aux_cfg = cfg.prompts.aux
    tokens = runs[name]["render"]["metrics"]["aux"]["tokens"]
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    markdown = "\n".join([
        f"## Auxiliary tasks on {cfg.protocol.name} (`benchmarks/quality.py --aux-only`)",
        "",
        f"`{Path(cfg.model.backbone).name}` (float32, CPU). Rows without aux: the run "
        f"`{plain_name}` of the ranking table (commit {before['commit'][:7]}); rows with aux: "
        f"`{name}`, the same config, ingest, samples, encode and retrieve outputs, plus "
        f"`prompts.aux` (tasks {', '.join(aux_cfg.tasks)}, {aux_cfg.rows_per_user} rows per user "
        f"and task, {aux_cfg.history_len} titles, one title masked, train split only) and "
        f"`finetune.aux` {shares} in both steps: the same budget (step 1 {s1.max_steps} x "
        f"{s1.batch_size} text, step 2 {s2.max_steps} x {s2.batch_size} binary at lr {s2.lr:g}), "
        "of which the aux tasks take half. Pointwise columns: the quality table's test users; "
        f"NDCG/Recall@10: the LLM re-ranking of the codes' top {cfg.rerank.top_n} for the "
        f"{cfg.rerank.max_users} seeded users, all of them (**full**: whole catalog, **sampled**: "
        f"1 test positive + {cfg.retrieve.sampled_negatives} unseen). Aux prompt tokens (mean): "
        + ", ".join(f"{t} {m} {v['mean']:.0f}" for t, by in tokens.items() for m, v in by.items())
        + f". The aux run's render, finetune, score, rerank and evaluate took {minutes:.0f} min "
        "(stage wall times; finished stages are skipped on a re-run); its finetune finished "
        f"{runs[name]['finetune']['finished_at']}.",
        "",
        table(header, body),
    ])
    save(f"quality-aux-{stem}", {
        "config": args.config, "overrides": sets, "shares": AUX_SHARES, "rows": rows,
        "finished_at": {s: runs[name][s]["finished_at"] for s in trained},
        "stage_s": {s: runs[name][s]["wall_time_s"] for s in ("render", *trained)},
    }, markdown)
    print(markdown)


# ---- the soft-token rows ----------------------------------------------------------------------
SOFT_ROWS = {
    "collm": "CoLLM (soft, projector-only step 2)",
    "rsllm": "RSLLM-style (soft + contrastive)",
}
"""Strategy -> its row: the other way in, soft tokens through a projector (``finetune.soft``)."""
COMPARED = ("text-only LoRA (step 1; TALLRec)", "text-only LoRA, two-step budget",
            "BinLLM binary, two-step", "BinLLM dot-decimal, two-step", "BinLLM binary, one-step")
"""The rows of the quality table printed next to the soft rows (read from its JSON)."""


def step1_source(root: Path, stem: str) -> Path:
    """The run whose step-1 text adapter the soft rows start from: the quality table's base run,
    else the ranking run (its step 1 is the same config, seed and train subset)."""
    for name in (f"{stem}-base", f"{stem}-ranking"):
        if (root / name / "finetune" / "_manifest.json").exists():
            return root / name
    raise SystemExit(f"no finished {stem}-base or {stem}-ranking run under {root}: run the "
                     "quality table (or --ranking-only) first")


def soft_table(args: argparse.Namespace, shared: list[str], root: Path, stem: str) -> None:
    """The soft-token rows at the BinLLM rows' budget: step 2 alone (``finetune.start_step``)
    from the same step-1 adapter, on ``soft`` prompts, at the step-2 rate the quality table
    chose; scored on the same test users. Printed next to the quality table's rows (from its
    JSON, not re-run)."""
    quality = json.loads((RESULTS / f"quality-{stem}.json").read_text())
    lr = next(x["step2_lr"] for x in quality["step2_lr_selection"] if x["chosen"])
    source = step1_source(root, stem)
    before = Tuned(source.name, manifests_of(source))
    adapter = str(source / before.manifests["finetune"]["metrics"]["adapters"]["step1"])
    codes = code_scores(root, source.name)
    rows, sets_of, copy_from = [], {}, source
    for strategy, label in SOFT_ROWS.items():
        name = f"{stem}-{strategy}"
        sets = [*shared, NO_RANKING, "prompts.modes=[text,soft]",
                f"finetune.strategy={strategy}", "finetune.start_step=step2",
                f"finetune.init_adapter={adapter}", f"finetune.step2.lr={float(lr)!r}",
                "score.modes=[soft]"]
        sets_of[strategy] = sets
        _, manifests, _ = run_variant(args.config, sets, root, name, copy_from)
        copy_from = root / name  # the other soft run finds this one's render
        tuned = Tuned(name, manifests, before, "step2")
        row = llm_row(label, root, tuned, "soft", manifests["render"], codes)
        rows.append({**row, "strategy": strategy})
    compared = [r for r in quality["rows"] if r["row"] in COMPARED]
    header = ["row", "test rows", "AUC", "UAUC", "warm AUC", "warm UAUC", "cold AUC",
              "cold UAUC", "valid AUC", "rho codes", "train seqs", "tokens/prompt", "finetune s",
              "score s"]
    body = [[r["row"], fmt(r.get("test_rows")), *[fmt(r.get(k)) for k in METRICS],
             fmt(r.get("valid_auc")), fmt(r.get("rho_codes"), 2),
             fmt(r.get("training_sequences")), fmt(r.get("tokens_per_prompt"), 1),
             fmt(r.get("train_s"), 0), fmt(r.get("score_s"), 0)] for r in [*compared, *rows]]
    cfg = load_config(args.config, sets_of["collm"])
    s1, s2, soft = cfg.finetune.step1, cfg.finetune.step2, cfg.finetune.soft
    markdown = "\n".join([
        f"## Soft tokens on {cfg.protocol.name} (`benchmarks/quality.py --soft-only`)",
        "",
        f"`{Path(cfg.model.backbone).name}` (float32, CPU). The last {len(rows)} rows start from "
        f"the step-1 text adapter of `{source.name}` (step 1 {s1.max_steps} x {s1.batch_size} "
        f"text prompts) and train step 2 alone ({s2.max_steps} x {s2.batch_size} `soft` prompts "
        f"at lr {lr:g}, the rate the quality table chose): the BinLLM two-step rows' budget. "
        f"Soft prompts are the code template with a placeholder token where the codes would be, "
        f"whose input embedding is the `{soft.projector}` projector of the encoder's "
        f"`{soft.vectors}` embeddings; CoLLM trains the projector alone (LoRA frozen), the "
        f"RSLLM-style row the projector and LoRA with InfoNCE terms (user-item hidden states "
        f"{soft.user_item_weight:g}, projected item-title embedding {soft.item_title_weight:g}, "
        f"temperature {soft.temperature:g}). Every row: the same test users "
        f"(score.max_rows {cfg.score.max_rows}, by {cfg.score.sample_by}) and valid_small "
        f"prompts; the first {len(compared)} rows are the quality table's (commit "
        f"{quality['commit'][:7]}).",
        "",
        table(header, body),
    ])
    save(f"quality-soft-{stem}", {"config": args.config, "overrides": sets_of, "step2_lr": lr,
                                  "step1_from": source.name, "rows": rows}, markdown)
    print(markdown)


def _chain(tuned: Tuned) -> list[Tuned]:
    return [tuned, *(_chain(tuned.before) if tuned.before else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quality_ml100k.yaml")
    parser.add_argument("--output-root", default="runs/quality")
    parser.add_argument("--step2-lr", type=float, action="append", default=None,
                        help="another step-2 learning rate to try on valid_small (repeatable; "
                             "default 1e-3)")
    parser.add_argument("--long-steps", type=int, default=400,
                        help="step 2 of one more two-step row per code mode, trained this many "
                             "steps at the chosen rate (0 leaves them out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--ranking-only", action="store_true",
                        help="only the ranking table (one two-step run through rerank)")
    parser.add_argument("--aux-only", action="store_true",
                        help="only the auxiliary-task rows: the ranking run's two steps with "
                             "mim and bpr mixed in (needs the ranking run's folder)")
    parser.add_argument("--soft-only", action="store_true",
                        help="only the soft-token rows (CoLLM, RSLLM-style) from the step-1 "
                             "adapter of the base (or ranking) run, next to the quality table")
    parser.add_argument("--tables-only", action="store_true",
                        help="with --aux-only: write the table from the runs' finished outputs, "
                             "running no stage (after a code change that would redo them)")
    args = parser.parse_args()
    shared = [
        f"data.uri={SHARED / 'data' / 'ml-100k'}",
        f"model.backbone={SHARED / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
        *args.overrides,
    ]
    root = Path(args.output_root).resolve()
    stem = Path(args.config).stem
    cfg = load_config(args.config, shared)
    if args.ranking_only:
        ranking_table(args, shared, root, stem)
        return
    if args.aux_only:
        aux_table(args, root, stem)
        return
    if args.soft_only:
        soft_table(args, shared, root, stem)
        return
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    lrs = list(dict.fromkeys([s2.lr, *(args.step2_lr or [1e-3])]))
    started = time.perf_counter()

    stage_s: dict[tuple[str, str], float] = {}  # (run, stage) -> wall time in its manifest

    def variant(name: str, sets: list[str], stages: list[str] | None = None,
                before: Tuned | None = None) -> Tuned:
        _, manifests, seconds = run_variant(args.config, [*shared, *sets, NO_RANKING], root,
                                            f"{stem}-{name}", root / f"{stem}-base", stages)
        stage_s.update({(name, s): t for s, t in seconds.items()})
        return Tuned(f"{stem}-{name}", manifests, before)

    base_cfg, manifests, seconds = run_variant(args.config, [*shared, *base_overrides()], root,
                                               f"{stem}-base", None)
    stage_s.update({("base", s): t for s, t in seconds.items()})
    base = Tuned(f"{stem}-base", manifests)
    adapter = str(root / base.name / manifests["finetune"]["metrics"]["adapters"]["step1"])
    tried = {lr: variant(f"binary-lr{lr:g}", from_step1("binary", adapter, lr), ["finetune"])
             for lr in lrs}
    lr = max(lrs, key=lambda x: tried[x].step["best_valid_auc"])
    binary = variant(f"binary-lr{lr:g}", from_step1("binary", adapter, lr), None, base)
    dotdec = variant("dotdec", from_step1("dotdec", adapter, lr), None, base)
    more_text = variant("text-more", ["finetune.strategy=text_only",
                                      f"finetune.init_adapter={adapter}",
                                      f"finetune.step1={json.dumps({**to_dict(s2), 'lr': lr})}",
                                      "score.modes=[text]"], None, base)
    onestep = variant("onestep", onestep_overrides(cfg))
    long_sets = [f"finetune.step2.max_steps={args.long_steps}",
                 f"finetune.eval_every={max(1, args.long_steps // 6)}"]
    longer = {
        mode: variant(f"{mode}-lr{lr:g}-steps{args.long_steps}",
                      [*from_step1(mode, adapter, lr), *long_sets], None, base)
        for mode in (("binary", "dotdec") if args.long_steps else ())
    }

    render = manifests["render"]
    rows = codes_rows(root, base.name, manifests)
    codes = code_scores(root, base.name)
    rows += [
        llm_row("text-only LoRA (step 1; TALLRec)", root, base, "text", render, codes),
        llm_row("text-only LoRA, two-step budget", root, more_text, "text", render, codes),
        llm_row("BinLLM binary, two-step", root, binary, "binary", render, codes),
        llm_row("BinLLM dot-decimal, two-step", root, dotdec, "dotdec", render, codes),
        llm_row("BinLLM binary, one-step", root, onestep, "binary", render, codes),
    ]
    rows += [llm_row(f"BinLLM {'binary' if mode == 'binary' else 'dot-decimal'}, two-step, "
                     f"{args.long_steps}-step step 2", root, run, mode, render, codes)
             for mode, run in longer.items()]
    selection = [{"step2_lr": x, "valid_auc": tried[x].step["best_valid_auc"],
                  "valid_uauc": tried[x].step["best_valid_uauc"], "chosen": x == lr,
                  "curve": curve(root, tried[x].name)} for x in lrs]
    header = ["row", "test rows", "AUC", "UAUC", "warm AUC", "warm UAUC", "cold AUC",
              "cold UAUC", "valid AUC", "rho codes", "train seqs", "tokens/prompt", "finetune s",
              "score s"]
    body = [[r["row"], fmt(r.get("test_rows")), *[fmt(r.get(k)) for k in METRICS],
             fmt(r.get("valid_auc")), fmt(r.get("rho_codes"), 2),
             fmt(r.get("training_sequences")),
             fmt(r.get("tokens_per_prompt"), 1), fmt(r.get("train_s"), 0),
             fmt(r.get("score_s"), 0)] for r in rows]
    picks = ", ".join(f"{x['step2_lr']:g}: {x['valid_auc']:.4f}" for x in selection)
    total_s = time.perf_counter() - started
    sample = ("every test sample of seeded random users" if cfg.score.sample_by == "users"
              else "seeded random test samples")
    sample = f"{sample}, up to {cfg.score.max_rows}" if cfg.score.max_rows else "all test samples"
    n_valid = cfg.finetune.max_valid_samples or "all"
    long_note = (f" The last {len(longer)} rows run step 2 for {args.long_steps} steps, "
                 "outside the equal budget." if longer else "")
    markdown = "\n".join([
        f"## Quality on {cfg.protocol.name} (`benchmarks/quality.py --config {args.config}`)",
        "",
        f"`{Path(cfg.model.backbone).name}` (float32, CPU), split `{cfg.protocol.split}` "
        f"{cfg.protocol.fractions}, answer score `{cfg.model.answer_score}`; LLM rows scored on "
        f"{sample} (score.seed {cfg.score.seed}); codes rows also on "
        f"the whole test split. Budget: step 1 {s1.max_steps} x {s1.batch_size} text prompts at "
        f"lr {s1.lr}; step 2 {s2.max_steps} x {s2.batch_size} prompts at lr {lr:g}, chosen on "
        f"valid_small among {picks} (binary step-2 valid AUC); every adapter chosen on "
        f"{n_valid} valid_small prompts (valid AUC column).{long_note} Stage time of the whole "
        f"table {sum(stage_s.values()) / 60:.0f} min (the finetune s column sums the stage "
        "times of the steps a row trained). Cold = user or "
        "item unseen in train; warm = user and item each > "
        f"{cfg.protocol.warm_more_than} train interactions. rho codes = Spearman correlation of "
        "a row's test scores with the binary codes' own scores on the same samples.",
        "",
        table(header, body),
    ])
    result = {"config": args.config, "overrides": shared, "config_resolved": to_dict(base_cfg),
              "rows": rows, "step2_lr_selection": selection, "total_s": total_s,
              "stage_s": {f"{run}/{stage}": t for (run, stage), t in stage_s.items()}}
    save(f"quality-{stem}", result, markdown)
    print(markdown)
    ranking_table(args, shared, root, stem)
    aux_table(args, root, stem)
    soft_table(args, shared, root, stem)


if __name__ == "__main__":
    main()
