"""DeepSpeed's CPU communication op: built ahead, and said out loud when it has to be built at run time.

On CPU, DeepSpeed's ``TorchBackend`` JIT-compiles ``deepspeed_shm_comm`` (two C++ files, with gcc) the first
time a process of an environment sets up distributed training, and caches it in torch's extension folder
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/<py>_<cuda>/deepspeed_shm_comm/``). That takes
1-6 minutes on a small or busy machine, inside the Ray Train workers, whose output vallex does not show:
the first run of a new environment looked hung. So:

- ``make venv`` and ``cluster/docker/Dockerfile`` build it ahead: ``python -m vallex.train.comm_op``;
- a training run checks the cache on the driver first (cheaply, without importing DeepSpeed) and, when
  the op is missing or stale, says so and builds it there, with a heartbeat, before any worker starts
  (the workers of this machine then load it in a second).

The cache check reads torch's ``build.ninja``: ninja rebuilds when the command line it records changes,
e.g. when the same environment is reached through another path (a symlinked ``.venv``), so a cached
``.so`` alone does not mean "no build".
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("vallex.train")

OP_NAME = "deepspeed_shm_comm"
# The op's sources inside the deepspeed package (deepspeed/ops/op_builder/cpu/comm.py:ShareMemCommBuilder);
# only used by the cheap check: if DeepSpeed changes them, the check says "not cached" and the real
# builder decides (a no-op build when it is up to date).
_SOURCES = ("ops/csrc/cpu/comm/shm_interface.cpp", "ops/csrc/cpu/comm/shm.cpp")
HEARTBEAT_S = 30.0
# torch's JIT build holds <build dir>/lock while it compiles, and a process that finds it waits for it to
# go away, without a timeout: a build killed mid-way (seen here: an OOM kill) leaves it behind for good.
STALE_LOCK_S = 600.0


def op_needed() -> bool:
    """Whether DeepSpeed would pick its CPU accelerator here (Linux, no CUDA device, DS_ACCELERATOR unset
    or cpu), the only case that builds the op."""
    import torch

    accel = os.environ.get("DS_ACCELERATOR", "")
    return sys.platform == "linux" and accel in ("", "cpu") and not torch.cuda.is_available()


def build_dir() -> Path | None:
    """torch's build folder of the op (it is where ``torch.utils.cpp_extension.load`` builds and caches)."""
    # Importing torch's cpp_extension warns "No CUDA runtime is found" on CPU machines, through torch's own
    # console handler: not a line for the user's terminal.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(OP_NAME, verbose=False))
    except Exception:  # a private torch helper: if it moves, say "not cached" and let DeepSpeed decide
        return None
    finally:
        quiet.setLevel(level)


def is_cached() -> bool:
    """The op's library is in torch's cache, built from this environment's DeepSpeed sources (so ninja
    will not rebuild it)."""
    spec = importlib.util.find_spec("deepspeed")
    folder = build_dir()
    if spec is None or spec.origin is None or folder is None:
        return False
    ninja = folder / "build.ninja"
    if not (folder / f"{OP_NAME}.so").is_file() or not ninja.is_file():
        return False
    package = Path(spec.origin).parent
    recorded = ninja.read_text(errors="replace")
    return all(str(package / src) in recorded for src in _SOURCES)


def build(heartbeat_s: float = HEARTBEAT_S) -> float | None:
    """Build (or load) the op with DeepSpeed's own builder, logging every ``heartbeat_s`` seconds while it
    compiles. Returns the seconds it took, or None when this DeepSpeed/accelerator has no such op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    done = threading.Event()
    t0 = time.time()

    lock = (build_dir() or Path("/nonexistent")) / "lock"

    def beat():
        while not done.wait(heartbeat_s):
            waited = time.time() - t0
            log.info("still building DeepSpeed's CPU communication op (%.0f s so far)", waited)
            if waited > STALE_LOCK_S and lock.exists():
                log.warning(
                    "torch's build lock %s is still there after %.0f s: if no gcc/ninja is running, an "
                    "earlier build was killed and left it; delete it and run again",
                    lock,
                    waited,
                )

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        builder.load(verbose=False)
    finally:
        done.set()
        thread.join(timeout=1)
    return time.time() - t0


def ensure_built() -> None:
    """Before training on CPU: build the op on the driver when the cache lacks it, saying what happens."""
    if not op_needed() or is_cached():
        return
    where = build_dir()
    log.info(
        "building DeepSpeed's CPU communication op (%s) with gcc, once per environment (~1-6 min; "
        "`make venv` and the cluster image build it ahead) into %s",
        OP_NAME,
        where or "torch's extension cache",
    )
    if where is not None and (where / "lock").exists():
        age = time.time() - (where / "lock").stat().st_mtime
        log.info(
            "another process holds torch's build lock %s (for %.0f s): waiting for it; if no build is "
            "running, a killed one left it: delete it",
            where / "lock",
            age,
        )
    try:
        took = build()
    except Exception as e:  # noqa: BLE001 -- building ahead is a courtesy: DeepSpeed builds it when needed
        log.warning(
            "could not build DeepSpeed's CPU communication op ahead (%s: %s); DeepSpeed will build it "
            "when it first needs it (minutes, once per environment)",
            type(e).__name__,
            e,
        )
        return
    if took is not None:
        log.info("DeepSpeed's CPU communication op is ready (%.0f s); training starts", took)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not op_needed():
        print(f"{OP_NAME}: not used here (DeepSpeed runs on a GPU accelerator); nothing to build")
        return 0
    if is_cached():
        print(f"{OP_NAME}: already built in {build_dir()}")
        return 0
    print(f"building DeepSpeed's CPU communication op ({OP_NAME}) with gcc, once per environment (~1-6 min)")
    try:
        took = build()
    except Exception as e:  # noqa: BLE001 -- never fail the environment's set-up: DeepSpeed builds it at first use
        print(
            f"{OP_NAME}: could not build it ahead ({type(e).__name__}: {e}); DeepSpeed will build it at first use"
        )
        return 0
    if took is None:
        print(f"{OP_NAME}: this DeepSpeed has no compatible CPU communication op; nothing to build")
    else:
        print(f"{OP_NAME}: built in {took:.0f} s into {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
