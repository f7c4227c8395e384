"""GPU smoke test: the real trainer (Ray Train + DeepSpeed) on one GPU in bf16, with a resume, in one command.

    python bench/gpu_smoke.py                        # a CUDA machine: 1 GPU worker, bf16, ZeRO-2 then ZeRO-3
    python bench/gpu_smoke.py --cpu                  # the same path on CPU (gloo): check it anywhere
    python bench/gpu_smoke.py --stages 2 --steps 20 --prepared runs/gpu_smoke/prepare --json smoke.json
    python bench/gpu_smoke.py --prepare-only --out .gpu  # only write the corpus (.gpu/prepare), e.g. to carry it

For each ZeRO stage it runs ``vallex.train.trainer.train`` (what ``ray_jobs/train.py`` runs) with
``train.use_gpu=true train.precision=bf16 train.num_workers=1``: ``--steps`` steps with evaluations at
step 1, every ``--steps``/3 steps and the last (per-language validation losses, text gain, PER of
synthesized speech read by the corpus's recognizer), a checkpoint at two thirds and at the end; then
the same run again with 10 more steps, which must resume from the end checkpoint. It checks what a
GPU run has to get right and prints one line per check, then a table per stage:

- DeepSpeed ran what was asked: the ZeRO stage, bf16, on a ``cuda`` device (``cpu`` with ``--cpu``);
- every evaluation holds finite losses, a text gain and a PER for every language, and the loss fell;
- the run wrote its checkpoint and ``model.pt``;
- the second run resumed: it continued at the checkpoint's step (metrics.jsonl goes on, with no
  step repeated) and the rows the model has seen count on from the checkpoint's.

The corpus: ``--prepared DIR`` (a prepared corpus; with ``recognizer.pt`` beside the shards for the
PER), else a small one written into ``--out`` by ``vallex.data.synthetic.write_phonetic_corpus`` (4
languages whose codes say their phonemes, so a model can learn to read them) with a recognizer trained
on it here (CPU; 4-6 min on a loaded 2-core machine). The exit status is 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("vallex.smoke")

SIZES = {"en": 96, "fr": 64, "zh": 64, "ar": 24}  # train rows per language: ar is the small one
EXTRA_STEPS = 10  # the resumed run's steps past the checkpoint


def write_corpus(folder: Path, recognizer_steps: int) -> Path:
    """A phonetic synthetic corpus with its recognizer beside the shards (what the PER needs)."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.data.synthetic import write_phonetic_corpus
    from vallex.eval.recognizer import train_recognizer

    root = write_phonetic_corpus(folder, SIZES, valid_per_language=8, num_symbols=40)
    log.info("training the corpus's recognizer (%d steps on CPU)", recognizer_steps)
    rec = train_recognizer(
        PreparedCorpus.open(root),
        steps=recognizer_steps,
        batch_size=16,
        lr=5e-3,
        seed=0,
        dim=32,
        hidden=32,
        layers=2,
        log_every=50,
    )
    rec.save(str(root))
    return root


def overrides(args, prepared: Path, stage: int, steps: int) -> list[str]:
    every = max(1, args.steps // 3)
    return [
        f"run.name=zero{stage}",
        f"run.output_dir={args.out / f'zero{stage}'}",
        f"run.prepared_dir={prepared}",
        "model.size=small",
        "model.d_model=128",  # the demo's model: 3.4 M parameters
        "model.dropout=0.0",
        "data.weights=uniform",
        "data.window_rows=64",
        f"train.use_gpu={'false' if args.cpu else 'true'}",
        "train.precision=bf16",
        f"train.zero_stage={stage}",
        "train.num_workers=1",
        f"train.cpus_per_worker={args.cpus_per_worker}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={steps}",
        "train.warmup_steps=5",
        "train.lr=2.0e-3",
        f"train.eval_every={every}",
        f"train.checkpoint_every={max(1, 2 * args.steps // 3)}",
        "train.intelligibility.per_utterances=2",
        *args.overrides,
    ]


class Checks:
    """Named pass/fail lines; ``ok`` is False once any failed."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def __call__(self, name: str, passed: bool, detail: str = "") -> bool:
        self.results.append({"check": name, "passed": bool(passed), "detail": detail})
        log.info("%s %s%s", "PASS" if passed else "FAIL", name, f": {detail}" if detail else "")
        return bool(passed)

    @property
    def ok(self) -> bool:
        return all(r["passed"] for r in self.results)


def check_stage(stage: int, args, first: dict, resumed: dict, records: list[dict], check: Checks) -> dict:
    """The checks of one stage's two runs (``first``/``resumed``: their reports; ``records``: the
    run's metrics.jsonl after both)."""
    steps, end = args.steps, args.steps + EXTRA_STEPS
    engines = [r["engine"] for r in records if "engine" in r]  # one per (re)start
    want_device = "cpu" if args.cpu else "cuda"
    for i, e in enumerate(engines):
        run = "first run" if i == 0 else "resumed run"
        check(
            f"ZeRO-{stage} {run}: DeepSpeed runs ZeRO-{stage}, bf16, on {want_device}",
            e.get("zero_stage") == stage
            and e.get("bf16") is True
            and str(e.get("device", "")).startswith(want_device),
            json.dumps(e),
        )
    check(f"ZeRO-{stage}: one engine line per start (2)", len(engines) == 2, f"{len(engines)} found")
    langs = sorted(SIZES)
    evaluated = [r for r in records if r.get("valid")]
    complete = all(
        set(r["valid"]) == set(langs)
        and all(
            math.isfinite(v["ar_loss"])
            and math.isfinite(v["nar_loss"])
            and v.get("text_gain") is not None
            and v.get("per") is not None
            for v in r["valid"].values()
        )
        for r in evaluated
    )
    check(
        f"ZeRO-{stage}: every evaluation has finite losses, text gain and PER for {', '.join(langs)}",
        len(evaluated) >= 3 and complete,
        f"{len(evaluated)} evaluations at steps {[r['step'] for r in evaluated]}",
    )
    loss = {
        k: sum(r["valid"][lang]["loss"] for lang in langs) / len(langs)
        for k, r in (("a", evaluated[0]), ("b", evaluated[-1]))
    }
    check(
        f"ZeRO-{stage}: mean validation loss fell",
        loss["b"] < loss["a"],
        f"{loss['a']:.3f} at step {evaluated[0]['step']} -> {loss['b']:.3f} at step {evaluated[-1]['step']}",
    )
    check(
        f"ZeRO-{stage}: first run wrote a checkpoint and model.pt",
        bool(first.get("checkpoint"))
        and bool(first.get("model_file"))
        and Path(first["model_file"]).is_file(),
        f"{first.get('checkpoint')}",
    )
    step_list = [r["step"] for r in evaluated]
    after = [r for r in evaluated if r["step"] > steps]
    restart = [r["step"] for r in records if "engine" in r]  # a fresh start would be at step 1 again
    seen = after[0]["samples_seen"] if after else None
    check(
        f"ZeRO-{stage}: resumed at step {steps} and ran to {end}",
        resumed.get("steps") == end
        and step_list == sorted(set(step_list))
        and len(restart) == 2
        and restart[1] > steps
        and seen == args.batch_size * after[0]["step"],
        f"evaluations at {step_list}, restarts at {restart}; rows seen at step {after[0]['step'] if after else None}: "
        f"{seen} (counted from step 0: {args.batch_size} x the step)",
    )
    rows = {
        lang: {k: evaluated[-1]["valid"][lang].get(k) for k in ("loss", "text_gain", "per", "per_floor")}
        for lang in langs
    }
    return {
        "stage": stage,
        "engine": engines[0] if engines else None,
        "evaluation_steps": step_list,
        "first_mean_loss": loss["a"],
        "last_mean_loss": loss["b"],
        "last": rows,
        "samples_per_s": [r.get("samples_per_s") for r in evaluated],
        "cuda_max_memory_gib": max((r.get("cuda_max_memory_gib") or 0.0) for r in evaluated) or None,
        "wall_seconds": {"first": first.get("wall_seconds"), "resumed": resumed.get("wall_seconds")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="train on CPU (gloo) instead of one GPU")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages to run, in order [2 3]")
    p.add_argument("--steps", type=int, default=30, help="steps of the first run of each stage [30]")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per step [16]")
    p.add_argument("--cpus-per-worker", type=float, default=0, help="CPUs of the worker [half the machine's]")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_smoke"), help="output folder [runs/gpu_smoke]")
    p.add_argument("--prepared", type=Path, default=None, help="a prepared corpus [write one into --out]")
    p.add_argument("--recognizer-steps", type=int, default=150, help="when writing the corpus [150]")
    p.add_argument("--prepare-only", action="store_true", help="write the corpus into --out/prepare and stop")
    p.add_argument("--budget-s", type=float, default=0, help="start no stage after this many seconds [none]")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("overrides", nargs="*", help="more config overrides, key=value")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (evaluations at step 1, in between, and at the end)")
    if args.out.exists() and any((args.out / f"zero{s}").exists() for s in args.stages):
        p.error(f"{args.out} already holds runs of these stages (a rerun would resume them): remove it first")
    args.out = args.out.resolve()
    if args.prepare_only:
        from vallex.logs import setup_logging

        setup_logging()
        log.info("wrote %s", write_corpus(args.out / "prepare", args.recognizer_steps))
        return 0
    cores = os.cpu_count() or 2
    if not args.cpus_per_worker:
        args.cpus_per_worker = max(1, cores // 2)  # the rest for Ray Data's reads and the driver

    from vallex.logs import setup_logging

    setup_logging(args.out / "logs" / "smoke.log")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        log.error("no CUDA device here (torch %s): run with --cpu to check the CPU path", torch.__version__)
        return 2
    t_start = time.time()
    log.info(
        "torch %s, %s, %d CPUs",
        torch.__version__,
        "CPU only" if args.cpu else f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})",
        cores,
    )
    prepared = (
        args.prepared.resolve()
        if args.prepared
        else write_corpus(args.out / "prepare", args.recognizer_steps)
    )

    from vallex.config import load_config
    from vallex.runtime import init_ray
    from vallex.train.metrics import read_metrics
    from vallex.train.trainer import train

    init_ray(num_cpus=cores)
    check = Checks()
    summary = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "stages": [],
    }
    for stage in args.stages:
        if args.budget_s and time.time() - t_start > args.budget_s:
            log.info(
                "skipping ZeRO-%d: %.0f s spent of a %.0f s budget",
                stage,
                time.time() - t_start,
                args.budget_s,
            )
            summary["stages"].append({"stage": stage, "skipped": "time budget"})
            continue
        log.info(
            "ZeRO-%d: %d steps, then %d more resumed from its checkpoint", stage, args.steps, EXTRA_STEPS
        )
        try:
            first = train(load_config(None, overrides(args, prepared, stage, args.steps)))
            resumed = train(load_config(None, overrides(args, prepared, stage, args.steps + EXTRA_STEPS)))
        except Exception as e:  # noqa: BLE001 -- a failed stage is a failed check; the next stage still runs
            log.exception("ZeRO-%d failed", stage)
            check(f"ZeRO-{stage}: both runs finished", False, f"{type(e).__name__}: {str(e)[:2000]}")
            summary["stages"].append({"stage": stage, "error": f"{type(e).__name__}: {e}"})
            continue
        records = read_metrics(args.out / f"zero{stage}" / "train" / "metrics.jsonl")
        summary["stages"].append(check_stage(stage, args, first, resumed, records, check))
    summary["checks"] = check.results
    summary["passed"] = check.ok
    summary["wall_seconds"] = time.time() - t_start
    for s in summary["stages"]:
        if "last" not in s:
            continue
        lines = [
            f"ZeRO-{s['stage']} at step {s['evaluation_steps'][-1]}: language  loss  text gain  PER (floor)"
        ]
        for lang, v in s["last"].items():
            lines.append(
                f"  {lang:<3} {v['loss']:8.3f} {v['text_gain']:8.3f} {v['per']:7.0%} ({v['per_floor']:.0%})"
            )
        log.info("\n".join(lines))
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    log.info(
        "%s: %d of %d checks passed in %.0f s",
        "PASSED" if check.ok else "FAILED",
        sum(r["passed"] for r in check.results),
        len(check.results),
        summary["wall_seconds"],
    )
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
