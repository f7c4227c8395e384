"""A Train worker's DeepSpeed start: ``import deepspeed`` + ``deepspeed.initialize``, with and without
what ``vallex.train.engine`` keeps out of it (mlflow through DeepSpeed's autotuner, TorchInductor
through its Muon module), in one command.

    .venv/bin/python bench/deepspeed_start.py              # 3 rounds, ZeRO-2, a tiny model
    .venv/bin/python bench/deepspeed_start.py --rounds 5 --zero-stage 3

Each measurement is a fresh process (a worker starts as one): a one-rank gloo process group, a tiny
VallexModel, then the timed part: ``engine._initialize`` (DeepSpeed as it comes: the baseline) or
``engine.initialize`` (vallex's lean start). The two alternate within each round, so machine load
hits both alike; the figure to read is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = """
import json, os, sys, time
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from vallex.config import load_config
from vallex.model.vallex import VallexConfig, VallexModel
from vallex.train import engine
cfg = load_config(None, [f"train.zero_stage={sys.argv[3]}", "train.batch_size=2"])
model = VallexModel(VallexConfig(d_model=32, nhead=2, num_layers=1, num_phonemes=50, num_languages=3))
t0 = time.perf_counter()
(engine.initialize if sys.argv[2] == "lean" else engine._initialize)(model, cfg.train)
print(json.dumps({"seconds": time.perf_counter() - t0, "mlflow": sys.modules.get("mlflow") is not None,
                  "inductor": "torch._inductor.compile_fx" in sys.modules}))
"""


def run(kind: str, port: int, zero_stage: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(port), kind, str(zero_stage)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage (default 2)")
    args = parser.parse_args(argv)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {"as it comes": [], "lean": []}
    port = 29600 + os.getpid() % 200
    for r in range(args.rounds):
        for kind in times:
            res = run("lean" if kind == "lean" else "plain", port, args.zero_stage)
            port += 1
            times[kind].append(res["seconds"])
            print(
                f"round {r + 1} {kind:>11}: {res['seconds']:5.2f} s  "
                f"(mlflow loaded: {res['mlflow']}, TorchInductor loaded: {res['inductor']})",
                flush=True,
            )
    base, lean = (statistics.median(times[k]) for k in ("as it comes", "lean"))
    print(f"median: as it comes {base:.2f} s, lean {lean:.2f} s: {base / lean:.2f}x faster")
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
