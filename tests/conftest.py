"""Shared fixtures. One local Ray cluster serves the whole test session (start-up costs seconds)."""

from __future__ import annotations

import os
import sys

import pytest

# Fast failure detection and quiet Train V2 on a 2-core machine (see shared STACK.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train V2 starts a PreemptionWatcher actor (a process) per worker group to notice node drains on
# spot clusters; no test drains a node, and on 2 cores each process start costs seconds.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(items):
    """Every test that asks for the shared cluster is a ``ray`` test (``make test-fast`` leaves them
    out); tests that start Ray another way carry ``@pytest.mark.ray`` themselves."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    # test_s3.py needs a Ray cluster of its own (its workers must inherit the S3 variables): it runs
    # first, before the session's cluster exists, so that cluster is not stopped and started again.
    items.sort(key=lambda item: item.path.name != "test_s3.py")


@pytest.fixture(autouse=True)
def _ray_tests_carry_the_ray_marker(request):
    """A test without the ``ray`` marker that leaves Ray running in this process fails, naming the
    marker: ``make test-fast`` (``-m "not ray"``) must never start Ray."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if (
        request.node.get_closest_marker("ray") is None
        and not before
        and ray is not None
        and ray.is_initialized()
    ):
        pytest.fail(
            f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray (or use the ray_cluster fixture)"
        )


def start_local_ray() -> None:
    """Start a local Ray cluster with 4 logical CPUs in this process. Its processes inherit the
    environment as it is now (test_s3.py starts its own for that reason)."""
    import ray

    # address="local": a private cluster even if a test (or a person) started one with `ray start`
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 4 logical CPUs, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads cost 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_worker_pids() -> list[int]:
    """PIDs of this test session's Ray Train worker processes (children of our own raylet)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids
