"""Where a run's files live, checked before training starts.

Ray Train writes checkpoints and results to ``train.storage_path`` from *every* worker node, and Ray
Data's read tasks open the prepared shards (``run.prepared_dir``, default ``<run.output_dir>/prepare``)
on whichever node they land. On one node any local folder works. On several nodes both must be
storage every node sees:

- cloud storage (``s3://bucket/path``, ``gs://bucket/path``), with credentials on every node (the
  ``AWS_*`` environment variables, an instance profile, a GCP service account), or
- a shared filesystem (NFS, EFS, Filestore, Lustre...) mounted at the same path on every node.

Instead of trusting a flag, vallex *checks* it: the driver writes a marker file into the folder and
a zero-CPU task pinned to each live node looks for it. A node that cannot see the marker fails the
run at once with a message naming the node and the fix, rather than minutes later (a checkpoint
that never reaches the driver, or a read task that finds no shard). Several Ray nodes on one
machine pass, as they should: they share its disk.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from vallex.files import is_uri

log = logging.getLogger("vallex.storage")

CLOUD_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


class StorageError(ValueError):
    """A run's storage cannot work on this cluster."""


def uri_problem(path: str) -> str | None:
    """What is wrong with a storage URI (None if nothing): its scheme must be one pyarrow's
    filesystems know (cloud or HDFS)."""
    scheme = path.split("://", 1)[0].lower()
    if scheme not in CLOUD_SCHEMES:
        return (
            f"unsupported scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in CLOUD_SCHEMES)} or a path on a filesystem every node mounts"
        )
    return None


def check_uri(path: str, key: str = "train.storage_path") -> None:
    problem = uri_problem(path)
    if problem:
        raise StorageError(f"{key}={path!r}: {problem}")


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def nodes_missing(folder: str | os.PathLike, nodes: list[dict], timeout_s: float = 30.0) -> list[str]:
    """Write a marker into ``folder`` and return the nodes (id and IP) that cannot read it back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".vallex-shared-check-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    marker.write_text(token)
    try:

        @ray.remote(num_cpus=0, max_retries=0)
        def sees(path: str, expected: str) -> bool:
            # A few tries: some network filesystems show a new file to other clients a moment later.
            for _ in range(5):
                try:
                    if Path(path).read_text() == expected:
                        return True
                except OSError:
                    pass
                time.sleep(0.2)
            return False

        refs = {
            f"{n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')})": sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), token)
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        return [name for name, ref in refs.items() if ref not in done or not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)


def check_shared(folder: str | os.PathLike, key: str, nodes: list[dict] | None = None) -> None:
    """Fail with a clear message if some live node of the cluster cannot see ``folder``."""
    nodes = _alive_nodes() if nodes is None else nodes
    if len(nodes) <= 1:
        return
    missing = nodes_missing(folder, nodes)
    if missing:
        raise StorageError(
            f"{key}={str(folder)!r} is a local folder, but this cluster has {len(nodes)} nodes and "
            f"{len(missing)} of them cannot see files written there: {', '.join(missing)}. "
            "Training on several nodes needs storage every node shares: set train.storage_path to "
            "s3://bucket/path or gs://bucket/path, or mount a shared filesystem (NFS, EFS, Filestore) "
            "at the same path on every node (see docs/CLUSTER.md)"
        )


def check_storage(cfg) -> None:
    """The early storage check of a training run (``cfg`` is a :class:`vallex.config.Config`).

    ``train.storage_path`` and the prepared corpus (``run.prepared_dir``, default
    ``<run.output_dir>/prepare``): a URI must have a known scheme; a local path must be visible from
    every live node when there are several.
    """
    nodes = _alive_nodes()
    storage = cfg.storage_path
    if is_uri(storage):
        check_uri(storage)
    else:
        check_shared(storage, "train.storage_path", nodes)
    prepared = cfg.prepared_dir
    key = "run.prepared_dir" if cfg.run.prepared_dir else "run.output_dir (its prepare/ shards)"
    if is_uri(prepared):
        check_uri(prepared, key)
    elif Path(prepared).exists():
        check_shared(Path(prepared).resolve(), key, nodes)
    if len(nodes) == 1 and not is_uri(storage) and os.environ.get("RAY_ADDRESS"):
        log.info(
            "storage %s is local: fine on this one-node cluster; nodes that join later (autoscaling) "
            "must mount it too, or use s3:// / gs://",
            storage,
        )
