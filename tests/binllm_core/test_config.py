"""Every preset loads; unknown keys, wrong types and bad overrides are one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from binllm_core.config import RunConfig, config_hash, load_config
from binllm_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"ml100k", "ml100k_global", "ml1m", "amazon_book", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.run_name and cfg.output_root and cfg.data.uri
    assert sum(cfg.protocol.fractions) == pytest.approx(1.0)


def test_override_sets_nested_keys_with_yaml_types(tmp_path: Path):
    cfg = load_config(
        "configs/ml100k.yaml",
        ["data.uri=/data/ml", "encoder.lr=1e-3", "protocol.fractions=[0.7, 0.2, 0.1]"],
    )
    assert cfg.data.uri == "/data/ml"
    assert cfg.encoder.lr == pytest.approx(1e-3)
    assert cfg.protocol.fractions == [0.7, 0.2, 0.1]


def test_unknown_key_is_one_line_naming_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  uri: x\n  formatt: auto\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "data.formatt" in message and str(bad) in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("encoder.dim=abc", "encoder.dim"),
        ("data.format=parquet", "not one of"),
        ("protocol.fractions=0.8", "must be a list"),
        ("encoder.binary=3", "encoder.binary"),
        ("nonsense", "key=value"),
    ],
)
def test_wrong_types_are_rejected(override: str, needle: str):
    with pytest.raises(ConfigError, match=needle):
        load_config("configs/ml100k.yaml", [override])


def test_config_hash_is_stable_and_sensitive():
    a = load_config("configs/ml100k.yaml")
    b = load_config("configs/ml100k.yaml")
    c = load_config("configs/ml100k.yaml", ["data.uri=elsewhere"])
    assert config_hash(a.data) == config_hash(b.data)
    assert config_hash(a.data) != config_hash(c.data)
