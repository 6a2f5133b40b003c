"""Codes: bits <-> binary string <-> dot-decimal, and the codes table."""

from __future__ import annotations

import numpy as np
import pytest

from binllm_core import codes
from binllm_core.errors import DataError
from binllm_core.modes import MODES


def test_known_example() -> None:
    binary = "10101100000100001111111000000001"
    assert codes.binary_to_dotdec([binary]) == ["172.16.254.1"]
    assert codes.dotdec_to_binary(["172.16.254.1"]) == [binary]
    assert codes.to_binary(np.array([[0, 1, 1]])) == ["011"]
    bits = codes.from_binary([binary])
    assert codes.to_hex(bits) == ["ac10fe01"]
    np.testing.assert_array_equal(codes.from_hex(["AC10FE01"]), bits)  # either case reads


@pytest.mark.parametrize("dim", [8, 32, 64])
def test_round_trips(dim: int) -> None:
    rng = np.random.default_rng(dim)
    signs = rng.choice([-1.0, 1.0], size=(50, dim))
    bits = codes.bits_from_signs(signs)
    assert set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(codes.signs_from_bits(bits), signs)
    binary = codes.to_binary(bits)
    dotdec = codes.to_dotdec(bits)
    assert all(len(b) == dim for b in binary)
    assert all(len(d.split(".")) == dim // 8 for d in dotdec)
    np.testing.assert_array_equal(codes.from_binary(binary), bits)
    np.testing.assert_array_equal(codes.from_dotdec(dotdec), bits)
    assert codes.binary_to_dotdec(binary) == dotdec
    assert codes.dotdec_to_binary(dotdec) == binary


def test_bad_codes() -> None:
    with pytest.raises(DataError):
        codes.to_dotdec(np.zeros((1, 12), np.uint8))
    with pytest.raises(DataError):
        codes.from_dotdec(["1.2.300.4"])
    with pytest.raises(DataError):
        codes.from_binary(["01x1"])
    with pytest.raises(DataError):
        codes.to_hex(np.zeros((1, 6), np.uint8))
    with pytest.raises(DataError):
        codes.from_hex(["ac1g"])


def test_codes_table() -> None:
    rng = np.random.default_rng(0)
    users = rng.choice([-1.0, 1.0], size=(4, 16))
    items = rng.choice([-1.0, 1.0], size=(3, 16))
    table = codes.codes_table(users, items)
    assert table.schema == codes.codes_schema(16)
    assert table.column("entity").to_pylist() == ["user"] * 3 + ["item"] * 2
    assert table.column("id").to_pylist() == [1, 2, 3, 1, 2]
    bits = np.array(table.column("bits").to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(bits[:3], codes.bits_from_signs(users[1:]))
    np.testing.assert_array_equal(codes.from_binary(table.column("code_binary").to_pylist()), bits)
    np.testing.assert_array_equal(codes.from_dotdec(table.column("code_dotdec").to_pylist()), bits)


def test_every_format_of_the_registry_round_trips_and_makes_a_mode_and_a_column() -> None:
    bits = np.random.default_rng(1).integers(0, 2, size=(5, 32)).astype(np.uint8)
    table = codes.codes_table(np.where(bits, 1, -1), np.where(bits, 1, -1))
    assert tuple(MODES) == ("text", *codes.CODE_FORMATS, "soft")
    assert [MODES[name].code_format for name in codes.CODE_FORMATS] == list(codes.CODE_FORMATS)
    assert [m.template for m in MODES.values()] == [
        "text",
        *["code"] * len(codes.CODE_FORMATS),
        "code",
    ]
    for name, fmt in codes.CODE_FORMATS.items():
        assert fmt.name == name and 32 % fmt.dim_multiple == 0
        np.testing.assert_array_equal(fmt.from_text(fmt.to_text(bits)), bits)
        assert fmt.column in table.column_names
        np.testing.assert_array_equal(fmt.from_text(table[fmt.column].to_pylist()[:4]), bits[1:5])
