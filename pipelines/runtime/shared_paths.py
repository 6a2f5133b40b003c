"""Local paths on a cluster: proved shared by every node, or refused in one line.

A Ray task, actor or Ray Train worker may run on another node, with its own disk. A local path
(``output_root``, ``data.uri``, ``model.backbone``, an adapter folder, ``--output``) is only safe
there when every node sees the same files at it: a shared mount. URIs (``s3://``, ``gs://``,
``https://``) need no proof. On a cluster whose tasks can run off the driver's node, the driver
proves each local path before any stage runs:

- a path the run *writes* (an output folder): the driver writes a marker file with a random
  token under it, and a task on every other alive node must read that token back there;
- a path the run *reads*: a task on every other node must find the same files (names and
  sizes) at it.

A cluster whose only node is the driver's (and has CPUs) needs no proof. A driver node with no
CPUs (``cluster.yaml``'s head) and no other node up yet: one task that needs a CPU is sent out,
which makes an autoscaler start a worker, and the proof runs there. Paths read only on the driver
(``--input``, ``--candidates``, ``--users``) may stay driver-local.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from binllm_core.config import RunConfig, is_local_path
from binllm_core.errors import StageError

MARKER = ".binllm-shared-"
"""Prefix of the marker file written under an output folder while it is proved shared."""
PROOF_TIMEOUT_S = float(os.environ.get("BINLLM_SHARED_PROOF_TIMEOUT_S", "600"))
"""How long to wait for a node to run the proof (an autoscaler may have to start one)."""
LISTED = 2000
"""At most this many files of a folder are compared (names and sizes)."""


@dataclass(frozen=True)
class LocalPath:
    """A local path a run uses, with the config key or flag that gave it."""

    key: str
    path: str
    writes: bool = False


def run_paths(
    cfg: RunConfig, readers: Iterable[Callable[[RunConfig], list[LocalPath]]]
) -> list[LocalPath]:
    """The local paths a run writes (``output_root``) and those ``readers`` (each stage's
    :attr:`~pipelines.runtime.stage.Stage.paths`) read, once each."""
    found = {"output_root": LocalPath("output_root", cfg.output_root, writes=True)}
    for paths in readers:
        found.update((p.key, p) for p in paths(cfg))
    return [p for p in found.values() if _on_disk(p.path)]


def _on_disk(value: str) -> bool:
    """A local file-system path (not a URI, a hub id or ``tiny``): absolute by now."""
    return bool(value) and is_local_path(value) and os.path.isabs(value.removeprefix("file://"))


def check_shared(paths: list[LocalPath]) -> None:
    """Prove every path in ``paths`` is the same on every node tasks can run on, or refuse the
    first that is not in one line (what, on which node, and what to do)."""
    paths = [p for p in paths if _on_disk(p.path)]
    if not paths:
        return
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    others = [n for n in alive if n["NodeID"] != here]
    this_node = [n for n in alive if n["NodeID"] == here]
    if not others and this_node and this_node[0].get("Resources", {}).get("CPU", 0) > 0:
        return  # one node: every task shares this disk
    token = uuid.uuid4().hex
    markers = [_write_marker(p, token) for p in paths if p.writes]
    try:
        expected = [_fingerprint(p.path, p.writes, token) for p in paths]
        args = ([p.path for p in paths], [p.writes for p in paths], token)
        proofs = [
            _proof.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(*args)
            for n in others
        ]
        if not others:  # a head without CPUs, nothing else up yet: let the autoscaler start one
            proofs = [_proof.options(num_cpus=1).remote(*args)]
        ready, _ = ray.wait(proofs, num_returns=len(proofs), timeout=PROOF_TIMEOUT_S)
        if len(ready) < len(proofs):
            raise StageError(
                f"cannot prove that {paths[0].key} {paths[0].path} is shared: no node ran the "
                f"check within {PROOF_TIMEOUT_S:.0f} s",
                todo="use s3:// (or another object store) or a mount shared by every node; "
                "check that the cluster has worker nodes",
            )
        for host, seen in ray.get(proofs):
            for p, want, got in zip(paths, expected, seen, strict=True):
                if got != want:
                    raise StageError(
                        f"{p.key} {p.path} is a local path that node {host} does not see as "
                        f"{socket.gethostname()} does ({_what(p, got)})",
                        todo="use an s3:// (or other object store) URI, or a folder on a mount "
                        "shared by every node of the cluster",
                    )
    finally:
        for marker in markers:
            try:
                os.remove(marker)
            except OSError:
                pass


def _what(path: LocalPath, got: Any) -> str:
    if got is None:
        return "it is not there"
    if path.writes:
        return "a file written there here is not there"
    return "other files are there"


def _write_marker(path: LocalPath, token: str) -> str:
    folder = path.path.removeprefix("file://")
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, MARKER + token)
    with open(marker, "w") as fh:
        fh.write(token)
    return marker


def _fingerprint(path: str, writes: bool, token: str) -> Any:
    """What a node sees at ``path``: the marker's token for an output folder; the names and
    sizes of the files for an input (None when nothing is there)."""
    path = path.removeprefix("file://")
    if writes:
        try:
            with open(os.path.join(path, MARKER + token)) as fh:
                return fh.read()
        except OSError:
            return None
    if os.path.isfile(path):
        return [["", os.path.getsize(path)]]
    if not os.path.isdir(path):
        return None
    files = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            files.append([os.path.relpath(full, path), os.path.getsize(full)])
            if len(files) >= LISTED:
                return files
    return files


@ray.remote(num_cpus=0, max_retries=0)
def _proof(paths: list[str], writes: list[bool], token: str) -> tuple[str, list[Any]]:
    return socket.gethostname(), [
        _fingerprint(p, w, token) for p, w in zip(paths, writes, strict=True)
    ]
