"""How fast the demo's model learns to read its text: text gain per N steps, one process, no Ray.

    .venv/bin/python bench/reading.py --prepared runs/demo/prepare                       # job.yaml's model
    .venv/bin/python bench/reading.py --prepared runs/demo/prepare --size small --d-model 128 \\
        --layers 4 --heads 4 --batch 16 --lr 1e-3 --stage both --steps 1500 --eval-every 250

Trains the real VallexModel on the prepared shards' training rows (languages drawn with p ~ n^alpha,
then rows uniformly within the language, as data.weights=temperature does), plain AdamW with the
trainer's schedule (linear warmup, cosine to 0.1 of the peak at --steps), ``--threads`` torch threads.
Every ``--eval-every`` steps it prints, per language, the AR validation loss with the true text and the
text gain (the AR loss with a fixed derangement of the language's validation texts minus the true-text
loss, nats per frame: vallex.eval.text_gain), plus the seconds of training so far. Evaluation time is
not counted in the training seconds. This is what chooses the demo's model, batch, lr and steps
(docs/BENCHMARKS.md "Demo"): the text gain per training second, not the loss, is what the demo must show.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vallex.data.collate import collate
from vallex.eval.text_gain import mismatched_table
from vallex.model.vallex import build_model


def load_splits(prepared: Path) -> tuple[dict[str, pa.Table], dict[str, pa.Table], int]:
    manifest = json.loads((prepared / "manifest.json").read_text())
    train, valid = {}, {}
    for lang, info in sorted(manifest["languages"].items()):
        table = pa.concat_tables(pq.read_table(prepared / s) for s in info["shards"])
        split = table.column("split").to_numpy(zero_copy_only=False)
        train[lang] = table.filter(pa.array(split == "train"))
        valid[lang] = table.filter(pa.array(split == "valid"))
    return train, valid, int(manifest["num_symbols"])


def rows_of(table: pa.Table) -> dict[str, np.ndarray]:
    return {
        c: table.column(c).to_numpy(zero_copy_only=False) for c in ("phonemes", "codes", "frames", "language")
    }


def ar_loss(model, rows: dict[str, np.ndarray], ids: dict[str, int], batch: int) -> float:
    """Token-mean AR loss (EOS included, as training) over ``rows``, in eval mode."""
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(rows["frames"]), batch):
            b = collate({k: v[s : s + batch] for k, v in rows.items()}, ids, 8)
            out = model(b, train_stage="ar")
            total += float(out["ar_loss_sum"].sum())
            tokens += float(out["ar_tokens"].sum())
    return total / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True, help="a prepared corpus (manifest.json + shards)")
    p.add_argument("--size", default="tiny", help="named model size (tiny, small)")
    p.add_argument("--d-model", type=int, default=0, help="override the size's width")
    p.add_argument("--layers", type=int, default=0, help="override the size's layers")
    p.add_argument("--heads", type=int, default=0, help="override the size's heads")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--stage", default="both", choices=("ar", "nar", "both"), help="what each step trains")
    p.add_argument("--alpha", type=float, default=0.5, help="language weights p ~ n^alpha")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--valid-rows", type=int, default=64, help="validation rows per language scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from this model (a vallex checkpoint, e.g. a run's model.pt)")
    p.add_argument(
        "--save", help="write the trained model here (a vallex checkpoint, for synthesis_parts.py)"
    )
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train, valid, num_symbols = load_splits(Path(a.prepared))
    langs = sorted(train)
    ids = {lang: i for i, lang in enumerate(langs)}
    overrides = {k: v for k, v in (("d_model", a.d_model), ("num_layers", a.layers), ("nhead", a.heads)) if v}
    if a.init:
        from vallex.data.corpus import PreparedCorpus
        from vallex.model.checkpoint import load_any

        model, meta = load_any(a.init, symbols=PreparedCorpus.open(a.prepared).symbols)
        if meta["languages"] != langs:
            raise SystemExit(f"{a.init} has languages {meta['languages']}, the corpus {langs}")
    else:
        model = build_model(
            a.size, num_phonemes=num_symbols, num_languages=len(langs), dropout=0.0, **overrides
        )
    c = model.config
    print(
        f"model {a.size} d{c.d_model} L{c.num_layers} h{c.nhead}: {model.num_parameters() / 1e6:.2f} M params; "
        f"stage {a.stage}, batch {a.batch}, lr {a.lr}, warmup {a.warmup}, {a.steps} steps, {a.threads} threads"
    )
    train_rows = {lang: rows_of(t) for lang, t in train.items()}
    n = np.array([len(train_rows[lang]["frames"]) for lang in langs], dtype=float)
    weights = n**a.alpha / (n**a.alpha).sum()
    fps = {lang: float(train_rows[lang]["frames"].mean()) for lang in langs}
    print("train rows", dict(zip(langs, n.astype(int).tolist(), strict=True)), "mean frames", fps)
    true_rows, mis_rows = {}, {}
    for lang in langs:
        v = valid[lang].slice(0, a.valid_rows)
        true_rows[lang] = rows_of(v)
        mis_rows[lang] = rows_of(mismatched_table(v, a.seed, lang))

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return (step + 1) / a.warmup
        progress = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(a.seed)
    trained_s, window = 0.0, []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        picks = rng.choice(len(langs), size=a.batch, p=weights)
        parts = {k: [] for k in ("phonemes", "codes", "frames", "language")}
        for li in picks:
            rows = train_rows[langs[li]]
            i = int(rng.integers(len(rows["frames"])))
            for k in parts:
                parts[k].append(rows[k][i])
        batch = collate(
            {
                k: np.array(v, dtype=object) if k in ("phonemes", "codes") else np.array(v)
                for k, v in parts.items()
            },
            ids,
            8,
        )
        model.train()
        out = model(batch, train_stage=a.stage)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        trained_s += time.perf_counter() - t0
        window.append(float(out["loss"].detach()))
        if step % 50 == 0:
            print(
                f"step {step:5d}  {trained_s:6.0f} s training, {time.process_time():6.0f} CPU-s", flush=True
            )
        if step % a.eval_every == 0 or step == a.steps:
            te = time.perf_counter()
            model.eval()
            cells = []
            gains = []
            for lang in langs:
                true = ar_loss(model, true_rows[lang], ids, 16)
                mis = ar_loss(model, mis_rows[lang], ids, 16)
                gains.append(mis - true)
                cells.append(f"{lang} {true:.3f}/{mis - true:+.3f}")
            print(
                f"step {step:5d}  train {np.mean(window):.3f}  {trained_s:6.0f} s ({trained_s / step:.3f} s/step)  "
                f"AR valid/text gain: {'  '.join(cells)}  min gain {min(gains):+.3f}  "
                f"[eval {time.perf_counter() - te:.0f} s]",
                flush=True,
            )
            window = []
    if a.save:
        from vallex.data.corpus import PreparedCorpus
        from vallex.model.checkpoint import save_checkpoint

        corpus = PreparedCorpus.open(a.prepared)
        save_checkpoint(
            model,
            a.save,
            languages=langs,
            symbols=corpus.symbols,
            symbols_version=int(corpus.manifest["symbols_version"]),
            size=a.size,
        )
        print(f"saved {a.save}")


if __name__ == "__main__":
    main()
