"""Model FLOP utilisation: VALL-E X forward+backward against a large matmul timed the same way, in one run.

    .venv/bin/python bench/model.py                       # small (256 wide, 4 layers), fp32 and bf16
    .venv/bin/python bench/model.py --size small --steps 10 --threads 2
    python bench/model.py --device cuda --size paper --batch 32  # on a GPU (fp32 is true fp32: TF32 off)

Prints, for fp32 and for bf16 autocast:
  1. the matmul peak: GFLOP/s of an N x N x N matmul (best of --steps timed runs after one untimed,
     timed before and after the model, the higher kept);
  2. the model: forward+backward (AR + NAR losses, no optimizer) tokens/s and GFLOP/s on fixed random
     batches, the median of --steps timed steps after --warmup untimed ones;
  3. MFU = model GFLOP/s / matmul GFLOP/s (goal >= 0.40).

Model FLOPs are counted analytically, forward x 3 for forward+backward: per layer and position
2 x 12 d^2 (q|k|v, out, 4d feed-forward) plus 4 x seq x d (scores and weighted sum), per audio position
the output layer (2 x d x 1025 AR, 2 x d x 1024 NAR). Tokens = AR positions (text + BOS + frames) + NAR
positions (text + frames). Embedding look-ups, norms and softmax are not counted (as usual for MFU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

BATCH, FRAMES, PHONEMES, LANGS, SYMBOLS = 8, 225, 40, 4, 128


def make_batch(seed: int = 0, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Random utterances shaped like 3 s of speech (225 frames x 8 codebooks, 40 phonemes)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "phonemes": torch.randint(4, SYMBOLS, (batch, PHONEMES), generator=g),
        "phoneme_lens": torch.full((batch,), PHONEMES),
        "codes": torch.randint(0, 1024, (batch, FRAMES, 8), generator=g),
        "code_lens": torch.full((batch,), FRAMES),
        "language": torch.randint(0, LANGS, (batch,), generator=g),
    }


def _sync(device) -> None:
    """Wait for the GPU's queued work: CUDA calls return before their kernels finish."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(config, batch: int = BATCH) -> tuple[float, int]:
    """(forward+backward FLOPs, tokens) of one batch."""
    d, L, ff, K = config.d_model, config.num_layers, config.dim_feedforward, config.codebook_size
    ar_seq, nar_seq = PHONEMES + FRAMES + 1, PHONEMES + FRAMES
    per_pos_layer = 2 * (4 * d * d + 2 * d * ff)  # q|k|v + out projections, feed-forward
    fwd = 0.0
    for seq, head in ((ar_seq, 2 * d * (K + 1) * (FRAMES + 1)), (nar_seq, 2 * d * K * FRAMES)):
        fwd += batch * (L * seq * (per_pos_layer + 4 * seq * d) + head)
    return 3 * fwd, batch * (ar_seq + nar_seq)


def matmul_peak(dtype: torch.dtype, n: int, runs: int, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype``: the best of ``runs`` after one untimed."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_rate(model, batch, dtype: torch.dtype, warmup: int, steps: int) -> float:
    """Median seconds per forward+backward step."""
    device = batch["codes"].device
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="named model size [small]")
    p.add_argument("--steps", type=int, default=8, help="timed steps (and matmul runs) [8]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first [2]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [all]")
    p.add_argument("--matmul-n", type=int, default=0, help="size of the peak matmul [2048; 8192 on a GPU]")
    p.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    p.add_argument("--batch", type=int, default=BATCH, help=f"utterances per batch [{BATCH}]")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    torch.set_num_threads(args.threads)
    from vallex.model.vallex import build_model

    torch.manual_seed(0)
    model = build_model(
        args.size, num_phonemes=SYMBOLS, num_languages=LANGS, dropout=0.0, attention_dropout=0.0
    )
    model.to(device).train()
    flops, tokens = step_flops(model.config, args.batch)
    batch = {k: v.to(device) for k, v in make_batch(batch=args.batch).items()}
    c = model.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(
        f"model {args.size}: d_model {c.d_model}, {c.num_layers} layers, {model.num_parameters():,} parameters; "
        f"batch {args.batch} x {FRAMES} frames + {PHONEMES} phonemes = {tokens} tokens, "
        f"{flops / 1e9:.1f} GFLOP per forward+backward; {where}"
    )
    print(f"{'dtype':6} {'matmul peak':>14} {'model':>14} {'tokens/s':>10} {'MFU':>6}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # The peak is timed before and after the model and the higher kept: on a shared machine a burst
        # of other work during one of them would otherwise inflate the MFU.
        before = matmul_peak(dtype, args.matmul_n, args.steps, device)
        sec = model_rate(model, batch, dtype, args.warmup, args.steps)
        peak = max(before, matmul_peak(dtype, args.matmul_n, args.steps, device))
        rate = flops / sec / 1e9
        print(f"{name:6} {peak:9.1f} GF/s {rate:9.1f} GF/s {tokens / sec:10.0f} {rate / peak:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
