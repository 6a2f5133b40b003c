"""The re-ranker on ml-100k: the pointwise adapter against the listwise one at an equal training
time, on the same users and candidates, and the blend that ships with each.

Two runs of one config (default ``configs/ml100k.yaml``) under ``--root``:

* ``{stem}-pointwise``: the config's own strategy (the preset's ``one_step``: Yes/No on rated
  items);
* ``{stem}-listwise``: strategy ``ranking`` (softmax over groups of a liked item and the
  retriever's candidates, :mod:`binllm_core.prompts.ranking_groups`), its adapter kept by the
  valid groups' NDCG@10. Its step count gives it the pointwise step's training seconds: a
  short probe run of the same step measures its seconds per step first.

Both re-rank the same seeded users (``--users`` per split, valid and test) with the same
candidates (the stages before ``finetune`` are copied from the pointwise run, or from
``--base``, a finished run of the same config), and ``evaluate`` measures them. The table:
every method on the re-ranked test users, full catalog and sampled, with bootstrap intervals;
the non-LLM rows on every test user; the training seconds and tokens of each adapter and the
re-ranking seconds. Finished stages are skipped on a re-run (binllm's lineage).

    python benchmarks/reranker.py --set data.uri=../shared/data/ml-100k \\
        --set model.backbone=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --base runs/ml100k
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save, table  # noqa: E402
from binllm_core.config import load_config  # noqa: E402
from binllm_core.storage import read_output  # noqa: E402

COPIED = ("ingest", "samples", "encode", "encode_retrieval", "retrieve", "render")
"""The stages both runs share (copied, then found fresh by their lineage)."""
LISTWISE = [
    "finetune.strategy=ranking",
    # The LLM re-ranks the first 10 candidates of the preset: groups of 10 (the liked item and
    # 9 of the retriever's first 20 the user never rated), one group per micro-batch, the
    # pointwise step's learning rate and warm-up.
    "finetune.ranking.size=10",
    "finetune.ranking.pool=20",
    "finetune.ranking.max_valid_users=40",
]
"""The listwise run's settings besides its step budget."""
PROBE_STEPS = 6
"""Optimizer steps of the probe that measures the listwise step's seconds per step."""
METHODS = ("popularity", "recent_popularity", "float", "codes", "codes+llm", "blend")
COLUMNS = (("ndcg", 10), ("recall", 10), ("hr", 10), ("mrr", 10))
ROW_KEY = ("protocol", "split", "users", "method", "run")


def run(
    config: str,
    sets: list[str],
    root: Path,
    name: str,
    base: Path | None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or find fresh) the stages of run ``name``; its manifests."""
    from pipelines.runtime.registry import run_pipeline

    cfg = load_config(config, [*sets, f"output_root={root}", f"run_name={name}"])
    if base is not None:
        for stage in COPIED:
            target = root / name / stage
            if (base / stage).exists() and not target.exists():
                shutil.copytree(base / stage, target)
    return run_pipeline(cfg, stages, log=lambda m: print(f"[{name}] {m}", flush=True))


def listwise_budget(
    args: argparse.Namespace, sets: list[str], root: Path, stem: str, pointwise: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """The listwise step's settings with as many steps as take the pointwise steps' training
    seconds (all of them: a two-step strategy's too), by a probe of :data:`PROBE_STEPS` steps
    (run ``{stem}-listwise-probe``, kept apart)."""
    steps_run = pointwise["finetune"]["metrics"]["steps"].values()
    seconds = sum(s["train_seconds"] for s in steps_run)
    step = {**json.loads(json.dumps(_step_of(args.config, sets))), "max_steps": PROBE_STEPS}
    probe_sets = [
        *sets,
        *LISTWISE,
        f"finetune.ranking.step={json.dumps(step)}",
        f"finetune.eval_every={PROBE_STEPS}",
        "finetune.ranking.max_valid_users=2",
    ]
    probe_name = f"{stem}-listwise-probe"
    probe = run(
        args.config, probe_sets, root, probe_name, root / f"{stem}-pointwise", ["finetune"]
    )["finetune"]["metrics"]["steps"]["step1"]
    per_step = probe["train_seconds"] / probe["steps"]
    steps = max(1, round(seconds / per_step))
    step["max_steps"] = steps
    chosen = [
        *sets,
        *LISTWISE,
        f"finetune.ranking.step={json.dumps(step)}",
        f"finetune.eval_every={max(1, steps // 4)}",
    ]
    return chosen, {
        "pointwise_train_seconds": seconds,
        "probe_steps": probe["steps"],
        "probe_seconds_per_step": round(per_step, 3),
        "listwise_steps": steps,
    }


def _step_of(config: str, sets: list[str]) -> dict[str, Any]:
    """The listwise step's budget: the schedule of the pointwise strategy's last step, with
    micro-batches of one group (10 prompts), so only the step count differs."""
    from binllm_core.config import to_dict
    from binllm_core.llm.strategies import plan

    cfg = load_config(config, sets)
    step = to_dict(plan(cfg.finetune)[-1].cfg)
    return {**step, "batch_size": 1, "grad_accum": 1}


def rows_of(run_dir: Path, label: str) -> list[dict[str, Any]]:
    """The evaluate stage's ranking rows at K=10, labelled by the run."""
    ranking = pl.from_arrow(read_output(str(run_dir / "evaluate"), "ranking"))
    return [dict(r, run=label) for r in ranking.filter(pl.col("k") == 10).to_dicts()]


def fmt(row: dict[str, Any], metric: str) -> str:
    value, low, high = row[metric], row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if value is None:
        return "–"
    if low is None:
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/ml100k.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--root", default="runs/bench-reranker")
    parser.add_argument("--base", default="", help="a finished run of the config to copy from")
    parser.add_argument("--users", type=int, default=50, help="re-ranked users per split")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    stem = Path(args.config).stem
    sets = [*args.sets, f"rerank.max_users={args.users}"]
    started = time.perf_counter()
    base = Path(args.base).resolve() if args.base else None
    if base is not None:  # the adapter too: the same config trains the same one
        target = root / f"{stem}-pointwise" / "finetune"
        if (base / "finetune").exists() and not target.exists():
            shutil.copytree(base / "finetune", target)
    pointwise = run(args.config, sets, root, f"{stem}-pointwise", base)
    listwise_sets, budget = listwise_budget(args, sets, root, stem, pointwise)
    listwise = run(args.config, listwise_sets, root, f"{stem}-listwise", root / f"{stem}-pointwise")
    runs = {"pointwise": pointwise, "listwise": listwise}
    rows = [r for label in runs for r in rows_of(root / f"{stem}-{label}", label)]

    body = []
    for protocol in ("full", "sampled"):
        for users in ("all", "reranked"):
            for method in METHODS:
                for label in runs:
                    key = (protocol, "test", users, method, label)
                    mine = [r for r in rows if tuple(r[c] for c in ROW_KEY) == key]
                    llm = method in ("codes+llm", "blend")
                    if not mine or (not llm and label != "pointwise"):
                        continue
                    for r in mine:
                        name = f"{method} ({label})" if llm else method
                        body.append(
                            [
                                protocol,
                                users,
                                name,
                                r["mode"],
                                r["n_users"],
                                *[fmt(r, m) for m, _ in COLUMNS],
                            ]
                        )
    header = ["protocol", "users", "method", "mode", "n", *[f"{m.upper()}@{k}" for m, k in COLUMNS]]
    cost = {}
    for label, manifests in runs.items():
        steps = manifests["finetune"]["metrics"]["steps"]
        step = steps[max(steps)]  # the last step's adapter re-ranks
        rerank = manifests["rerank"]["metrics"]
        cost[label] = {
            "task": step.get("task", "rec"),
            "steps": step["steps"],
            "sequences": step["sequences"],
            "tokens": step["tokens"],
            "train_seconds": sum(s["train_seconds"] for s in steps.values()),
            "best_step": step["best_step"],
            "selected_by": step.get("selected_by", "auc"),
            "best_valid": step.get(f"best_valid_{step.get('selected_by', 'auc')}"),
            "groups": step.get("groups"),
            "rerank": {
                m: {"prompts": v["rows"], "seconds": v["wall_time_s"]}
                for m, v in rerank["modes"].items()
            },
            "blend": rerank["blend"],
            "popular_union": rerank.get("popular_union"),
        }
    cfg = load_config(args.config, sets)
    lines = []
    for label, c in cost.items():
        rr = "; ".join(
            f"{m}: {v['prompts']:,} prompts in {v['seconds']:.0f} s" for m, v in c["rerank"].items()
        )
        alphas = ", ".join(
            f"{m} α {b['alpha']:g} (valid lift {b['valid_lift'] or 0:+.4f})"
            for m, b in c["blend"].items()
        )
        lines.append(
            f"- **{label}** ({c['task']}): {c['steps']} steps, {c['sequences']:,} prompts, "
            f"{c['tokens']:,} tokens in {c['train_seconds']:.0f} s of training; kept step "
            f"{c['best_step']} by valid {c['selected_by']} {c['best_valid'] or float('nan'):.4f}; "
            f"re-ranking {rr}; "
            f"blend {alphas}."
        )
    markdown = "\n".join(
        [
            "## The re-ranker on ml100k (`benchmarks/reranker.py`)",
            "",
            f"`{Path(cfg.model.backbone).name}` (float32, 2 CPU cores). The pointwise adapter "
            f"(strategy `{cfg.finetune.strategy}`) against the listwise one (strategy `ranking`: "
            "softmax over groups of 10, the liked item and 9 of the retriever's first 20 the user "
            "never rated; kept by valid NDCG@10 of 40 valid groups), the listwise step given the "
            f"pointwise step's training seconds ({budget['pointwise_train_seconds']:.0f} s: "
            f"{budget['listwise_steps']} steps at {budget['probe_seconds_per_step']:.2f} s "
            f"per step measured by a {budget['probe_steps']}-step probe). Both re-rank the first "
            f"{cfg.rerank.top_n} candidates of the same {args.users} seeded users per split; α of "
            "each blend chosen on the valid users' lists. Test split, K = 10, bootstrap 95 % "
            "intervals; **all**: every test user with a positive; **reranked**: the users the LLM "
            "re-ranked.",
            "",
            *lines,
            "",
            table(header, body),
            "",
            f"Whole benchmark {(time.perf_counter() - started) / 60:.0f} min (finished stages are "
            "skipped on a re-run).",
        ]
    )
    save(
        f"reranker-{stem}",
        {
            "config": args.config,
            "overrides": sets,
            "listwise_overrides": listwise_sets,
            "budget": budget,
            "cost": cost,
            "rows": rows,
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
