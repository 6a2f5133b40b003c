"""Model files from anywhere (:mod:`binllm_core.io.artifacts`): fetched once per node and version
from a real S3 API (moto's server) and a local web server, concurrent fetches that download
once, one-line errors; a backbone and an adapter at a URI checked where they lie and loaded; a
GGUF converted once per node that scores as the GGUF does."""

from __future__ import annotations

import collections
import fcntl
import functools
import http.server
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
import torch

from binllm_core.config import ModelConfig
from binllm_core.errors import ConfigError
from binllm_core.io.artifacts import (
    build_once,
    cache_key,
    fetch,
    identity,
    listing,
    stat_identity,
    version,
)
from binllm_core.io.lineage import model_identity
from binllm_core.llm.backbone import (
    TINY_VOCAB,
    check_backbone,
    fetch_adapter,
    is_adapter,
    load_tokenizer,
    tiny_tokenizer,
)
from binllm_core.llm.loading import load_language_model, tiny_model
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.llm.scoring import Scorer
from tests.conftest import SMOLLM_GGUF

PROMPTS = [
    '#Question: A user has given high ratings to the following movies: "a b". Answer with "Yes"'
    ' or "No".\n#Answer:',
    "movie 0 1 1 0 . 3 ? Answer:",
]


# ---- stores ------------------------------------------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GET and HEAD requests per path on its server."""

    def do_GET(self) -> None:
        self.server.gets[self.path] += 1
        super().do_GET()

    def do_HEAD(self) -> None:
        self.server.heads[self.path] += 1
        super().do_HEAD()

    def log_message(self, *args) -> None:
        pass


class WebServer:
    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.gets = collections.Counter()
        self.server.heads = collections.Counter()
        self.root = root
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def gets(self) -> collections.Counter:
        return self.server.gets

    @property
    def heads(self) -> collections.Counter:
        return self.server.heads


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    """A local web server (http.server in a thread) over a fresh folder: https-like URIs."""
    root = tmp_path / "www"
    root.mkdir()
    server = WebServer(root)
    yield server
    server.server.shutdown()
    server.server.server_close()


def s3(options: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**options)


def write_folder(root: Path) -> dict[str, bytes]:
    files = {"config.json": b'{"a": 1}', "sub/weights.bin": b"\x00\x01" * 1000}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def read_tree(folder: str) -> dict[str, bytes]:
    base = Path(folder)
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


@pytest.fixture
def downloads(monkeypatch) -> Iterator[collections.Counter]:
    """How many times each object was downloaded from S3 (calls of ``_get_file``)."""
    counts: collections.Counter = collections.Counter()
    original = s3fs.S3FileSystem._get_file

    async def counting(self, rpath, lpath, **kwargs):
        counts[rpath] += 1
        return await original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance holds the method unpatched
    yield counts
    s3fs.S3FileSystem.clear_instance_cache()


# ---- fetch ---------------------------------------------------------------------------------------
def test_a_local_path_is_returned_as_it_is(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert fetch("m.gguf", {}, str(cache)) == str(tmp_path / "m.gguf")
    assert fetch(f"file://{tmp_path}", {}, str(cache)) == str(tmp_path)
    assert not cache.exists()
    with pytest.raises(ConfigError, match="model.backbone .*nowhere is not there") as err:
        fetch("nowhere", {}, str(cache), "model.backbone", "model.storage_options")
    assert "\n" not in str(err.value)


def test_s3_file_and_folder_are_fetched_once_per_version(
    tmp_path: Path, s3_bucket, downloads
) -> None:
    bucket, options = s3_bucket
    local = tmp_path / "src"
    files = write_folder(local)
    s3(options).put(str(local) + "/", f"{bucket}/model", recursive=True)
    cache = str(tmp_path / "cache")

    path = fetch(f"{bucket}/model/config.json", options, cache)
    assert Path(path).read_bytes() == files["config.json"] and path.endswith("/config.json")
    entry = Path(path).parent
    assert entry.parent == Path(cache) and entry.name.count("-") == 1 and len(entry.name) == 33
    folder = fetch(f"{bucket}/model", options, cache)
    assert Path(folder).name == "model" and read_tree(folder) == files
    assert sum(downloads.values()) == 3

    # Again: the same copies, nothing downloaded, no temporary folder left behind.
    stamp = os.stat(Path(folder) / "sub" / "weights.bin").st_mtime_ns
    assert fetch(f"{bucket}/model/config.json", options, cache) == path
    assert fetch(f"{bucket}/model/", options, cache) != folder  # another URI, another entry
    downloads.clear()
    assert fetch(f"{bucket}/model", options, cache) == folder
    assert sum(downloads.values()) == 0
    assert os.stat(Path(folder) / "sub" / "weights.bin").st_mtime_ns == stamp
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]

    # A changed object is a new version: a new entry, downloaded; the old one is left as it was.
    before = identity(f"{bucket}/model", options)
    s3(options).pipe(f"{bucket}/model/sub/weights.bin", b"\x02\x03" * 1000)  # the same size
    assert identity(f"{bucket}/model", options) != before
    changed = fetch(f"{bucket}/model", options, cache)
    assert changed != folder and sum(downloads.values()) == 2
    assert read_tree(changed)["sub/weights.bin"] == b"\x02\x03" * 1000
    assert read_tree(folder) == files


def test_web_file_and_folder_are_fetched_once_per_version(tmp_path: Path, web) -> None:
    files = write_folder(web.root / "model")
    cache = str(tmp_path / "cache")
    path = fetch(f"{web.url}/model/sub/weights.bin", {}, cache)
    assert Path(path).read_bytes() == files["sub/weights.bin"]
    folder = fetch(f"{web.url}/model/", {}, cache)
    assert read_tree(folder) == files
    assert web.gets["/model/sub/weights.bin"] == 2  # one per URI: the file, the folder
    assert web.gets["/model/config.json"] == 1

    assert fetch(f"{web.url}/model/sub/weights.bin", {}, cache) == path
    assert fetch(f"{web.url}/model/", {}, cache) == folder
    assert web.gets["/model/sub/weights.bin"] == 2 and web.gets["/model/config.json"] == 1

    (web.root / "model" / "sub" / "weights.bin").write_bytes(b"longer weights" * 200)
    assert fetch(f"{web.url}/model/sub/weights.bin", {}, cache) != path
    assert web.gets["/model/sub/weights.bin"] == 3
    assert Path(path).read_bytes() == files["sub/weights.bin"]


def test_two_processes_on_one_node_download_once(tmp_path: Path, web) -> None:
    (web.root / "model.gguf").write_bytes(b"GGUF" + os.urandom(50_000))
    uri, cache = f"{web.url}/model.gguf", str(tmp_path / "cache")
    key = cache_key(uri, version(listing(uri)[1]))
    os.makedirs(cache)
    spawn = multiprocessing.get_context("spawn")
    # Both processes wait on the node's lock, held here, until both have listed the object:
    # then they race for it, and one downloads while the other waits and takes its copy.
    with open(os.path.join(cache, f"{key}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        workers = [spawn.Process(target=fetch, args=(uri, {}, cache)) for _ in range(2)]
        for worker in workers:
            worker.start()
        deadline = time.time() + 120
        while web.heads["/model.gguf"] < 3 and time.time() < deadline:  # 1 here, 1 per worker
            time.sleep(0.1)
        time.sleep(0.5)
        assert all(w.is_alive() for w in workers) and web.gets["/model.gguf"] == 0
        fcntl.flock(lock, fcntl.LOCK_UN)
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert web.gets["/model.gguf"] == 1
    assert sorted(os.listdir(cache)) == [key, f"{key}.lock"]
    assert (Path(cache, key, "model.gguf")).read_bytes() == (web.root / "model.gguf").read_bytes()


def test_a_failed_build_leaves_nothing_and_a_later_one_succeeds(tmp_path: Path) -> None:
    def broken(folder: str) -> None:
        Path(folder, "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(str(tmp_path), "k", broken)
    assert sorted(os.listdir(tmp_path)) == ["k.lock"]
    folder = build_once(str(tmp_path), "k", lambda f: Path(f, "whole").write_text("y"))
    assert os.listdir(folder) == ["whole"]


def test_a_missing_or_unreachable_object_is_one_line(tmp_path: Path, s3_bucket, web) -> None:
    bucket, options = s3_bucket
    cache = str(tmp_path / "cache")
    cases = [
        (f"{bucket}/no/such.gguf", options, "is not there"),
        (f"{bucket}/no/folder", options, "is not there"),
        (f"s3://no-such-bucket-{os.getpid()}/x", options, "is not there|cannot read"),
        (f"{web.url}/no/such.gguf", {}, "is not there"),
        ("http://127.0.0.1:9/x.gguf", {}, "cannot read .*ClientConnectorError"),
    ]
    for uri, opts, needle in cases:
        with pytest.raises(ConfigError, match=needle) as err:
            fetch(uri, opts, cache, "model.backbone", "model.storage_options")
        message = str(err.value)
        assert "\n" not in message and uri in message, message
        assert "set model.storage_options" in message, message
    assert not Path(cache).exists() or not [n for n in os.listdir(cache) if ".tmp-" in n]


def test_identity_of_local_files_is_the_stat_identity(tmp_path: Path, s3_bucket) -> None:
    bucket, options = s3_bucket
    (tmp_path / "m.gguf").write_bytes(b"GGUF1")
    st = os.stat(tmp_path / "m.gguf")
    assert identity(str(tmp_path / "m.gguf")) == stat_identity([str(tmp_path / "m.gguf")])
    import hashlib

    line = f"m.gguf\t{st.st_size}\t{st.st_mtime_ns}"
    assert identity(str(tmp_path / "m.gguf")) == hashlib.sha256(line.encode()).hexdigest()[:16]
    s3(options).pipe(f"{bucket}/m.gguf", b"GGUF1")
    first = identity(f"{bucket}/m.gguf", options)
    assert len(first) == 16 and first == identity(f"{bucket}/m.gguf", options)
    s3(options).pipe(f"{bucket}/m.gguf", b"GGUF2")
    assert identity(f"{bucket}/m.gguf", options) != first


# ---- backbones and adapters at a URI -----------------------------------------------------------
def test_check_backbone_reads_a_remote_gguf_where_it_lies(
    tmp_path: Path, s3_bucket, downloads
) -> None:
    bucket, options = s3_bucket
    fs = s3(options)
    fs.pipe(f"{bucket}/m/model.gguf", b"GGUF" + b"\x03\x00" * 5000)
    fs.pipe(f"{bucket}/m/zip.gguf", b"PK\x03\x04 not a gguf")
    fs.pipe(f"{bucket}/notes/readme.txt", b"x")
    cache = tmp_path / "cache"

    def cfg(backbone: str, gguf_file: str = "") -> ModelConfig:
        return ModelConfig(backbone, gguf_file, storage_options=options, cache_dir=str(cache))

    source = check_backbone(cfg(f"{bucket}/m/model.gguf"))
    assert (source.kind, source.remote, source.gguf_file) == ("gguf", True, "model.gguf")
    assert check_backbone(cfg(f"{bucket}/m", "model.gguf")).kind == "gguf"
    refused = [
        (cfg(f"{bucket}/m/zip.gguf"), r"is not a GGUF file \(it starts with b'PK\\x03\\x04'\)"),
        (cfg(f"{bucket}/m/none.gguf"), "model.backbone s3://.*/m/none.gguf is not there"),
        (cfg(f"{bucket}/m", "none.gguf"), "is not there"),
        (cfg(f"{bucket}/notes"), "is not a model folder: it has no config.json and no tokenizer"),
        (cfg(f"{bucket}/nothing"), "is not there"),
    ]
    for bad, needle in refused:
        with pytest.raises(ConfigError, match=needle) as err:
            check_backbone(bad)
        assert "\n" not in str(err.value)
    nowhere = {
        "endpoint_url": "http://127.0.0.1:9",  # nothing listens: the storage options are wrong
        "key": "x",
        "secret": "x",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    with pytest.raises(ConfigError, match="cannot read model.backbone s3://") as err:
        check_backbone(ModelConfig(f"{bucket}/m/model.gguf", storage_options=nowhere))
    assert "\n" not in str(err.value) and "set model.storage_options" in str(err.value)
    assert sum(downloads.values()) == 0 and not cache.exists()  # checked, never downloaded
    # The lineage covers the object: a replaced GGUF is another model.
    before = model_identity(cfg(f"{bucket}/m/model.gguf"))
    assert before == model_identity(cfg(f"{bucket}/m", "model.gguf"))
    fs.pipe(f"{bucket}/m/model.gguf", b"GGUF" + b"\x04\x00" * 5000)
    assert model_identity(cfg(f"{bucket}/m/model.gguf")) != before


def save_tiny(folder: Path) -> None:
    tokenizer = tiny_tokenizer()
    tiny_model(TINY_VOCAB, tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def scores(rec: LLMRecommender) -> torch.Tensor:
    return torch.as_tensor(Scorer(rec, 8, 512).score(PROMPTS)[0])


@pytest.mark.usefixtures("one_thread")
def test_a_model_folder_on_s3_loads_as_the_model(tmp_path: Path, s3_bucket) -> None:
    bucket, options = s3_bucket
    save_tiny(tmp_path / "tiny")
    s3(options).put(str(tmp_path / "tiny") + "/", f"{bucket}/models/tiny", recursive=True)
    cfg = ModelConfig(
        backbone=f"{bucket}/models/tiny", storage_options=options, cache_dir=str(tmp_path / "c")
    )
    assert check_backbone(cfg).kind == "folder"
    assert not (tmp_path / "c").exists()
    remote = LLMRecommender(load_language_model(cfg))
    fetched = list((tmp_path / "c" / "fetched").iterdir())
    assert len([p for p in fetched if p.is_dir()]) == 1  # model and tokenizer: one download
    assert load_tokenizer(cfg).get_vocab() == remote.tokenizer.get_vocab()
    tiny = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"))
    assert remote.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    torch.testing.assert_close(scores(remote), scores(tiny), rtol=0, atol=1e-6)
    assert len(model_identity(cfg)) == 16


@pytest.mark.usefixtures("one_thread")
def test_an_adapter_on_s3_is_checked_there_and_scores_as_the_local_one(
    tmp_path: Path, s3_bucket, downloads
) -> None:
    from pipelines.ops.scoring import PromptScorer, adapter_hash

    bucket, options = s3_bucket
    tiny = ModelConfig(backbone="tiny", cache_dir=str(tmp_path / "c"))
    torch.manual_seed(0)
    trained = LLMRecommender.from_backbone(tiny, trainable=True)
    for p in trained.net.parameters():  # LoRA's B starts at 0: make the adapter count
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    trained.save(tmp_path / "adapter")
    uri = f"{bucket}/runs/adapters/step1"
    s3(options).put(str(tmp_path / "adapter") + "/", uri, recursive=True)
    s3(options).pipe(f"{bucket}/runs/empty/notes.txt", b"x")

    assert is_adapter(uri, options) and is_adapter(str(tmp_path / "adapter"))
    assert not is_adapter(f"{bucket}/runs/empty", options) and not is_adapter(str(tmp_path))
    assert adapter_hash(uri, options) == adapter_hash(str(tmp_path / "adapter"))
    for bad, needle in (
        (f"{bucket}/runs/empty", "holds no saved adapter"),
        (f"{bucket}/x", "is not there"),
    ):
        with pytest.raises(ConfigError, match=needle) as err:
            adapter_hash(bad, options)
        assert "\n" not in str(err.value)
    assert sum(downloads.values()) == 0

    lineage = {"model": "tiny", "adapter": uri, "adapter_hash": "h", "run_name": "r"}
    args = {"lineage": lineage, "batch_size": 8, "max_length": 512, "storage_options": options}
    remote = PromptScorer(tiny, uri, **args).logits(PROMPTS)[0]
    assert sum(downloads.values()) == len(read_tree(str(tmp_path / "adapter")))
    again = PromptScorer(tiny, uri, **args).logits(PROMPTS)[0]  # another actor on the node
    assert sum(downloads.values()) == len(read_tree(str(tmp_path / "adapter")))
    local = PromptScorer(tiny, str(tmp_path / "adapter"), **args).logits(PROMPTS)[0]
    bare = PromptScorer(tiny, "", **args).logits(PROMPTS)[0]
    assert (remote == local).all() and (again == local).all() and not (bare == local).all()
    folder = fetch_adapter(tiny, uri, options)
    assert folder.startswith(str(tmp_path / "c" / "adapters"))
    assert read_tree(folder) == read_tree(str(tmp_path / "adapter"))


# ---- a GGUF converted once per node ------------------------------------------------------------
@pytest.mark.slow  # dequantizes SmolLM2-135M twice (~20 s each on 2 cores)
@pytest.mark.usefixtures("one_thread")
def test_a_gguf_is_converted_once_and_scores_as_the_gguf(tmp_path: Path, monkeypatch) -> None:
    if not SMOLLM_GGUF.exists():
        pytest.skip(f"shared SmolLM2 GGUF not found at {SMOLLM_GGUF}")
    from transformers import AutoModelForCausalLM

    from binllm_core.llm import loading as llm

    cfg = ModelConfig(backbone=str(SMOLLM_GGUF), cache_dir=str(tmp_path / "c"))
    from_gguf = load_tokenizer(cfg)  # no converted folder yet: read from the GGUF
    assert not (tmp_path / "c").exists()
    conversions = []
    convert = llm._convert_gguf
    monkeypatch.setattr(llm, "_convert_gguf", lambda *a: conversions.append(a) or convert(*a))

    first = load_language_model(cfg)
    converted = list((tmp_path / "c" / "converted").iterdir())
    folder = [p for p in converted if p.is_dir()]
    assert len(folder) == 1 and "-float32-transformers" in folder[0].name
    assert (folder[0] / "model.safetensors").exists() and (folder[0] / "tokenizer.json").exists()
    assert "quantization_config" not in (folder[0] / "config.json").read_text()
    second = load_language_model(cfg)  # another actor on the node: the folder, converted once
    assert len(conversions) == 1

    direct = AutoModelForCausalLM.from_pretrained(
        str(SMOLLM_GGUF.parent), gguf_file=SMOLLM_GGUF.name, dtype=torch.float32
    ).eval()
    batch = first.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        want = direct(**batch).logits[:, -1]
        for lm in (first, second):
            torch.testing.assert_close(lm.model(**batch).logits[:, -1], want, rtol=0, atol=1e-5)
    # The tokenizer read from the converted folder is the GGUF's.
    from_folder = load_tokenizer(cfg)
    for tok in (from_folder, first.tokenizer):
        assert tok.get_vocab() == from_gguf.get_vocab()
        assert tok.all_special_tokens == from_gguf.all_special_tokens
        assert tok(PROMPTS)["input_ids"] == from_gguf(PROMPTS)["input_ids"]
    assert first.answer == llm.answer_score(from_gguf, cfg)
