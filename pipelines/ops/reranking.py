"""Re-ranking on Ray Data: the LLM orders each user's first ``rerank.top_n`` candidates (stage
``rerank``, ``binllm recommend`` and ``nightly --topk``).

Each candidate of ``retrieve/candidates`` (both protocols) becomes the run's prompt for its user
and item — the user's history as ``retrieve/users`` recorded it (the positives before the
split, so a list never shows the split's own items), the titles and, in a code mode, the codes —
and is scored by :func:`pipelines.ops.scoring.score_now` (the actors, adapters and shared user
prefix of stage ``score``: a user's N prompts run the prefix once). Each mode is ranked by its
answer score, ties by retrieval rank, and by the blend of that score with the retriever's
(:mod:`binllm_core.ranking.blend`, the weight of each mode given). ``binllm recommend`` and
``nightly --topk`` (:mod:`pipelines.recommend`) run the same steps on their own users.

Table ``recommendations`` (:data:`RECOMMENDATIONS_SCHEMA`): per protocol, split, mode and user
the re-ranked list (rank 1 = best) with the answer score, the blend's score and rank, the
retrieval rank and distance, and the lineage columns of ``scores``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.config import RunConfig
from binllm_core.modes import MODES
from binllm_core.prompts.render import prompt_with_soft
from binllm_core.prompts.templates import Templates, templates_from_config
from binllm_core.prompts.user_pairs import RunLookups
from binllm_core.ranking.blend import blend_order, blend_scores
from pipelines.ops.scoring import LINEAGE, NONE, SCORE_FIELDS, now_utc, score_now

RECOMMENDATIONS_SCHEMA = pa.schema(
    [
        ("protocol", pa.string()),
        ("split", pa.string()),
        ("mode", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("title", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float64()),
        ("p_yes", pa.float64()),
        ("blend_rank", pa.int32()),
        ("blend_score", pa.float64()),
        ("retrieval_rank", pa.int32()),
        ("hamming", pa.int16()),
        ("source", pa.string()),
        ("cold", pa.bool_()),
        ("n_tokens", pa.int32()),
        *[f for f in SCORE_FIELDS if f[0] in LINEAGE],
    ]
)
"""Re-ranked lists, rows in ``rank`` order: ``score`` is the answer score (the ``Yes`` logit by
default), ``rank`` its order within (protocol, split, mode, user), ties by ``retrieval_rank``
(the LLM's own list); ``blend_score`` = alpha z(score) + (1 - alpha) z(-hamming) over the user's
candidates (:mod:`binllm_core.ranking.blend`; minus ``retrieval_rank`` for a popularity list) and
``blend_rank`` its order, ties by ``retrieval_rank``: the list that ships (alpha of the mode in
the ``rerank`` manifest's ``blend``, or the one ``binllm recommend`` records); ``cold``: the user
has no code (a popularity list with text prompts, ``binllm recommend`` only); ``split`` is empty
for ``binllm recommend``, whose top K are the first K of ``blend_rank``."""
GROUP = ["protocol", "split", "list_mode", "uid", "user"]
"""One list: users without a code all have uid 0 (``binllm recommend``), so the name counts."""
ROWS_PER_PARTITION = 1_000_000
"""Rows per partition of the shuffle that groups each user's scored candidates."""


def render_lists(
    batch: pa.Table,
    lookups: RunLookups,
    histories: Mapping[tuple[str, int], list[int]],
    templates: Templates,
    mode: str,
    history_len: int,
) -> pa.Table:
    """Candidates (:data:`CANDIDATES_SCHEMA`) -> the same rows with ``list_mode`` (``mode``),
    ``mode`` (the prompt's: text for a user without a code), ``title``, ``cold``, ``prompt``."""
    prompt_lookups = lookups.prompt
    users, items = batch["uid"].to_pylist(), batch["iid"].to_pylist()
    splits = batch["split"].to_pylist()
    user_codes = prompt_lookups.user_codes.get(mode, {})
    item_codes = prompt_lookups.item_codes.get(mode, {})
    modes, titles, colds, prompts, softs = [], [], [], [], []
    for split, uid, iid in zip(splits, users, items, strict=True):
        title = prompt_lookups.titles.get(iid, str(iid))
        cold = uid not in user_codes if MODES[mode].has_codes else False
        row_mode = "text" if cold else mode
        codes = (user_codes[uid], item_codes[iid]) if MODES[row_mode].has_codes else None
        prompt, soft = prompt_with_soft(
            templates,
            row_mode,
            histories.get((split or "", uid), []),
            prompt_lookups.titles,
            history_len,
            title,
            codes,
            uid,
            iid,
        )
        modes.append(row_mode)
        titles.append(title)
        colds.append(cold)
        prompts.append(prompt)
        softs.append(soft)
    for name, values, kind in (
        ("list_mode", [mode] * batch.num_rows, pa.string()),
        ("mode", modes, pa.string()),
        ("title", titles, pa.string()),
        ("cold", colds, pa.bool_()),
        ("prompt", prompts, pa.string()),
        ("soft_ids", softs, pa.list_(pa.int32())),
    ):
        batch = batch.append_column(name, pa.array(values, kind))
    return batch


def rank_group(group: pa.Table, alphas: Mapping[str, float]) -> pa.Table:
    """One user's scored candidates of one protocol, split and mode, ordered by answer score
    (ties: retrieval rank), with ``rank`` 1..n, and ``blend_rank`` 1..n by the blend of the
    weight ``alphas[mode]``."""
    score = group["logit_yes"].to_numpy()
    retrieval_rank = group["rank"].to_numpy()
    order = np.lexsort((retrieval_rank, -score))
    hamming = pc.cast(group["hamming"], pa.float64()).to_numpy()  # null (popularity) -> NaN
    alpha = alphas[group["list_mode"][0].as_py()]
    blend = blend_scores(score, hamming, retrieval_rank, alpha)
    blend_rank = np.empty(len(order), np.int32)
    blend_rank[blend_order(blend, retrieval_rank)] = np.arange(1, len(order) + 1)
    ordered = group.take(pa.array(order))
    out = {
        "protocol": ordered["protocol"],
        "split": ordered["split"],
        "mode": ordered["list_mode"],
        "uid": ordered["uid"],
        "iid": ordered["iid"],
        "user": ordered["user"],
        "item": ordered["item"],
        "title": ordered["title"],
        "rank": pa.array(np.arange(1, len(order) + 1), pa.int32()),
        "score": ordered["logit_yes"],
        "p_yes": ordered["p_yes"],
        "blend_rank": pa.array(blend_rank[order], pa.int32()),
        "blend_score": pa.array(blend[order], pa.float64()),
        "retrieval_rank": ordered["rank"],
        "hamming": ordered["hamming"],
        "source": ordered["source"],
        "cold": ordered["cold"],
        "n_tokens": ordered["n_tokens"],
        **{name: ordered[name] for name in LINEAGE},
    }
    return pa.table(out).cast(RECOMMENDATIONS_SCHEMA)


def score_lists(
    candidates: ray.data.Dataset,
    cfg: RunConfig,
    modes: list[str],
    plan: Mapping[str, str],
    lookups: RunLookups,
    histories: Mapping[tuple[str, int], list[int]],
) -> tuple[ray.data.Dataset | None, dict[str, Any]]:
    """Score ``candidates`` in each of ``modes`` with the adapters of ``plan`` (mode -> adapter
    URI, ``text`` included: a user without a code is scored with the text prompt and adapter,
    inside the list of its mode); the scored rows (``list_mode`` the list's mode, ``logit_yes``
    the answer score, ``rank`` the retrieval rank; None without a row) and per-mode counts."""
    templates = templates_from_config(cfg.prompts)
    scored_at = now_utc()
    parts, per_mode = [], {}
    for mode in modes:
        prompts = candidates.map_batches(
            render_lists,
            fn_kwargs={
                "lookups": lookups,
                "histories": histories,
                "templates": templates,
                "mode": mode,
                "history_len": cfg.prompts.history_len,
            },
            batch_format="pyarrow",
        ).materialize()
        started, rows = time.time(), 0
        for row_mode in dict.fromkeys([mode, "text"]):
            subset = _of_mode(prompts, row_mode)
            n = subset.count()
            if n == 0:
                continue
            title = f"rerank {mode}" + (" (text rows)" if row_mode != mode else "")
            scored = score_now(subset, cfg, plan[row_mode], scored_at, title)
            parts.append(scored)
            rows += n
        seconds = time.time() - started
        per_mode[mode] = {
            "adapter": plan[mode] or NONE,
            "rows": rows,
            "wall_time_s": round(seconds, 2),
            "prompts_per_s": round(rows / max(seconds, 1e-9), 3),
        }
    if not parts:
        return None, per_mode
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), per_mode


def rank_lists(scored: ray.data.Dataset | None, alphas: Mapping[str, float]) -> ray.data.Dataset:
    """The scored rows of :func:`score_lists` as lists (:data:`RECOMMENDATIONS_SCHEMA`,
    materialized), each mode blended with its weight in ``alphas``."""
    if scored is None:
        return ray.data.from_arrow(RECOMMENDATIONS_SCHEMA.empty_table())
    # Few partitions: Ray's default of many costs seconds of tasks even for a few rows.
    partitions = max(1, -(-scored.count() // ROWS_PER_PARTITION))
    ranked = scored.groupby(GROUP, num_partitions=partitions).map_groups(
        rank_group, fn_kwargs={"alphas": dict(alphas)}, batch_format="pyarrow"
    )
    return ranked.materialize()


def _of_mode(ds: ray.data.Dataset, mode: str) -> ray.data.Dataset:
    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.equal(batch["mode"], mode))

    return ds.map_batches(keep, batch_format="pyarrow").materialize()


def histories_of(users: pa.Table) -> dict[tuple[str, int], list[int]]:
    """``retrieve/users`` (split, uid, history) -> {(split, uid): history}."""
    return {
        (split or "", uid): list(history or [])
        for split, uid, history in zip(
            users["split"].to_pylist(),
            users["uid"].to_pylist(),
            users["history"].to_pylist(),
            strict=True,
        )
    }
