"""The evaluation report: AUC/UAUC per split and prompt mode, overall / warm / cold, next to the
encoder's codes-only AUC; as a table, ``metrics.json``, ``report.md`` and ROC curves (PNG).

Every AUC and UAUC comes from :mod:`binllm_core.evaluation.metrics` (the official definitions);
this module only groups rows, draws the curves and writes the text.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.evaluation.metrics import score_report
from binllm_core.ranking.metrics import HEADLINE, METRICS
from binllm_core.ranking.popularity import WindowChoice

METRIC_KEYS = ("auc", "uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc")

METRICS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("scorer", pa.string()),
        ("mode", pa.string()),
        ("adapter", pa.string()),
        ("rows", pa.int64()),
        ("positives", pa.int64()),
        ("warm_rows", pa.int64()),
        ("cold_rows", pa.int64()),
        *[(k, pa.float64()) for k in METRIC_KEYS],
    ]
)
"""One row per split and scorer: ``scorer`` is ``llm`` (a prompt mode with its adapter) or
``codes`` (the encoder's code inner products, from the encode manifest); AUCs are null where
undefined (one class only); row counts are null for the codes rows (the encoder scores every
sample of the split)."""


def _nan_to_none(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def llm_metrics(scores: pa.Table) -> list[dict[str, Any]]:
    """Metric rows of a ``scores`` table (sample_id, split, mode, uid, label, warm, not_cold,
    logit_yes, adapter), one per (split, mode), in split then mode order of appearance."""
    frame = pl.from_arrow(
        scores.select(["split", "mode", "uid", "label", "warm", "not_cold", "logit_yes", "adapter"])
    )
    rows = []
    for (split, mode), part in frame.group_by(["split", "mode"], maintain_order=True):
        labels = part["label"].to_numpy().astype(np.int64)
        warm = part["warm"].to_numpy().astype(bool)
        not_cold = part["not_cold"].to_numpy().astype(bool)
        report = score_report(
            part["uid"].to_numpy(), labels, part["logit_yes"].to_numpy(), warm, not_cold
        )
        rows.append(
            {
                "split": split,
                "scorer": "llm",
                "mode": mode,
                "adapter": part["adapter"][0],
                "rows": part.height,
                "positives": int(labels.sum()),
                "warm_rows": int(warm.sum()),
                "cold_rows": int((~not_cold).sum()),
                **{k: _nan_to_none(report[k]) for k in METRIC_KEYS},
            }
        )
    return rows


def codes_metrics(encode_metrics: Mapping[str, Any], splits: Sequence[str]) -> list[dict[str, Any]]:
    """Codes-only rows from the encode manifest's ``metrics.codes.{split}`` (AUC of the inner
    products of the binary codes, computed by the encode stage on all samples of the split)."""
    codes = encode_metrics.get("codes", {})
    rows = []
    for split in splits:
        found = codes.get(split)
        if not isinstance(found, Mapping):
            continue
        rows.append(
            {
                "split": split,
                "scorer": "codes",
                "mode": "codes",
                "adapter": None,
                "rows": None,
                "positives": None,
                "warm_rows": None,
                "cold_rows": None,
                **{k: _nan_to_none(found.get(k)) for k in METRIC_KEYS},
            }
        )
    return rows


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=METRICS_SCHEMA)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (for plotting), from (0, 0)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def roc_png(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str) -> bytes:
    """A PNG of ROC curves ``(label, fpr, tpr)`` with the chance diagonal (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, label=label)  # straight segments: ties count half, as in the AUC
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def roc_curves(scores: pa.Table, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One curve per prompt mode of ``split`` (label: mode, overall AUC in the legend)."""
    from binllm_core.evaluation.metrics import auc

    frame = pl.from_arrow(scores.select(["split", "mode", "label", "logit_yes"]))
    frame = frame.filter(pl.col("split") == split)
    curves = []
    for (mode,), part in frame.group_by(["mode"], maintain_order=True):
        y, s = part["label"].to_numpy(), part["logit_yes"].to_numpy()
        value = auc(y, s)
        fpr, tpr = roc_points(y, s)
        curves.append((f"{mode} (AUC {_fmt(value)})", fpr, tpr))
    return curves


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


SCORE_DEFINITIONS = {
    "yes_logit": "logit of the answer token Yes at the last prompt position",
    "yes_minus_no": "logit of the answer token Yes minus that of No at the last prompt position",
}
"""What an LLM row's score is, per ``model.answer_score`` (the ``logit_yes`` column holds it)."""


def report_markdown(
    rows: Sequence[Mapping[str, Any]],
    run_name: str,
    warm_more_than: int,
    images: Mapping[str, str],
    notes: Sequence[str] = (),
    answer_score: str = "yes_logit",
) -> str:
    """``report.md``: definitions, one table per split, the ROC image of each split."""
    score = SCORE_DEFINITIONS[answer_score].replace(" Yes", " `Yes`").replace(" No ", " `No` ")
    lines = [
        f"# Evaluation of run `{run_name}`",
        "",
        f"Scores are the {score}. "
        "**AUC** is the area under the ROC curve over all rows (ties count half). **UAUC** is the "
        "unweighted mean of per-user AUCs over users with at least two rows and both labels.",
        "",
        f"- **warm**: the user and the item each have more than {warm_more_than} train "
        "interactions (`warm`).",
        "- **cold**: the user or the item does not occur in train (`not not_cold`). Warm and cold "
        "do not partition the rows: a row can be neither.",
        "- **codes** rows: the encoder alone (inner product of the user and item binary codes), "
        "from the encode manifest, computed on every sample of the split.",
        *[f"- {n}" for n in notes],
        "",
    ]
    header = ["scorer", "mode", "rows", "warm rows", "cold rows", *METRIC_KEYS]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    for split in splits:
        lines += [f"## {split}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            if r["split"] != split:
                continue
            cells = [r["scorer"], r["mode"], r["rows"], r["warm_rows"], r["cold_rows"]]
            cells += [r[k] for k in METRIC_KEYS]
            lines.append("| " + " | ".join(_fmt(c) if c is not None else "–" for c in cells) + " |")
        adapters = {r["mode"]: r["adapter"] for r in rows if r["split"] == split and r["adapter"]}
        if adapters:
            lines += ["", "Adapters: " + "; ".join(f"{m}: `{a}`" for m, a in adapters.items())]
        if split in images:
            lines += ["", f"![ROC curves, {split}]({images[split]})"]
        lines.append("")
    return "\n".join(lines)


RANKING_COLUMNS = tuple(
    (name, k)
    for name in sorted(METRICS, key=lambda name: name != HEADLINE)
    for k in METRICS[name].report_ks
)
"""The columns of the report's ranking tables, (metric, K): each metric of
:data:`~binllm_core.ranking.metrics.METRICS` at its ``report_ks``, the headline metric first."""


SPLIT_WORDS = {
    "per_user": "temporal per user: each user's own interactions in time order, cut by "
    "protocol.fractions (one user's train can be later than another's test)",
    "global": "global temporal: one cut of all interactions in time order by "
    "protocol.fractions (train before valid before test for every user)",
    "months": "calendar months: train, valid and test in the month ranges of protocol",
    "months_then_halves": "train months, then the holdout months in time order: the first half "
    "valid, the second test",
}
"""How each ``protocol.split`` cuts the interactions, in the report's words."""
METHOD_NAMES = {
    "codes": "codes",
    "popularity": "popularity",
    "recent_popularity": "time-aware popularity",
    "float": "float",
}
"""The methods of the report's headline, in its order."""


def ranking_markdown(
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[tuple[str, str, str], str],
    negatives: int,
    split_kind: str,
    window: WindowChoice | None,
    resamples: int,
    codes_from: str = "the codes",
    blend: Mapping[str, Mapping[str, Any]] | None = None,
    union: Mapping[str, Any] | None = None,
    ratios: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The report's ranking section: a headline (NDCG@10 of the codes and the popularity
    baselines on every user of the full protocol, and ``ratios``' codes / float with its paired
    interval, :func:`binllm_core.ranking.lists.ratio_rows`), the split kind, the definitions,
    the time-aware popularity's window, the blend's weight per mode (``blend``: stage
    ``rerank``'s manifest, :func:`binllm_core.ranking.blend.blend_weights`); per protocol and
    split, one row per method, mode and user set with the metrics of :data:`RANKING_COLUMNS`
    and their intervals; the retriever's Recall@N; the curves of ``images`` ((protocol, split,
    user set) -> file). ``codes_from`` says which encoder's codes the lists are retrieved by
    (and whose float model is ``float``). ``union``: the rerank manifest's ``popular_union``
    (the places time-aware popular items took among the candidates,
    :mod:`binllm_core.ranking.candidates`), None where it was off."""
    if not rows:
        return []
    lines = ["## Ranking", "", *_headline(rows, window, ratios), ""]
    intervals = (
        f"`[low, high]`: the bootstrap 95 % interval over the row's users ({resamples:,} "
        "resamples, `evaluate.bootstrap`; the same resamples for every method of a user set)."
        if resamples
        else "No intervals (`evaluate.bootstrap: 0`)."
    )
    lines += [
        f"Split `{split_kind}` (`protocol.split`): {SPLIT_WORDS[split_kind]}. "
        "Per user, the held-out positives of the split against a ranked list. **full**: the whole "
        "catalog without the user's excluded items (`retrieve.exclude`); **sampled**: the user's "
        f"first positive of the split among {negatives} random items the user never "
        "interacted with (fewer where the user has not that many unseen items). "
        f"`codes`: Hamming distance of {codes_from} (ties: `retrieve.tie_break`, then id); "
        "`float`: the inner products of the continuous model trained beside them; "
        "`popularity`: train positives; "
        "`recent_popularity`: train positives of the last W days of train (ties: train "
        "popularity, then id); `codes+llm`: the codes' first `rerank.top_n` candidates "
        "(with `rerank.popular_places`, their last P places given to time-aware popular items) "
        "re-ranked by the LLM's answer score; `blend`: the lists that ship, those candidates by "
        "α·z(answer score) + (1 − α)·z(−Hamming distance) per user (α = 0: the codes' order). "
        "Users **all**: every user of the split with a "
        "positive (a positive the retriever missed counts as a miss; every method but the "
        "LLM); **reranked**: the users the LLM re-ranked (a seeded `rerank.max_users`; every "
        "method, so the LLM is compared on the same users); **retrieved**: reranked users whose "
        "positive is among the re-ranked candidates (what LlamaRec reports). "
        f"{_and([m.label for m in METRICS.values()])} as in `binllm_core/ranking/metrics.py`; "
        + intervals,
        "",
        _window_words(window),
        "",
        *_union_words(union),
        *[
            line
            for mode, chosen in (blend or {}).items()
            for line in _blend_words(rows, mode, chosen)
        ],
    ]
    header = ["method", "mode", "users", "n", *[f"{m.upper()}@{k}" for m, k in RANKING_COLUMNS]]
    groups = list(dict.fromkeys((r["protocol"], r["split"]) for r in rows))
    for protocol, split in groups:
        part = [r for r in rows if r["protocol"] == protocol and r["split"] == split]
        lines += [f"### {split}, {protocol} ranking", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        keys = list(dict.fromkeys((r["method"], r["mode"], r["users"]) for r in part))
        for method, mode, users in keys:
            mine = {
                r["k"]: r
                for r in part
                if (r["method"], r["mode"], r["users"]) == (method, mode, users)
            }
            n = next(iter(mine.values()))["n_users"]
            cells = [method, mode, users, f"{n:,}"]
            cells += [_with_interval(mine[k], m) if k in mine else "–" for m, k in RANKING_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        recall = {
            r["k"]: r
            for r in part
            if r["method"] == "codes" and r["users"] == "all" and r["k"] >= 20
        }
        if protocol == "full" and recall:
            lines += [
                "",
                "Retriever (codes, all users) "
                + ", ".join(
                    f"Recall@{k} {_with_interval(r, 'recall')}" for k, r in sorted(recall.items())
                ),
            ]
        for (p, s, users), name in images.items():
            if (p, s) == (protocol, split):
                lines += ["", f"![ranking curves, {split}, {protocol}, {users} users]({name})"]
        lines.append("")
    return lines


def _headline(
    rows: Sequence[Mapping[str, Any]],
    window: WindowChoice | None,
    ratios: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """One line per split: NDCG@10 of :data:`METHOD_NAMES` on every user, full catalog, then
    the split's ``ratios`` (full protocol)."""
    lines = []
    for split in dict.fromkeys(r["split"] for r in rows if r["protocol"] == "full"):
        found = {
            r["method"]: r
            for r in rows
            if (r["protocol"], r["split"], r["users"], r["k"]) == ("full", split, "all", 10)
        }
        if "codes" not in found:
            continue
        named = []
        for method, name in METHOD_NAMES.items():
            if method in found:
                days = f" ({window.days} days)" if method == "recent_popularity" and window else ""
                named.append(f"{name}{days} {_with_interval(found[method], 'ndcg')}")
        n = found["codes"]["n_users"]
        compared = [
            ratio_words(r) for r in ratios if (r["protocol"], r["split"]) == ("full", split)
        ]
        lines.append(
            f"**{split}, NDCG@10 on every user with a positive ({n:,}), full catalog:** "
            + "; ".join(named)
            + "."
            + "".join(f" {c}." for c in compared)
        )
    return lines


def ratio_words(ratio: Mapping[str, Any]) -> str:
    """``codes / float 0.941 [0.885, 1.001] (paired bootstrap)``: a row of
    :func:`binllm_core.ranking.lists.ratio_rows`, as it is or read back from JSON (nan: null)."""
    value, low = ratio["ratio"], ratio["low"]
    words = f"{ratio['numerator']} / {ratio['denominator']}"
    if value is None or math.isnan(value):
        return f"{words} undefined (the {ratio['denominator']} lists' {ratio['metric']} is 0)"
    if low is None or math.isnan(low):
        return f"{words} {value:.3f}"
    return f"{words} {value:.3f} [{low:.3f}, {ratio['high']:.3f}] (paired bootstrap)"


def _window_words(window: WindowChoice | None) -> str:
    if window is None:
        return (
            "`recent_popularity` is not measured: no valid user has a positive to choose its "
            "window by."
        )
    curve = ", ".join(
        f"**{d} d {v:.4f}**" if d == window.days else f"{d} d {v:.4f}"
        for d, v in window.valid_ndcg.items()
    )
    return (
        f"`recent_popularity`'s window W = **{window.days} days** "
        "(`evaluate.popularity_windows`), chosen on valid NDCG@10 (never on test) over "
        f"{window.valid_users:,} valid users, their train items left out of the lists: "
        f"{curve}; train popularity {window.popularity_valid_ndcg:.4f}. The window ends at the "
        "latest train interaction."
    )


def _union_words(union: Mapping[str, Any] | None) -> list[str]:
    """The places the time-aware popular items took among the re-ranked candidates, and the
    valid Recall@N they were chosen by."""
    if union is None:
        return []
    n_key = next(k for k in union if k.startswith("valid_recall@"))
    n = n_key.split("@")[1]
    if not union["valid_users"]:
        return [
            f"Candidates: the codes' first {n} (no valid user to choose popular places by).",
            "",
        ]
    places = union["places"]
    curve = ", ".join(
        f"**{p} {v:.4f}**" if int(p) == places else f"{p} {v:.4f}" for p, v in union[n_key].items()
    )
    return [
        f"Candidates the LLM re-ranks: the codes' first {int(n) - places} and **{places}** "
        f"time-aware popular items (window {union['window_days']} days; "
        "`rerank.popular_places`), chosen on valid Recall@"
        f"{n} over {union['valid_users']:,} valid users: {curve}; lift over the codes' own "
        f"{n} {union['valid_lift']:+.4f}.",
        "",
    ]


def _blend_words(
    rows: Sequence[Mapping[str, Any]], mode: str, chosen: Mapping[str, Any]
) -> list[str]:
    """The blend's weight for ``mode``, its valid curve, and its lift over the codes' lists on
    the re-ranked users of each split (full catalog, NDCG at the largest K up to 10 the blend
    has)."""
    alpha = chosen["alpha"]
    curve = ", ".join(
        f"**{a} {v:.4f}**" if float(a) == alpha else f"{a} {v:.4f}"
        for a, v in chosen["valid_ndcg@10"].items()
    )
    valid = (
        f"valid NDCG@10 of the blended lists over {chosen['valid_users']:,} re-ranked valid "
        f"users (`rerank.alpha_grid`): {curve}; lift over the retriever (α = 0) "
        f"{chosen['valid_lift']:+.4f}"
        if chosen["valid_ndcg@10"]
        else "no valid user was re-ranked (add valid to `retrieve.splits`)"
    )
    lifts = []
    for split in dict.fromkeys(r["split"] for r in rows if r["protocol"] == "full"):
        mine = [
            r
            for r in rows
            if (r["protocol"], r["split"], r["users"]) == ("full", split, "reranked")
            and r["k"] <= 10
        ]
        blended = {r["k"]: r for r in mine if (r["method"], r["mode"]) == ("blend", mode)}
        codes = {r["k"]: r for r in mine if r["method"] == "codes"}
        common = sorted(set(blended) & set(codes))
        if common:
            k = common[-1]
            lift = blended[k]["ndcg"] - codes[k]["ndcg"]
            lifts.append(f"{split} {lift:+.4f} (NDCG@{k} {_fmt(blended[k]['ndcg'])})")
    return [
        f"`blend` in `{mode}`: α = **{alpha:g}** ({chosen['chosen_by']}); {valid}. "
        + (
            "Lift over `codes` on the re-ranked users, full catalog: " + "; ".join(lifts) + "."
            if lifts
            else ""
        ),
        "",
    ]


def _with_interval(row: Mapping[str, Any], metric: str) -> str:
    """``0.0805 [0.0709, 0.0909]``, or the value alone without an interval."""
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if low is None or high is None or math.isnan(low):
        return _fmt(row[metric])
    return f"{_fmt(row[metric])} [{low:.4f}, {high:.4f}]"


def ranking_png(curves: Sequence[tuple[str, str, np.ndarray, np.ndarray]], title: str) -> bytes:
    """Two panels: NDCG@K and Recall@K against K, one line per ``(panel, label, ks, values)``
    (panel ``ndcg`` or ``recall``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    axes = dict(zip(("ndcg", "recall"), fig.subplots(1, 2), strict=True))
    for panel, label, ks, values in curves:
        axes[panel].plot(ks, values, label=label)
    for panel, ax in axes.items():
        ax.set(xlabel="K (list length)", ylabel=f"{panel.upper()}@K")
        ax.set_xlim(left=1)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _and(words: Sequence[str]) -> str:
    """``a, b and c``."""
    return f"{', '.join(words[:-1])} and {words[-1]}" if len(words) > 1 else "".join(words)
