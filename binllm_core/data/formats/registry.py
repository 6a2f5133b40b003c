"""The registry of source formats: ``data.format`` name -> :class:`FormatSpec`.

Adding a format: write its module (a ``FormatSpec``, its docstring saying what its files look
like) and add it here. Detection tries the formats in this order; messages list them in it.
"""

from __future__ import annotations

from binllm_core.data.formats.amazon import AMAZON2018, AMAZON2023
from binllm_core.data.formats.movielens import ML1M, ML100K
from binllm_core.data.formats.movielens_csv import ML_CSV
from binllm_core.data.formats.recbole import RECBOLE
from binllm_core.data.formats.spec import FormatSpec

FORMATS: dict[str, FormatSpec] = {
    spec.name: spec for spec in (ML100K, ML1M, ML_CSV, AMAZON2018, AMAZON2023, RECBOLE)
}
