"""Typed run configuration, loaded from YAML and overridable with ``key=value`` pairs.

Every section is a dataclass with a docstring under each field. Loading checks every key and
type: an unknown key or a value of the wrong type is a single-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from binllm_core.errors import ConfigError

SourceFormat = Literal["auto", "ml100k", "ml1m", "ml_csv", "amazon2018", "amazon2023", "recbole"]
SplitKind = Literal["per_user", "global", "months", "months_then_halves"]


@dataclass
class DataConfig:
    """Where the raw interactions come from and how to read them."""

    uri: str = ""
    """fsspec URI of the source: a folder, a data file or the official ``.zip``; a local path,
    ``http(s)://`` or ``s3://``."""
    format: SourceFormat = "auto"
    """Source layout. ``auto`` detects it from the file names; an explicit value overrides it:
    ml100k (u.data + u.item), ml1m (ratings.dat + movies.dat, also ML-10M), ml_csv (ratings.csv +
    movies.csv: latest/20M/25M/32M), amazon2018, amazon2023, recbole (NAME.inter + NAME.item)."""
    name: str = ""
    """Which dataset to take when the URI holds several: the RecBole atomic-file stem, or the
    Amazon review file stem (e.g. ``Books_5``). Empty: the only one there."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A malformed source line stops ingest (``error``) or is dropped, counted in the manifest and
    kept in the ``rejects`` table (``skip``)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Options for the source's fsspec filesystem, e.g. ``{endpoint_url: http://..., anon: true}``
    for s3; the usual AWS environment variables work too."""
    cache_dir: str = "~/.cache/binllm/sources"
    """Local folder where remote (http/s3) sources are kept after their first download."""


@dataclass
class ProtocolConfig:
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
    split: SplitKind = "per_user"
    """``per_user``: each user's interactions in time order cut by ``fractions``; ``global``: one
    cut of all interactions in time order by ``fractions``; ``months``: calendar-month ranges
    ``train_months``/``valid_months``/``test_months``, rows outside them dropped;
    ``months_then_halves``: ``train_months`` for train, rows in ``holdout_months`` in time order,
    first half valid and second half test."""
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train/valid/test fractions for the ``per_user`` and ``global`` splits."""
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


@dataclass
class ModelConfig:
    """The causal language model behind the recommender."""

    backbone: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """A Hugging Face hub id, a local model folder, a ``.gguf`` file, or ``tiny`` (a small random
    Llama built in code, for tests). Only a hub id ever downloads anything."""
    gguf_file: str = ""
    """File name of the GGUF weights inside ``backbone`` when it is a folder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: ``auto`` is float32 on CPU and bfloat16 on GPU."""


@dataclass
class EncoderConfig:
    """The binarized collaborative encoder (MF or LightGCN -> Linear -> tanh -> sign)."""

    backbone: Literal["mf", "lightgcn"] = "mf"
    """Collaborative backbone producing the continuous embeddings."""
    dim: int = 32
    """Embedding and code length in bits (a multiple of 8)."""
    lightgcn_layers: int = 2
    """Propagation layers K of the LightGCN backbone."""
    shared_projection: bool = False
    """One Linear for users and items (the paper's formula) instead of one per side (official)."""
    binary: bool = True
    """Train binary codes; ``false`` trains the continuous backbone alone (float baseline)."""
    lr: float = 1e-2
    """Adam learning rate."""
    weight_decay: float = 1e-3
    """Adam weight decay (L2)."""
    batch_size: int = 2048
    """Training batch size (samples)."""
    max_epochs: int = 200
    """Upper bound on training epochs."""
    patience: int = 20
    """Stop after this many epochs without a better validation AUC of the binary codes."""
    beta_step: float = 0.05
    """Added to beta every 2 epochs, capped at 1.0: the chance that an element of the code is
    binary rather than continuous during training."""
    num_workers: int = 1
    """Ray Train workers."""
    use_gpu: bool = False
    """Train on GPUs (one per worker)."""
    max_failures: int = 2
    """How many worker failures Ray Train recovers from (from the last checkpoint)."""
    seed: int = 2023
    """Seed of the initialisation, the shuffling and the binary/continuous mix."""


@dataclass
class RunConfig:
    """A whole pipeline run: where outputs go and the configuration of each stage."""

    run_name: str = "ml100k"
    """Name of the run; outputs land under ``{output_root}/{run_name}/{stage}/``."""
    output_root: str = "runs"
    """fsspec URI under which runs are written (local path or ``s3://``)."""
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``output_root`` (e.g. ``{endpoint_url: ...}`` for an S3-compatible
    store)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Source data."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """Labelling and split protocol."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Binarized collaborative encoder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Language model backbone."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides (dotted keys, YAML values), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found", todo="pass an existing YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    return build(RunConfig, raw, str(path))


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


def build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Validate ``raw`` against dataclass ``cls`` and build it, recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix or '(top)'} must be a mapping", where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key {key}", where, f"known keys here: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _check(hints[name], value, f"{prefix}{name}", where)
    return cls(**values)


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
    raise ConfigError(
        f"config key {key} = {value!r} must be {getattr(tp, '__name__', tp)}", where
    )


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for manifests and hashing)."""
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any) -> str:
    """A stable hash of config sections (dataclasses or plain data)."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
