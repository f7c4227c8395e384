"""Whether the model says its text, at every evaluation: text gain, PER of synthesized speech, samples.

Three measurements per language, each all-reduced so every rank (and Tune, the guard, the trackers)
sees the same figures:

- **text gain** (``vallex.eval.text_gain``): validation loss with mismatched text minus with the true
  text, nats/frame, for the AR and the NAR. A second validation pass in lockstep on every rank.
- **phoneme error rate of synthesized speech**: a fixed, seeded subset of the language's validation
  utterances (``train.intelligibility.per_utterances``) is synthesized from its phonemes, prompted, as
  VALL-E evaluates, with another validation utterance of the same speaker (its codes and phonemes; when
  the speaker has no other one, another utterance of the language, counted in the plan). The AR samples
  top-k (``top_k``, ``temperature``) with a generator seeded per utterance from ``run.seed``: every
  evaluation decodes the same texts with the same random numbers, whatever the number of workers. The
  recognizer beside the shards (``vallex.eval.recognizer``) transcribes the generated codes, scored
  against the input phonemes; beside it its PER on the same utterances' ground-truth codes (the floor:
  what a perfect synthesizer would score). Without a recognizer the run reports text gain only and
  says why once.
- **a listening sample**: the subset's first utterance per language, sent by rank 0 to the metrics sink,
  which decodes it with the preparation's codec into ``train/samples/step_<N>/<lang>.wav`` and
  TensorBoard.

Which ranks synthesize: decoding runs the model's modules outside DeepSpeed's forward, a different number
of AR steps per utterance, so it must not involve collectives. Under ZeRO 0-2 every rank holds every
weight: rank ``r`` synthesizes items ``k`` with ``k % world == r`` of each language (item 0, the
listening sample, on rank 0), and edit counts and reference lengths are all-reduced. Under ZeRO-3 each
rank holds a slice: the weights are gathered once per evaluation (a collective every rank joins, as the
export does) into a copy on rank 0, which synthesizes every item.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from vallex.data.schema import codes_matrix

log = logging.getLogger("vallex.train")

SAMPLES_DIR = "samples"


# ----------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One utterance to synthesize: rows of the language's validation table (in table order)."""

    lang: str
    k: int  # position in the language's subset (0 = the listening sample)
    row: int
    prompt_row: int
    same_speaker: bool
    seed: int


def synthesis_plan(tables: dict[str, pa.Table], count: int, seed: int) -> tuple[list[Item], dict[str, str]]:
    """The fixed subset of ``count`` utterances per language and their prompts; languages skipped, why.

    Deterministic for ``seed`` and the validation tables: the same on every rank and every evaluation.
    """
    items: list[Item] = []
    skipped: dict[str, str] = {}
    for lang in sorted(tables):
        table = tables[lang]
        n = table.num_rows
        if n < 2:
            skipped[lang] = f"{n} validation utterance(s): synthesis needs another one as the prompt"
            continue
        speakers = table.column("speaker").to_pylist()
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode())])
        rows = sorted(int(i) for i in rng.choice(n, size=min(count, n), replace=False))
        for k, i in enumerate(rows):
            same = [j for j in range(n) if j != i and speakers[j] == speakers[i]]
            pool = same or [j for j in range(n) if j != i]
            j = pool[int(rng.integers(len(pool)))]
            items.append(Item(lang, k, i, j, bool(same), zlib.crc32(f"{seed}/{lang}/{i}".encode())))
    return items, skipped


def describe_plan(tables: dict[str, pa.Table], items: list[Item]) -> dict[str, list[dict]]:
    """For report.json: which utterances are synthesized, with which prompt."""
    out: dict[str, list[dict]] = {}
    for it in items:
        ids = tables[it.lang].column("utt_id")
        out.setdefault(it.lang, []).append(
            {
                "utt_id": ids[it.row].as_py(),
                "prompt_utt_id": ids[it.prompt_row].as_py(),
                "prompt_same_speaker": it.same_speaker,
            }
        )
    return out


# ----------------------------------------------------------------------------------- the recognizer


def load_recognizer(prepared_dir: str, corpus=None):
    """``(recognizer, None)`` or ``(None, why there is none)``. A recognizer that does not match the
    corpus is reported, not fatal: evaluating never needs it."""
    try:
        from vallex.eval.recognizer import RECOGNIZER_FILE, Recognizer
    except ImportError:
        return None, "this vallex build has no phoneme recognizer (vallex.eval.recognizer)"
    try:
        rec = Recognizer.load(prepared_dir, corpus)
    except (ValueError, OSError) as e:
        return None, f"the recognizer beside the shards cannot score this corpus: {e}"
    if rec is None:
        return None, (
            f"no {RECOGNIZER_FILE} beside the shards in {prepared_dir}: train one on the prepared corpus "
            "to get the phoneme error rate of synthesized speech"
        )
    return rec, None


def driver_setup(cfg, corpus, tables: dict[str, pa.Table]) -> tuple[dict, dict]:
    """On the driver: ``(what the workers need, what report.json says)``; logs once why PER is off."""
    import ray

    s = cfg.train.intelligibility
    recognizer, reason = (None, "train.intelligibility.per_utterances is 0")
    if s.per_utterances > 0:
        recognizer, reason = load_recognizer(cfg.prepared_dir, corpus)
    if cfg.train.guard.metric == "per" and recognizer is None:
        raise ValueError(f"train.guard.metric=per needs the phoneme error rate, but {reason}")
    if reason and s.per_utterances > 0:
        log.warning("phoneme error rate of synthesized speech is off: %s; reporting text gain only", reason)
    count = s.per_utterances if recognizer is not None else (1 if s.samples else 0)
    items, skipped = synthesis_plan(tables, count, cfg.run.seed)
    for lang, why in skipped.items():
        log.warning("%s: no synthesis (PER, listening sample): %s", lang, why)
    other = sorted({it.lang for it in items if not it.same_speaker})
    if other:
        log.info(
            "synthesis prompts from another speaker (no other validation utterance of the same one): %s",
            other,
        )
    to_workers = {
        # its weights file's bytes, read back on the workers with weights_only (nothing pickled)
        "recognizer": ray.put(recognizer.to_bytes()) if recognizer is not None else None,
        "symbols": list(corpus.symbols),
    }
    report = {
        "text_gain": s.text_gain,
        "per": "computed" if recognizer is not None else None,
        "reason": reason if recognizer is None else None,
        "recognizer_valid_per": getattr(recognizer, "meta", {}).get("valid_per") if recognizer else None,
        # what a frame's codes become for it: the codec's own vectors, or learned embeddings (older files)
        "recognizer_inputs": recognizer.meta.get("inputs", "codes") if recognizer else None,
        "sampling": {"top_k": s.top_k, "temperature": s.temperature, "seed": cfg.run.seed},
        "synthesized": describe_plan(tables, items),
        "skipped": skipped,
        "samples": s.samples,
    }
    return to_workers, report


# ------------------------------------------------------------------------------------ on the workers


def synthesis_count(settings, has_recognizer: bool) -> int:
    """Utterances synthesized per language: the PER subset, else the listening sample, else none."""
    return settings.per_utterances if has_recognizer else (1 if settings.samples else 0)


def synthesized_by(items: list[Item], rank: int, world: int, zero_stage: int) -> list[Item]:
    """The items ``rank`` synthesizes (see the module docstring: which ranks synthesize)."""
    if zero_stage == 3:
        return items if rank == 0 else []
    return [it for it in items if it.k % world == rank]


def synthesized_rows(cfg, tables, rank: int, world: int, extra: dict | None) -> dict[str, set[int]]:
    """Per language, the validation rows ``rank`` synthesizes or prompts with (it reads their codes).
    ``tables``: the speaker column of every row is enough (vallex.data.corpus.read_rank_rows)."""
    s = cfg.train.intelligibility
    has_recognizer = (extra or {}).get("recognizer") is not None
    items, _ = synthesis_plan(tables, synthesis_count(s, has_recognizer), cfg.run.seed)
    rows: dict[str, set[int]] = {}
    for it in synthesized_by(items, rank, world, cfg.train.zero_stage):
        rows.setdefault(it.lang, set()).update((it.row, it.prompt_row))
    return rows


class Intelligibility:
    """Per-worker state of the intelligibility evaluation (built once, used at every evaluation)."""

    def __init__(self, cfg, tables, plan, rank: int, world: int, model, extra: dict | None):
        """``plan``: the run's :class:`vallex.train.plan.RunPlan` (languages, ids, model config)."""
        import ray

        from vallex.eval.text_gain import mismatched_batches

        s = cfg.train.intelligibility
        self.settings = s
        self.rank, self.world = rank, world
        self.languages: list[str] = list(plan.eval_languages)
        self.language_ids: dict[str, int] = plan.language_ids
        self.num_codebooks: int = plan.num_codebooks
        self.zero_stage = cfg.train.zero_stage
        self.train_stage = cfg.train.train_stage
        self.model_config = plan.model_config
        self.mismatched: dict[str, list] = {}
        if s.text_gain:
            self.mismatched, _ = mismatched_batches(
                model,
                tables,
                self.language_ids,
                self.num_codebooks,
                cfg.train.batch_size,
                rank,
                world,
                cfg.run.seed,
                cfg.data.max_tokens,
            )
        extra = extra or {}
        self.recognizer = None
        if extra.get("recognizer") is not None:  # the file's bytes, or (from the driver) a ref to them
            from vallex.eval.recognizer import Recognizer

            data = extra["recognizer"]
            self.recognizer = Recognizer.from_bytes(data if isinstance(data, bytes) else ray.get(data))
        self.symbols = extra.get("symbols")
        self.items, _ = synthesis_plan(tables, synthesis_count(s, self.recognizer is not None), cfg.run.seed)
        self.rows = {
            lang: {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("phonemes", "codes", "frames")}
            for lang, t in tables.items()
        }
        self.texts = {lang: t.column("text").to_pylist() for lang, t in tables.items()}
        self.utt_ids = {lang: t.column("utt_id").to_pylist() for lang, t in tables.items()}
        self._floor_edits: dict[str, int] | None = None
        self._copy = None  # ZeRO-3: rank 0's whole-weights copy for synthesis

    def mine(self) -> list[Item]:
        return synthesized_by(self.items, self.rank, self.world, self.zero_stage)

    def evaluate(self, model_engine, valid: dict, device, filler, step: int, sink=None) -> None:
        """Add text gain and PER to ``valid`` (the all-reduced losses, per language), in place; rank 0
        (``sink`` given) sends the listening samples. A collective: every rank calls it."""
        if self.settings.text_gain:
            from vallex.eval.losses import evaluate
            from vallex.eval.text_gain import text_gains

            langs = [lang for lang in self.languages if lang in self.mismatched]
            mis = evaluate(model_engine, self.mismatched, langs, device, self.train_stage, filler)
            gains = text_gains({lang: valid[lang] for lang in langs}, mis)
            for lang in self.languages:
                valid[lang].update(
                    gains.get(lang, dict.fromkeys(("ar_text_gain", "nar_text_gain", "text_gain")))
                )
        if not self.items:
            return
        # Weights that give a NaN/inf loss cannot be sampled from; the run stops at this evaluation
        # (train.on_nonfinite) and the losses, identical on every rank, already say why.
        if any(
            x is not None and not math.isfinite(x)
            for v in valid.values()
            for x in (v.get("ar_loss"), v.get("nar_loss"))
        ):
            return
        model = self._synthesis_model(model_engine)
        generated = {it: self._synthesize(model, it) for it in self.mine()}
        if self.recognizer is not None:
            self._score(generated, valid, device)
        if sink is not None and self.settings.samples:
            import ray

            payload = {
                it.lang: {
                    "codes": codes,
                    "utt_id": self.utt_ids[it.lang][it.row],
                    "prompt_utt_id": self.utt_ids[it.lang][it.prompt_row],
                    "text": self.texts[it.lang][it.row],
                    "frames_reference": int(self.rows[it.lang]["frames"][it.row]),
                }
                for it, codes in generated.items()
                if it.k == 0
            }
            ray.get(sink.samples.remote(step, payload))

    # ------------------------------------------------------------------------------------ helpers

    def _synthesis_model(self, model_engine):
        if self.zero_stage != 3:
            return getattr(model_engine, "module", model_engine)  # DeepSpeed's engine, or a bare model
        from vallex.model.checkpoint import consolidated_state_dict
        from vallex.model.vallex import VallexConfig, VallexModel

        weights = consolidated_state_dict(model_engine, 3)  # every rank joins the gather
        if self.rank != 0:
            return None
        if self._copy is None:
            self._copy = VallexModel(VallexConfig(**self.model_config))
        self._copy.load_state_dict(weights)
        return self._copy

    def _synthesize(self, model, it: Item) -> np.ndarray:
        from vallex.model.synthesis import SamplingSettings, synthesize_codes

        rows, s = self.rows[it.lang], self.settings
        frames = int(rows["frames"][it.row])
        prompt = codes_matrix(
            rows["codes"][it.prompt_row], int(rows["frames"][it.prompt_row]), self.num_codebooks
        )
        settings = SamplingSettings(
            top_k=s.top_k,
            temperature=s.temperature,
            seed=it.seed,
            max_frames=max(1, math.ceil(s.max_length_ratio * frames)),
        )
        lang_id = self.language_ids[it.lang]
        return synthesize_codes(
            model,
            [np.asarray(rows["phonemes"][it.row]).tolist()],
            lang_id,
            settings,
            prompt_ids=np.asarray(rows["phonemes"][it.prompt_row]).tolist(),
            prompt_codes=prompt,
            prompt_language=lang_id,
        )[0]

    def _score(self, generated: dict[Item, np.ndarray], valid: dict, device) -> None:
        """PER of the generated codes and of the ground truth, per language, all-reduced."""
        from vallex.eval.recognizer import edit_distance, reference_phonemes

        mine = list(generated)
        refs = [reference_phonemes(self.rows[it.lang]["phonemes"][it.row], self.symbols) for it in mine]
        hyps = self.recognizer.transcribe([generated[it] for it in mine]) if mine else []
        if self._floor_edits is None:  # the ground truth and the recognizer never change: once
            truth = [
                codes_matrix(
                    self.rows[it.lang]["codes"][it.row],
                    int(self.rows[it.lang]["frames"][it.row]),
                    self.num_codebooks,
                )
                for it in mine
            ]
            floor_hyps = self.recognizer.transcribe(truth) if mine else []
            self._floor_edits = {}
            for it, ref, hyp in zip(mine, refs, floor_hyps, strict=True):
                self._floor_edits[it.lang] = self._floor_edits.get(it.lang, 0) + edit_distance(ref, hyp)
        langs = sorted({it.lang for it in self.items})
        sums = torch.zeros(len(langs), 4, dtype=torch.float64, device=device)
        for it, ref, hyp in zip(mine, refs, hyps, strict=True):
            li = langs.index(it.lang)
            sums[li, 0] += edit_distance(ref, hyp)
            sums[li, 2] += len(ref)
            sums[li, 3] += 1
        for lang, edits in self._floor_edits.items():
            sums[langs.index(lang), 1] += edits
        if dist.is_initialized():
            dist.all_reduce(sums)
        for li, lang in enumerate(langs):
            syn, floor, ref_len, n = sums[li].tolist()
            if lang in valid and ref_len > 0:
                valid[lang].update(
                    {"per": syn / ref_len, "per_floor": floor / ref_len, "per_utterances": int(n)}
                )


# ----------------------------------------------------------------------------- listening samples


def open_codec(codec: dict, prepared_dir: str | None):
    """The preparation's codec: ``vallex.codec.open_tokenizer`` when this build has it, else EnCodec
    from the manifest's settings dict."""
    try:
        from vallex.codec import open_tokenizer
    except ImportError:
        from vallex.codec.encodec import AudioTokenizer, CodecSettings

        return AudioTokenizer(CodecSettings(**codec))
    return open_tokenizer(codec, prepared_dir)


def write_samples(train_dir: Path, step: int, payload: dict, tokenizer, tb=None) -> list[Path]:
    """Decode each language's codes; write ``samples/step_<N>/<lang>.wav`` (24 kHz, 16-bit, atomic),
    ``samples.json`` beside them, and TensorBoard audio. Returns the wav paths."""
    import soundfile as sf

    from vallex.files import write_bytes, write_text

    folder = Path(train_dir) / SAMPLES_DIR / f"step_{step}"
    langs = sorted(payload)
    wavs = tokenizer.decode([np.asarray(payload[lang]["codes"]) for lang in langs]) if langs else []
    sr = int(getattr(tokenizer, "sample_rate", 24000))
    paths, index = [], {}
    for lang, wav in zip(langs, wavs, strict=True):
        wav = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
        buf = io.BytesIO()
        sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
        path = folder / f"{lang}.wav"
        write_bytes(path, buf.getvalue())
        paths.append(path)
        meta = {k: v for k, v in payload[lang].items() if k != "codes"}
        index[lang] = {
            **meta,
            "file": path.name,
            "frames": int(np.asarray(payload[lang]["codes"]).shape[1]),
            "seconds": len(wav) / sr,
        }
        if tb is not None:
            tb.add_audio(f"samples/{lang}", torch.from_numpy(wav)[None], step, sample_rate=sr)
    if langs:
        write_text(folder / "samples.json", json.dumps(index, indent=1, ensure_ascii=False))
    return paths
