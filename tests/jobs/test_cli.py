"""The binllm command line: bad config and stage names are one line on stderr, exit code 2."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm_core.errors import DataError, find_user_error
from jobs.cli import COMMANDS, main
from pipelines.recommend import read_users
from tests.builders import publish_stage


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_its_help(command: str, capsys: pytest.CaptureFixture):
    """``binllm CMD --help`` answers for every command of the table, and ``binllm --help`` lists
    it with its help line."""
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: binllm {command} ")
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert COMMANDS[command].help in " ".join(capsys.readouterr().out.split())


def test_unknown_key_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["run", "configs/tiny.yaml", "--set", "data.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("binllm: error: unknown config key data.nope")
    assert "\n" not in err


def test_a_key_that_moved_exits_2_naming_where_it_went(capsys: pytest.CaptureFixture):
    assert main(["run", "configs/tiny.yaml", "--set", "retrieve.max_users=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("binllm: error: config key retrieve.max_users moved to rerank.max_users")
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


def test_recommend_k_beyond_the_reranked_candidates_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    publish_stage(tmp_path / "tiny", "render", {})
    run = ["--run", "configs/tiny.yaml", "--set", f"output_root={tmp_path}"]
    assert main(["recommend", *run, "--k", "50"]) == 2
    err = capsys.readouterr().err
    assert "--k 50 is more than the rerank.top_n = 5 candidates" in err and "\n" == err[-1]
    assert main(["nightly", *run, "--topk", "0"]) == 2  # 0 means no --topk: candidates needed
    assert main(["nightly", *run, "--topk", "9", "--date", "2026-11-23"]) == 2
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["render"]


@pytest.mark.parametrize("command", [["score", "--input", "x.parquet"], ["recommend"]])
def test_a_run_that_was_never_run_is_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str]
):
    run = ["--run", "configs/tiny.yaml", "--set", f"output_root={tmp_path / 'runs'}"]
    assert main([command[0], *run, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "has no finished render stage; run it first: binllm run configs/tiny.yaml" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: str(d / "nowhere"), "is not there"),
        (
            lambda d: (d / "m.gguf").write_bytes(b"PK\x03\x04zip") and str(d / "m.gguf"),
            "is not a GGUF file (it starts with b'PK\\x03\\x04')",
        ),
        (
            lambda d: (d / "notes.txt").write_text("x") and str(d),
            "is not a model folder: it has no config.json and no tokenizer file",
        ),
    ],
    ids=["missing", "not-gguf", "not-a-model-folder"],
)
def test_a_bad_model_path_stops_the_run_before_any_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, needle: str
):
    model = tmp_path / "model"
    model.mkdir()
    sets = ["--set", f"output_root={tmp_path / 'runs'}", "--set", f"model.backbone={make(model)}"]
    assert main(["run", "configs/tiny.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "tiny" / "ingest").exists()  # found before ingest ran


def test_an_output_root_that_cannot_be_made_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    (tmp_path / "afile").write_text("not a folder")
    root = tmp_path / "afile" / "runs"
    assert main(["run", "configs/tiny.yaml", "--set", f"output_root={root}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: cannot write or read ") and str(root.parent) in err
    assert err.count("\n") == 1


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys: pytest.CaptureFixture):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "run", replace(COMMANDS["run"], run=interrupted))
    assert main(["run", "configs/tiny.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("binllm: interrupted") and err.count("\n") == 1


def test_a_damaged_manifest_is_one_line_naming_the_file_and_the_stage_to_redo(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    publish_stage(tmp_path / "tiny", "render", {})
    manifest = tmp_path / "tiny" / "render" / "_manifest.json"
    manifest.write_text('{"layout": 2, "tab')
    assert main(["status", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"binllm: error: {manifest} is damaged (JSONDecodeError")
    assert "binllm run CONFIG --stages render --force" in err and err.count("\n") == 1


def test_a_run_folder_on_s3_is_opened_with_the_storage_options_given_by_set(
    s3_bucket, capsys: pytest.CaptureFixture
):
    import s3fs

    root, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    config = {"data": {"uri": "tests/fixtures/tiny", "format": "recbole"}}
    manifest = json.dumps({"layout": 2, "config": config}).encode()
    fs.pipe(f"{root[5:]}/runs/tiny/render/_manifest.json", manifest)
    sets = [f"--set=output_storage_options.{k}={v}" for k, v in options.items()]
    assert main(["status", f"{root}/runs/tiny", *sets]) == 0
    out = capsys.readouterr().out
    assert f"[binllm] run {root[5:]}/runs/tiny" in out
    assert "ingest           missing" in out


@pytest.mark.parametrize(
    ("users", "needle"),
    [
        (pa.array([1.0, 2.0]), "the users table's user column holds double, not ids"),
        (pa.array(["1", " "]), "the users table has an empty user in row 1"),
        (pa.array(["1", None]), "the users table has an empty user in row 1"),
    ],
    ids=["float", "blank", "null"],
)
def test_users_ids_are_checked_as_pair_ids_are(tmp_path: Path, users: pa.Array, needle: str):
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user": users}), path)
    with pytest.raises(DataError) as err:
        read_users(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_integer_user_ids_are_read_as_source_ids(tmp_path: Path):
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user": pa.array([196, 7, 196])}), path)
    assert read_users(str(path)) == ["196", "7"]


def test_a_strategy_whose_prompts_render_does_not_write_stops_before_ingest(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    sets = ["--set", f"output_root={tmp_path}", "--set", "prompts.modes=[text,hex]"]
    assert main(["run", "configs/tiny.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert "finetune.strategy two_step trains step2 on binary prompts, which prompts.modes" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_an_output_root_in_a_bucket_that_does_not_exist_is_refused_not_created(
    s3_server: str, capsys: pytest.CaptureFixture
):
    import s3fs

    from tests.builders import s3_options

    options = s3_options(s3_server)
    sets = [f"--set=output_storage_options.{k}={v}" for k, v in options.items()]
    assert main(["run", "configs/tiny.yaml", "--set=output_root=s3://nobucket/runs", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: output_root s3://nobucket/runs: the bucket nobucket ")
    assert "binllm never creates buckets" in err and err.count("\n") == 1
    assert not s3fs.S3FileSystem(**options).exists("nobucket")


def test_a_store_that_cannot_be_reached_is_one_line_naming_what_to_set(
    capsys: pytest.CaptureFixture,
):
    from tests.builders import free_port

    sets = [
        "--set=output_root=s3://bucket/runs",
        f"--set=output_storage_options.endpoint_url=http://127.0.0.1:{free_port()}",
        "--set=output_storage_options.config_kwargs={retries: {max_attempts: 1}}",
        "--set=output_storage_options.key=x",
        "--set=output_storage_options.secret=x",
    ]
    assert main(["run", "configs/tiny.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: cannot reach s3://bucket/runs (output_root): ")
    assert "EndpointConnectionError" in err and "output_storage_options" in err
    assert err.count("\n") == 1
    assert main(["status", "s3://bucket/runs/tiny", *sets[1:]]) == 2
    assert "cannot reach s3://bucket/runs/tiny (the run)" in capsys.readouterr().err


def test_status_shows_a_run_in_progress(tmp_path: Path, capsys: pytest.CaptureFixture):
    from binllm_core.config import load_config
    from pipelines.runtime.registry import run_lock

    sets = ["--set", f"output_root={tmp_path}"]
    with run_lock(load_config("configs/tiny.yaml", sets[1:]), lambda _: None):
        assert main(["status", "configs/tiny.yaml", *sets]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  in progress: ") and f"pid {os.getpid()} on " in out[1]
    assert "its lease expires at " in out[1]
    assert main(["status", "configs/tiny.yaml", *sets]) == 0
    assert "in progress" not in capsys.readouterr().out


def test_a_store_that_stops_answering_mid_run_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """What botocore raises when the endpoint goes away, wrapped as a Ray task would wrap it."""

    class EndpointConnectionError(Exception):
        pass

    def lost(args):
        try:
            raise EndpointConnectionError('Could not connect to the endpoint URL: "http://s3:9"')
        except EndpointConnectionError as err:
            raise RuntimeError("task failed") from err

    monkeypatch.setitem(COMMANDS, "run", replace(COMMANDS["run"], run=lost))
    assert main(["run", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: the storage stopped answering (EndpointConnectionError")
    assert "what was running published nothing" in err and err.count("\n") == 1
