"""DeepSpeed around the model: config from ``TrainSection``, initialization, checkpoint save/load.

The only CPU/GPU difference is the device and the communication backend, both decided by
``train.use_gpu``: NCCL + CUDA on GPUs, gloo + CPU otherwise (Ray Train creates the process group).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import Any

import torch

from vallex.config import TrainSection


def deepspeed_config(train: TrainSection) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run, derived from the train section."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": {"stage": train.zero_stage},
        # We hand DeepSpeed a plain torch AdamW: DeepSpeed's own fused/CPU Adam need compiled ops.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,  # vallex logs progress itself
        "wall_clock_breakdown": False,
    }
    if train.grad_clip > 0:
        cfg["gradient_clipping"] = train.grad_clip
    if train.offload != "none":
        # Pinned host buffers speed up GPU<->host copies; on a CPU run there is nothing to pin for.
        host = {"device": "cpu", "pin_memory": train.use_gpu}
        cfg["zero_optimization"]["offload_optimizer"] = dict(host)
        if train.offload == "all":
            cfg["zero_optimization"]["offload_param"] = dict(host)
        # Keep the torch AdamW above: DeepSpeedCPUAdam is faster but a compiled op.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def lr_lambda(train: TrainSection):
    """Linear warmup to 1, then cosine decay to 0.1 at max_steps (multiplies train.lr)."""
    warmup = min(train.warmup_steps, train.max_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, train.max_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def device_for(train: TrainSection) -> torch.device:
    if train.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


@contextlib.contextmanager
def _lean_deepspeed_start():
    """Keep two imports that vallex never uses out of a worker's start (seconds per process).

    - ``import deepspeed`` imports its autotuner, which imports mlflow whenever it is installed (it is:
      ``train.tracking``); mlflow is hidden from that one import (the autotuner then runs without it),
      unless this process already loaded it for tracking.
    - With ZeRO on, ``deepspeed.initialize`` imports its Muon optimizer to list it, and that module
      compiles kernels with ``torch.compile`` as it is imported, which loads TorchInductor. Dynamo is
      switched off (``TORCHDYNAMO_DISABLE``) for the call: those kernels stay plain Python functions.
      vallex compiles nothing, and the variable is put back as it was afterwards.
    """
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is set
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
        if before is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def initialize(model: torch.nn.Module, train: TrainSection):
    """Wrap ``model`` in a DeepSpeed engine (process group already created by Ray Train)."""
    with _lean_deepspeed_start():
        return _initialize(model, train)


def _initialize(model: torch.nn.Module, train: TrainSection):
    import deepspeed

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norms, biases and embeddings' scalars are not decayed (standard transformer practice).
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler


# ------------------------------------------------------------------------------ loading checkpoints
#
# DeepSpeed 0.19.8 reads every checkpoint file with ``torch.load(weights_only=False)``: a file planted in
# the checkpoint storage (a shared bucket, NFS) would run its pickled code on every worker at resume.
# vallex reads them weights-only instead: tensors, plain containers and the few DeepSpeed types its
# ZeRO 0-3 checkpoints hold (listed from real checkpoints of each stage: ``get_unsafe_globals_in_checkpoint``).
# None of them runs code when unpickled: a dataclass, an enum and a plain attribute holder.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something a weights-only load refuses (possibly pickled code)."""


def _allowed_globals() -> list:
    import importlib

    out = []
    for name in CHECKPOINT_GLOBALS:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


def unsafe_globals(path) -> list[str]:
    """What in ``path`` a weights-only load would refuse, read from its pickle without running it."""
    import torch.serialization as ts

    try:
        found = ts.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 -- not a torch zip file: nothing vallex would load from it
        return [f"<not a torch checkpoint: {type(e).__name__}: {e}>"]
    return sorted(set(found) - set(CHECKPOINT_GLOBALS))


def check_checkpoint_files(ckpt_dir) -> None:
    """Refuse a checkpoint with any ``.pt`` file holding more than tensors and the allowed types,
    naming the file, before DeepSpeed (or vallex) loads anything from it."""
    from pathlib import Path

    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        bad = unsafe_globals(path)
        if bad:
            raise UnsafeCheckpointError(
                f"refusing to resume: checkpoint file {path} holds {', '.join(bad[:5])}, which a "
                "weights-only load does not allow (only tensors, plain containers and "
                f"{', '.join(CHECKPOINT_GLOBALS)}); it may hold pickled code. Was it written by vallex? "
                "Delete that checkpoint (or the run's storage) to start over"
            )


def load_weights_only(path, map_location=None):
    """``torch.load`` of a DeepSpeed checkpoint file that cannot run code (see CHECKPOINT_GLOBALS)."""
    import pickle

    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {path}: {lines[0] if lines else e} (it may hold pickled code)"
            ) from None


def use_weights_only_loads(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_weights_only` (its model,
    optimizer and ZeRO partition files all go through ``engine.checkpoint_engine.load``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # another engine (Nebula, decoupled): not reviewed
        raise UnsafeCheckpointError(
            f"DeepSpeed checkpoint engine {type(current).__name__}: vallex loads checkpoints only through "
            "TorchCheckpointEngine, with weights-only loads"
        )
    cls = _weights_only_engine_class()
    safe = cls.__new__(cls)
    safe.__dict__.update(current.__dict__)  # same settings for saving
    engine.checkpoint_engine = safe


@functools.cache
def _weights_only_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class _WeightsOnly(TorchCheckpointEngine):
        """DeepSpeed's TorchCheckpointEngine with weights-only loads."""

        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    return _WeightsOnly
