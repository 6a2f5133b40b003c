"""``python -m jobs.score --run RUN --input PAIRS [--output URI] [--set k=v]``: a scoring Ray job.

Scores every row of a Parquet table of (user, item) source ids with a trained run (its config
file or its folder) and writes Parquet plus a manifest; see
:func:`pipelines.pairs.score_candidates`.
"""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
