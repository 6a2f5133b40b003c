"""Nothing is published that was not produced: rows are counted where they are written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from binllm_core.errors import StageError
from binllm_core.storage import MANIFEST, Publication, read_output, resolve
from pipelines.runtime.publish import write_dataset


def _publication(target: Path) -> Publication:
    fs, path = resolve(str(target))
    return Publication.begin(fs, path, "pairs")


def test_rows_written_by_ray_are_counted_and_published(ray_session, tmp_path: Path):
    publication = _publication(tmp_path / "out")
    ds = ray.data.range(1000, override_num_blocks=4).map_batches(
        lambda b: {"x": b["id"] * 2}, batch_format="numpy"
    )
    write_dataset(publication, ds, "numbers")
    write_dataset(publication, ray.data.range(5), "parts", {"day": "1"})
    write_dataset(publication, ray.data.range(7), "parts", {"day": "2"})
    assert publication.written == {"numbers": 1000, "parts": 12}
    manifest = publication.publish({})
    assert manifest["tables"]["numbers"]["rows"] == 1000
    assert manifest["tables"]["parts"]["rows"] == 12
    got = read_output(str(tmp_path / "out"), "numbers").column("x").to_pylist()
    assert sorted(got) == list(range(0, 2000, 2))


def test_an_empty_dataset_is_an_empty_typed_table(ray_session, tmp_path: Path):
    publication = _publication(tmp_path / "out")
    empty = ray.data.range(10).filter(lambda r: r["id"] < 0)
    write_dataset(publication, empty, "none", schema=pa.schema([("id", pa.int64())]))
    manifest = publication.publish({})
    assert manifest["tables"]["none"] == {**manifest["tables"]["none"], "rows": 0}
    assert manifest["tables"]["none"]["schema"] == {"id": "int64"}


def test_rows_this_process_cannot_see_are_not_published(ray_session, tmp_path: Path):
    """What a local output path that is not shared looks like to the publishing process:
    some written files are not there. The publish stops in one line; the previous version
    stays current."""
    target = tmp_path / "out"
    first = _publication(target)
    write_dataset(first, ray.data.range(10), "numbers")
    first.publish({})
    before = (target / MANIFEST).read_text()

    second = _publication(target)
    write_dataset(second, ray.data.range(300, override_num_blocks=3), "numbers")
    files = sorted((target / second.version / "numbers").glob("*.parquet"))
    assert len(files) == 3
    files[0].unlink()  # written on another node: not on this one's disk
    with pytest.raises(StageError) as err:
        second.publish({})
    message = str(err.value)
    assert "\n" not in message
    assert "300 rows were written" in message and "200 are there" in message
    assert "s3://" in message and "shared by every node" in message
    assert (target / MANIFEST).read_text() == before
    assert json.loads(before)["tables"]["numbers"]["rows"] == 10
