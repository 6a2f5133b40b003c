"""A finished fake run (ingest, samples, encode) for scoring and recommending tests, no training
needed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from binllm_core.config import RunConfig, load_config
from binllm_core.storage import Publication, resolve

N_USERS, N_ITEMS = 8, 12


def publish_stage(
    run: Path, stage: str, tables: dict[str, pa.Table], metrics: dict | None = None
) -> None:
    """Publish ``tables`` as the finished output of ``stage`` (the real publish, fake content)."""
    fs, target = resolve(str(run / stage))
    publication = Publication.begin(fs, target, f"stage:{stage}")
    for name, table in tables.items():
        publication.write_table(table, name)
    publication.publish({"stage": stage, "config_hash": f"fake-{stage}", "metrics": metrics or {}})


def fake_run(tmp_path: Path, *overrides: str) -> RunConfig:
    """Config of run ``f`` under ``tmp_path``: tiny backbone, no adapters (bare backbone)."""
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"output_root={tmp_path}",
            "run_name=f",
            "score.adapters={text: none, binary: none}",
            *overrides,
        ],
    )
    run = tmp_path / "f"
    users = [f"u{i}" for i in range(1, N_USERS + 1)]
    items = [f"i{i}" for i in range(1, N_ITEMS + 1)]
    publish_stage(
        run, "ingest", {"items": pa.table({"item": items, "title": [f"Film {i}" for i in items]})}
    )
    rows = [
        {
            "sample_id": k,
            "uid": 1 + k % N_USERS,
            "iid": 1 + (k * 5) % N_ITEMS,
            "label": k % 3 != 0,
            "timestamp": 1000 + k,
            "split": "train" if k < 44 else "valid" if k < 52 else "test",
        }
        for k in range(60)
    ]
    samples = pa.Table.from_pylist(rows).cast(
        pa.schema(
            [
                ("sample_id", pa.int64()),
                ("uid", pa.int32()),
                ("iid", pa.int32()),
                ("label", pa.int8()),
                ("timestamp", pa.int64()),
                ("split", pa.string()),
            ]
        )
    )
    publish_stage(
        run,
        "samples",
        {
            "samples": samples,
            "user_map": pa.table(
                {"user": users, "uid": pa.array(range(1, N_USERS + 1), pa.int32())}
            ),
            "item_map": pa.table(
                {"item": items, "iid": pa.array(range(1, N_ITEMS + 1), pa.int32())}
            ),
        },
    )
    # The last user and item have no code (the encoder never saw them).
    code_users, code_items = list(range(1, N_USERS)), list(range(1, N_ITEMS))
    entity = ["user"] * len(code_users) + ["item"] * len(code_items)
    ids = pa.array(code_users + code_items, pa.int32())
    bits = [[int(b) for b in f"{i * 37 % 256:08b}"] for i in code_users + code_items]
    relaxed = [[(2 * b - 1) * (0.5 + 0.05 * i) for i, b in enumerate(row)] for row in bits]
    vector = pa.list_(pa.float32(), 8)
    publish_stage(
        run,
        "encode",
        {
            "codes": pa.table(
                {"entity": entity, "id": ids, "bits": pa.array(bits, pa.list_(pa.uint8(), 8))}
            ),
            "embeddings": pa.table(
                {
                    "entity": entity,
                    "id": ids,
                    "relaxed": pa.array(relaxed, vector),
                    "float": pa.array(relaxed, vector),
                }
            ),
        },
    )
    return cfg


def candidates(path: Path, n: int = 40) -> Path:
    users = [f"u{1 + k % (N_USERS + 1)}" for k in range(n)]  # u9 is unknown
    items = [f"i{1 + (k * 7) % N_ITEMS}" for k in range(n)]
    pq.write_table(pa.table({"user": users, "item": items}), path)
    return path
