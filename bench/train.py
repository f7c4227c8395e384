"""Training throughput and memory: Ray Train + DeepSpeed against a plain PyTorch loop, in one command.

    .venv/bin/python bench/train.py                 # defaults: d_model 256, 4 layers, 30 timed steps
    .venv/bin/python bench/train.py --steps 50 --d-model 128
    python bench/train.py --gpu --d-model 1024 --layers 12 --batch 32   # on a CUDA machine: see below

Prints, on the same model and the same batches:
  1. samples/s of a plain PyTorch AdamW loop (the baseline, in this process);
  2. samples/s of 1 Ray Train worker running DeepSpeed ZeRO-2 (ratio to 1; goal >= 0.9x);
  3. where the difference goes: DeepSpeed ZeRO-2 in this process (no Ray), and the plain loop inside
     1 Ray Train worker (no DeepSpeed);
  4. samples/s of 2 workers vs 1 (each worker gets half the cores);
  5. per-worker parameter elements held under ZeRO-3 vs ZeRO-0 with 2 workers (goal: ~1/2).
Start-up (process group, DeepSpeed init, first steps) is excluded: each loop times only its last
``--steps`` steps after ``--warmup`` untimed ones.

With ``--gpu`` (one CUDA device) it prints instead, against a plain PyTorch fp32 loop on that GPU:
plain PyTorch with bf16 autocast; DeepSpeed ZeRO-0 and ZeRO-2, each in fp32 and in bf16 (DeepSpeed's
bf16: bf16 weights and activations, fp32 master weights), in this process (a 1-rank NCCL group); and
1 Ray Train GPU worker running DeepSpeed ZeRO-2 bf16 (what ``train.use_gpu=true train.precision=bf16``
runs). fp32 is true fp32 (PyTorch's default: no TF32).
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


def make_batches(n: int, seed: int = 0, batch: int = BATCH, device="cpu") -> list[dict[str, torch.Tensor]]:
    """Fixed random batches shaped like 3 s utterances (225 frames x 8 codebooks, 40 phonemes)."""
    g = torch.Generator().manual_seed(seed)
    out = [
        {
            "phonemes": torch.randint(4, SYMBOLS, (batch, PHONEMES), generator=g),
            "phoneme_lens": torch.full((batch,), PHONEMES),
            "codes": torch.randint(0, 1024, (batch, FRAMES, 8), generator=g),
            "code_lens": torch.full((batch,), FRAMES),
            "language": torch.randint(0, LANGS, (batch,), generator=g),
        }
        for _ in range(n)
    ]
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def _sync() -> None:
    """Wait for queued GPU work (CUDA calls return before their kernels finish); nothing on CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


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


def plain_loop(args, device="cpu", precision: str = "fp32") -> float:
    model = build(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = make_batches(args.warmup + args.steps, batch=args.batch, device=device)
    for i, b in enumerate(batches):
        if i == args.warmup:
            _sync()
            t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync()
    return args.steps * args.batch / (time.perf_counter() - t0)


def deepspeed_loop(
    args, stage: int, seed: int = 0, precision: str = "fp32", gpu: bool = False
) -> tuple[float, int]:
    """(samples/s, parameter elements held) of a DeepSpeed engine over the same model and batches; needs
    a torch.distributed process group (on the current CUDA device with ``gpu``)."""
    from vallex.train import engine as ds_engine

    cfg = load_config(
        None,
        [
            f"train.zero_stage={stage}",
            f"train.batch_size={args.batch}",
            f"train.precision={precision}",
            f"train.use_gpu={str(gpu).lower()}",
        ],
    )
    engine, _, _ = ds_engine.initialize(build(args), cfg.train)
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    batches = make_batches(args.warmup + args.steps, seed=seed, batch=args.batch, device=engine.device)
    for i, b in enumerate(batches):
        if i == args.warmup:
            _sync()
            t0 = time.perf_counter()
        out = engine(b)
        engine.backward(out["loss"])
        engine.step()
    _sync()
    return args.steps * args.batch / (time.perf_counter() - t0), local


def deepspeed_here(args, runs=((2, "fp32"),), gpu: bool = False) -> list[float]:
    """samples/s of DeepSpeed at each ``(stage, precision)`` of ``runs`` in this process (a 1-rank gloo
    group, NCCL with ``gpu``; no Ray): DeepSpeed's own cost."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what a launcher would set; DeepSpeed checks
    if gpu:
        torch.cuda.set_device(0)
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return [deepspeed_loop(args, stage, precision=p, gpu=gpu)[0] for stage, p in runs]
    finally:
        dist.destroy_process_group()


def worker_loop(config: dict) -> None:
    """Runs in each Ray Train worker: DeepSpeed (``stage``), or the plain loop (``stage`` None)."""
    import ray.train

    args = argparse.Namespace(**config["args"])
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    gpu = config.get("gpu", False)
    if config["stage"] is None:
        rate, local = plain_loop(args), sum(p.numel() for p in build(args).parameters())
    else:
        precision = config.get("precision", "fp32")
        rate, local = deepspeed_loop(args, config["stage"], seed=rank, precision=precision, gpu=gpu)
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"samples_per_s": rate, "param_elements": local})
    )


def ray_run(args, workers: int, stage: int | None, precision: str = "fp32", gpu: bool = False) -> dict:
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
                "precision": precision,
                "gpu": gpu,
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=gpu,
                resources_per_worker={"CPU": 0.5, **({"GPU": 1} if gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
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
    p.add_argument("--batch", type=int, default=BATCH, help=f"utterances per step [{BATCH}]")
    p.add_argument("--gpu", action="store_true", help="the GPU figures (one CUDA device), see above")
    args = p.parse_args()
    if args.gpu:
        return gpu_main(args)

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(os.cpu_count() or 2)

    base = plain_loop(args)
    (ds_here,) = deepspeed_here(args)
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


def gpu_main(args) -> None:
    """fp32 vs bf16 and ZeRO-0 vs ZeRO-2 on one GPU, against plain PyTorch fp32 on it (see the docstring)."""
    import ray

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    name = torch.cuda.get_device_name(0)
    model = build(args)
    print(
        f"{name}: model d_model={args.d_model} layers={args.layers} ({model.num_parameters() / 1e6:.1f} M), "
        f"batch {args.batch} x {FRAMES} frames, {args.steps} timed steps after {args.warmup}"
    )
    del model
    rows = [
        ("plain PyTorch fp32", plain_loop(args, "cuda", "fp32")),
        ("plain PyTorch bf16 autocast", plain_loop(args, "cuda", "bf16")),
    ]
    runs = [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16")]
    rows += [
        (f"DeepSpeed ZeRO-{s} {p}", r)
        for (s, p), r in zip(runs, deepspeed_here(args, runs, gpu=True), strict=True)
    ]
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows.append(
        ("Ray Train 1 GPU worker, ZeRO-2 bf16", ray_run(args, 1, 2, "bf16", gpu=True)["samples_per_s"])
    )
    ray.shutdown()
    base, by = rows[0][1], dict(rows)
    for label, rate in rows:
        print(f"{label:<38} {rate:9.1f} samples/s  {rate / base:5.2f}x")
    print(
        "bf16 / fp32: plain {:.2f}x, ZeRO-0 {:.2f}x, ZeRO-2 {:.2f}x; ZeRO-2 / ZeRO-0 in bf16: {:.2f}x; "
        "Ray Train worker / in-process ZeRO-2 bf16: {:.2f}x".format(
            by["plain PyTorch bf16 autocast"] / base,
            by["DeepSpeed ZeRO-0 bf16"] / by["DeepSpeed ZeRO-0 fp32"],
            by["DeepSpeed ZeRO-2 bf16"] / by["DeepSpeed ZeRO-2 fp32"],
            by["DeepSpeed ZeRO-2 bf16"] / by["DeepSpeed ZeRO-0 bf16"],
            by["Ray Train 1 GPU worker, ZeRO-2 bf16"] / by["DeepSpeed ZeRO-2 bf16"],
        )
    )


if __name__ == "__main__":
    main()
