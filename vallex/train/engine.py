"""DeepSpeed around the model: config from ``TrainSection``, initialization, checkpoint save/load.

The only CPU/GPU difference is the device and the communication backend, both decided by
``train.use_gpu``: NCCL + CUDA on GPUs, gloo + CPU otherwise (Ray Train creates the process group).
"""

from __future__ import annotations

import math
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


def initialize(model: torch.nn.Module, train: TrainSection):
    """Wrap ``model`` in a DeepSpeed engine (process group already created by Ray Train)."""
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
