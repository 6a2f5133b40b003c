"""``python -m jobs.recommend --run RUN [--users USERS] [--k 10] [--output URI] [--set k=v]``.

The recommendation Ray job: top-K items per user (the codes retrieve, the LLM re-ranks), published
to ``{run}/recommendations/{name}/`` or ``--output``; see :func:`pipelines.recommend.recommend`.
Nightly lists: ``python -m jobs.nightly --run RUN --topk K [--users USERS] [--date DATE]``.
"""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
