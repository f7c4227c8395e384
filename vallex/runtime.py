"""Connecting to Ray: the same code runs on a laptop (a local cluster) and as a cluster job."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("vallex")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by ``ray job submit``), else start a local one.

    To run on an existing cluster from its head node, set ``RAY_ADDRESS=auto``.

    Worker output is not forwarded to the driver: vallex prints its own compact progress, and the
    frameworks' chatter stays in Ray's per-worker log files (``/tmp/ray/session_latest/logs``).
    """
    # Importing torch and starting Ray each take tens of seconds on a busy machine: say so before.
    address = os.environ.get("RAY_ADDRESS")
    if "torch" not in sys.modules:
        log.info("loading torch")
    # torch before joining a cluster: importing it after ray.init() in a `ray job submit` driver was
    # seen to abort with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (issue 8 notes).
    import ray
    import torch  # noqa: F401
    from ray.data import DataContext

    if not ray.is_initialized():
        if address:
            log.info("joining the Ray cluster at %s", address)
        else:
            log.info("starting a local Ray cluster")
        kwargs = {"log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": always a fresh cluster of this machine, never a stray `ray start` one by accident
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        res = ray.cluster_resources()
        log.info(
            "Ray %s: %d CPU, %d GPU across %d node(s)",
            "cluster " + address if address else "local cluster",
            res.get("CPU", 0),
            res.get("GPU", 0),
            len([n for n in ray.nodes() if n["Alive"]]),
        )
    from vallex.logs import route_framework_logs

    route_framework_logs()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # vallex shows its own bars
    ctx.print_on_execution_start = False
