"""What an evaluation costs against the training it interrupts, at the demo's settings, in one process.

    .venv/bin/python bench/evaluation.py                                # job.yaml's settings, a stand-in corpus
    .venv/bin/python bench/evaluation.py --prepared runs/demo/prepare   # the prepared demo corpus itself
    .venv/bin/python bench/evaluation.py train.intelligibility.per_utterances=8 train.eval_every=100
    python bench/evaluation.py --device cuda train.num_workers=1      # on a GPU: rank 0 of 1 (bf16: train.precision=bf16)

The process plays rank 0 of the demo's ``train.num_workers`` ranks (one torch thread each, as
``train.cpus_per_worker=0.5`` gives them): it times ``--steps`` training steps (forward, backward, AdamW
on ``train.batch_size`` training rows; DeepSpeed ZeRO-2 runs at 0.98x plain PyTorch here, STACK.md), then
one evaluation of rank 0's share, part by part: the validation losses (what every run already paid),
the text-gain pass, the synthesis of its share of ``train.intelligibility.per_utterances`` utterances
per language with the recognizer's transcription (PER and its floor), and decoding the listening
samples with the corpus's codec (the metrics sink does that on the driver's node while rank 0 waits).
It does that ``--repeats`` times and keeps each part's minimum: the least disturbed by other jobs.

The model is untrained: its AR never says EOS, so every synthesis runs to its frame cap
(``max_length_ratio`` x the ground truth): the worst case. Prints each part's seconds and the share of
the run's time evaluation takes: ``eval / (eval_every x step + eval)``.

Without ``--prepared`` the corpus is a stand-in with the demo's validation size (308 utterances over 4
languages, ~2.5 s each; vallex.data.synthetic.write_phonetic_corpus) and a recognizer trained for a few
steps (its cost does not depend on its quality); no listening sample is decoded (that corpus has no
codec), so the stand-in figure leaves out one codec decode per language.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_VALID = {"en": 132, "zh": 88, "fr": 71, "ar": 17}  # the demo corpus's validation utterances


def _stand_in(folder: Path) -> str:
    from vallex.data.synthetic import write_phonetic_corpus

    per = round(sum(DEMO_VALID.values()) / len(DEMO_VALID))
    return str(
        write_phonetic_corpus(
            folder / "prepare",
            dict.fromkeys(DEMO_VALID, 64),
            valid_per_language=per,
            phonemes=(25, 55),
            frames_per_phoneme=(3, 6),
            num_symbols=60,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "job.yaml"), help="the run's config (default job.yaml)")
    ap.add_argument("--prepared", default="", help="a prepared corpus (default: a stand-in, see above)")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed (after 3 of warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (steps, evaluation); minima kept")
    ap.add_argument("--device", default="cpu", help="cpu or cuda [cpu]; with train.precision=bf16, autocast")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()

    import dataclasses

    from vallex.config import derive_config, load_config
    from vallex.data.collate import collate
    from vallex.data.corpus import PreparedCorpus
    from vallex.eval.intelligibility import Intelligibility, load_recognizer, open_codec, synthesis_plan
    from vallex.eval.losses import to_device
    from vallex.eval.recognizer import train_recognizer
    from vallex.model.vallex import MODEL_SIZES, VallexModel
    from vallex.train.loop import _validation_batches, evaluate
    from vallex.train.plan import plan_run

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    tmp = tempfile.TemporaryDirectory(prefix="vallex-bench-eval-")
    prepared = args.prepared or _stand_in(Path(tmp.name))
    corpus = PreparedCorpus.open(prepared)
    langs = sorted(corpus.languages)
    tables = {lang: corpus.read_split(lang, "valid") for lang in langs}
    recognizer, reason = load_recognizer(prepared, corpus)
    if recognizer is None:
        print(f"no recognizer ({reason}): training one for 3 steps, to time transcription")
        recognizer = train_recognizer(corpus, steps=3, seed=0, threads=1, log_every=0)
    world, s = cfg.train.num_workers, cfg.train.intelligibility
    torch.manual_seed(0)
    model = VallexModel(
        MODEL_SIZES[cfg.model.size](
            num_phonemes=corpus.num_symbols, num_languages=len(langs), **cfg.model.overrides()
        )
    )
    # What the workers get: the run's plan over this corpus (its languages, ids and the model's shape).
    info = plan_run(
        derive_config(cfg, {"run.prepared_dir": str(prepared), "data.languages": []}), corpus=corpus
    )
    assert info.model_config == dataclasses.asdict(model.config)
    device = torch.device(args.device)
    model.to(device)

    def sync() -> float:  # CUDA calls return before their kernels finish: wait for them, then read the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # train.precision=bf16 as bf16 autocast (DeepSpeed's bf16 holds bf16 weights: close, not the same)
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    print(
        f"model {cfg.model.size} ({model.num_parameters() / 1e6:.1f} M), batch {cfg.train.batch_size}, "
        f"eval_every {cfg.train.eval_every}, rank 0 of {world}, {args.device} {cfg.train.precision}, 1 thread; validation "
        + ", ".join(f"{lang} {t.num_rows}" for lang, t in tables.items())
    )

    # training steps, then one evaluation of rank 0's share, --repeats times; each part's minimum over
    # the repeats is kept (the least disturbed by other jobs on a shared machine)
    train = {lang: corpus.read_split(lang, "train") for lang in langs}
    rows = {
        c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in train.values()])
        for c in ("phonemes", "codes", "frames", "language")
    }
    trained = copy.deepcopy(model)  # steps train a copy: the evaluated model stays untrained (worst case)
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.train.lr)
    rng = np.random.default_rng(0)
    extra = {"recognizer": recognizer.to_bytes(), "symbols": list(corpus.symbols)}
    only_gain = load_config(
        args.config,
        [*args.overrides, "train.intelligibility.per_utterances=0", "train.intelligibility.samples=false"],
    )
    only_per = load_config(args.config, [*args.overrides, "train.intelligibility.text_gain=false"])
    codec = None
    if s.samples and corpus.codec.get("name") != "synthetic_phonetic":
        codec = open_codec(corpus.codec, prepared)
        codec.decode([np.zeros((corpus.num_codebooks, 10), dtype=np.int16)])  # load it (once per run)
    steps, parts = [], {}

    def keep(name: str, seconds: float) -> None:
        parts[name] = min(parts.get(name, seconds), seconds)

    for _ in range(args.repeats):
        trained.train()
        for i in range(args.steps + 3):
            if i == 3:
                t0 = sync()
            idx = rng.choice(len(rows["frames"]), cfg.train.batch_size, replace=False)
            batch = collate({c: v[idx] for c, v in rows.items()}, info.language_ids, corpus.num_codebooks)
            with autocast():
                out = trained(to_device(batch, device))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        steps.append((sync() - t0) / args.steps)

        t0 = sync()
        batches = _validation_batches(
            tables,
            info.language_ids,
            corpus.num_codebooks,
            cfg.train.batch_size,
            0,
            world,
            cfg.data.max_tokens,
        )
        filler = next(b[0] for b in batches.values() if b)
        with autocast():
            valid = evaluate(model, batches, langs, device, cfg.train.train_stage, filler)
        keep("validation losses (before this issue)", sync() - t0)
        t0 = sync()
        with autocast():
            Intelligibility(only_gain, tables, info, 0, world, model, extra).evaluate(
                model, valid, device, filler, 1
            )
        keep("text gain (mismatched-text pass)", sync() - t0)
        if s.per_utterances:
            intel = Intelligibility(only_per, tables, info, 0, world, model, extra)
            t0 = sync()
            with autocast():
                intel.evaluate(model, valid, device, filler, 1)
            mine = intel.mine()
            cap = sum(
                int(tables[it.lang].column("frames")[it.row].as_py() * s.max_length_ratio) for it in mine
            )
            keep(f"synthesis + recognizer ({len(mine)} utterances, <= {cap} frames)", sync() - t0)
        if codec is not None:
            items, _ = synthesis_plan(tables, 1, cfg.run.seed)
            codes = [
                np.zeros(
                    (
                        corpus.num_codebooks,
                        int(s.max_length_ratio * tables[it.lang].column("frames")[it.row].as_py()),
                    ),
                    dtype=np.int16,
                )
                for it in items
            ]
            t0 = time.perf_counter()
            codec.decode(codes)
            keep("listening samples (codec decode)", time.perf_counter() - t0)
    step = min(steps)
    print(f"training step per repeat: {', '.join(f'{x * 1000:.0f} ms' for x in steps)}")
    total = sum(parts.values())
    new = total - parts["validation losses (before this issue)"]
    print(
        f"training step: {step * 1000:.0f} ms; {cfg.train.eval_every} steps between evaluations: {cfg.train.eval_every * step:.1f} s"
    )
    for name, sec in parts.items():
        print(f"  {name:<55} {sec:6.2f} s")
    span = cfg.train.eval_every * step
    print(
        f"evaluation {total:.2f} s = {total / (span + total):.1%} of the run's time "
        f"(the part this issue adds: {new:.2f} s = {new / (span + total):.1%}); limit 15%"
    )


if __name__ == "__main__":
    main()
