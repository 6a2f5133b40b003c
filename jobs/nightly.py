"""``python -m jobs.nightly --run RUN --candidates PAIRS [--date YYYY-MM-DD] [--incremental]``, or
``python -m jobs.nightly --run RUN --topk K [--users USERS] [--date YYYY-MM-DD]`` (top-K lists
into ``{run}/recommendations/date=YYYY-MM-DD/``, :func:`pipelines.recommend.nightly_topk`).

The nightly scoring Ray job: writes ``{run}/nightly/date=YYYY-MM-DD/`` whole (a re-run of the same
date replaces it, a failed run leaves it as it was); see :func:`pipelines.nightly.run_nightly`.
"""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
