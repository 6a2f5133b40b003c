"""Typed run configuration, loaded from YAML and overridable with ``key=value`` pairs.

Every section is a dataclass with a docstring under each field, and the rules between its
fields in its :meth:`Section.check`, next to them. Loading checks every key, type and rule, so a
config that loads runs: an unknown key, a value of the wrong type or one that breaks a rule is a
single-line :class:`ConfigError` before anything starts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from binllm_core.codes import CODE_FORMATS
from binllm_core.data.formats import FORMATS
from binllm_core.errors import ConfigError
from binllm_core.llm.strategies import RANKING_TASKS, STRATEGIES
from binllm_core.modes import MODES, TEXT_AND_CODE_MODES
from binllm_core.ranking.retrieval import BACKENDS


def resource(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A field that says how to run (workers, devices, retries, caches), not what to compute:
    changing it never changes a stage's hash, so it never redoes finished work."""
    return field(default=default, default_factory=factory, metadata={"resource": True})


SplitKind = Literal["per_user", "global", "months", "months_then_halves"]
Split = Literal["train", "valid", "test"]

MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
PLAIN_NAME = re.compile(r"(?!\.\.?\Z)[^/\\\x00-\x1f]+")
"""A run name: one folder name (no ``/`` or ``\\``, no control character, not ``.`` or
``..``), matched whole."""
MONTH_FIELDS = ("train_months", "valid_months", "test_months", "holdout_months")
SPLIT_MONTHS: dict[str, tuple[str, ...]] = {
    "months": ("train_months", "valid_months", "test_months"),
    "months_then_halves": ("train_months", "holdout_months"),
}
"""The month ranges each month split reads."""
PLACEHOLDERS = ("<ItemTitleList>", "<UserID>", "<TargetItemTitle>", "<TargetItemID>")
"""What a prompt template can hold; ``fill`` replaces each."""
_LOOKS_LIKE_PLACEHOLDER = re.compile(r"<[A-Z][A-Za-z]*>")


class Section:
    """A config section. :func:`build` calls :meth:`check` on every section it builds, after
    checking each field's type and choices."""

    def check(self, key: str, where: str = "") -> None:
        """Raise a one-line :class:`ConfigError` for a value that breaks one of the section's
        rules; ``key`` is the section's dotted key (``""`` at the top), ``where`` the config file.
        A section without rules beyond its field types keeps this one."""


@dataclass
class DataConfig(Section):
    """Where the raw interactions come from and how to read them."""

    uri: str = ""
    """fsspec URI of the source: a folder, a data file or the official ``.zip``; a local path,
    ``http(s)://`` or ``s3://``."""
    format: str = "auto"
    """Source layout. ``auto`` detects it from the file names; an explicit value overrides it:
    a name in the registry :data:`binllm_core.data.formats.FORMATS` (the README's table lists
    them; each format family's module says what its files look like)."""
    name: str = ""
    """Which dataset to take when the URI holds several: the RecBole atomic-file stem, or the
    Amazon review file stem (e.g. ``Books_5``). Empty: the only one there."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A malformed source line stops ingest (``error``) or is dropped, counted in the manifest and
    kept in the ``rejects`` table (``skip``)."""
    storage_options: dict[str, Any] = resource(factory=dict)
    """Options for the source's fsspec filesystem, e.g. ``{endpoint_url: http://..., anon: true}``
    for s3; the usual AWS environment variables work too."""
    cache_dir: str = resource("~/.cache/binllm/sources")
    """Local folder where remote (http/s3) sources are kept after their first download (one
    copy per version of a file: an edited remote file is downloaded again)."""
    identity: Literal["stat", "content"] = resource("stat")
    """How ingest tells whether the source changed: ``stat`` by each file's name, size and
    modification time (ETag on S3/HTTP); ``content`` by a SHA-256 of its bytes (reads them)."""

    def check(self, key: str, where: str = "") -> None:
        _check_format(self.format, f"{key}.format", where)


@dataclass
class ProtocolConfig(Section):
    """How interactions become labelled, split samples. Every rule is a field."""

    name: str = "ml100k"
    """A label for the protocol, recorded in the manifest."""
    label_min_rating: float = 4.0
    """A rating at or above this is a positive (label 1), below it a negative."""
    keep_years: list[int] = field(default_factory=list)
    """Keep only interactions in these calendar years (UTC); empty keeps all."""
    min_user_interactions: int = 0
    """Keep users with at least this many interactions. Counted once, on the rows left after
    ``keep_years`` and before either filter is applied (one pass, as the official code)."""
    min_item_interactions: int = 0
    """Keep items with at least this many interactions, counted like the user filter."""
    orphans: Literal["drop", "keep"] = "drop"
    """Interactions whose item has no row in the items file: ``drop`` puts them in the
    ``dropped`` table of ``samples`` (counted in its manifest), ``keep`` keeps them (their
    prompts then show the item id for a title)."""
    duplicates: Literal["drop", "keep"] = "drop"
    """Exact duplicate interactions (same user, item, rating and timestamp): ``drop`` keeps the
    first in source order and puts the others in ``dropped`` (counted), ``keep`` keeps them all
    (copies can land in two splits with the same label)."""
    split: SplitKind = "per_user"
    """``per_user``: each user's interactions in time order cut by ``fractions``; ``global``: one
    cut of all interactions in time order by ``fractions``; ``months``: calendar-month ranges
    ``train_months``/``valid_months``/``test_months``, rows outside them dropped;
    ``months_then_halves``: ``train_months`` for train, rows in ``holdout_months`` in time order,
    first half valid and second half test."""
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train/valid/test fractions for the ``per_user`` and ``global`` splits: three non-negative
    shares summing to 1 (checked whatever the split)."""
    train_months: list[str] = field(default_factory=list)
    """Inclusive ``[first, last]`` months (``YYYY-MM``, UTC) of the train split."""
    valid_months: list[str] = field(default_factory=list)
    """Inclusive ``[first, last]`` months of the valid split (``months`` split)."""
    test_months: list[str] = field(default_factory=list)
    """Inclusive ``[first, last]`` months of the test split (``months`` split)."""
    holdout_months: list[str] = field(default_factory=list)
    """Inclusive ``[first, last]`` months halved into valid and test (``months_then_halves``)."""
    valid_small_fraction: float = 0.5
    """Share of the valid split marked ``valid_small`` (LLM model selection)."""
    valid_small_seed: int = 2023
    """Seed of the ``valid_small`` draw."""
    warm_more_than: int = 3
    """A sample is ``warm`` when its user and its item each have more than this many train
    interactions."""
    history_len: int = 10
    """How many of the latest positives strictly before a sample are kept as its history."""

    def check(self, key: str, where: str = "") -> None:
        fr = self.fractions
        if len(fr) != 3 or not all(f >= 0 for f in fr) or not abs(sum(fr) - 1.0) <= 1e-6:
            raise ConfigError(
                f"{key}.fractions = {fr} must be three non-negative train/valid/test shares "
                "summing to 1",
                where,
                "write e.g. fractions: [0.8, 0.1, 0.1]",
            )
        spans = {
            name: month_range(getattr(self, name), f"{key}.{name}", where)
            for name in MONTH_FIELDS
            if getattr(self, name)
        }
        for name in SPLIT_MONTHS.get(self.split, ()):
            if name not in spans:
                raise ConfigError(
                    f"{key}.split = {self.split} needs {key}.{name}",
                    where,
                    f"set {key}.{name}: [YYYY-MM, YYYY-MM]",
                )
        used = [(name, spans[name]) for name in SPLIT_MONTHS.get(self.split, ())]
        for i, (name, (lo, hi)) in enumerate(used):
            for other, (lo2, hi2) in used[i + 1 :]:
                if lo <= hi2 and lo2 <= hi:
                    raise ConfigError(
                        f"{key}.{name} and {key}.{other} overlap",
                        where,
                        "make the month ranges disjoint",
                    )
        if not 0.0 <= self.valid_small_fraction <= 1.0:
            raise ConfigError(
                f"{key}.valid_small_fraction = {self.valid_small_fraction} is not in [0, 1]", where
            )
        _signs(self, key, where, non_negative="history_len")


@dataclass
class ModelConfig(Section):
    """The causal language model behind the recommender."""

    backbone: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """A Hugging Face hub id, a model folder (written by ``save_pretrained``) or a ``.gguf`` file,
    on a local path or any fsspec URI (``s3://``, ``gs://``, ``https://``; fetched once per node
    into ``cache_dir``), or ``tiny`` (a small random Llama built in code, for tests)."""
    gguf_file: str = ""
    """File name of the GGUF weights inside ``backbone`` when it is a folder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: ``auto`` is float32 on CPU and bfloat16 on GPU."""
    answer_score: Literal["yes_logit", "yes_minus_no"] = "yes_logit"
    """The score trained with BCE and ranked by AUC, read at the answer position: ``yes_logit``
    is the raw logit of the ``Yes`` token (official BinLLM); ``yes_minus_no`` is ``Yes`` minus
    ``No``, the log-odds of the two answers (TALLRec's P(Yes)). A raw logit starts far from 0
    (about +14 for SmolLM2), so a short budget spends its first steps pulling it down."""
    storage_options: dict[str, Any] = resource(factory=dict)
    """Options for the fsspec filesystem of a ``backbone`` given as a URI (``s3://``, ``gs://``,
    ``https://``), e.g. ``{endpoint_url: http://minio:9000}`` for s3; the usual AWS environment
    variables work too."""
    cache_dir: str = resource("~/.cache/binllm/models")
    """Local folder of each node where remote model files and adapters are kept after their
    first download (one copy per version of an object), and where a ``.gguf`` backbone is kept
    converted to a model folder (once per file and dtype), so actors and workers load it fast."""

    def check(self, key: str, where: str = "") -> None:
        if not self.backbone:
            raise ConfigError(
                f"{key}.backbone is empty", where, "give a hub id, a model folder, a .gguf or tiny"
            )


ENCODER_OBJECTIVES = ("rated", "implicit", "mixed")
"""The names of :data:`binllm_core.encoder.objectives.OBJECTIVES` (torch-free, as
:data:`ENCODER_BACKBONES`)."""
ENCODER_BACKBONES = ("mf", "lightgcn")
"""The names of :data:`binllm_core.encoder.model.BACKBONES`, kept here so that loading a config
needs no torch (``tests/test_registries.py`` checks they are the registry's keys)."""
SOFT_PROJECTORS = ("collm", "llara")
"""The names of :data:`binllm_core.llm.soft.PROJECTORS` (torch-free, checked like
:data:`ENCODER_BACKBONES`)."""

MAX_CODE_BITS = 1024
"""The longest code: a binary code is one token per bit in every prompt that holds it."""


@dataclass
class EncoderConfig(Section):
    """The binarized collaborative encoder (MF or LightGCN -> Linear -> tanh -> sign)."""

    backbone: str = "mf"
    """Collaborative backbone producing the continuous embeddings: ``mf`` or ``lightgcn``
    (:data:`binllm_core.encoder.model.BACKBONES`)."""
    dim: int = 32
    """Embedding length, and the codes' length where ``bits`` is 0 (then a multiple of 8, at
    most :data:`MAX_CODE_BITS`)."""
    bits: int = 0
    """The binary codes' length where it differs from ``dim`` (a multiple of 8, at most
    :data:`MAX_CODE_BITS`): the projection maps a ``dim``-dim embedding to ``bits`` code bits
    (less the prior bits), so the codes can be longer than the float model they are compared
    with; 0: ``dim`` bits. On ml-100k's valid users held out from the epoch choice, 96-bit codes
    from 64-dim tables scored NDCG@10 0.1138 against 0.1125 for 64 bits and 0.1113 for 128
    (BENCHMARKS.md, Codes' own lists)."""
    prior_bits: int = 0
    """Of the code bits, this many carry a learned item prior: a user's are always 1 and
    an item's are learned per item, so the item's count of 1s among them adds to its inner
    product with every user (what a float model keeps in an item vector's norm, mostly
    popularity, which codes of equal length cannot hold). 0: every bit is projected."""
    logit_scale: float = 1.0
    """The binary model's training logit is its codes' inner product times this (the codes'
    order is unchanged). A ±1 inner product of ``dim`` bits moves in steps of 2 up to ±dim, so
    at 1 a sigmoid loss saturates for most pairs and they stop teaching; on ml-100k's valid
    lists, 64-bit implicit codes went from NDCG@10 0.0985 at 1 to 0.1132 at 0.25."""
    lightgcn_layers: int = 2
    """Propagation layers K of the LightGCN backbone."""
    shared_projection: bool = False
    """One Linear for users and items (the paper's formula) instead of one per side (official)."""
    binary: bool = True
    """Train binary codes (and the float baseline beside them, for comparison); ``false`` trains
    the continuous backbone alone, whose codes are then the signs of its embeddings."""
    lr: float = 1e-2
    """Adam learning rate of the binary model."""
    weight_decay: float = 1e-3
    """Adam weight decay (L2) of the binary model."""
    float_lr: float = 1e-3
    """Adam learning rate of the continuous (float) model on the same backbone."""
    float_weight_decay: float = 1e-4
    """Adam weight decay (L2) of the continuous (float) model."""
    float_init_std: float = 1.0
    """Standard deviation of the normal init of the float model's embeddings (the binary model
    keeps PyTorch's N(0, 1), as the official code)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Both models' learning rates per epoch: ``constant``, or ``cosine`` (a half cosine from
    ``lr`` at the first epoch to 0 at ``max_epochs``: the binary codes' valid lists flip less
    from epoch to epoch as it falls, so the kept epoch is less a lucky spike)."""
    ema_decay: float = 0.0
    """Validate and export an exponential moving average of each model's weights, updated
    after every optimizer step with this decay (warmed up as ``min(decay, (1+t)/(10+t))`` at
    step t); 0: the weights as trained. The binary codes' valid lists move by about ±0.005
    NDCG@10 from epoch to epoch on ml-100k as latent weights near 0 flip their sign; the
    average flips less, so the kept epoch is less a lucky spike."""
    batch_size: int = 2048
    """Training batch size (samples)."""
    max_epochs: int = 200
    """Upper bound on training epochs."""
    patience: int = 20
    """Stop after this many epochs without a better validation AUC of the binary codes (and of
    the float baseline trained beside them: each model has this patience; the best binary
    checkpoint is kept)."""
    beta_step: float = 0.05
    """Added to beta every 2 epochs, capped at 1.0: the chance that an element of the code is
    binary rather than continuous during training."""
    num_workers: int = resource(1)
    """Ray Train workers."""
    use_gpu: bool = resource(False)
    """Train on GPUs (one per worker)."""
    max_failures: int = resource(2)
    """How many worker failures Ray Train recovers from (from the last checkpoint)."""
    checkpoint_every: int = resource(10)
    """Checkpoint every this many epochs, besides every epoch whose binary valid AUC improves and
    the last one (a Ray Train report costs about 2 s, so not every epoch)."""
    seed: int = 2023
    """Seed of the initialisation, the shuffling and the binary/continuous mix."""
    objective: str = "rated"
    """What the codes learn (:data:`binllm_core.encoder.objectives.OBJECTIVES`): ``rated`` (the
    paper's like-vs-dislike BCE on rated samples; the best epoch by valid AUC), ``implicit``
    (liked items against ``negatives`` catalog items the user never rated; the best epoch by
    valid NDCG@10 of the Hamming lists) or ``mixed`` (both, ``implicit_weight`` of the first)."""
    negatives: int = 4
    """Catalog items drawn per liked train item by the ``implicit`` and ``mixed`` objectives."""
    implicit_loss: Literal["bpr", "bce"] = "bpr"
    """The implicit loss: ``bpr`` (liked above each drawn item) or ``bce`` (liked 1, drawn 0)."""
    hard_negatives: bool = False
    """The first drawn item of a liked item is one of the user's rated dislikes, where the user
    has any (implicit and mixed objectives)."""
    implicit_weight: float = 0.5
    """The ``mixed`` objective's weight of the implicit loss (the rated one has the rest)."""
    distill_weight: float = 0.0
    """Weight of a distillation term (implicit and mixed objectives, binary runs): for each
    liked item and its drawn items, the KL divergence from the float model's softmax over
    their scores (trained beside the codes, or before them with ``float_first``; held fixed in
    this term) to the codes', at ``distill_temperature``, times its square. The codes then
    learn the float model's order
    among the drawn items, not only the liked item above them; 0: off. On ml-100k, weight 1
    held the codes back: beside a young float model (valid NDCG@10 0.082 against 0.112
    without; its softmax is nearly flat), and with ``float_first``'s kept float model as the
    teacher too (held-out valid NDCG@10 0.1037 against 0.1158 without, 96 bits, three seeds;
    the codes' best epoch came 8 to 20 epochs after they started; BENCHMARKS.md, Codes' own
    lists)."""
    distill_temperature: float = 1.0
    """Temperature of both softmaxes of the distillation term."""
    float_first: bool = False
    """Train the float model first, alone, to its best valid epoch (its own ``patience`` and
    ``max_epochs``); then start the binary model's embedding tables from the float model's kept
    ones and train the codes (``beta`` and the learning-rate schedule start again; the float
    model stays as it was kept, the teacher of ``distill_weight``). Side by side (false), the
    codes start from random tables and learn them while learning to binarize them."""

    @property
    def code_bits(self) -> int:
        """The codes' length: ``bits``, or ``dim`` where it is 0."""
        return self.bits or self.dim

    def check(self, key: str, where: str = "") -> None:
        _check_name(self.backbone, ENCODER_BACKBONES, f"{key}.backbone", where)
        _check_name(self.objective, ENCODER_OBJECTIVES, f"{key}.objective", where)
        if self.objective != "rated" and self.negatives < 1:
            raise ConfigError(
                f"{key}.negatives = {self.negatives}: the {self.objective} objective draws at "
                "least one catalog item per liked item",
                where,
                f"set {key}.negatives to 1 or more (4 to 8 are usual)",
            )
        if not 0.0 < self.implicit_weight < 1.0:
            raise ConfigError(
                f"{key}.implicit_weight = {self.implicit_weight} is not between 0 and 1",
                where,
                "use the rated or the implicit objective for 0 or 1",
            )
        if self.bits and not self.binary:
            raise ConfigError(
                f"{key}.bits = {self.bits}: this run trains no binary model (binary: false), "
                f"and its codes are the signs of the {self.dim}-dim embeddings",
                where,
                f"set {key}.bits to 0, or {key}.binary to true",
            )
        if self.dim <= 0:
            raise ConfigError(f"{key}.dim = {self.dim} is not positive", where, "use e.g. 32 or 64")
        multiple = math.lcm(*(f.dim_multiple for f in CODE_FORMATS.values()))
        length = "bits" if self.bits else "dim"
        if self.code_bits <= 0 or self.code_bits % multiple:
            needs = [
                f"{f.name} codes need a multiple of {f.dim_multiple}"
                for f in CODE_FORMATS.values()
                if f.dim_multiple > 1
            ]
            raise ConfigError(
                f"{key}.{length} = {self.code_bits} is not a positive multiple of {multiple}",
                where,
                "; ".join([*needs, f"use e.g. {4 * multiple} or {8 * multiple}"]),
            )
        if not 0 <= self.prior_bits < self.code_bits:
            raise ConfigError(
                f"{key}.prior_bits = {self.prior_bits} is not between 0 and {key}.{length} - 1 "
                f"({self.code_bits - 1})",
                where,
                f"keep most of the {self.code_bits} bits projected: e.g. "
                f"{self.code_bits // 4}, or 0",
            )
        if self.distill_weight and (self.objective == "rated" or not self.binary):
            raise ConfigError(
                f"{key}.distill_weight = {self.distill_weight} distills the float model's "
                f"order of the drawn items into the codes, and this run "
                + ("trains no codes" if not self.binary else "draws none (objective rated)"),
                where,
                f"set {key}.distill_weight to 0, or use the implicit or mixed objective "
                "with binary codes",
            )
        if self.float_first and not self.binary:
            raise ConfigError(
                f"{key}.float_first starts the codes from the float model, and this run trains "
                "no codes (binary: false)",
                where,
                f"set {key}.float_first to false, or {key}.binary to true",
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(
                f"{key}.ema_decay = {self.ema_decay} is not in [0, 1)",
                where,
                "use 0 (no average) or a decay such as 0.99 or 0.999",
            )
        if self.code_bits > MAX_CODE_BITS:
            raise ConfigError(
                f"{key}.{length} = {self.code_bits} is more than {MAX_CODE_BITS} bits",
                where,
                "a binary code is one token per bit in every prompt that holds it: use e.g. "
                f"32 or 64, at most {MAX_CODE_BITS}",
            )
        _signs(
            self,
            key,
            where,
            positive="lr float_lr float_init_std logit_scale batch_size max_epochs patience "
            "checkpoint_every num_workers distill_temperature",
            non_negative="lightgcn_layers weight_decay float_weight_decay beta_step distill_weight",
        )


AUX_TASKS = ("mim", "bpr")
"""Auxiliary tasks in words (:mod:`binllm_core.prompts.aux_rows`)."""
AUX_PLACEHOLDERS = ("<ItemTitleList>", "<UserID>", "<CandidateA>", "<CandidateB>")


@dataclass
class AuxConfig(Section):
    """Auxiliary task rows ``render`` writes from the train split alone (table ``aux``): the
    training operations of classic recommenders written as text, after "Aligning LLMs with
    Recommendation Knowledge" (Cao et al. 2024). Its wordings, masking ratio and counts are not
    public; these fields are binllm's choices (``finetune.aux`` mixes the rows into training)."""

    tasks: list[str] = field(default_factory=list)
    """Tasks to write: ``mim`` (masked item modelling, BERT4Rec's task: the user's liked titles
    in time order with some replaced by ``mask_word``; the model writes the hidden titles, and
    only their tokens carry the loss) and ``bpr`` (pairwise preference: the user's liked titles,
    then a later liked item and an item the user never rated in train as (A)/(B) in a seeded,
    balanced order; the answer is the letter, BCE on the two letter logits). Empty: none. Rows
    are written in every mode of ``prompts.modes``: in a code mode each title carries its item's
    code and the question the user's code."""
    rows_per_user: int = 2
    """Rows per user and task (a user with fewer than ``min_positives`` train positives gets
    none)."""
    history_len: int = 10
    """Titles a row shows: the window of consecutive liked titles a ``mim`` row masks in, and
    the liked titles right before a ``bpr`` row's positive."""
    min_positives: int = 3
    """Train positives a user needs to get aux rows (at least 2: one shown, one asked)."""
    mask_fraction: float = 0.0
    """Share of a ``mim`` window replaced by ``mask_word``: at least one title and never all
    of them; the answer lists the hidden titles in order."""
    mask_word: str = "[MASK]"
    """What stands where a hidden title (and its code) was."""
    mim_template: str = ""
    """Own ``mim`` question (empty: the built-in one), with ``<ItemTitleList>`` (and
    ``<UserID>`` in code modes); the answer is written after it."""
    bpr_template: str = ""
    """Own ``bpr`` question (empty: the built-in one), with ``<ItemTitleList>``,
    ``<CandidateA>``, ``<CandidateB>`` (and ``<UserID>`` in code modes); it must end where the
    answer letter follows."""
    seed: int = 2024
    """Seed of the windows, masks, pairs, negatives and letter order (per task and user, so a
    user's rows do not depend on the others)."""

    def check(self, key: str, where: str = "") -> None:
        for i, task in enumerate(self.tasks):
            if task not in AUX_TASKS:
                raise ConfigError(
                    f"{key}.tasks has {task}", where, f"choose among: {', '.join(AUX_TASKS)}"
                )
            if task in self.tasks[:i]:
                raise ConfigError(f"{key}.tasks has {task} twice", where, "name each task once")
        _signs(self, key, where, positive="rows_per_user history_len")
        if self.min_positives < 2:
            raise ConfigError(
                f"{key}.min_positives = {self.min_positives} must be >= 2",
                where,
                "a row shows at least one liked title and asks about another",
            )
        if not 0.0 <= self.mask_fraction < 1.0:
            raise ConfigError(f"{key}.mask_fraction = {self.mask_fraction} is not in [0, 1)", where)
        if not self.mask_word.strip():
            raise ConfigError(f"{key}.mask_word is empty", where, "use e.g. [MASK]")
        for name, needs in (
            ("mim_template", ("<ItemTitleList>",)),
            ("bpr_template", ("<ItemTitleList>", "<CandidateA>", "<CandidateB>")),
        ):
            template = getattr(self, name)
            missing = [p for p in needs if template and p not in template]
            if missing:
                raise ConfigError(f"{key}.{name} lacks the placeholder {missing[0]}", where)


@dataclass
class PromptConfig(Section):
    """How samples become prompts (stage ``render``)."""

    domain: Literal["movie", "book"] = "movie"
    """Wording of the built-in templates: ``movies``/``movie`` or ``books``/``book``."""
    style: Literal["paper", "default"] = "default"
    """Built-in template set. ``paper`` is the official text to the character, with its literal
    backslash-n before ``#Answer:`` and ``unkow`` for an empty history; ``default`` is the same
    text with a real newline and ``none`` for an empty history."""
    text_template: str = ""
    """Own template for ``text`` prompts (replaces the built-in one when not empty), with the
    placeholders ``<ItemTitleList>`` and ``<TargetItemTitle>``."""
    code_template: str = ""
    """Own template for prompts with codes (every code format and ``soft``; replaces the
    built-in one when not empty):
    ``<ItemTitleList>``, ``<UserID>``, ``<TargetItemTitle>``, ``<TargetItemID>``."""
    modes: list[str] = field(default_factory=lambda: list(TEXT_AND_CODE_MODES))
    """Prompt modes to render (:data:`binllm_core.modes.MODES`): ``text`` (no codes), one per
    code format (``binary``, ``dotdec``, ``hex``: codes in the user and target item slots;
    default: these and ``text``), and
    ``soft`` (the code template with soft tokens in those slots, whose projected embeddings the
    LLM reads: :mod:`binllm_core.llm.soft`). One output row per sample and mode."""
    history_len: int = 10
    """How many of the latest positive titles (quoted, comma-joined) fill ``<ItemTitleList>``."""
    empty_history: str = ""
    """Text for an empty history; empty takes the style's own (``unkow`` or ``none``)."""
    soft_history: bool = False
    """In ``soft`` prompts, a soft token after every history title too (the item's embedding
    next to its title, as LLaRA), not only in the user and target item slots."""
    aux: AuxConfig = field(default_factory=AuxConfig)
    """Auxiliary task rows (table ``aux``) besides the recommendation prompts."""

    def check(self, key: str, where: str = "") -> None:
        if not self.modes:
            raise ConfigError(
                f"{key}.modes has no modes", where, f"choose among: {', '.join(MODES)}"
            )
        _check_modes(self.modes, f"{key}.modes", where)
        if self.text_template:
            _check_template(
                self.text_template,
                f"{key}.text_template",
                where,
                needs=("<TargetItemTitle>",),
                codes=False,
            )
        if self.code_template:
            _check_template(
                self.code_template,
                f"{key}.code_template",
                where,
                needs=("<UserID>", "<TargetItemID>"),
                codes=True,
            )
        _signs(self, key, where, non_negative="history_len")
        self.aux.check(f"{key}.aux", where)


@dataclass
class TuneStepConfig(Section):
    """Optimisation budget and schedule of one LoRA tuning step."""

    lr: float = 1e-3
    """Peak learning rate (reached after warm-up)."""
    min_lr: float = 8e-5
    """Learning rate at the end of the cosine decay."""
    warmup_lr: float = 1e-5
    """Learning rate at global step 0; it rises linearly to ``lr`` over ``warmup_steps``."""
    warmup_steps: int = 200
    """Warm-up length in global optimizer steps (not restarted each epoch, unlike the official
    runner)."""
    batch_size: int = 16
    """Sequences per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 10000
    """Upper bound on optimizer steps; 0 means only ``epochs`` bounds the step."""
    epochs: float = 0.0
    """Upper bound in passes over the (subsampled) train prompts; 0 means only ``max_steps``."""

    def check(self, key: str, where: str = "") -> None:
        _signs(
            self,
            key,
            where,
            positive="lr batch_size grad_accum",
            non_negative="min_lr warmup_lr warmup_steps max_steps epochs",
        )
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError(
                f"{key} has no budget: max_steps and epochs are both 0",
                where,
                f"set {key}.max_steps or {key}.epochs above 0",
            )


@dataclass
class SoftConfig(Section):
    """Soft tokens (``soft`` prompts): which vectors, which projector, which extra losses.
    RSLLM publishes no code: its contrastive terms here follow its paper and CALRec, and their
    weights and temperature are binllm's choices."""

    vectors: Literal["float", "relaxed"] = "float"
    """The encoder's ``embeddings`` column the projector reads: ``float`` (the continuous
    MF/LightGCN embeddings, CoLLM's input) or ``relaxed`` (tanh(proj(e)), the vectors BinLLM's
    codes are the signs of: the same information without binarization)."""
    projector: str = "collm"
    """``collm``: Linear(d, 10d) -> ReLU -> Linear(10d, hidden); ``llara``: Linear(d, hidden)
    -> GELU -> Linear(hidden, hidden) (:data:`binllm_core.llm.soft.PROJECTORS`)."""
    user_item_weight: float = 0.1
    """``rsllm`` only: weight of InfoNCE between the LLM's last hidden state at the user's soft
    token and at the target item's, over the batch's positive samples (in-batch negatives)."""
    item_title_weight: float = 0.1
    """``rsllm`` only: weight of InfoNCE between the projected target item embedding and the
    LLM's own embedding of its title (the mean of the title's token embeddings), in-batch."""
    temperature: float = 0.1
    """Temperature of both InfoNCE terms."""
    curriculum: bool = False
    """LLaRA's curriculum in the soft step: each training prompt is its soft version with
    probability (optimizer step / planned steps), else the same sample's text prompt, so
    training moves linearly from text-only to hybrid prompts (evaluation stays on soft
    prompts). Needs ``text`` in ``prompts.modes``."""

    def check(self, key: str, where: str = "") -> None:
        _check_name(self.projector, SOFT_PROJECTORS, f"{key}.projector", where)
        _signs(
            self,
            key,
            where,
            positive="temperature",
            non_negative="user_item_weight item_title_weight",
        )


@dataclass
class RankingConfig(Section):
    """The listwise step of ``finetune.strategy`` ``ranking``/``one_step_ranking``: groups of a
    liked item and the retriever's candidates (:mod:`binllm_core.prompts.ranking_groups`), a
    loss over each group's answer scores, and the adapter kept by the valid groups' NDCG@10."""

    size: int = 20
    """Prompts per group: the liked item and ``size - 1`` negatives (LlamaRec re-ranks the
    retriever's top 20). The valid groups have this size too."""
    per_user: int = 1
    """Train groups per user, at the user's latest train positives (the nearest to the lists
    the stage re-ranks: the whole train history, then the next item)."""
    min_history: int = 1
    """Items a train group's point needs in its history (the positives before its second, as
    its prompts show them)."""
    pool: int = 20
    """The first ``pool`` of a user's retrieved candidates (never rated in train) the candidate
    negatives are drawn from; at least the candidate negatives a group takes
    (``size - 1`` less the uniform ones) and at most ``retrieve.top_n``."""
    uniform_share: float = 0.0
    """Share of a train group's negatives drawn uniformly from the catalog (CIGAR: 0.5). 0: the
    retriever's candidates alone, as the lists ``rerank`` orders hold nothing else (LlamaRec);
    a uniform share teaches the ranker items it never meets there."""
    loss: str = "rank"
    """``rank``: softmax cross-entropy of each group's answer scores with the liked item as the
    target; ``rank_pairs``: BPR of the liked item's score over each negative's
    (:data:`binllm_core.llm.objectives.OBJECTIVES`)."""
    step: TuneStepConfig = field(
        default_factory=lambda: TuneStepConfig(lr=1e-4, batch_size=1, max_steps=1000)
    )
    """Budget of the listwise step. Its ``batch_size`` counts GROUPS per worker per
    micro-batch (a micro-batch holds ``batch_size x size`` prompts), and ``epochs`` passes
    over the train groups."""
    max_users: int = 0
    """Build train groups for a seeded random subset of this many users (0: every user)."""
    max_valid_users: int = 200
    """Valid groups: one per ``valid_small`` user with a valid liked item, a seeded random
    subset of this many users (0: every one)."""

    def check(self, key: str, where: str = "") -> None:
        _check_name(self.loss, RANKING_TASKS, f"{key}.loss", where)
        if self.size < 2:
            raise ConfigError(
                f"{key}.size = {self.size} must be >= 2",
                where,
                "a group is a liked item and negatives",
            )
        _signs(self, key, where, positive="per_user", non_negative="min_history pool max_users")
        _signs(self, key, where, non_negative="max_valid_users")
        if not 0.0 <= self.uniform_share <= 1.0:
            raise ConfigError(
                f"{key}.uniform_share = {self.uniform_share} is not in [0, 1]",
                where,
                "use 0 (the retriever's candidates alone) to 1 (catalog items alone)",
            )
        hard = self.size - 1 - round(self.uniform_share * (self.size - 1))
        if self.pool < hard:
            raise ConfigError(
                f"{key}.pool = {self.pool} holds fewer than the {hard} candidate negatives a group "
                f"of {self.size} takes",
                where,
                f"raise {key}.pool to {hard} or more, or raise {key}.uniform_share",
            )


@dataclass
class FinetuneConfig(Section):
    """LoRA fine-tuning of the backbone on prompts (stage ``finetune``, Ray Train)."""

    strategy: str = "two_step"
    """``two_step``: step 1 on ``text`` prompts, step 2 from that adapter on code prompts;
    ``one_step``: code prompts from a fresh adapter (intuitive tuning); ``text_only``: step 1
    alone (the TALLRec / BinLLM-TO ablation); ``collm``: step 1 on text, step 2 on ``soft``
    prompts training the projector alone (LoRA frozen), as CoLLM; ``rsllm``: step 1 on text,
    step 2 on ``soft`` prompts training projector and LoRA with ``soft``'s contrastive terms
    (RSLLM-style); ``ranking``: one listwise step on code prompts from a fresh adapter, on
    groups of a liked item and the retriever's candidates (``ranking``), its adapter kept by
    the valid groups' NDCG@10 (the equal-budget rival of ``one_step``); ``one_step_ranking``:
    ``one_step``'s pointwise step, then a listwise step from its adapter. The steps of each
    are :data:`binllm_core.llm.strategies.STRATEGIES`."""
    code_mode: str = "binary"
    """Prompt mode of the code-bearing step of ``two_step``/``one_step``: a code format
    (``binary``, ``dotdec``; :data:`binllm_core.codes.CODE_FORMATS`) or ``soft``."""
    start_step: Literal["step1", "step2"] = "step1"
    """The first tuning step to run. ``step2`` skips step 1 of a two-step strategy and starts
    step 2 from ``init_adapter`` (an adapter step 1 made elsewhere, e.g. another run's
    ``adapters/step1``): step 2 alone, on an existing text adapter."""
    soft: SoftConfig = field(default_factory=lambda: SoftConfig())
    """The projector and losses of ``soft`` steps."""
    ranking: RankingConfig = field(default_factory=lambda: RankingConfig())
    """The groups, loss and budget of a listwise step (strategies ``ranking`` and
    ``one_step_ranking``)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get LoRA adapters."""
    step1: TuneStepConfig = field(default_factory=TuneStepConfig)
    """Step 1 (text prompts). Official: lr 1e-3, batch 16 per GPU on 2 GPUs."""
    step2: TuneStepConfig = field(default_factory=lambda: TuneStepConfig(lr=1e-4, batch_size=4))
    """Step 2 (code prompts), also the only step of ``one_step``. Official: lr 1e-4, batch 4 per
    GPU on 2 GPUs."""
    weight_decay: float = 1e-3
    """AdamW weight decay, on weight matrices only."""
    eval_every: int = 50
    """Evaluate on ``valid_small`` every this many optimizer steps (and at the end): AUC, or a
    listwise step's NDCG@10 of the valid groups."""
    patience: int = 20
    """Stop a step after this many evaluations without a better validation AUC (NDCG@10 of a
    listwise step)."""
    eval_batch_size: int = 64
    """Sequences per scoring batch during evaluation."""
    max_length: int = 1024
    """Longest prompt in tokens; longer prompts lose their beginning (the answer cue stays)."""
    batch_by_prefix: bool = False
    """Build micro-batches from whole groups of prompts with the same user and history, so
    that each group's shared prefix runs forward and backward once
    (:mod:`binllm_core.llm.prefix_sharing`), and draw a ``max_train_samples`` subset as whole
    groups. Off by default: on ml-100k it trained 1.33x more sequences/s but reached a lower
    valid AUC at an equal number of sequences (0.553 against 0.578 after 320; BENCHMARKS.md,
    Fine-tuning), the batches being less varied. Either way, prompts of a micro-batch that
    happen to share a prefix run it once, and evaluation scores with one prefix pass per
    group (the same scores)."""
    init_adapter: str = ""
    """Start the first tuning step from this saved adapter (a folder every worker can read, e.g.
    the ``adapters/step1`` of another run) instead of a fresh one; empty starts fresh."""
    max_train_samples: int = 0
    """Train on a seeded random subset of this many train samples (the same samples in both
    steps); 0 takes all."""
    max_valid_samples: int = 0
    """Evaluate on a seeded random subset of this many ``valid_small`` samples; 0 takes all."""
    seed: int = 42
    """Seed of the subsets, the LoRA initialisation, dropout and shuffling."""
    num_workers: int = resource(1)
    """Ray Train workers (data-parallel)."""
    use_gpu: bool = resource(False)
    """Train on GPUs (one per worker)."""
    cpus_per_worker: int = resource(1)
    """CPU cores reserved per worker (also its torch thread count on CPU)."""
    aux: dict[str, float] = field(default_factory=dict)
    """Share of each tuning step's training sequences given to an auxiliary task that
    ``prompts.aux.tasks`` renders, e.g. ``{mim: 0.25, bpr: 0.25}``; the recommendation task gets
    the rest, so a step's budget (steps x batch) is the same with or without them (a step
    bounded by ``epochs`` makes fewer passes over the recommendation prompts). A micro-batch
    holds one task; the tasks take turns by smooth weighted round-robin (exact shares within
    one micro-batch, no randomness; a run resumed after a failure starts the turns afresh),
    each in the step's prompt mode. Empty: recommendation prompts only."""
    aux_steps: list[str] = field(default_factory=lambda: ["step1", "step2"])
    """The tuning steps that mix in ``aux`` (``one_step`` and ``text_only`` have only
    ``step1``); never a listwise step."""
    max_failures: int = resource(2)
    """How many worker failures Ray Train recovers from (from the last checkpoint)."""

    @property
    def soft_step(self) -> str:
        """The tuning step that trains on soft prompts (``""``: none)."""
        steps = STRATEGIES[self.strategy](self) if self.strategy in STRATEGIES else []
        return next((name for name, mode, *_ in steps if MODES[mode].soft), "")

    @property
    def listwise_steps(self) -> list[str]:
        """The tuning steps that train on ranking groups (they read ``retrieve``)."""
        steps = STRATEGIES[self.strategy](self) if self.strategy in STRATEGIES else []
        return [s[0] for s in steps if s[3].get("task", "rec") in RANKING_TASKS]

    def check(self, key: str, where: str = "") -> None:
        _check_name(self.strategy, tuple(STRATEGIES), f"{key}.strategy", where)
        if self.code_mode not in (*CODE_FORMATS, "soft"):
            raise ConfigError(
                f"{key}.code_mode = {self.code_mode!r} is not a code format",
                where,
                f"choose among: {', '.join(CODE_FORMATS)}, soft",
            )
        if self.start_step == "step2" and len(STRATEGIES[self.strategy](self)) == 1:
            two = ", ".join(n for n, steps in STRATEGIES.items() if len(steps(self)) > 1)
            raise ConfigError(
                f"{key}.start_step = step2, and {self.strategy} has one step only",
                where,
                f"use a two-step strategy ({two}) or start_step step1",
            )
        if self.start_step == "step2" and not self.init_adapter:
            raise ConfigError(
                f"{key}.start_step = step2 needs the step-1 adapter to start from",
                where,
                f"set {key}.init_adapter to a folder such as runs/RUN/finetune/adapters/step1",
            )
        _signs(
            self,
            key,
            where,
            positive="lora_r lora_alpha eval_every patience eval_batch_size max_length "
            "num_workers cpus_per_worker",
            non_negative="weight_decay max_train_samples max_valid_samples",
        )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{key}.lora_dropout = {self.lora_dropout} is not in [0, 1)", where)
        for task, share in self.aux.items():
            if task not in AUX_TASKS:
                raise ConfigError(
                    f"{key}.aux has {task}", where, f"choose among: {', '.join(AUX_TASKS)}"
                )
            if not share > 0:
                raise ConfigError(f"{key}.aux.{task} = {share} must be > 0", where)
        if sum(self.aux.values()) >= 1.0:
            raise ConfigError(
                f"{key}.aux shares sum to {sum(self.aux.values()):g}",
                where,
                "keep their sum below 1: the recommendation task trains on the rest",
            )
        unknown = [s for s in self.aux_steps if s not in ("step1", "step2")]
        if unknown:
            raise ConfigError(f"{key}.aux_steps has {unknown[0]}", where, "use step1 and step2")
        listwise = [s for s in self.listwise_steps if s in self.aux_steps]
        if self.aux and listwise:
            raise ConfigError(
                f"{key}.aux mixes aux tasks into {listwise[0]}, a listwise step of {self.strategy}",
                where,
                f"leave {listwise[0]} out of {key}.aux_steps",
            )
        if self.listwise_steps and self.code_mode == "soft" and self.soft.curriculum:
            raise ConfigError(
                f"{key}.soft.curriculum mixes text prompts into pointwise steps, and "
                f"{self.strategy}'s listwise step trains on groups without text versions",
                where,
                f"set {key}.soft.curriculum to false, or use a pointwise strategy",
            )
        if not self.lora_target_modules:
            raise ConfigError(
                f"{key}.lora_target_modules is empty",
                where,
                "name the modules that get adapters, e.g. [q_proj, v_proj]",
            )


@dataclass
class ScoreConfig(Section):
    """Bulk scoring with the fine-tuned adapters (stage ``score``, ``binllm score``/``nightly``)."""

    modes: list[str] = field(default_factory=list)
    """Prompt modes the ``score`` stage scores; empty: the modes the finetune steps trained on
    (``text`` with the step-1 adapter and the code mode with the step-2 adapter, for two_step)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter per mode, overriding the default (the last finetune step trained on that mode,
    else the final adapter): a step name (``step1``/``step2``), an adapter folder or URI, or
    ``none`` for the bare backbone."""
    splits: list[Split] = field(default_factory=lambda: ["test", "valid"])
    """Splits of the rendered prompts the ``score`` stage scores."""
    max_rows: int = 0
    """Score a seeded random subset of this many samples per split (the same samples in every
    mode); 0 scores all."""
    sample_by: Literal["rows", "users"] = "rows"
    """How ``max_rows`` draws its subset: ``rows`` (samples at random) or ``users`` (whole users
    at random, every sample of each, up to ``max_rows``): per-user AUC (UAUC) needs users with
    several samples, which a random ``rows`` subset of a large split rarely has."""
    seed: int = 2024
    """Seed of the ``max_rows`` subset."""
    candidate_mode: str = ""
    """Prompt mode of arbitrary (user, item) candidates (``binllm score``/``nightly``/
    ``recommend``); empty: the mode of the strategy's last tuning step (``text`` for
    text_only, ``soft`` for collm and rsllm, else ``finetune.code_mode``)."""
    unknown: Literal["text", "skip", "error"] = "text"
    """A candidate whose user or item the encoder never saw (so it has no code): ``text`` scores
    it with the text-only prompt and the text adapter and flags it ``cold``; ``skip`` leaves it
    out (counted in the manifest); ``error`` stops with the row."""
    num_actors: int = resource(1)
    """Scoring actors (each holds one copy of the merged model)."""
    num_gpus: float = resource(0.0)
    """GPUs per actor (0 on CPU)."""
    cpus_per_actor: float = resource(1.0)
    """CPU cores reserved per actor (also its torch thread count on CPU)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    sort_window: int = 8
    """Forward passes per Ray batch: each actor takes ``batch_size * sort_window`` prompts at a
    time, orders them by token length (little padding), scores, and restores their order."""
    max_length: int = 1024
    """Longest prompt in tokens; longer prompts lose their beginning (the answer cue stays)."""
    share_prefix: bool = True
    """Score the prompts that share a user prefix (same user, same history) with one prefix
    pass and a copy of its key/value cache per prompt (:mod:`binllm_core.llm.prefix_sharing`);
    scores equal those of whole prompts (float32 differences ~1e-5). False: every prompt whole."""
    max_restarts: int = resource(3)
    """How often a scoring actor that died is restarted (its unfinished batches are retried)."""

    def check(self, key: str, where: str = "") -> None:
        _check_modes(self.modes, f"{key}.modes", where)
        if self.candidate_mode and self.candidate_mode not in MODES:
            raise ConfigError(
                f"{key}.candidate_mode = {self.candidate_mode!r} is not one of: {', '.join(MODES)}",
                where,
                "or leave it empty for the code mode of the finetune stage",
            )
        unknown = sorted(set(self.adapters) - set(MODES))
        if unknown:
            raise ConfigError(
                f"{key}.adapters has {unknown[0]}, not a prompt mode",
                where,
                f"key it by a mode among: {', '.join(MODES)}",
            )
        if not self.splits:
            raise ConfigError(f"{key}.splits is empty", where, "choose among: train, valid, test")
        _signs(
            self,
            key,
            where,
            positive="batch_size sort_window max_length num_actors cpus_per_actor",
            non_negative="max_rows num_gpus",
        )


@dataclass
class RetrieveConfig(Section):
    """Stage ``retrieve``: each user's top-N items by Hamming distance between the codes
    (:mod:`binllm_core.ranking.retrieval`), and the sampled protocol's pools."""

    top_n: int = 100
    """Candidates per user (ranked by Hamming distance, then the tie rule); 0 turns the
    ``retrieve`` and ``rerank`` stages off."""
    splits: list[Split] = field(default_factory=lambda: ["test"])
    """Splits whose users get candidates: every user with at least one positive in the split
    (the ranking metrics are measured on those positives; ``rerank.max_users`` picks the ones
    the LLM re-ranks)."""
    exclude: list[Split] = field(default_factory=lambda: ["train", "valid"])
    """A user's interactions in these splits are never candidates for them; the split a list is
    made for is never excluded (its positives are what the list should find)."""
    tie_break: Literal["relaxed", "popularity", "id"] = "popularity"
    """Order among items at the same Hamming distance (then the smaller item id): ``popularity``,
    the item's train positives; ``relaxed``, the inner product of the codes' pre-sign vectors
    tanh(proj(e)); ``id``, none. Chosen on ml-100k's valid_small (codes-only NDCG@10:
    popularity 0.0417, relaxed 0.0315, id 0.0321; ``benchmarks/quality.py``)."""
    sampled_negatives: int = 99
    """The sampled protocol: each user's first positive of the split with this many random
    items the user never interacted with; 0 leaves it out."""
    seed: int = 2024
    """Seed of the sampled negatives."""
    backend: str = resource("numpy")
    """``numpy`` (exact scan) or ``faiss`` (``IndexBinaryFlat``, needs faiss-cpu); both return
    the same lists (:data:`binllm_core.ranking.retrieval.BACKENDS`)."""
    batch_users: int = resource(512)
    """Users per Ray Data batch."""
    num_actors: int = resource(1)
    """Retrieval actors (each holds the item codes once)."""
    cpus_per_actor: float = resource(1.0)
    """CPU cores reserved per retrieval actor (also faiss's thread count)."""

    def check(self, key: str, where: str = "") -> None:
        _check_name(self.backend, tuple(BACKENDS), f"{key}.backend", where)
        if self.top_n and not self.splits:
            raise ConfigError(f"{key}.splits is empty", where, "choose among: train, valid, test")
        twice = [s for i, s in enumerate(self.splits) if s in self.splits[:i]]
        if twice:
            raise ConfigError(f"{key}.splits has {twice[0]} twice", where, "name each split once")
        _signs(
            self,
            key,
            where,
            positive="batch_users num_actors cpus_per_actor",
            non_negative="top_n sampled_negatives",
        )


@dataclass
class RerankConfig(Section):
    """Stage ``rerank``: the LLM scores each user's first ``top_n`` candidates and orders them
    (the scoring of ``score``: same actors, adapters and shared prefixes)."""

    top_n: int = 20
    """Candidates per user the LLM re-ranks (the first of ``retrieve.top_n``); 0: no rerank."""
    modes: list[str] = field(default_factory=list)
    """Prompt modes to re-rank with; empty: the modes the finetune steps trained on (as
    ``score.modes``). Each mode uses the adapter ``score`` uses for it."""
    max_users: int = 0
    """Re-rank a seeded random subset of this many of each split's retrieved users (0: every
    one). ``retrieve`` and the evaluation's non-LLM rows still cover every user; the
    evaluation measures every method on this subset too (users ``reranked``)."""
    seed: int = 2024
    """Seed of the ``max_users`` subset."""
    alpha: float | None = None
    """Weight of the LLM in the lists that ship (:mod:`binllm_core.ranking.blend`: per user,
    alpha z(LLM score) + (1 - alpha) z(retriever score)); empty: chosen per mode on valid
    NDCG@10 over ``alpha_grid`` (``retrieve.splits`` must hold valid; without valid users it is
    0, the retriever's order); a number in [0, 1] forces it (``binllm recommend`` too)."""
    alpha_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    """The weights alpha is chosen among, each in [0, 1]; it holds 0 (the retriever alone), so
    the chosen blend is never worse than the retriever on valid. Of equal valid figures, the
    smaller alpha."""
    popular_places: list[int] = field(default_factory=lambda: [0])
    """Places of each full-catalog list the time-aware popular items may take
    (:mod:`binllm_core.ranking.candidates`): the last P of the ``top_n`` go to the first
    popular items of the evaluation's window that the user may be given and the codes did not
    list. P is chosen among these by Recall@``top_n`` of every retrieved valid user's list (the
    smaller of equals); it holds 0, the codes' own lists, which ``[0]`` keeps."""

    def check(self, key: str, where: str = "") -> None:
        _check_modes(self.modes, f"{key}.modes", where)
        _signs(self, key, where, non_negative="top_n max_users")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ConfigError(f"{key}.alpha = {self.alpha} is not in [0, 1]", where)
        grid = self.alpha_grid
        if any(not 0 <= a <= 1 for a in grid) or len(set(grid)) < len(grid) or 0 not in grid:
            raise ConfigError(
                f"{key}.alpha_grid = {grid} must be distinct weights in [0, 1] holding 0",
                where,
                "write e.g. alpha_grid: [0, 0.25, 0.5, 0.75, 1]",
            )
        places = self.popular_places
        if 0 not in places or min(places) < 0 or len(set(places)) < len(places):
            raise ConfigError(
                f"{key}.popular_places = {places} must be distinct places holding 0",
                where,
                "write e.g. popular_places: [0, 1, 2, 3, 5]",
            )
        if self.top_n and max(places) > self.top_n:
            raise ConfigError(
                f"{key}.popular_places = {places} gives popular items more places than the "
                f"{key}.top_n = {self.top_n} candidates the LLM re-ranks",
                where,
                f"lower {key}.popular_places along with {key}.top_n, e.g. [0, 1]",
            )


@dataclass
class EvaluateConfig(Section):
    """Stage ``evaluate``'s ranking figures: the time-aware popularity baseline and the
    intervals of every figure."""

    popularity_windows: list[int] = field(default_factory=lambda: [7, 30, 90, 180, 365])
    """Windows W in days of the time-aware popularity baseline (the items most liked in the
    last W days of train); the one of the best valid NDCG@10 is measured (the shortest of
    equals). Never chosen on test."""
    bootstrap: int = 1000
    """Resamples of the users behind each ranking figure's 95 % interval (the same resamples
    for every method of a user set); 0: no intervals."""
    seed: int = 2024
    """Seed of the bootstrap resamples."""

    def check(self, key: str, where: str = "") -> None:
        windows = self.popularity_windows
        if not windows or any(w <= 0 for w in windows) or len(set(windows)) < len(windows):
            raise ConfigError(
                f"{key}.popularity_windows = {windows} must be distinct positive days",
                where,
                "write e.g. popularity_windows: [7, 30, 90, 180, 365]",
            )
        _signs(self, key, where, non_negative="bootstrap")


@dataclass
class RunConfig(Section):
    """A whole pipeline run: where outputs go and the configuration of each stage."""

    run_name: str = "ml100k"
    """Name of the run, one folder name (no ``/``, not ``.`` or ``..``); outputs land under
    ``{output_root}/{run_name}/{stage}/``."""
    output_root: str = "runs"
    """fsspec URI under which runs are written (local path or ``s3://``)."""
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``output_root`` (e.g. ``{endpoint_url: ...}`` for an S3-compatible
    store)."""
    keep_versions: int = 1
    """How many versions of each output to keep: 1 keeps the current one only; more keep the
    previous ones (named in the manifest's ``history``) for readers that still use them."""
    data: DataConfig = field(default_factory=DataConfig)
    """Source data."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """Labelling and split protocol."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Binarized collaborative encoder: the codes of the prompts (stage ``encode``)."""
    retrieval_encoder: EncoderConfig | None = None
    """A second encoder whose codes only retrieve (stage ``encode_retrieval``; the same fields
    as ``encoder``, whose values it does not inherit): codes trained for the lists (e.g.
    ``objective: implicit``) are worse prompt codes by pointwise AUC, so a run can hold both.
    Empty: ``retrieve`` uses the prompts' codes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Language model backbone."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """Prompt rendering."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """LoRA fine-tuning."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Bulk scoring (stage ``score``, candidates and nightly)."""
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    """Hamming top-N candidates per user (stage ``retrieve``, ``binllm recommend``)."""
    rerank: RerankConfig = field(default_factory=RerankConfig)
    """LLM re-ranking of the candidates (stage ``rerank``, ``binllm recommend``)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The ranking figures of stage ``evaluate``."""

    def check(self, key: str, where: str = "") -> None:
        """The rules between sections (each section checks its own fields when it is built)."""
        _signs(self, key, where, positive="keep_versions")
        if not PLAIN_NAME.fullmatch(self.run_name):
            raise ConfigError(
                f"run_name {self.run_name!r} is not a plain name",
                where,
                "give one folder name (no '/', not '.' or '..'); choose where runs go with "
                "output_root",
            )
        unrendered = [m for m in self.score.modes if m not in self.prompts.modes]
        if unrendered:
            raise ConfigError(
                f"score.modes has {unrendered[0]}, which prompts.modes does not render",
                where,
                f"add {unrendered[0]} to prompts.modes or drop it from score.modes",
            )
        unrendered = [t for t in self.finetune.aux if t not in self.prompts.aux.tasks]
        if unrendered:
            raise ConfigError(
                f"finetune.aux has {unrendered[0]}, which prompts.aux.tasks does not render",
                where,
                f"add {unrendered[0]} to prompts.aux.tasks or drop it from finetune.aux",
            )
        soft_step = self.finetune.soft_step
        if soft_step and "soft" not in self.prompts.modes:
            raise ConfigError(
                f"finetune {soft_step} trains on soft prompts, which prompts.modes does not render",
                where,
                "add soft to prompts.modes",
            )
        for key, modes in (("score.modes", self.score.modes), ("rerank.modes", self.rerank.modes)):
            if "soft" in modes and not soft_step and "soft" not in self.score.adapters:
                raise ConfigError(
                    f"{key} has soft, and no finetune step trains on soft prompts",
                    where,
                    "use finetune.strategy collm or rsllm, or set score.adapters.soft to an "
                    "adapter with a projector",
                )
        if soft_step and self.finetune.soft.curriculum and "text" not in self.prompts.modes:
            raise ConfigError(
                "finetune.soft.curriculum mixes in text prompts, which prompts.modes does not "
                "render",
                where,
                "add text to prompts.modes",
            )
        if soft_step in self.finetune.aux_steps and self.finetune.aux:
            raise ConfigError(
                f"finetune.aux mixes aux tasks into {soft_step}, a soft step: aux rows are "
                "written in words only",
                where,
                f"leave {soft_step} out of finetune.aux_steps",
            )
        aux = self.prompts.aux
        for name in ("mim_template", "bpr_template"):
            if "text" in self.prompts.modes and "<UserID>" in getattr(aux, name):
                raise ConfigError(
                    f"prompts.aux.{name} has <UserID>, which text prompts have no code for",
                    where,
                    "drop <UserID> or render code modes only (prompts.modes)",
                )
        listwise = self.finetune.listwise_steps
        has_codes = any(MODES[m].has_codes for m in self.prompts.modes)
        if listwise and not (has_codes and self.retrieve.top_n):
            raise ConfigError(
                f"finetune.strategy {self.finetune.strategy} trains on the retriever's candidates, "
                "and this run retrieves none (retrieve.top_n 0 or no code mode in prompts.modes)",
                where,
                "set retrieve.top_n > 0 with a code mode rendered, or use a pointwise strategy "
                "such as one_step",
            )
        if listwise and self.finetune.ranking.pool > self.retrieve.top_n:
            raise ConfigError(
                f"finetune.ranking.pool = {self.finetune.ranking.pool} is more than the "
                f"retrieve.top_n = {self.retrieve.top_n} candidates there are",
                where,
                "lower finetune.ranking.pool or raise retrieve.top_n",
            )
        if self.retrieve.top_n and self.rerank.top_n > self.retrieve.top_n:
            raise ConfigError(
                f"rerank.top_n = {self.rerank.top_n} is more than the "
                f"retrieve.top_n = {self.retrieve.top_n} candidates there are",
                where,
                "lower rerank.top_n or raise retrieve.top_n",
            )


def month_range(value: list[str], key: str, where: str = "") -> tuple[int, int]:
    """``["YYYY-MM", "YYYY-MM"]`` -> inclusive month indices ``(year * 12 + month - 1)``."""
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(
            f"{key} = {value!r} must be two months [first, last]",
            where,
            'write e.g. ["2001-06", "2002-03"] (inclusive, UTC)',
        )
    indices = []
    for text in value:
        match = MONTH.match(str(text))
        if not match:
            raise ConfigError(
                f"{key} holds {text!r}, not a YYYY-MM month (month 01-12)",
                where,
                'write e.g. ["2001-06", "2002-03"] (inclusive, UTC)',
            )
        indices.append(int(match[1]) * 12 + int(match[2]) - 1)
    if indices[0] > indices[1]:
        raise ConfigError(f"{key} = {value!r} ends before it starts", where, "swap the two months")
    return indices[0], indices[1]


def _signs(
    section: Section, key: str, where: str, positive: str = "", non_negative: str = ""
) -> None:
    """The fields named in ``positive`` (space-separated) must be > 0, those in
    ``non_negative`` >= 0 (NaN is neither)."""
    for names, zero in ((positive, False), (non_negative, True)):
        for name in names.split():
            value = getattr(section, name)
            if not (value >= 0 if zero else value > 0):
                dotted = f"{key}.{name}" if key else name
                raise ConfigError(f"{dotted} = {value} must be {'>=' if zero else '>'} 0", where)


def _check_format(fmt: str, key: str, where: str) -> None:
    """``auto`` or a name of :data:`FORMATS`."""
    if fmt != "auto" and fmt not in FORMATS:
        choices = ", ".join(("auto", *FORMATS))
        raise ConfigError(f"config key {key} = {fmt!r} is not one of: {choices}", where)


def _check_name(name: str, known: tuple[str, ...], key: str, where: str) -> None:
    """``name`` one of a registry's ``known`` names."""
    if name not in known:
        raise ConfigError(
            f"{key} = {name!r} is not known", where, f"choose among: {', '.join(known)}"
        )


def _check_modes(modes: list[str], key: str, where: str) -> None:
    """Every mode one of :data:`MODES`, none twice."""
    for i, mode in enumerate(modes):
        if mode not in MODES:
            raise ConfigError(f"{key} has {mode}", where, f"choose among: {', '.join(MODES)}")
        if mode in modes[:i]:
            raise ConfigError(f"{key} has {mode} twice", where, "name each mode once")


def _check_template(
    template: str, key: str, where: str, needs: tuple[str, ...], codes: bool
) -> None:
    """Only known placeholders, the ``needs`` among them, and code ones only with ``codes``."""
    for token in _LOOKS_LIKE_PLACEHOLDER.findall(template):
        if token not in PLACEHOLDERS:
            raise ConfigError(
                f"{key} has the unknown placeholder {token}",
                where,
                f"use {', '.join(PLACEHOLDERS)}",
            )
        if not codes and token in ("<UserID>", "<TargetItemID>"):
            raise ConfigError(
                f"{key} has {token}, which text prompts have no code for",
                where,
                "put codes in prompts.code_template",
            )
    missing = [p for p in needs if p not in template]
    if missing:
        raise ConfigError(f"{key} lacks the placeholder {missing[0]}", where)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides (dotted keys, YAML values), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found", todo="pass an existing YAML") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return anchor_paths(build_with_overrides(raw, overrides or [], str(path)))


def build_with_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> RunConfig:
    """The config ``raw`` with ``key=value`` overrides applied, validated. An error that first
    appears with an override applied says ``at --set key=value over FILE``, not at the file."""
    given = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    try:
        return build(RunConfig, copy.deepcopy(raw), where)
    except ConfigError as err:
        error = err
    for item in ["", *overrides]:  # the file alone, then one override more at a time
        if item:
            apply_override(given, item)
        try:
            build(RunConfig, copy.deepcopy(given), where)
        except ConfigError as err:
            if str(err) == str(error):
                if item:
                    build(RunConfig, raw, f"--set {item} over {where}")  # raises, told so
                break
    raise error


STEP_NAMES = ("step1", "step2")
"""Names ``score.adapters`` may give instead of a folder (the finetune steps)."""
NO_ADAPTER = "none"


def is_local_path(value: str) -> bool:
    """A path on this machine's disk rather than a URI (``s3://``, ``https://``...)."""
    return "://" not in value or value.startswith("file://")


def absolute(value: str, base: str, expand_home: bool = True) -> str:
    """A local path as an absolute one against ``base`` (``~`` expanded unless told not to:
    a cache folder's ``~`` is each node's own home); URIs and empty values as they are."""
    if not value or not is_local_path(value):
        return value
    value = value.removeprefix("file://")
    if value.startswith("~"):
        return os.path.expanduser(value) if expand_home else value
    return os.path.normpath(os.path.join(base, value))


def _model_path(name: str, base: str) -> str:
    """``model.backbone`` made absolute when it names local weights; ``tiny`` and hub ids
    (``org/name`` that is not a folder here) stay as they are."""
    if name == "tiny" or not is_local_path(name):
        return name
    local = name.startswith((".", "/", "~", "file://")) or name.endswith(".gguf")
    if local or os.path.exists(os.path.join(base, name)):
        return absolute(name, base)
    return name


def anchor_paths(cfg: RunConfig, base: str | None = None) -> RunConfig:
    """Every local path of ``cfg`` made absolute against the directory it was given in
    (``base``, default the current one), before anything is shipped to Ray: a task, actor or
    Ray Train worker runs in a working directory of its own, often on another node. The run's
    manifests then record absolute paths, so a run reopened from elsewhere reads what it read.
    Cache folders keep a leading ``~`` (each node caches under its own home)."""
    base = base or os.getcwd()
    cfg.output_root = absolute(cfg.output_root, base)
    cfg.data.uri = absolute(cfg.data.uri, base)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir, base, expand_home=False)
    cfg.model.backbone = _model_path(cfg.model.backbone, base)
    cfg.model.cache_dir = absolute(cfg.model.cache_dir, base, expand_home=False)
    cfg.finetune.init_adapter = absolute(cfg.finetune.init_adapter, base)
    cfg.score.adapters = {
        mode: choice if choice in (*STEP_NAMES, NO_ADAPTER) else absolute(choice, base)
        for mode, choice in cfg.score.adapters.items()
    }
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``1e-3``, ``[1, 2]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value", todo="write e.g. data.uri=/path")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""


MOVED = {
    "retrieve.max_users": (
        "rerank.max_users",
        "retrieve now takes every user with a positive and the LLM re-ranks a seeded subset: "
        "write max_users (and its seed) under rerank",
    ),
}
"""Keys that moved to another section -> (where to, what to do): a config that still sets one
is refused at load in one line naming the new key."""


def build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Validate ``raw`` against dataclass ``cls`` and build it, recursively: the types and
    choices of its fields, then (inner sections first) each section's :meth:`Section.check`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix or '(top)'} must be a mapping", where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            moved, why = MOVED[key]
            raise ConfigError(f"config key {key} moved to {moved}", where, why)
        raise ConfigError(
            f"unknown config key {key}", where, f"known keys here: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _check(hints[name], value, f"{prefix}{name}", where)
    section = cls(**values)
    if isinstance(section, Section):
        section.check(prefix.rstrip("."), where)
    return section


def _check(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, f"{key}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"config key {key} = {value!r} is not one of: {choices}", where)
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(arg, value, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key} = {value!r} has the wrong type", where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, got {value!r}", where)
        return [_check(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping, got {value!r}", where)
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key {key} must be empty", where)
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-3 (no dot) as a string; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"config key {key} = {value!r} must be {getattr(tp, '__name__', tp)}", where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for manifests and hashing)."""
    return dataclasses.asdict(cfg)


def hashed(section: Any) -> Any:
    """A config section as plain data without its :func:`resource` fields (what a stage's hash
    covers)."""
    if not dataclasses.is_dataclass(section):
        return section
    return {
        f.name: hashed(getattr(section, f.name))
        for f in dataclasses.fields(section)
        if not f.metadata.get("resource")
    }


def config_hash(*parts: Any) -> str:
    """A stable hash of config sections (dataclasses or plain data)."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
