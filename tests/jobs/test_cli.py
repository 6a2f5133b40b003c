"""The binllm command line: bad config and stage names are one line on stderr, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from binllm_core.errors import DataError, find_user_error
from jobs.cli import main


def test_unknown_key_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["run", "configs/tiny.yaml", "--set", "data.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("binllm: error: unknown config key data.nope")
    assert "\n" not in err


def test_unknown_stage_lists_the_stages(capsys: pytest.CaptureFixture):
    assert main(["run", "configs/tiny.yaml", "--stages", "ingest,bake"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage bake" in err and "ingest" in err


def test_user_error_is_found_behind_wrapping_exceptions():
    inner = DataError("malformed line", "u.data line 3", "fix it")
    try:
        try:
            raise inner
        except DataError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as outer:
        assert find_user_error(outer) is inner
