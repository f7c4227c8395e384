"""Training throughput and memory: Ray Train + DeepSpeed against a plain PyTorch loop, in one command.

    .venv/bin/python bench/train.py                 # defaults: d_model 256, 4 layers, 30 timed steps
    .venv/bin/python bench/train.py --steps 50 --d-model 128

Prints, on the same model and the same batches:
  1. samples/s of a plain PyTorch AdamW loop (the baseline, in this process);
  2. samples/s of 1 Ray Train worker running DeepSpeed ZeRO-2 (ratio to 1; goal >= 0.9x);
  3. where the difference goes: DeepSpeed ZeRO-2 in this process (no Ray), and the plain loop inside
     1 Ray Train worker (no DeepSpeed);
  4. samples/s of 2 workers vs 1 (each worker gets half the cores);
  5. per-worker parameter elements held under ZeRO-3 vs ZeRO-0 with 2 workers (goal: ~1/2).
Start-up (process group, DeepSpeed init, first steps) is excluded: each loop times only its last
``--steps`` steps after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vallex.config import load_config

BATCH, FRAMES, PHONEMES, LANGS, SYMBOLS = 8, 225, 40, 4, 128


def make_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed random batches shaped like 3 s utterances (225 frames x 8 codebooks, 40 phonemes)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "phonemes": torch.randint(4, SYMBOLS, (BATCH, PHONEMES), generator=g),
            "phoneme_lens": torch.full((BATCH,), PHONEMES),
            "codes": torch.randint(0, 1024, (BATCH, FRAMES, 8), generator=g),
            "code_lens": torch.full((BATCH,), FRAMES),
            "language": torch.randint(0, LANGS, (BATCH,), generator=g),
        }
        for _ in range(n)
    ]


def build(args):
    from vallex.model.vallex import build_model

    torch.manual_seed(0)
    return build_model(
        "small",
        num_phonemes=SYMBOLS,
        num_languages=LANGS,
        d_model=args.d_model,
        num_layers=args.layers,
        dropout=0.0,
    )


def plain_loop(args) -> float:
    model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = make_batches(args.warmup + args.steps)
    for i, b in enumerate(batches):
        if i == args.warmup:
            t0 = time.perf_counter()
        loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return args.steps * BATCH / (time.perf_counter() - t0)


def deepspeed_loop(args, stage: int, seed: int = 0) -> tuple[float, int]:
    """(samples/s, parameter elements held) of a DeepSpeed engine over the same model and batches; needs
    a torch.distributed process group."""
    from vallex.train import engine as ds_engine

    cfg = load_config(None, [f"train.zero_stage={stage}", f"train.batch_size={BATCH}"])
    engine, _, _ = ds_engine.initialize(build(args), cfg.train)
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    batches = make_batches(args.warmup + args.steps, seed=seed)
    for i, b in enumerate(batches):
        if i == args.warmup:
            t0 = time.perf_counter()
        out = engine(b)
        engine.backward(out["loss"])
        engine.step()
    return args.steps * BATCH / (time.perf_counter() - t0), local


def deepspeed_here(args) -> float:
    """DeepSpeed ZeRO-2 in this process (a 1-rank gloo group, no Ray): DeepSpeed's own cost."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what a launcher would set; DeepSpeed checks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return deepspeed_loop(args, 2)[0]
    finally:
        dist.destroy_process_group()


def worker_loop(config: dict) -> None:
    """Runs in each Ray Train worker: DeepSpeed (``stage``), or the plain loop (``stage`` None)."""
    import ray.train

    args = argparse.Namespace(**config["args"])
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    if config["stage"] is None:
        rate, local = plain_loop(args), sum(p.numel() for p in build(args).parameters())
    else:
        rate, local = deepspeed_loop(args, config["stage"], seed=rank)
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"samples_per_s": rate, "param_elements": local})
    )


def ray_run(args, workers: int, stage: int | None) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as out:
        TorchTrainer(
            worker_loop,
            train_loop_config={
                "args": vars(args),
                "stage": stage,
                "out": out,
                "threads": max(1, cores // workers),
            },
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="bench"),
        ).fit()
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {
        "samples_per_s": sum(r["samples_per_s"] for r in ranks),  # global throughput
        "param_elements": max(r["param_elements"] for r in ranks),  # per worker
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(os.cpu_count() or 2)

    base = plain_loop(args)
    ds_here = deepspeed_here(args)
    plain_ray = ray_run(args, 1, None)
    one = ray_run(args, 1, 2)
    two = ray_run(args, 2, 2)
    z0 = ray_run(args, 2, 0)
    z3 = ray_run(args, 2, 3)
    print(
        f"model d_model={args.d_model} layers={args.layers}, batch {BATCH} x {FRAMES} frames, {args.steps} timed steps"
    )
    print(f"plain PyTorch loop           {base:8.2f} samples/s   1.00x")
    print(
        f"Ray Train + DeepSpeed ZeRO-2 {one['samples_per_s']:8.2f} samples/s   {one['samples_per_s'] / base:.2f}x (1 worker)"
    )
    print(f"  DeepSpeed ZeRO-2, no Ray   {ds_here:8.2f} samples/s   {ds_here / base:.2f}x (this process)")
    print(
        f"  plain loop in a Ray worker {plain_ray['samples_per_s']:8.2f} samples/s   "
        f"{plain_ray['samples_per_s'] / base:.2f}x (no DeepSpeed)"
    )
    print(
        f"2 workers vs 1 (ZeRO-2)      {two['samples_per_s']:8.2f} samples/s   {two['samples_per_s'] / one['samples_per_s']:.2f}x"
    )
    print(
        f"ZeRO-3 vs ZeRO-0 parameter elements per worker (2 workers): {z3['param_elements']:,} vs "
        f"{z0['param_elements']:,} = {z3['param_elements'] / z0['param_elements']:.2f}x"
    )


if __name__ == "__main__":
    main()
