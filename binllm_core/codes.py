"""Binary codes as bits, as a binary string and as dot-decimal text, and the ``codes`` table.

A code of ``d`` dimensions is ``d`` bits in {0, 1} (the encoder's -1 is 0, +1 is 1).
``code_binary`` writes bit k as character k (``"0110..."``); ``code_dotdec`` packs every 8 bits,
most significant first, into a number 0-255 and joins them with ``.`` (IPv4 style:
``10101100 00010000 11111110 00000001`` -> ``172.16.254.1``), so ``d`` must be a multiple of 8.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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


def binary_to_dotdec(codes: list[str]) -> list[str]:
    return to_dotdec(from_binary(codes))


def dotdec_to_binary(codes: list[str]) -> list[str]:
    return to_binary(from_dotdec(codes))


def codes_schema(dim: int) -> pa.Schema:
    """Schema of the ``codes`` table for ``dim``-bit codes."""
    return pa.schema(
        [
            ("entity", pa.string()),
            ("id", pa.int32()),
            ("bits", pa.list_(pa.uint8(), dim)),
            ("code_binary", pa.string()),
            ("code_dotdec", pa.string()),
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
                    "code_binary": pa.array(to_binary(bits), pa.string()),
                    "code_dotdec": pa.array(to_dotdec(bits), pa.string()),
                },
                schema=codes_schema(dim),
            )
        )
    return pa.concat_tables(parts)
