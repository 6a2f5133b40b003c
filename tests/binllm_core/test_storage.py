"""Publishing outputs: readers see the old version or the new one, never a mix; binllm removes
only what it wrote; the same checks on a local disk and on S3 (moto's server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from binllm_core import storage
from binllm_core.errors import StageError
from binllm_core.storage import (
    MANIFEST,
    Publication,
    check_target,
    content_identity,
    read_manifest,
    read_output,
    resolve,
)
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> tuple[str, dict]:
    """A folder to publish into: on the local disk, or in a fresh bucket of a real S3 API."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    return request.getfixturevalue("s3_bucket")


def publish(uri: str, options: dict, values: list[int], keep: int = 1) -> dict:
    fs, target = resolve(uri, options)
    pub = Publication.begin(fs, target, "demo")
    pub.write_table(pa.table({"x": values}), "numbers")
    return pub.publish({"note": "test"}, keep=keep)


def versions(uri: str, options: dict) -> list[str]:
    fs, target = resolve(uri, options)
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(target, detail=False)]
    return sorted(n for n in names if n.startswith("v-"))


def test_publish_replaces_whole_and_keeps_n_versions(root):
    uri, options = root
    target = f"{uri}/demo"
    first = publish(target, options, [1, 2, 3])
    assert first["tables"]["numbers"] == {
        "path": f"{first['version']}/numbers",
        "rows": 3,
        "schema": {"x": "int64"},
    }
    assert read_output(target, "numbers", storage_options=options)["x"].to_pylist() == [1, 2, 3]
    second = publish(target, options, [4])
    assert read_output(target, storage_options=options)["x"].to_pylist() == [4]
    assert versions(target, options) == [second["version"]]  # the old version is gone
    third = publish(target, options, [5], keep=2)
    assert third["history"] == [second["version"]]
    assert versions(target, options) == sorted([second["version"], third["version"]])


def test_failure_before_the_pointer_keeps_the_old_version(root, monkeypatch):
    uri, options = root
    target = f"{uri}/demo"
    publish(target, options, [1, 2, 3])
    fs, path = resolve(target, options)
    before = fs.cat_file(f"{path}/{MANIFEST}")

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(storage, "put_atomically", broken)
    pub = Publication.begin(fs, path, "demo")
    pub.write_table(pa.table({"x": [9, 9]}), "numbers")
    with pytest.raises(OSError, match="disk gone"):
        pub.publish({})
    monkeypatch.undo()
    assert fs.cat_file(f"{path}/{MANIFEST}") == before
    assert read_output(target, storage_options=options)["x"].to_pylist() == [1, 2, 3]
    # The unpublished version is litter: the next publish removes it.
    assert len(versions(target, options)) == 2
    latest = publish(target, options, [7])
    assert versions(target, options) == [latest["version"]]


def test_identity_follows_content_not_names_or_place(tmp_path: Path):
    one = publish(str(tmp_path / "a"), {}, [1, 2])
    two = publish(str(tmp_path / "b"), {}, [1, 2])
    three = publish(str(tmp_path / "c"), {}, [1, 3])
    assert one["identity"] == two["identity"] != three["identity"]
    fs, path = resolve(str(tmp_path / "a"))
    assert content_identity(fs, f"{path}/{one['version']}") == one["identity"]


def test_killed_inside_publish_leaves_previous_output_readable(tmp_path: Path):
    target = tmp_path / "demo"
    publish(str(target), {}, [1, 2, 3])
    before = (target / MANIFEST).read_text()
    script = (
        "import pyarrow as pa\n"
        "from binllm_core.storage import Publication, resolve\n"
        f"fs, path = resolve({str(target)!r})\n"
        "pub = Publication.begin(fs, path, 'demo')\n"
        "pub.write_table(pa.table({'x': [8]}), 'numbers')\n"
        "pub.publish({})\n"
    )
    env = {"BINLLM_TEST_FAULT": "publish", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True)
    assert done.returncode == 86, done.stderr
    assert (target / MANIFEST).read_text() == before
    assert read_output(str(target))["x"].to_pylist() == [1, 2, 3]


def test_check_target_refuses_what_binllm_did_not_write(tmp_path: Path, root):
    uri, options = root
    fs, base = resolve(uri, options)
    check_target(fs, f"{base}/new", "pairs")  # absent: fine
    fs.makedirs(f"{base}/empty", exist_ok=True)
    check_target(fs, f"{base}/empty", "pairs")
    fs.makedirs(f"{base}/mine", exist_ok=True)
    fs.pipe_file(f"{base}/mine/notes.txt", b"keep me")
    with pytest.raises(StageError, match="not empty and not a binllm output .*notes.txt"):
        check_target(fs, f"{base}/mine", "pairs")
    assert fs.cat_file(f"{base}/mine/notes.txt") == b"keep me"
    fs.pipe_file(f"{base}/afile", b"x")
    with pytest.raises(StageError, match="is a file"):
        check_target(fs, f"{base}/afile", "pairs")
    publish(f"{uri}/stage", options, [1])
    with pytest.raises(StageError, match="another kind .*demo, not pairs"):
        check_target(fs, f"{base}/stage", "pairs")
    check_target(fs, f"{base}/stage", "demo")  # an earlier output of its own kind: fine
    run = f"{base}/runs/r1"
    for target in (run, f"{base}/runs", base):
        with pytest.raises(StageError, match="holds the run"):
            check_target(fs, target, "pairs", protected=[run])


def test_read_output_names_a_corrupt_file(tmp_path: Path):
    target = tmp_path / "demo"
    manifest = publish(str(target), {}, [1])
    part = next((target / manifest["version"] / "numbers").glob("*.parquet"))
    part.write_bytes(b"not parquet at all")
    with pytest.raises(StageError, match=f"cannot read {part} as Parquet") as err:
        read_output(str(target))
    assert "\n" not in str(err.value)


def test_manifest_pointer_is_the_only_thing_readers_follow(tmp_path: Path):
    target = tmp_path / "demo"
    publish(str(target), {}, [1])
    manifest = read_manifest(*resolve(str(target)))
    assert manifest["layout"] == storage.LAYOUT and manifest["kind"] == "demo"
    assert json.loads((target / MANIFEST).read_text())["version"] == manifest["version"]
    assert not [p for p in target.iterdir() if p.name.startswith("_manifest.json.tmp")]
