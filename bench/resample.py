"""Benchmark the resampler's memory: peak RSS rise and time for 30 s of audio -> 24 kHz, per input rate.

    python bench/resample.py                 # 44 100 (on-grid baseline), 44 101, 192 000, 12 345, 8 004 Hz
    python bench/resample.py --seconds 60 --rates 44101 96000

Each rate runs in a fresh Python process (torch imported and warmed up on a tiny clip first), so one
case's allocations do not hide another's: the figure is the process's peak RSS (``ru_maxrss``) after
the call minus its RSS just before it, i.e. what the call itself added at its peak, input and output
included. The baseline is 44 100 Hz, whose reduced ratio (80:147) torchaudio handles with a small
filter bank already; the ratio column compares each rate with it.

What vallex resampled before (``torchaudio.functional.resample`` on the plain gcd-reduced ratio) is not
run for the off-grid rates: at 44 101 Hz its filter bank has 24 000 phases x 44 125 taps, built in
float64 (~8.5 GB, plus float32 copies); the script prints that size from torchaudio's own formula.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys, time
import numpy as np, psutil, torch
from vallex.codec.audio import resample, resample_ratio
torch.set_num_threads(1)
sr, seconds = int(sys.argv[1]), float(sys.argv[2])
resample(np.zeros(sr // 10, np.float32), sr, 24000)  # warm-up: imports, kernels, allocator
x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(sr * seconds)) / sr)).astype(np.float32)
rss = psutil.Process().memory_info().rss
t0 = time.perf_counter()
y = resample(x, sr, 24000)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rate": sr, "ratio": resample_ratio(sr, 24000), "rise_mb": max(peak - rss, 0) / 2**20,
                  "seconds": dt, "out": len(y), "in_mb": x.nbytes / 2**20}))
"""


def old_kernel_bytes(sr_from: int, sr_to: int = 24000, width: int = 6, rolloff: float = 0.99) -> int:
    """float64 bytes of the filter bank torchaudio builds for the plain gcd-reduced ratio."""
    g = math.gcd(sr_from, sr_to)
    orig, new = sr_from // g, sr_to // g
    w = math.ceil(width * orig / (min(orig, new) * rolloff))
    return new * (orig + 2 * w) * 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length (default 30 s)")
    parser.add_argument(
        "--rates", type=int, nargs="+", default=[44100, 44101, 192000, 12345, 8004], help="input rates (Hz)"
    )
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; 1 torch thread"
    )
    rows = []
    for sr in args.rates:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(sr), str(args.seconds)],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
            },
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["rate"] == 44100), rows[0])
    print(
        f"{'rate':>8} {'up:down':>10} {'in MB':>7} {'peak rise MB':>13} {'x base':>7} {'time s':>7} "
        f"{'old kernel (float64)':>21}"
    )
    for r in rows:
        up, down = r["ratio"]
        print(
            f"{r['rate']:>8} {f'{up}:{down}':>10} {r['in_mb']:>7.1f} {r['rise_mb']:>13.1f} "
            f"{r['rise_mb'] / max(base['rise_mb'], 1e-9):>6.2f}x {r['seconds']:>7.2f} "
            f"{old_kernel_bytes(r['rate']) / 2**20:>18.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
