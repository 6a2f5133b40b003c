"""Binary codes as bits, their text formats, and the ``codes`` table.

A code of ``d`` dimensions is ``d`` bits in {0, 1} (the encoder's -1 is 0, +1 is 1). Each text
format is one entry of :data:`CODE_FORMATS`; the prompt modes (``text`` plus one per format), the
config check, the ``codes`` table's columns, render and pair scoring all derive from it, so a new
format is one entry here.
``code_binary`` writes bit k as character k (``"0110..."``); ``code_dotdec`` packs every 8 bits,
most significant first, into a number 0-255 and joins them with ``.`` (IPv4 style:
``10101100 00010000 11111110 00000001`` -> ``172.16.254.1``), so ``d`` must be a multiple of 8;
``code_hex`` writes every 4 bits, most significant first, as one lowercase hexadecimal digit
(``1010 1100 0001 0000`` -> ``ac10``), so a 32-bit code is 8 characters: SmolLM2's tokenizer
gives it ~8 tokens against ~13 for dot-decimal and 33 for binary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm_core.errors import DataError


def bits_from_signs(signs: np.ndarray) -> np.ndarray:
    """±1 codes (any shape) -> bits as uint8 (-1 -> 0, +1 -> 1)."""
    return (np.asarray(signs) > 0).astype(np.uint8)


def signs_from_bits(bits: np.ndarray) -> np.ndarray:
    """Bits -> ±1 codes as float32."""
    return np.where(np.asarray(bits) > 0, 1.0, -1.0).astype(np.float32)


def _check_width(bits: np.ndarray) -> np.ndarray:
    bits = np.atleast_2d(np.asarray(bits, dtype=np.uint8))
    if bits.shape[1] % 8:
        raise DataError(f"a code of {bits.shape[1]} bits is not a whole number of octets")
    return bits


def to_binary(bits: np.ndarray) -> list[str]:
    """Rows of bits (n, d) -> ``n`` strings of ``d`` characters ``0``/``1``."""
    bits = np.atleast_2d(np.asarray(bits, dtype=np.uint8))
    chars = (bits + ord("0")).astype(np.uint8)
    width = bits.shape[1]
    blob = chars.tobytes().decode("ascii")
    return [blob[i : i + width] for i in range(0, len(blob), width)]


def from_binary(codes: list[str]) -> np.ndarray:
    """Binary strings -> bits (n, d); every string must have the same length."""
    try:
        return np.array([[int(c) for c in code] for code in codes], dtype=np.uint8).reshape(
            len(codes), -1
        )
    except ValueError:
        raise DataError("a binary code holds a character other than 0 and 1") from None


def to_dotdec(bits: np.ndarray) -> list[str]:
    """Rows of bits (n, d) -> ``n`` dot-decimal strings of ``d / 8`` octets."""
    octets = np.packbits(_check_width(bits), axis=1)  # big-endian: first bit is the MSB
    return [".".join(map(str, row)) for row in octets.tolist()]


def from_dotdec(codes: list[str]) -> np.ndarray:
    """Dot-decimal strings -> bits (n, 8 * octets)."""
    try:
        octets = np.array([[int(o) for o in code.split(".")] for code in codes])
    except ValueError:
        raise DataError("a dot-decimal code holds something other than numbers and dots") from None
    if octets.size and (octets.min() < 0 or octets.max() > 255):
        raise DataError("a dot-decimal code has an octet outside 0-255")
    return np.unpackbits(octets.astype(np.uint8).reshape(len(codes), -1), axis=1)


_HEX_DIGITS = np.array(list("0123456789abcdef"))
_NIBBLE = np.array([8, 4, 2, 1], dtype=np.uint8)


def to_hex(bits: np.ndarray) -> list[str]:
    """Rows of bits (n, d) -> ``n`` strings of ``d / 4`` lowercase hexadecimal digits."""
    bits = np.atleast_2d(np.asarray(bits, dtype=np.uint8))
    if bits.shape[1] % 4:
        raise DataError(f"a code of {bits.shape[1]} bits is not a whole number of hex digits")
    digits = _HEX_DIGITS[bits.reshape(len(bits), -1, 4) @ _NIBBLE]
    return ["".join(row) for row in digits.tolist()]


def from_hex(codes: list[str]) -> np.ndarray:
    """Hexadecimal strings -> bits (n, 4 * digits); every string must have the same length."""
    try:
        values = np.array([[int(c, 16) for c in code] for code in codes], dtype=np.uint8)
    except ValueError:
        raise DataError("a hex code holds a character other than 0-9 and a-f") from None
    values = values.reshape(len(codes), -1)
    return ((values[:, :, None] & _NIBBLE) > 0).astype(np.uint8).reshape(len(codes), -1)


def binary_to_dotdec(codes: list[str]) -> list[str]:
    return to_dotdec(from_binary(codes))


def dotdec_to_binary(codes: list[str]) -> list[str]:
    return to_binary(from_dotdec(codes))


@dataclass(frozen=True)
class CodeFormat:
    """One way of writing a code as text in a prompt."""

    name: str
    """The prompt mode that uses it, and the suffix of its ``codes`` column."""
    to_text: Callable[[np.ndarray], list[str]]
    """Bits (n x d, 0/1) -> one string per row."""
    from_text: Callable[[list[str]], np.ndarray]
    """The inverse: strings -> bits."""
    dim_multiple: int = 1
    """The code width must be a multiple of this (dot-decimal packs 8 bits per number)."""

    @property
    def column(self) -> str:
        return f"code_{self.name}"


CODE_FORMATS: dict[str, CodeFormat] = {
    f.name: f
    for f in (
        CodeFormat("binary", to_binary, from_binary),
        CodeFormat("dotdec", to_dotdec, from_dotdec, dim_multiple=8),
        CodeFormat("hex", to_hex, from_hex, dim_multiple=4),
    )
}
CODE_COLUMNS: list[str] = [f.column for f in CODE_FORMATS.values()]
"""The text columns of the ``codes`` table, one per format."""


def codes_schema(dim: int) -> pa.Schema:
    """Schema of the ``codes`` table for ``dim``-bit codes."""
    return pa.schema(
        [
            ("entity", pa.string()),
            ("id", pa.int32()),
            ("bits", pa.list_(pa.uint8(), dim)),
            *[(column, pa.string()) for column in CODE_COLUMNS],
        ]
    )


def codes_table(user_signs: np.ndarray, item_signs: np.ndarray) -> pa.Table:
    """The ``codes`` table from ±1 codes of users and items indexed by id (row 0 = padding).

    Row 0 of each array is the padding id and is left out: the table holds ids 1..n-1, users
    first, each side in id order.
    """
    dim = user_signs.shape[1]
    parts = []
    for entity, signs in (("user", user_signs), ("item", item_signs)):
        bits = bits_from_signs(signs[1:])
        n = len(bits)
        flat = pa.array(bits.reshape(-1), type=pa.uint8())
        parts.append(
            pa.table(
                {
                    "entity": pa.array([entity] * n, pa.string()),
                    "id": pa.array(np.arange(1, n + 1, dtype=np.int32)),
                    "bits": pa.FixedSizeListArray.from_arrays(flat, dim),
                    **{
                        f.column: pa.array(f.to_text(bits), pa.string())
                        for f in CODE_FORMATS.values()
                    },
                },
                schema=codes_schema(dim),
            )
        )
    return pa.concat_tables(parts)


def embeddings_schema(bits: int, dim: int) -> pa.Schema:
    """Schema of the ``embeddings`` table: the continuous vectors of every user and item, the
    codes' pre-sign ones (``bits`` long) and the float model's (``dim``)."""
    return pa.schema(
        [
            ("entity", pa.string()),
            ("id", pa.int32()),
            ("relaxed", pa.list_(pa.float32(), bits)),
            ("float", pa.list_(pa.float32(), dim)),
        ]
    )


def embeddings_table(vectors: dict[str, tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """The ``embeddings`` table from ``{"relaxed": (users, items), "float": (users, items)}``
    arrays indexed by id (row 0 = padding, left out as in :func:`codes_table`): ``relaxed`` is
    what the codes are the signs of (tanh(proj(e))), ``float`` the continuous baseline's
    embedding. The two may differ in length (codes of ``encoder.bits`` from ``dim``-dim
    embeddings)."""
    parts = []
    for side, entity in enumerate(("user", "item")):
        n = len(vectors["relaxed"][side]) - 1
        widths = {name: vectors[name][side].shape[1] for name in ("relaxed", "float")}
        columns = {
            name: pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(vectors[name][side][1:], np.float32).reshape(-1)), width
            )
            for name, width in widths.items()
        }
        parts.append(
            pa.table(
                {
                    "entity": pa.array([entity] * n, pa.string()),
                    "id": pa.array(np.arange(1, n + 1, dtype=np.int32)),
                    **columns,
                },
                schema=embeddings_schema(widths["relaxed"], widths["float"]),
            )
        )
    return pa.concat_tables(parts)


def id_table(table: pa.Table, entity: str, column: str) -> np.ndarray:
    """Rows of ``column`` (a fixed-size list) of one ``entity`` of a ``codes``/``embeddings``
    table, as an array indexed by id (row 0 and ids without a row are zeros)."""
    part = table.filter(pc.equal(table["entity"], entity))
    ids = part["id"].to_numpy()
    values = part[column].combine_chunks()
    width = values.type.list_size
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False)).reshape(len(ids), width)
    out = np.zeros((int(ids.max()) + 1 if len(ids) else 1, width), flat.dtype)
    out[ids] = flat
    return out
