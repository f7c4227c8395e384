"""Where a trained model's synthesized PER is lost: AR, NAR, prompt, sampling, or the recognizer.

    .venv/bin/python bench/synthesis_parts.py runs/demo/prepare runs/demo/train/model.pt
    .venv/bin/python bench/synthesis_parts.py runs/demo/prepare runs/demo/train/model.pt --per-language 16 \\
        --sampling 10:1.0 1:1.0 --prompts same-speaker none

One process, no Ray. The recognizer beside the shards transcribes, for a fixed seeded subset of each
language's validation utterances (the evaluation's own ``synthesis_plan``, so its first items are the
ones the training run scores), and scores against the input phonemes (corpus-level PER):

- ``gt``            the ground-truth codes (the floor);
- ``gt1+nar``       ground-truth codebook 1, codebooks 2..Q filled by the model's NAR (argmax, prompted);
- ``ar+gt``         the AR's codebook 1 with the ground truth's codebooks 2..Q, time-aligned to the AR's
                    length by nearest-frame resampling (the AR's length rarely matches);
- ``full``          AR then NAR: what the evaluation scores.

once per AR sampling setting (``top_k:temperature``) and prompt (``same-speaker``: another validation
utterance of the same speaker, as the evaluation; ``none``: no acoustic prompt). Also printed: the AR's
length against the ground truth's (mean ratio; how many reached the frame cap instead of EOS), the
NAR's per-codebook accuracy on ground-truth codebook 1, the recognizer's PER on ground truth with
only the first k codebooks read (``Recognizer.transcribe(codebooks=k)``), with codebooks k+1..Q
replaced by the NAR's, and with codebooks 2..Q uniformly random, for k = 1..Q-1: how much the
recognizer leans on the fine codebooks; and, for a mel_rvq corpus, what the NAR's codes do to the sound
(mean squared error of the normalized log-mel the codes stand for, against the ground truth's, with
codebook 1 alone and with the NAR's 2..Q). ``--split train`` synthesizes texts the model was trained
on; ``--recognizer FILE`` scores with another recognizer (e.g. one reading learned code embeddings,
``recognizer.inputs=codes``). Figures and how to read them: docs/BENCHMARKS.md "where synthesized PER
is lost".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vallex.data.corpus import PreparedCorpus
from vallex.data.schema import codes_matrix
from vallex.eval.intelligibility import synthesis_plan
from vallex.eval.recognizer import Recognizer, phoneme_error_rate
from vallex.model.checkpoint import load_any
from vallex.model.synthesis import SamplingSettings, synthesize_codes


def nar_fill(model, ids, lang_id, prompt_ids, prompt_codes, first) -> np.ndarray:
    """Codebooks 2..Q from the NAR given codebook 1 ``first`` (int [T]); [Q, T]."""
    text = torch.tensor([list(prompt_ids) + list(ids)])
    lang = torch.full_like(text, lang_id)
    Q = model.config.num_codebooks
    if prompt_codes is None:
        prompt = torch.zeros(1, 0, Q, dtype=torch.long)
    else:
        prompt = torch.from_numpy(prompt_codes.astype(np.int64).T.copy())[None]
    with torch.inference_mode():
        model.eval()
        out = model._nar_generate(text, lang, prompt, torch.from_numpy(first.astype(np.int64))[None])
    return out.T.numpy().astype(np.int16)


def resample(codes: np.ndarray, frames: int) -> np.ndarray:
    """[Q, T] -> [Q, frames] by nearest frame (a linear time warp)."""
    idx = np.minimum((np.arange(frames) * codes.shape[1] / frames).astype(int), codes.shape[1] - 1)
    return codes[:, idx]


def per_by_lang(items, refs, hyps) -> dict[str, float]:
    out = {}
    for lang in sorted({it.lang for it in items}):
        idx = [i for i, it in enumerate(items) if it.lang == lang]
        out[lang] = phoneme_error_rate([refs[i] for i in idx], [hyps[i] for i in idx])
    return out


def row(name: str, per: dict[str, float], extra: str = "") -> str:
    return (
        f"{name:<34}" + "".join(f"{100 * v:7.1f}%" for v in per.values()) + (f"   {extra}" if extra else "")
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", help="the prepared corpus (manifest.json, shards, recognizer.pt)")
    p.add_argument("model", help="a training run's model.pt (or any checkpoint load_any reads)")
    p.add_argument("--recognizer", help="a recognizer.pt to use instead of the one beside the shards")
    p.add_argument("--per-language", type=int, default=16, help="validation utterances per language")
    p.add_argument("--sampling", nargs="+", default=["10:1.0", "1:1.0"], help="AR top_k:temperature, each")
    p.add_argument("--prompts", nargs="+", default=["same-speaker", "none"], choices=("same-speaker", "none"))
    p.add_argument(
        "--split", default="valid", choices=("valid", "train"), help="train: texts the model was trained on"
    )
    p.add_argument("--max-length-ratio", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()

    corpus = PreparedCorpus.open(a.prepared)
    if a.recognizer:
        rec = Recognizer.from_bytes(Path(a.recognizer).read_bytes(), a.recognizer)
        rec.check_matches(corpus, a.recognizer)
    else:
        rec = Recognizer.load(a.prepared, corpus)
    if rec is None:
        raise SystemExit(f"no recognizer beside the shards in {a.prepared}: run ray_jobs/recognizer.py first")
    model, meta = load_any(a.model, symbols=corpus.symbols)
    model.eval()
    lang_ids = {lang: i for i, lang in enumerate(meta["languages"])}
    Q = model.config.num_codebooks
    tables = {lang: corpus.read_split(lang, a.split) for lang in corpus.languages if lang in lang_ids}
    items, skipped = synthesis_plan(tables, a.per_language, a.seed)
    langs = sorted({it.lang for it in items})
    cols = {
        lang: {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("phonemes", "codes", "frames")}
        for lang, t in tables.items()
    }

    def gt(lang, r):
        return codes_matrix(cols[lang]["codes"][r], int(cols[lang]["frames"][r]), Q)

    def ids(lang, r):
        return np.asarray(cols[lang]["phonemes"][r]).tolist()

    features = None
    try:
        from vallex.codec import open_tokenizer

        tok = open_tokenizer(corpus.codec, a.prepared)
        if hasattr(tok, "codebooks"):  # mel_rvq: the sum of the chosen centroids; -1 = stage left out

            def features(c):
                c = torch.from_numpy(np.asarray(c).astype(np.int64))
                return sum(tok.codebooks[k][c[k].clamp_min(0)] * (c[k] >= 0)[:, None] for k in range(Q))
    except Exception as e:  # noqa: BLE001 - the figures without the feature error
        print(f"codec features unavailable: {e}")

    refs = [rec.reference_phonemes(ids(it.lang, it.row)) for it in items]
    truth = [gt(it.lang, it.row) for it in items]
    figures: dict = {
        "languages": langs,
        "utterances": {lang: sum(it.lang == lang for it in items) for lang in langs},
    }
    print(
        f"model {a.model}: d{model.config.d_model} L{model.config.num_layers}; languages {meta['languages']}; "
        f"{len(items)} utterances ({figures['utterances']}); skipped {skipped or 'none'}; "
        f"recognizer reads {rec.meta.get('inputs', 'codes')}; {a.split} split"
    )
    print(f"{'':<34}" + "".join(f"{lang:>8}" for lang in langs))
    figures["gt"] = per_by_lang(items, refs, rec.transcribe(truth))
    print(row("gt (floor)", figures["gt"]))

    # How the recognizer uses the codebooks: only the first k summed.
    figures["gt_first_k"] = {}
    for k in range(1, Q):
        figures["gt_first_k"][k] = per_by_lang(items, refs, rec.transcribe(truth, codebooks=k))
        print(row(f"gt, first {k} codebook(s) only", figures["gt_first_k"][k]))
    rng = np.random.default_rng(a.seed)  # codebooks 2..Q replaced by uniformly random codes
    noisy = [np.concatenate([t[:1], rng.integers(0, 1024, t[1:].shape).astype(t.dtype)]) for t in truth]
    figures["gt1+random"] = per_by_lang(items, refs, rec.transcribe(noisy))
    print(row("gt1 + random codes 2..Q", figures["gt1+random"]))

    for prompt_kind in a.prompts:

        def prompt_of(it, kind=prompt_kind):
            if kind == "none":
                return [], None
            return ids(it.lang, it.prompt_row), gt(it.lang, it.prompt_row)

        # NAR from ground-truth codebook 1 (no AR involved).
        nar = [
            nar_fill(model, ids(it.lang, it.row), lang_ids[it.lang], *prompt_of(it), t[0])
            for it, t in zip(items, truth, strict=True)
        ]
        acc = [
            float(np.mean([np.mean(n[k] == t[k]) for n, t in zip(nar, truth, strict=True)]))
            for k in range(1, Q)
        ]
        key = f"prompt {prompt_kind}"
        figures[key] = {"nar_accuracy_per_codebook": acc}
        figures[key]["gt1+nar"] = per_by_lang(items, refs, rec.transcribe(nar))
        print(f"-- prompt: {prompt_kind}")
        print("   NAR accuracy on GT codebook 1, codebooks 2..Q: " + " ".join(f"{x:.3f}" for x in acc))
        print(row("gt1 + nar 2..Q", figures[key]["gt1+nar"]))
        if features is not None:  # what the NAR's codes do to the sound the codes stand for

            def mse(pairs):
                return float(np.mean([((features(x) - features(y)) ** 2).mean().item() for x, y in pairs]))

            only1 = [np.concatenate([t[:1], np.full_like(t[1:], -1)]) for t in truth]
            figures[key]["feature_mse"] = {
                "gt1 only": mse(zip(only1, truth, strict=True)),
                "gt1+nar": mse(zip(nar, truth, strict=True)),
            }
            print(
                "   codec features (normalized log-mel), mean squared error against the ground truth's: "
                + ", ".join(f"{k} {v:.4f}" for k, v in figures[key]["feature_mse"].items())
            )
        mixed = {}
        for k in range(1, Q):  # GT codebooks 1..k, NAR's k+1..Q
            m = [np.concatenate([t[:k], n[k:]]) for t, n in zip(truth, nar, strict=True)]
            mixed[k] = per_by_lang(items, refs, rec.transcribe(m))
            print(row(f"gt 1..{k} + nar {k + 1}..Q", mixed[k]))
        figures[key]["gt_k+nar"] = mixed

        for spec in a.sampling:
            top_k, temperature = spec.split(":")
            syn, ar_gt, lens, capped = [], [], [], 0
            ts = time.perf_counter()
            for it, t in zip(items, truth, strict=True):
                frames = t.shape[1]
                cap = max(1, int(np.ceil(a.max_length_ratio * frames)))
                settings = SamplingSettings(
                    top_k=int(top_k), temperature=float(temperature), seed=it.seed, max_frames=cap
                )
                p_ids, p_codes = prompt_of(it)
                kw = (
                    {}
                    if p_codes is None
                    else {"prompt_ids": p_ids, "prompt_codes": p_codes, "prompt_language": lang_ids[it.lang]}
                )
                c = synthesize_codes(model, [ids(it.lang, it.row)], lang_ids[it.lang], settings, **kw)[0]
                syn.append(c)
                lens.append(c.shape[1] / frames)
                capped += c.shape[1] >= cap
                ar_gt.append(np.concatenate([c[:1], resample(t, c.shape[1])[1:]]) if c.shape[1] else c)
            name = f"top_k {top_k} T {temperature}"
            f = {
                "full": per_by_lang(items, refs, rec.transcribe(syn)),
                "ar+gt": per_by_lang(items, refs, rec.transcribe(ar_gt)),
                "length_ratio_mean": float(np.mean(lens)),
                "length_ratio_by_lang": {
                    lang: float(np.mean([x for x, it in zip(lens, items, strict=True) if it.lang == lang]))
                    for lang in langs
                },
                "capped": int(capped),
                "seconds": round(time.perf_counter() - ts, 1),
            }
            figures[key][name] = f
            print(row(f"ar ({name}) + gt 2..Q", f["ar+gt"]))
            print(
                row(
                    f"full ({name})",
                    f["full"],
                    f"length/GT {f['length_ratio_mean']:.2f} "
                    + " ".join(f"{lang} {v:.2f}" for lang, v in f["length_ratio_by_lang"].items())
                    + f"; {capped}/{len(items)} hit the cap; {f['seconds']} s",
                )
            )
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
