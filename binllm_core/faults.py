"""Test-only fault points: ``BINLLM_TEST_FAULT=NAME`` makes the process exit at point ``NAME``.

Tests use it to kill a real process at a chosen moment (for instance between writing a new
version and publishing its pointer) and then check what a reader sees.
"""

from __future__ import annotations

import os
import sys

ENV = "BINLLM_TEST_FAULT"
EXIT_CODE = 86


def fault_point(name: str) -> None:
    """Exit at once, without clean-up, when the environment names this point."""
    if os.environ.get(ENV) == name:
        sys.stderr.write(f"{ENV}: process killed at {name}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
