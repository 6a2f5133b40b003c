"""Stage ``ingest`` on a real local Ray: every format, zip/http/s3 sources, and bad input."""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from binllm_core.config import DataConfig, RunConfig
from binllm_core.errors import DataError, find_user_error
from binllm_core.storage import MANIFEST, read_output
from jobs.cli import main
from pipelines.runtime.registry import STAGES
from pipelines.runtime.stage import run_stage
from tests.builders import free_port
from tests.conftest import FIXTURES

FORMATS = FIXTURES / "formats"
STAGE = next(s for s in STAGES if s.name == "ingest")
pytestmark = pytest.mark.usefixtures("ray_session")


def run_ingest(tmp_path: Path, uri: str, **data: Any) -> dict[str, Any]:
    """Run the stage into ``tmp_path/out``; the manifest, with the tables added."""
    cfg = RunConfig(run_name="t", output_root=str(tmp_path / "out"), data=DataConfig(uri, **data))
    manifest = run_stage(cfg, STAGE, force=True)
    folder = str(tmp_path / "out" / "t" / "ingest")
    manifest["read"] = {t: read_output(folder, t) for t in manifest["tables"]}
    return manifest


def official_zip(tmp_path: Path, fixture: str, top: str) -> Path:
    """A zip laid out like GroupLens' (``ml-100k.zip`` holds ``ml-100k/u.data``...)."""
    path = tmp_path / f"{top}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((FORMATS / fixture).iterdir()):
            zf.write(f, f"{top}/{f.name}")
        zf.writestr(f"{top}/README", "not data")
    return path


@pytest.mark.parametrize(
    ("fixture", "fmt", "interactions", "items", "title"),
    [
        ("ml100k", "ml100k", 12, 12, "Misérables, Les (1995)"),
        ("ml1m", "ml1m", 8, 8, "Crónica de una muerte anunciada (1987)"),
        ("ml_csv", "ml_csv", 7, 7, "Shawshank Redemption, The (1994)"),
        ("amazon2018", "amazon2018", 5, 3, "Crème Brûlée Lip Balm"),
        ("amazon2023", "amazon2023", 4, 3, "Sérum – Vitamin C"),
        ("recbole", "recbole", 6, 7, "Misérables, Les"),
    ],
)
def test_each_format(tmp_path, fixture, fmt, interactions, items, title) -> None:
    manifest = run_ingest(tmp_path, str(FORMATS / fixture))
    metrics, tables = manifest["metrics"], manifest["read"]
    assert metrics["format"] == fmt and metrics["rejected_rows"] == 0
    assert (metrics["interactions_rows"], metrics["items_rows"]) == (interactions, items)
    assert len(metrics["source_files"]) == 2
    assert manifest["tables"]["interactions"]["schema"] == {
        "user": "string",
        "item": "string",
        "rating": "float",
        "timestamp": "int64",
        "row": "int64",
    }
    assert tables["interactions"].num_rows == interactions
    assert title in tables["items"]["title"].to_pylist()
    rows = tables["interactions"]["row"].to_pylist()
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    assert "rejects" not in tables


@pytest.mark.parametrize("fixture", ["ml_csv", "recbole", "amazon2023"])
def test_a_byte_order_mark_is_dropped(tmp_path, fixture) -> None:
    """Files saved with a UTF-8 BOM (Excel, Notepad) read as the same rows and titles."""
    folder = tmp_path / "bom"
    folder.mkdir()
    for f in (FORMATS / fixture).iterdir():
        (folder / f.name).write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    plain = run_ingest(tmp_path / "plain", str(FORMATS / fixture))["read"]
    marked = run_ingest(tmp_path / "marked", str(folder))
    assert marked["metrics"]["rejected_rows"] == 0
    items = marked["read"]["items"]
    assert items.equals(plain["items"])
    got, want = marked["read"]["interactions"], plain["interactions"]
    assert got.drop_columns(["row"]).equals(want.drop_columns(["row"]))  # rows: byte offsets


def test_gzipped_amazon_2023(tmp_path) -> None:
    for f in (FORMATS / "amazon2023").iterdir():
        (tmp_path / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    tables = run_ingest(tmp_path, str(tmp_path))["read"]
    assert tables["interactions"]["timestamp"].to_pylist()[:2] == [1588687728, 1588615855]


def test_explicit_format_and_name_choose(tmp_path) -> None:
    shutil.copytree(FORMATS / "ml100k", tmp_path / "src" / "ml-100k")
    shutil.copytree(FORMATS / "ml1m", tmp_path / "src" / "ml-1m")
    src = str(tmp_path / "src")
    with pytest.raises(DataError, match="several datasets: ml-100k \\(ml100k\\), ml-1m"):
        run_ingest(tmp_path, src)
    assert run_ingest(tmp_path, src, format="ml1m")["metrics"]["interactions_rows"] == 8
    assert run_ingest(tmp_path, src, name="ml-100k")["metrics"]["format"] == "ml100k"
    one_file = str(tmp_path / "src" / "ml-1m" / "ratings.dat")
    assert run_ingest(tmp_path, one_file)["metrics"]["format"] == "ml1m"


def test_official_zip(tmp_path) -> None:
    path = official_zip(tmp_path, "ml100k", "ml-100k")
    manifest = run_ingest(tmp_path, str(path))
    assert manifest["metrics"]["dataset"] == "ml-100k"
    assert manifest["metrics"]["source_files"][0] == f"{path}/ml-100k/u.data"
    assert manifest["read"]["interactions"].num_rows == 12


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args: Any) -> None:
        CountingHandler.requests.append(f"{self.command} {self.path}")


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[str, Path, http.server.ThreadingHTTPServer]]:
    root = tmp_path / "www"
    root.mkdir()
    CountingHandler.requests = []

    def handler(*args: Any) -> CountingHandler:
        return CountingHandler(*args, directory=str(root))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, server
    server.shutdown()
    server.server_close()


def test_http_zip_is_downloaded_once_per_version(tmp_path, http_root) -> None:
    url, root, server = http_root
    shutil.move(official_zip(tmp_path, "ml1m", "ml-1m"), root / "ml-1m.zip")
    cache = str(tmp_path / "cache")
    first = run_ingest(tmp_path, f"{url}/ml-1m.zip", cache_dir=cache)
    assert first["metrics"]["interactions_rows"] == 8 and CountingHandler.requests
    assert any((tmp_path / "cache").iterdir())
    downloads = [r for r in CountingHandler.requests if r.startswith("GET")]
    assert downloads
    second = run_ingest(tmp_path, f"{url}/ml-1m.zip", cache_dir=cache)
    assert second["read"]["interactions"].equals(first["read"]["interactions"])
    # The second run only asked the server which version it has (HEAD), then read its cache.
    assert [r for r in CountingHandler.requests if r.startswith("GET")] == downloads
    assert second["inputs"]["source"] == first["inputs"]["source"]

    # The file changes on the server (a new export): it is downloaded again, and read anew.
    rows = (FORMATS / "ml1m" / "ratings.dat").read_text().splitlines()[:5]
    with zipfile.ZipFile(root / "ml-1m.zip", "w") as zf:
        for f in sorted((FORMATS / "ml1m").iterdir()):
            text = "\n".join(rows) + "\n" if f.name == "ratings.dat" else f.read_bytes()
            zf.writestr(f"ml-1m/{f.name}", text)
    os.utime(root / "ml-1m.zip", (2_000_000_000, 2_000_000_000))
    third = run_ingest(tmp_path, f"{url}/ml-1m.zip", cache_dir=cache)
    assert len([r for r in CountingHandler.requests if r.startswith("GET")]) > len(downloads)
    assert third["metrics"]["interactions_rows"] == 5
    assert third["inputs"]["source"] != first["inputs"]["source"]


def test_unreachable_http(tmp_path, http_root) -> None:
    url, _, _ = http_root
    with pytest.raises(DataError, match=r"cannot read .*/missing.zip \(FileNotFoundError"):
        run_ingest(tmp_path, f"{url}/missing.zip", cache_dir=str(tmp_path / "c"))
    closed = f"http://127.0.0.1:{free_port()}/ml-100k.zip"
    with pytest.raises(DataError, match="cannot read http://127.0.0.1:.*reachable") as err:
        run_ingest(tmp_path, closed, cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(err.value)


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_folder_and_zip(tmp_path, s3_endpoint) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="data")
    for f in (FORMATS / "ml_csv").iterdir():
        s3.upload_file(str(f), "data", f"ml-latest-small/{f.name}")
    s3.upload_file(str(official_zip(tmp_path, "ml100k", "ml-100k")), "data", "ml-100k.zip")
    options = {"endpoint_url": s3_endpoint, "key": "x", "secret": "x"}
    cache = str(tmp_path / "cache")
    folder = run_ingest(
        tmp_path, "s3://data/ml-latest-small", storage_options=options, cache_dir=cache
    )
    assert folder["metrics"]["format"] == "ml_csv"
    assert folder["read"]["interactions"].num_rows == 7
    packed = run_ingest(tmp_path, "s3://data/ml-100k.zip", storage_options=options, cache_dir=cache)
    assert packed["metrics"]["interactions_rows"] == 12
    with pytest.raises(DataError, match="cannot read s3://no-such-bucket/x") as err:
        run_ingest(tmp_path, "s3://no-such-bucket/x", storage_options=options, cache_dir=cache)
    assert "\n" not in str(err.value)


def bad_copy(tmp_path: Path, line: int, text: str) -> Path:
    """The ml100k fixture with line ``line`` of u.data replaced."""
    folder = tmp_path / "bad"
    shutil.copytree(FORMATS / "ml100k", folder, dirs_exist_ok=True)
    lines = (folder / "u.data").read_text().splitlines()
    lines[line - 1] = text
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    return folder


def test_malformed_line_stops_with_one_line_and_keeps_old_output(tmp_path, capsys) -> None:
    good = run_ingest(tmp_path, str(FORMATS / "ml100k"))
    folder = bad_copy(tmp_path, 7, "298\t474\t4")
    with pytest.raises(Exception) as err:
        run_ingest(tmp_path, str(folder))
    found = find_user_error(err.value)
    assert str(found) == (
        f"malformed line in {folder}/u.data line 7: expected 4 tab-separated fields, got 3; "
        "fix the line or set data.on_bad_rows: skip"
        f" (raised on host {socket.gethostname()})"  # parsed in a Ray task
    )
    kept = read_output(str(tmp_path / "out" / "t" / "ingest"), "interactions")
    assert kept.equals(good["read"]["interactions"])

    config = tmp_path / "bad.yaml"
    config.write_text(f"run_name: t\noutput_root: {tmp_path / 'cli'}\ndata:\n  uri: {folder}\n")
    assert main(["run", str(config), "--stages", "ingest"]) == 2
    assert capsys.readouterr().err.strip() == f"binllm: error: {found}"


def test_skip_keeps_rejects(tmp_path) -> None:
    folder = bad_copy(tmp_path, 3, "22\t377\tfive\t878887116")
    lines = (folder / "u.data").read_text().splitlines()
    lines[9] = "6\t86\t3\tyesterday"
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    manifest = run_ingest(tmp_path, str(folder), on_bad_rows="skip")
    assert manifest["metrics"]["interactions_rows"] == 10
    assert manifest["metrics"]["rejected_rows"] == 2
    rejects = manifest["read"]["rejects"].to_pylist()
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (3, "rating five is not a number"),
        (10, "timestamp yesterday is not a number"),
    ]
    assert rejects[0]["file"] == f"{folder}/u.data"


def test_a_header_only_file_is_one_line_and_commits_nothing(tmp_path) -> None:
    folder = tmp_path / "headers"
    folder.mkdir()
    for f in (FORMATS / "recbole").iterdir():
        text = f.read_text(encoding="utf-8")
        (folder / f.name).write_text(text if f.suffix == ".item" else text.splitlines()[0] + "\n")
    with pytest.raises(Exception) as err:
        run_ingest(tmp_path, str(folder))
    inter = next(folder.glob("*.inter"))
    assert str(find_user_error(err.value)) == (
        f"{inter} holds no interactions: it is empty or holds only a header; "
        "give a recbole source with data"
    )
    assert not (tmp_path / "out" / "t" / "ingest" / MANIFEST).exists()


def test_missing_file_column_and_unknown_format(tmp_path) -> None:
    only_ratings = tmp_path / "a"
    only_ratings.mkdir()
    shutil.copy(FORMATS / "ml100k" / "u.data", only_ratings)
    with pytest.raises(DataError, match="u.data has no u.item next to it; add u.item"):
        run_ingest(tmp_path, str(only_ratings))

    no_asin = tmp_path / "b"
    no_asin.mkdir()
    shutil.copy(FORMATS / "amazon2018" / "meta_Beauty.json", no_asin)
    text = (FORMATS / "amazon2018" / "Beauty_5.json").read_text().replace('"asin"', '"item"')
    (no_asin / "Beauty_5.json").write_text(text)
    with pytest.raises(Exception) as err:
        run_ingest(tmp_path, str(no_asin))
    assert "column asin missing in" in str(find_user_error(err.value))

    unknown = tmp_path / "c"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no dataset of any supported format .*notes.txt") as err:
        run_ingest(tmp_path, str(unknown))
    assert "ml_csv: ratings.csv + movies.csv" in str(err.value)
    with pytest.raises(DataError, match="cannot read .*nowhere \\(FileNotFoundError"):
        run_ingest(tmp_path, str(tmp_path / "nowhere"))


def test_shared_ml100k(tmp_path, ml100k_dir) -> None:
    manifest = run_ingest(tmp_path, str(ml100k_dir))
    assert manifest["metrics"]["interactions_rows"] == 100_000
    assert manifest["metrics"]["items_rows"] == 1_682
    first = manifest["read"]["interactions"].slice(0, 1).to_pylist()[0]
    assert (first["user"], first["item"], first["timestamp"]) == ("196", "242", 881250949)
