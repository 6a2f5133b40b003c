"""What tests build: fake finished stages and runs (the real publish, fake content), planted
samples, prompts, configs, ports and S3 options. Test modules import these from here, never
from each other."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from binllm_core.codes import embeddings_table
from binllm_core.config import PromptConfig, RunConfig, load_config
from binllm_core.prompts.render import prompt_of
from binllm_core.prompts.templates import templates_from_config
from binllm_core.storage import Publication, read_output, resolve
from pipelines.runtime.registry import STAGES
from pipelines.runtime.stage import Stage, StageContext, run_stage

TEMPLATES = templates_from_config(PromptConfig())


UPSTREAM_ITEMS, UPSTREAM_USERS, TRAIN_ITEMS = 60, 20, 40
SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("timestamp", pa.int64()),
        ("split", pa.string()),
        ("valid_small", pa.bool_()),
        ("history", pa.list_(pa.int32())),
        ("not_cold", pa.bool_()),
        ("warm", pa.bool_()),
    ]
)


def item_code(iid: int) -> str:
    return format((iid * 37 + 11) % 256, "08b")


def user_code(uid: int) -> str:
    return format((uid * 53 + 7) % 256, "08b")


def embeddings(codes: pa.Table) -> pa.Table:
    """The ``embeddings`` of the fake codes: ``relaxed`` = 0.9 x the signs (what the codes are
    the signs of), ``float`` = the signs plus a small seeded noise."""
    users = np.zeros((UPSTREAM_USERS + 1, len(user_code(1))), np.float32)
    items = np.zeros((UPSTREAM_ITEMS + 1, len(item_code(1))), np.float32)
    columns = (codes[c].to_pylist() for c in ("entity", "id", "bits"))
    for entity, i, bits in zip(*columns, strict=True):
        (users if entity == "user" else items)[i] = 2.0 * np.asarray(bits, np.float32) - 1.0
    rng = np.random.default_rng(0)
    noisy = tuple(v + 0.1 * rng.standard_normal(v.shape, np.float32) for v in (users, items))
    vectors = {"relaxed": (0.9 * users, 0.9 * items), "float": noisy}
    return embeddings_table(vectors)



def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "x", "secret": "x"}



def lineage() -> dict:
    return {
        "model": "tiny",
        "adapter": "none",
        "adapter_hash": "none",
        "run_name": "t",
        "scored_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    }


SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("split", pa.string()),
        ("valid_small", pa.bool_()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("label", pa.int8()),
        ("not_cold", pa.bool_()),
        ("warm", pa.bool_()),
        ("history", pa.list_(pa.int32())),
    ]
)



def make_cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    sets = [f"output_root={tmp_path}", "run_name=t", *overrides]
    return load_config("configs/tiny.yaml", sets)


def fake_upstream(cfg: RunConfig, n_samples: int = 600, drop_user_code: int = 0) -> None:
    """Finished ingest/samples/encode outputs of a task whose label is the first bit of the
    target item's code; valid items never occur in train, so only the code tells the label.
    Sample 0 is pinned: uid 1, iid 2, history [3, 1]."""
    rng = random.Random(0)
    rows = []
    for sample_id in range(n_samples):
        iid, uid = rng.randint(1, UPSTREAM_ITEMS), rng.randint(1, UPSTREAM_USERS)
        history = [rng.randint(1, UPSTREAM_ITEMS) for _ in range(rng.randint(0, 3))]
        if sample_id == 0:
            iid, uid, history = 2, 1, [3, 1]
        train = iid <= TRAIN_ITEMS
        rows.append(
            dict(
                sample_id=sample_id,
                uid=uid,
                iid=iid,
                label=int(item_code(iid)[0]),
                timestamp=sample_id,
                split="train" if train else "valid",
                valid_small=not train,
                history=history,
                not_cold=True,
                warm=train,
            )
        )
    samples = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    iids = pa.array(range(1, UPSTREAM_ITEMS + 1), pa.int32())
    items = pa.table(
        {
            "item": [f"m{i}" for i in range(1, UPSTREAM_ITEMS + 1)],
            "title": [f"Title {i}" for i in range(1, UPSTREAM_ITEMS + 1)],
        }
    )
    item_map = pa.table({"item": items["item"], "iid": iids})
    uids = pa.array(range(1, UPSTREAM_USERS + 1), pa.int32())
    user_map = pa.table({"user": [f"u{u}" for u in uids.to_pylist()], "uid": uids})
    users = [u for u in range(1, UPSTREAM_USERS + 1) if u != drop_user_code]
    codes = pa.table(
        {
            "entity": ["user"] * len(users) + ["item"] * UPSTREAM_ITEMS,
            "id": pa.array(users + list(range(1, UPSTREAM_ITEMS + 1)), pa.int32()),
            "bits": pa.array(
                [[int(b) for b in user_code(u)] for u in users]
                + [[int(b) for b in item_code(i)] for i in iids.to_pylist()],
                pa.list_(pa.uint8(), len(user_code(1))),
            ),
        }
    )

    def writer(tables: dict[str, pa.Table]):
        def fn(ctx: StageContext) -> dict:
            for name, table in tables.items():
                ctx.write_table(table, name)
            return {}

        return fn

    run_stage(cfg, Stage("ingest", writer({"items": items}), ("data",)))
    tables = {"samples": samples, "user_map": user_map, "item_map": item_map}
    run_stage(cfg, Stage("samples", writer(tables), ("protocol",)))
    run_stage(
        cfg,
        Stage("encode", writer({"codes": codes, "embeddings": embeddings(codes)}), ("encoder",)),
        force=True,
    )


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def read_prompts(tmp_path: Path) -> pa.Table:
    return read_output(str(tmp_path / "t" / "render"), "prompts")



def user_prompts(seed: int = 0, users: int = 6, mode: str = "binary") -> list[str]:
    """Prompts of several users, each with one to six items, one user with two histories, and
    the users' rows shuffled together."""
    rng = np.random.default_rng(seed)
    out = []
    for user in range(users):
        histories = 2 if user == 0 else 1
        code = "".join(rng.choice(list("01"), 16))
        for _ in range(histories):
            titles = [f'"movie {rng.integers(100)} ({1950 + rng.integers(50)})"' for _ in range(3)]
            history = ", ".join(titles[: rng.integers(0, 4)]) or "none"
            for _ in range(rng.integers(1, 7)):
                item_code = "".join(rng.choice(list("01"), 16))
                target = f"book {rng.integers(500)} of {rng.integers(9)}"
                codes = None if mode == "text" else (code, item_code)
                out.append(prompt_of(TEMPLATES, mode, history, target, codes))
    rng.shuffle(out)
    return out



def planted_samples(
    users: int = 100, items: int = 60, groups: int = 4, per_user: int = 40, seed: int = 0
) -> pa.Table:
    """A ``samples`` table where a user likes exactly the items of its own group (2% noise).

    Rows are split at random 80/10/10; the last 2 users appear only in valid/test (cold rows).
    ``user_num = users + 1`` and ``item_num = items + 1`` (ids are 1-based).
    """
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, groups, users + 1)
    item_group = rng.integers(0, groups, items + 1)
    rows = []
    for u in range(1, users + 1):
        for i in rng.choice(np.arange(1, items + 1), per_user, replace=False):
            label = int(user_group[u] == item_group[i]) ^ int(rng.random() < 0.02)
            split = rng.choice(["train", "valid", "test"], p=[0.8, 0.1, 0.1])
            if u > users - 2:
                split = "valid" if rng.random() < 0.5 else "test"
            rows.append((u, int(i), label, str(split)))
    uid, iid, label, split = (np.array(c) for c in zip(*rows, strict=True))
    train = split == "train"
    user_count = np.bincount(uid[train], minlength=users + 1)
    item_count = np.bincount(iid[train], minlength=items + 1)
    n = len(uid)
    return pa.table(
        {
            "sample_id": pa.array(np.arange(n), pa.int64()),
            "uid": pa.array(uid, pa.int32()),
            "iid": pa.array(iid, pa.int32()),
            "label": pa.array(label, pa.int8()),
            "timestamp": pa.array(np.arange(n) * 60, pa.int64()),
            "split": pa.array(split, pa.string()),
            "valid_small": pa.array((split == "valid") & (np.arange(n) % 2 == 0)),
            "history": pa.array([[0]] * n, pa.list_(pa.int32())),
            "not_cold": pa.array((user_count[uid] > 0) & (item_count[iid] > 0)),
            "warm": pa.array((user_count[uid] > 3) & (item_count[iid] > 3)),
        }
    )


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
    samples = pa.Table.from_pylist(rows).cast(pa.schema(list(SAMPLES_SCHEMA)[:6]))
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
