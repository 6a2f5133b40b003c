"""Stage ``encode`` on a local Ray: DDP on two CPU workers, a worker failure, a crashed run that
resumes, and the single-worker stage against the plain loop. Each run starts a TorchTrainer
(tens of seconds on two cores), so the assertions are grouped into few runs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm_core.codes import from_binary, from_dotdec
from binllm_core.config import EncoderConfig, RunConfig
from binllm_core.encoder.data import split_samples
from binllm_core.encoder.model import BINARY
from binllm_core.encoder.training import fit
from binllm_core.storage import MANIFEST
from pipelines.runtime.stage import Stage, StageContext, run_stage
from pipelines.stages import encode
from tests.builders import planted_samples

pytestmark = pytest.mark.slow  # Ray Train

USERS, ITEMS = 100, 60
ENCODER = EncoderConfig(
    dim=16,
    lr=3e-2,
    weight_decay=1e-3,
    float_lr=3e-2,
    float_weight_decay=1e-3,
    batch_size=256,
    max_epochs=14,
    patience=4,
    beta_step=0.25,
    seed=7,
)
ENCODE = Stage("encode", encode.run, ("encoder",), ("samples",))


def fake_samples_stage(seed: int) -> Stage:
    """A finished ``samples`` stage holding a planted table (no ingest needed)."""

    def write(ctx: StageContext) -> dict:
        ctx.write_table(planted_samples(seed=seed), "samples")
        return {"user_num": USERS + 1, "item_num": ITEMS + 1}

    return Stage("samples", write, ("protocol",))


def read_codes(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ctx = StageContext.open(cfg, "encode")
    table = ctx.read_table("encode", "codes")
    bits = np.array(table["bits"].to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(from_binary(table["code_binary"].to_pylist()), bits)
    np.testing.assert_array_equal(from_dotdec(table["code_dotdec"].to_pylist()), bits)
    return bits, table["id"].to_numpy(), table["entity"].to_pylist()


def test_two_workers_survive_a_worker_failure(ray_session, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BINLLM_TEST_FAULT", f"{encode.FAULT_POINT}@4")
    cfg = RunConfig(run_name="two", output_root=str(tmp_path))
    cfg.encoder = EncoderConfig(**{**ENCODER.__dict__, "num_workers": 2, "max_failures": 1})
    run_stage(cfg, fake_samples_stage(seed=0))
    manifest = run_stage(cfg, ENCODE)
    metrics = manifest["metrics"]

    # The worker died once at the start of epoch 4; training went on from the last checkpoint
    # the controller had registered (the latest reports may still be in flight when it dies:
    # on a loaded machine epoch 0's was, at a fault at epoch 2, so it dies later here).
    assert len(metrics["resumed_at"]) == 1 and 1 <= metrics["resumed_at"][0] <= 4
    assert metrics["num_workers"] == 2
    assert metrics["codes"]["test"]["auc"] > 0.9
    assert metrics["continuous"]["test"]["auc"] > 0.9
    assert 0 <= metrics["best_epoch"] < metrics["epochs_run"] <= ENCODER.max_epochs
    assert set(metrics["codes"]["valid"]) == {
        "auc",
        "uauc",
        "warm_auc",
        "warm_uauc",
        "cold_auc",
        "cold_uauc",
    }
    checkpoints = tmp_path / "two" / "encode" / "checkpoints"
    assert len(list(checkpoints.glob(f"*/{encode.FAULT_MARKER}"))) == 1
    bits, ids, entity = read_codes(cfg)
    assert entity == ["user"] * USERS + ["item"] * ITEMS
    assert ids[:USERS].tolist() == list(range(1, USERS + 1))
    assert bits.shape == (USERS + ITEMS, ENCODER.dim)
    assert manifest["tables"]["codes"]["rows"] == USERS + ITEMS
    codes = tmp_path / "two" / "encode" / manifest["tables"]["codes"]["path"]
    schema = pq.read_schema(next(codes.glob("*.parquet")))
    bits_type = schema.field("bits").type
    assert pa.types.is_fixed_size_list(bits_type) and bits_type.list_size == ENCODER.dim
    assert bits_type.value_type == pa.uint8()


def test_crashed_run_resumes_and_matches_the_plain_loop(ray_session, tmp_path, monkeypatch):
    cfg = RunConfig(run_name="one", output_root=str(tmp_path))
    cfg.encoder = EncoderConfig(**{**ENCODER.__dict__, "num_workers": 1, "max_failures": 0})
    run_stage(cfg, fake_samples_stage(seed=3))

    monkeypatch.setenv("BINLLM_TEST_FAULT", f"{encode.FAULT_POINT}@3")
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's exit in its own error
        run_stage(cfg, ENCODE)
    assert not (tmp_path / "one" / "encode" / MANIFEST).exists()
    assert not list((tmp_path / "one" / "encode").glob("v-*"))  # the failed version is gone

    monkeypatch.delenv("BINLLM_TEST_FAULT")
    metrics = run_stage(cfg, ENCODE)["metrics"]
    assert len(metrics["resumed_at"]) == 1 and 1 <= metrics["resumed_at"][0] <= 3

    # The same seed in one process gives the same codes and the same metrics: a resumed Ray
    # run is the plain run.
    plain = fit(cfg.encoder, split_samples(planted_samples(seed=3)), USERS + 1, ITEMS + 1)
    users, items = plain.signs()
    bits, _, _ = read_codes(cfg)
    np.testing.assert_array_equal(bits[:USERS], (users[1:] > 0).astype(np.uint8))
    np.testing.assert_array_equal(bits[USERS:], (items[1:] > 0).astype(np.uint8))
    assert metrics["best_epoch"] == plain.best_epoch
    assert metrics["codes"]["test"] == pytest.approx(plain.best[BINARY]["test"], nan_ok=True)
    assert metrics["epochs_run"] == plain.epoch + 1


def test_an_implicit_objective_keeps_the_plain_loops_best_ndcg_epoch(ray_session, tmp_path):
    """The stage's workers draw the negatives around every train row (the ``seen`` dataset) and
    the run keeps the epoch of the best valid NDCG@10 of the lists: the plain loop's codes. The
    float model trains first here (``float_first``): the worker goes through both phases."""
    cfg = RunConfig(run_name="implicit", output_root=str(tmp_path))
    cfg.encoder = EncoderConfig(
        **{**ENCODER.__dict__, "objective": "implicit", "negatives": 4, "float_first": True}
    )
    run_stage(cfg, fake_samples_stage(seed=4))
    metrics = run_stage(cfg, ENCODE)["metrics"]
    assert metrics["objective"] == "implicit" and metrics["selected_by"] == "ndcg"
    assert 0 < metrics["codes"]["started_at_epoch"] < metrics["best_epoch"]
    plain = fit(cfg.encoder, split_samples(planted_samples(seed=4)), USERS + 1, ITEMS + 1)
    users, items = plain.signs()
    bits, _, _ = read_codes(cfg)
    np.testing.assert_array_equal(bits[:USERS], (users[1:] > 0).astype(np.uint8))
    np.testing.assert_array_equal(bits[USERS:], (items[1:] > 0).astype(np.uint8))
    assert metrics["best_epoch"] == plain.best_epoch
    history = [h.get("binary_valid_ndcg", -1.0) for h in plain.history]
    assert plain.best_epoch == history.index(max(history))
