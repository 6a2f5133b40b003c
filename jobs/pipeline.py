"""``python -m jobs.pipeline CONFIG [--set k=v] [--stages ...]``: the pipeline as a Ray job."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
