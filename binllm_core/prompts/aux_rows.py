"""Auxiliary task rows: recommendation knowledge written as text (Cao et al. 2024, "Aligning
Large Language Models with Recommendation Knowledge"; ``binllm_method.md`` section 5).

Two training operations of classic recommenders become prompts, made from the **train split
only** (a user's train positives in time order; negatives never rated by the user in train):

* ``mim`` — masked item modelling (BERT4Rec): a window of the user's consecutive liked titles
  with some replaced by the mask word; the answer is the hidden titles, trained with the
  language-modelling loss on their tokens (:mod:`binllm_core.llm.objectives`).
* ``bpr`` — pairwise preference (BPR): the liked titles before a later liked item, then that
  item and an item the user never rated in train as (A)/(B); the answer is the letter. Which
  letter is the liked item is drawn so that exactly half the rows (±1) say (A).

The items are chosen once (:func:`build_rows`, seeded per task and user) and written in every
prompt mode (:func:`render_rows`): in a code mode each title carries its item's code and the
question the user's code. Neither the wording, the masking ratio nor the mixture of the paper is
public; the templates and counts here are binllm's, all in :class:`~binllm_core.config.AuxConfig`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.config import AUX_PLACEHOLDERS, AUX_TASKS, AuxConfig, PromptConfig
from binllm_core.modes import MODES
from binllm_core.prompts.render import Lookups, code_of

LETTERS = ("A", "B")
"""The two choices of a ``bpr`` prompt, in order; the answer is one of them after a space."""


AUX_SCHEMA = pa.schema(
    [
        ("aux_id", pa.int64()),
        ("task", pa.string()),
        ("mode", pa.string()),
        ("uid", pa.int32()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("label", pa.int8()),
        ("shown", pa.list_(pa.int32())),
        ("hidden", pa.list_(pa.int32())),
        ("positive", pa.int32()),
        ("negative", pa.int32()),
    ]
)
"""``answer``: the text trained after the prompt (``mim``: the hidden titles; ``bpr``: the
letter); ``label``: 1 when (A) is the liked item (``bpr``; 1 for ``mim``); ``shown``: items whose
titles the prompt holds; ``hidden``: the masked items (``mim``); ``positive``/``negative``: the
pair of a ``bpr`` row."""

_CUE = {"paper": " \\n#Answer:", "default": "\n#Answer:"}
_BUILTIN = {
    ("mim", False): "#Question: A user has given high ratings to the following {items}, oldest "
    "first: <ItemTitleList>. Which {item} is hidden behind {mask}?",
    ("mim", True): "#Question: A user with the feature <UserID> has given high ratings to the "
    "following {items}, oldest first, each with its feature: <ItemTitleList>. Which {item} is "
    "hidden behind {mask}?",
    ("bpr", False): "#Question: A user has given high ratings to the following {items}: "
    "<ItemTitleList>. Which {item} would the user enjoy more, (A) <CandidateA> or (B) "
    '<CandidateB>? Answer with "A" or "B".',
    ("bpr", True): "#Question: A user with the feature <UserID> has given high ratings to the "
    "following {items}, each with its feature: <ItemTitleList>. Which {item} would the user "
    'enjoy more, (A) <CandidateA> or (B) <CandidateB>? Answer with "A" or "B".',
}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in AUX_PLACEHOLDERS))


# ---- which items a row holds -------------------------------------------------------------------
@dataclass(frozen=True)
class UserTrain:
    """A user's train interactions: liked items oldest first, and the keys (titles, or ids) of
    every item rated in train."""

    uid: int
    liked: list[int]
    rated: frozenset[Hashable]


@dataclass(frozen=True)
class NegativePool:
    """The items a ``bpr`` negative is drawn from (those rated in train: each has a title and a
    code), one per key (title, or id), with their keys."""

    iids: np.ndarray
    keys: list[Hashable]


@dataclass(frozen=True)
class AuxRow:
    """The items of one auxiliary row, before it is written in a mode."""

    task: str
    uid: int
    listed: list[int]
    """The liked items the question lists, oldest first (``mim``: with the hidden ones)."""
    mask_at: list[int] = field(default_factory=list)
    """Positions in ``listed`` the mask word takes (``mim``)."""
    positive: int | None = None
    negative: int | None = None
    label: int = 1

    @property
    def hidden(self) -> list[int]:
        return [self.listed[k] for k in self.mask_at]

    @property
    def shown(self) -> list[int]:
        """Items whose title the prompt holds."""
        masked = set(self.mask_at)
        listed = [i for k, i in enumerate(self.listed) if k not in masked]
        return listed + [i for i in (self.positive, self.negative) if i is not None]


def train_users(
    samples: pl.DataFrame, titles: Mapping[int, str] | None = None
) -> tuple[list[UserTrain], NegativePool]:
    """Every user with a train sample (by uid) and the negatives' catalog. Only
    ``split == "train"`` rows are read; liked items are ordered by time, then sample id. Items
    are told apart by ``titles`` when given (two items can share a title): a liked title is
    listed once and no negative has the title of an item its user rated, so a hidden or
    preferred title is never also shown, nor a pair two items of one title."""
    train = samples.filter(pl.col("split") == "train").sort("uid", "timestamp", "sample_id")
    users = train.group_by("uid", maintain_order=True).agg(
        liked=pl.col("iid").filter(pl.col("label") == 1), rated=pl.col("iid")
    )
    key: Callable[[int], Hashable] = titles.__getitem__ if titles is not None else int
    out = []
    for uid, liked, rated in users.select("uid", "liked", "rated").iter_rows():
        first: dict[Hashable, int] = {}
        for iid in liked:
            first.setdefault(key(iid), iid)
        out.append(UserTrain(uid, list(first.values()), frozenset(map(key, rated))))
    catalog: dict[Hashable, int] = {}
    for iid in np.sort(train["iid"].unique().to_numpy()).tolist():
        catalog.setdefault(key(iid), iid)
    return out, NegativePool(np.asarray(list(catalog.values())), list(catalog))


def mim_rows(
    user: UserTrain, catalog: NegativePool, cfg: AuxConfig, rng: np.random.Generator
) -> Iterator[AuxRow]:
    """Windows of consecutive liked items with ``mask_fraction`` of them (at least one, never
    all) hidden (``catalog`` unused: every builder has one signature)."""
    n, width = len(user.liked), min(cfg.history_len, len(user.liked))
    masked = min(width - 1, max(1, round(cfg.mask_fraction * width)))
    for _ in range(cfg.rows_per_user):
        start = int(rng.integers(0, n - width + 1))
        hide = sorted(rng.choice(width, size=masked, replace=False).tolist())
        yield AuxRow("mim", user.uid, user.liked[start : start + width], hide)


def bpr_rows(
    user: UserTrain, catalog: NegativePool, cfg: AuxConfig, rng: np.random.Generator
) -> Iterator[AuxRow]:
    """A liked item after at least one other (the ``history_len`` before it are shown) against a
    catalog item the user never rated in train (none when the user rated them all)."""
    if len(user.rated) >= len(catalog.keys):  # the rated keys are catalog keys
        return
    for _ in range(cfg.rows_per_user):
        at = int(rng.integers(1, len(user.liked)))
        pick = int(rng.integers(len(catalog.keys)))
        while catalog.keys[pick] in user.rated:
            pick = int(rng.integers(len(catalog.keys)))
        listed = user.liked[max(0, at - cfg.history_len) : at]
        yield AuxRow("bpr", user.uid, listed, [], user.liked[at], int(catalog.iids[pick]))


Builder = Callable[[UserTrain, NegativePool, AuxConfig, np.random.Generator], Iterator[AuxRow]]
BUILDERS: dict[str, Builder] = {"mim": mim_rows, "bpr": bpr_rows}
"""Task -> its rows for one user; a new task is an entry here and one in
:data:`binllm_core.llm.objectives.OBJECTIVES`."""
LETTER_STREAM = 1_000
"""The seed stream (next to each task's index) of the ``bpr`` letter order."""


def build_rows(
    samples: pl.DataFrame, cfg: AuxConfig, titles: Mapping[int, str] | None = None
) -> list[AuxRow]:
    """The rows of every task of ``cfg.tasks``, seeded per (seed, task, uid); users with fewer
    than ``min_positives`` train positives (distinct titles, see :func:`train_users`) get none.
    ``bpr`` labels: a seeded half say (A)."""
    users, catalog = train_users(samples, titles)
    rows: list[AuxRow] = []
    for task in cfg.tasks:
        made = [
            row
            for user in users
            if len(user.liked) >= cfg.min_positives
            for row in BUILDERS[task](user, catalog, cfg, _rng(cfg.seed, task, user.uid))
        ]
        if task == "bpr":
            order = np.random.default_rng([cfg.seed, LETTER_STREAM]).permutation(len(made))
            made = [replace(r, label=int(k % 2 == 0)) for r, k in zip(made, order, strict=True)]
        rows += made
    return rows


def repeated_rows(rows: list[AuxRow]) -> dict[str, int]:
    """Per task, how many rows repeat an earlier row of the same user (a user with few liked
    items has few distinct windows or pairs to draw ``rows_per_user`` rows from)."""
    seen: set[tuple] = set()
    out: dict[str, int] = {}
    for row in rows:
        key = (row.task, row.uid, tuple(row.listed), tuple(row.mask_at), row.positive, row.negative)
        out[row.task] = out.get(row.task, 0) + (key in seen)
        seen.add(key)
    return out


def _rng(seed: int, task: str, uid: int) -> np.random.Generator:
    return np.random.default_rng([seed, AUX_TASKS.index(task), uid])


# ---- writing a row in a mode -------------------------------------------------------------------
@dataclass(frozen=True)
class AuxTemplates:
    """The question of each task, for text and for code modes."""

    questions: Mapping[tuple[str, bool], str]
    mask_word: str

    @classmethod
    def of(cls, cfg: PromptConfig) -> AuxTemplates:
        words = {"items": f"{cfg.domain}s", "item": cfg.domain, "mask": cfg.aux.mask_word}
        cue = _CUE[cfg.style]
        own = {"mim": cfg.aux.mim_template, "bpr": cfg.aux.bpr_template}
        questions = {
            (task, codes): own[task] or _BUILTIN[task, codes].format(**words) + cue
            for task, codes in _BUILTIN
        }
        return cls(questions, cfg.aux.mask_word)


def render_rows(
    rows: Sequence[AuxRow], lookups: Lookups, templates: AuxTemplates, modes: Sequence[str]
) -> pa.Table:
    """One prompt per row and mode (``aux_id`` = the row's index, the same in every mode)."""
    out: dict[str, list] = {n: [] for n in AUX_SCHEMA.names}
    for mode in modes:
        codes = MODES[mode].has_codes
        item = _item_writer(lookups, mode, templates.mask_word)
        for aux_id, row in enumerate(rows):
            masked = set(row.mask_at)
            listed = [None if k in masked else i for k, i in enumerate(row.listed)]
            values = {"<ItemTitleList>": ", ".join(map(item, listed))}
            if codes:
                values["<UserID>"] = code_of(lookups.user_codes[mode], row.uid, "user uid", mode)
            if row.task == "bpr":
                first, second = (
                    (row.positive, row.negative) if row.label else (row.negative, row.positive)
                )
                values["<CandidateA>"], values["<CandidateB>"] = item(first), item(second)
                answer = " " + LETTERS[0 if row.label else 1]
            else:
                answer = " " + ", ".join(f'"{lookups.titles[i]}"' for i in row.hidden)
            question = templates.questions[row.task, codes]
            for name, value in (
                ("aux_id", aux_id),
                ("task", row.task),
                ("mode", mode),
                ("uid", row.uid),
                ("prompt", fill(question, values)),
                ("answer", answer),
                ("label", row.label),
                ("shown", row.shown),
                ("hidden", row.hidden),
                ("positive", row.positive),
                ("negative", row.negative),
            ):
                out[name].append(value)
    return pa.table(out, schema=AUX_SCHEMA)


def fill(question: str, values: Mapping[str, str]) -> str:
    """Every placeholder replaced in one pass (a title holding one stays as it is)."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m[0], m[0]), question)


def _item_writer(lookups: Lookups, mode: str, mask_word: str) -> Callable[[int | None], str]:
    """An item -> its quoted title, with its code in brackets in a code mode; ``None`` -> the
    mask word."""
    codes = lookups.item_codes.get(mode) if MODES[mode].has_codes else None

    def write(iid: int | None) -> str:
        if iid is None:
            return mask_word
        title = f'"{lookups.titles[iid]}"'
        return title if codes is None else f"{title} ({code_of(codes, iid, 'item iid', mode)})"

    return write
