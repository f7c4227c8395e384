"""Data preparation end to end on real espeak speech, the real phonemizer and a (random-init) EnCodec."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vallex.config import CodecSection, PrepareSection
from vallex.data import prepare
from vallex.data.corpus import PreparedCorpus
from vallex.data.demo_corpus import make_demo_corpus
from vallex.data.prepare import PrepareError, _fit_sample, prepare_corpus, progress_postfix, read_shard_stats
from vallex.data.schema import SHARD_SCHEMA, check_schema, codes_matrix
from vallex.data.sources import ManifestError, read_manifest

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = PrepareSection(
    codec=CodecSection(pretrained=False), rows_per_shard=4, codec_actors=2, codec_batch_size=4
)


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0, scale=0, progress=False)


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _subset(manifest: Path, out: Path, per_lang: dict[str, tuple[int, int]], extra: list[dict] = ()) -> Path:
    """A small manifest: (train, valid) utterances per language, audio paths made absolute."""
    rows = []
    for lang, (n_train, n_valid) in per_lang.items():
        for split, n in (("train", n_train), ("valid", n_valid)):
            pick = [r for r in _rows(manifest) if r["language"] == lang and r["split"] == split][:n]
            rows += [{**r, "audio": str(manifest.parent / r["audio"])} for r in pick]
    rows += list(extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return out


def _write_wav(path: Path, samples: np.ndarray, sr: int = 22050) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


def _planted(tmp: Path, demo: Path) -> list[dict]:
    """One bad item of each kind, all labelled English training data."""
    good = next(r for r in _rows(demo) if r["language"] == "en")
    good_audio = demo.parent / good["audio"]
    truncated = tmp / "bad" / "truncated.wav"
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(good_audio.read_bytes()[:30])  # a header cut in half
    t = np.arange(22050 * 2) / 22050
    base = {"language": "en", "speaker": "en-bad", "split": "train"}
    return [
        {**base, "id": "bad-truncated", "audio": str(truncated), "text": "A cut file."},
        {**base, "id": "bad-empty-text", "audio": str(good_audio), "text": "   "},
        {
            **base,
            "id": "bad-silence",
            "audio": _write_wav(tmp / "bad/silence.wav", np.zeros_like(t)),
            "text": "Silence.",
        },
        {
            **base,
            "id": "bad-short",
            "audio": _write_wav(tmp / "bad/short.wav", 0.3 * np.sin(2 * np.pi * 220 * t[:2205])),
            "text": "Too short.",
        },
        {**base, "id": "bad-missing", "audio": str(tmp / "bad/nowhere.wav"), "text": "Missing file."},
        {
            **base,
            "id": "bad-long",  # 25 s > max_duration: skipped from its header, never decoded
            "audio": _write_sf(
                tmp / "bad/long.flac", 0.3 * np.sin(2 * np.pi * 220 * np.arange(22050 * 25) / 22050)
            ),
            "text": "Too long.",
        },
        {
            **base,
            "id": "bad-rate",
            "audio": _write_sf(tmp / "bad/rate.wav", _speech(good_audio), sr=4000),
            "text": good["text"],
        },
    ]


def _write_sf(path: Path, samples: np.ndarray, sr: int = 22050, **kwargs) -> str:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sr, **kwargs)
    return str(path)


def _speech(path: Path) -> np.ndarray:
    import soundfile as sf

    return sf.read(path, dtype="float32")[0]


def _odd_but_good(tmp: Path, demo: Path) -> list[dict]:
    """Real speech at an off-grid rate (44 101 Hz) and in 5.1 (a 40 Hz hum on the LFE channel)."""
    good = [r for r in _rows(demo) if r["language"] == "en" and r["split"] == "train"][-2:]
    speech = [_speech(demo.parent / r["audio"]) for r in good]
    surround = np.repeat(speech[1][:, None], 6, axis=1)
    surround[:, 3] = 0.5 * np.sin(2 * np.pi * 40 * np.arange(len(surround)) / 22050)
    base = {"language": "en", "speaker": "en-odd", "split": "train"}
    return [
        {
            **base,
            "id": "odd-rate",
            "audio": _write_sf(tmp / "odd/rate.wav", speech[0], sr=44101),
            "text": good[0]["text"],
        },
        {
            **base,
            "id": "odd-surround",
            "audio": _write_sf(tmp / "odd/surround.wav", surround, format="WAVEX", subtype="FLOAT"),
            "text": good[1]["text"],
        },
    ]


def test_prepare_writes_shards_manifest_and_counts_bad_input(ray_cluster, demo_manifest, tmp_path):
    extra = _planted(tmp_path, demo_manifest) + _odd_but_good(tmp_path, demo_manifest)
    src = _subset(demo_manifest, tmp_path / "m.jsonl", {"en": (6, 2), "ar": (3, 2)}, extra)
    out = tmp_path / "prepared"
    manifest = prepare_corpus(read_manifest(src), out, SETTINGS, progress=False)

    assert json.loads((out / "manifest.json").read_text()) == manifest
    en, ar = manifest["languages"]["en"], manifest["languages"]["ar"]
    assert en["utterances"] == {"train": 8, "valid": 2} and ar["utterances"] == {"train": 3, "valid": 2}
    skipped = {reason: e["examples"] for reason, e in en["skipped"].items()}
    assert skipped == {
        "unreadable_audio": ["bad-truncated"],
        "empty_text": ["bad-empty-text"],
        "silent": ["bad-silence"],
        "too_short": ["bad-short"],
        "missing_audio": ["bad-missing"],
        "too_long": ["bad-long"],
        "unsupported_sample_rate": ["bad-rate"],
    }
    assert en["skipped"]["unsupported_sample_rate"]["errors"] == [
        "bad-rate: 4000 Hz, outside 8000..192000 Hz"
    ]
    assert "truncated.wav" in en["skipped"]["unreadable_audio"]["errors"][0]
    assert en["skipped_total"] == 7 and ar["skipped_total"] == 0
    # How channels were mixed: the 5.1 clip without its LFE channel, the rest mono.
    assert en["channel_mix"] == {
        "mean of 5 of 6 channels, LFE (channel 4) left out (WAVE channel mask)": 1,
        "mono": 9,
    }
    assert manifest["codec"]["pretrained"] is False and manifest["codec"]["num_codebooks"] == 8

    symbols = json.loads((out / "symbols.json").read_text())
    assert symbols["version"] == manifest["symbols_version"]
    # 8 + 2 en rows with rows_per_shard=4 -> 3 shards (the bad rows are filtered before sharding or inside)
    shards = sorted((out / "en").glob("part-*.parquet"))
    assert [str(p.relative_to(out)) for p in shards] == en["shards"]
    # per-shard split counts, parallel to the list of shards
    assert list(en["shard_rows"]) == en["shards"]
    for rel, counts in en["shard_rows"].items():
        splits = pq.read_table(out / rel, columns=["split"])["split"].to_pylist()
        assert counts == {"train": splits.count("train"), "valid": splits.count("valid")}
    assert sum(c["train"] for c in en["shard_rows"].values()) == en["utterances"]["train"]
    table = pq.read_table(shards[0])
    check_schema(table.schema, str(shards[0]))
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    for row in table.to_pylist():
        codes = codes_matrix(np.array(row["codes"]), row["frames"], row["num_codebooks"])
        assert codes.shape[0] == 8 and codes.max() < 1024 and codes.min() >= 0
        # EnCodec 24 kHz: 75 frames per second of audio
        assert abs(row["frames"] - row["duration"] * 75) <= 2
        assert row["phonemes"] and all(0 < i < len(symbols["symbols"]) for i in row["phonemes"])
        assert row["language"] == "en" and row["split"] in ("train", "valid")


def test_rerun_skips_finished_shards_and_adding_a_language_keeps_ids(
    ray_cluster, demo_manifest, tmp_path, monkeypatch
):
    out = tmp_path / "prepared"
    first = _subset(demo_manifest, tmp_path / "a.jsonl", {"en": (4, 2)})
    prepare_corpus(read_manifest(first), out, SETTINGS, progress=False)
    en_shards = sorted((out / "en").glob("*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in en_shards}
    symbols_before = json.loads((out / "symbols.json").read_text())

    # Same input again: nothing is rewritten, nothing phonemized again.
    again = prepare_corpus(read_manifest(first), out, SETTINGS, progress=False)
    assert {p: p.stat().st_mtime_ns for p in en_shards} == mtimes
    assert again["last_run"] == {
        "phonemized": 0,
        "cached": 6,
        "shards_written": 0,
        "shards_reused": len(en_shards),
    }

    # Adding Chinese fails twice (disk full): symbols.json and manifest.json commit together, so the
    # corpus still opens as it was, with the table its shards were written with.
    added = _subset(demo_manifest, tmp_path / "b.jsonl", {"zh": (3, 2)})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare, "_run_jobs", disk_full)  # in the encode pass
    with pytest.raises(OSError, match="No space left"):
        prepare_corpus(read_manifest(added), out, SETTINGS, progress=False)
    monkeypatch.undo()
    assert json.loads((out / "symbols.json").read_text()) == symbols_before
    assert PreparedCorpus.open(out).symbols == symbols_before["symbols"]

    write_text = prepare.write_text
    monkeypatch.setattr(  # after the shards and symbols.json, at the last write
        prepare,
        "write_text",
        lambda path, text: disk_full() if path.endswith("manifest.json") else write_text(path, text),
    )
    with pytest.raises(OSError, match="No space left"):
        prepare_corpus(read_manifest(added), out, SETTINGS, progress=False)
    monkeypatch.undo()
    assert json.loads((out / "symbols.json").read_text())["version"] == symbols_before["version"] + 1
    corpus = PreparedCorpus.open(out)
    assert corpus.languages == ["en"] and corpus.symbols == symbols_before["symbols"]

    # Add Chinese: only its shards are written, old ids stay, the table grows and its version bumps.
    # (The failed runs cached the phonemes, and the second one wrote the shards.)
    manifest = prepare_corpus(read_manifest(added), out, SETTINGS, progress=False)
    assert {p: p.stat().st_mtime_ns for p in en_shards} == mtimes
    assert manifest["last_run"] == {"phonemized": 0, "cached": 5, "shards_written": 0, "shards_reused": 2}
    assert PreparedCorpus.open(out).languages == ["en", "zh"]
    assert set(manifest["languages"]) == {"en", "zh"}
    symbols_after = json.loads((out / "symbols.json").read_text())
    n = len(symbols_before["symbols"])
    assert symbols_after["symbols"][:n] == symbols_before["symbols"]
    assert len(symbols_after["symbols"]) > n and symbols_after["version"] == symbols_before["version"] + 1
    assert manifest["symbols_version"] == symbols_after["version"]


def test_fitted_codec_is_fitted_once_beside_the_shards_and_reused(ray_cluster, demo_manifest, tmp_path):
    """codec.kind=mel_rvq: fitted on the training split before the shards, stored beside them with its
    sha256 in the manifest, loaded by the encode actors, reused by later runs into the same folder."""
    from vallex.codec import open_tokenizer
    from vallex.codec.audio import load_audio, resample
    from vallex.codec.mel_rvq import FITTED_NAME, MelRVQSettings, fit_tables, sha256, tables_bytes

    fitted = CodecSection(kind="mel_rvq", fit_frames=2048, fit_iterations=3)
    settings = PrepareSection(codec=fitted, rows_per_shard=4, codec_actors=2, codec_batch_size=4)
    utts = read_manifest(_subset(demo_manifest, tmp_path / "a.jsonl", {"en": (8, 2)}))
    out = tmp_path / "prepared"
    manifest = prepare_corpus(utts, out, settings, progress=False)
    codec, data = manifest["codec"], (out / FITTED_NAME).read_bytes()
    assert codec["kind"] == "mel_rvq" and codec["fitted"] == FITTED_NAME and codec["sha256"] == sha256(data)
    assert (codec["num_codebooks"], codec["codebook_size"], codec["frame_rate"], codec["seed"]) == (
        8,
        1024,
        75,
        0,
    )

    # The driver's fit is the fit of the training audio (validation audio never seen), reproducible
    # in another process; the actors' codes are that codec's codes of each clip.
    wavs = {u.id: resample(*load_audio(u.audio), 24000) for u in utts}
    spec = MelRVQSettings.from_dict(codec)
    sample = _fit_sample(utts, spec.fit_utterances, seed=0)
    assert {u.split for u in sample} == {"train"} and len(sample) == 8
    assert tables_bytes(fit_tables([wavs[u.id] for u in sample], spec), spec) == data
    tokenizer = open_tokenizer(codec, out)
    rows = [r for rel in manifest["languages"]["en"]["shards"] for r in pq.read_table(out / rel).to_pylist()]
    assert len(rows) == 10
    for row in rows:
        codes = codes_matrix(np.array(row["codes"]), row["frames"], row["num_codebooks"])
        assert np.array_equal(codes, tokenizer.encode([wavs[row["utt_id"]]])[0]), row["utt_id"]

    # A re-run and an added language reuse the tables; another codec is refused; so are changed tables.
    mtime = (out / FITTED_NAME).stat().st_mtime_ns
    again = prepare_corpus(utts, out, settings, progress=False)
    assert again["last_run"]["shards_written"] == 0 and again["codec"] == codec
    zh = read_manifest(_subset(demo_manifest, tmp_path / "b.jsonl", {"zh": (3, 2)}))
    added = prepare_corpus(zh, out, settings, progress=False)
    assert added["codec"] == codec and set(added["languages"]) == {"en", "zh"}
    assert (out / FITTED_NAME).stat().st_mtime_ns == mtime
    with pytest.raises(PrepareError, match="codes from different codecs cannot be mixed"):
        prepare_corpus(utts, out, settings, seed=1, progress=False)
    (out / FITTED_NAME).write_bytes(tables_bytes(fit_tables([wavs[u.id] for u in utts], spec), spec))
    with pytest.raises(PrepareError, match=f"{FITTED_NAME}: sha256 .* the fitted codec changed"):
        prepare_corpus(utts, out, settings, progress=False)
    (out / FITTED_NAME).unlink()
    with pytest.raises(PrepareError, match=f"{FITTED_NAME} is missing but .*manifest.json says the shards"):
        prepare_corpus(utts, out, settings, progress=False)


def test_language_with_nothing_usable_is_an_error(ray_cluster, demo_manifest, tmp_path):
    rows = _planted(tmp_path, demo_manifest)[3:]  # too short + missing: nothing survives
    valid = _subset(demo_manifest, tmp_path / "v.jsonl", {"en": (0, 1)})
    src = tmp_path / "bad.jsonl"
    src.write_text(valid.read_text() + "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(PrepareError, match="language 'en' yielded no training utterances.*too_short"):
        prepare_corpus(read_manifest(src), tmp_path / "out", SETTINGS, progress=False)


def test_manifest_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"audio": "a.wav", "text": "hi", "language": "en", "speaker": "s"}\n{"audio": "b.wav", "text": "x"}\n'
    )
    with pytest.raises(ManifestError, match=r"m.jsonl:2: missing keys \['language', 'speaker'\]"):
        read_manifest(p)
    p.write_text('{"audio": "a.wav", "text": "hi", "language": "xx", "speaker": "s"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1: .*xx"):
        read_manifest(p)
    c = tmp_path / "m.csv"
    c.write_text("audio,text,lang,speaker\na.wav,hi,en,s\n")
    with pytest.raises(ManifestError, match="header lacks columns"):
        read_manifest(c)


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("*/part-*.parquet"))


def test_resume_after_a_killed_run(ray_cluster, demo_manifest, tmp_path):
    """Kill ray_jobs/prepare.py (SIGKILL, its whole process group) once some shards exist, plant what a
    crash can leave (a temp file, a shard cut short at its final name), re-run: finished shards are kept
    as they are, the rest are written, and the manifest is the one a clean run produces."""
    src = _subset(demo_manifest, tmp_path / "m.jsonl", {"en": (4, 2)})
    args = [
        "--config",
        str(ROOT / "job.yaml"),
        f"corpus.source={src}",
        "prepare.rows_per_shard=1",
        "prepare.codec_actors=1",
        "prepare.codec.kind=encodec",  # job.yaml's demo codec is fitted; this test is about EnCodec's shards
        "prepare.codec.pretrained=false",
        "run.seed=0",
    ]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "ray_jobs" / "prepare.py"), *args, f"run.output_dir={killed}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill below reaches its Ray processes too
    )
    try:
        deadline = time.monotonic() + 120
        while len(_shards(killed / "prepare")) < 2:
            assert proc.poll() is None, (
                f"prepare exited ({proc.returncode}) before it was killed: see {log.name}"
            )
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    out = killed / "prepare"
    finished = [p for p in _shards(out) if read_shard_stats(p)[0] is not None]
    assert 2 <= len(finished) < 6, f"{len(finished)} of 6 shards finished: the kill came too late"
    assert not (out / "manifest.json").exists()

    # What a crash mid-write leaves: a temp file, and (from a non-atomic writer) a shard cut short.
    cut = finished.pop()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert read_shard_stats(cut) == (None, None)
    tmp = cut.with_name(".part-00005.parquet.tmp-12345")
    tmp.write_bytes(b"PAR1 half a shard")
    mtimes = {p: p.stat().st_mtime_ns for p in finished}

    main = runpy.run_path(str(ROOT / "ray_jobs" / "prepare.py"), run_name="vallex_test")["main"]
    assert main([*args, f"run.output_dir={killed}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes  # finished shards not rewritten
    assert read_shard_stats(cut)[0] is not None and pq.read_table(cut).num_rows == 1  # the cut one is
    assert not tmp.exists()

    assert main([*args, f"run.output_dir={clean}"]) == 0
    resumed = json.loads((out / "manifest.json").read_text())
    reference = json.loads((clean / "prepare" / "manifest.json").read_text())
    # The resumed run phonemized nothing (the killed run cached it) and wrote only the missing shards.
    # (Reused may exceed len(finished): a codec actor can land one more shard as the kill spreads.)
    run = resumed["last_run"]
    assert run["phonemized"] == 0 and run["cached"] == 6
    assert run["shards_written"] + run["shards_reused"] == 6 and run["shards_reused"] >= len(finished)
    assert run["shards_written"] >= 1  # at least the cut shard
    for m in (resumed, reference):
        m.pop("created")
        m.pop("last_run")
    assert resumed == reference
    en = resumed["languages"]["en"]
    assert en["utterances"] == {"train": 4, "valid": 2} and len(en["shards"]) == 6


def test_progress_postfix_gives_rates():
    assert progress_postfix(7200.0, 100, 10.0) == (
        "10.0 kept utt/s, 0.2000 audio-h/s (720.0x real time), 2.000 h done"
    )


def test_a_read_error_hints_at_credentials_only_for_a_bucket(tmp_path, monkeypatch):
    """A local file that cannot be read is named with the OS's reason, not blamed on AWS credentials;
    on a URI the hint names where credentials come from."""
    from vallex.data import corpus, prepare
    from vallex.data.corpus import CorpusError, PreparedCorpus

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    (tmp_path / "manifest.json").write_text("{}")
    for module in (corpus, prepare):
        monkeypatch.setattr(module, "read_text", denied)
    local = os.path.realpath(tmp_path / "manifest.json")
    expected = f"cannot read {local} ([Errno 13] Permission denied: '{local}')"
    with pytest.raises(CorpusError) as err:
        PreparedCorpus.open(tmp_path)
    assert str(err.value) == expected
    with pytest.raises(PrepareError) as err:
        prepare._read_json(local)
    assert str(err.value) == expected

    monkeypatch.setattr(prepare, "is_file", lambda path: True)
    with pytest.raises(PrepareError, match=r"cannot read s3://b/p/manifest.json .*credentials .*AWS_"):
        prepare._read_json("s3://b/p/manifest.json")


def _reference_jobs(utts, phonemizer, rows_per_shard: int, valid_fraction: float, seed: int):
    """What one pass over the whole input on the driver gives (the layout shards have always had):
    splits, the text filter, each language's usable rows in id order cut every ``rows_per_shard``."""
    from vallex.data.prepare import assign_splits

    ready = {}
    for u in assign_splits(utts, valid_fraction, seed):
        if u.text.strip() and (phones := phonemizer([u.text], u.language)[0]):
            ready.setdefault(u.language, []).append((u, phones))
    out = {}
    for lang, rows in ready.items():
        rows.sort(key=lambda r: r[0].id)
        out[lang] = [rows[i : i + rows_per_shard] for i in range(0, len(rows), rows_per_shard)]
    return out


def test_batches_planned_into_shards_give_the_one_pass_layout(tmp_path):
    """In process, the real phonemizer: utterances phonemized in batches (as the Ray tasks do, each
    batch alone), their summaries merged and the shards planned from per-batch counts give exactly the
    shards one pass over the input gives, with the same fingerprints; unusable texts are counted skips
    whose examples are the first ones of the input; the per-batch cache serves a re-run."""
    from vallex.data.prepare import (
        _language_batches,
        _merge_batch_skips,
        _phonemizer_context,
        _shard_pieces,
        phonemize_batch,
        plan_shard,
    )
    from vallex.data.sources import Utterance
    from vallex.text.phonemize import Phonemizer
    from vallex.text.symbols import SymbolTable

    words = ["one", "two", "three", "four", "five", "six", "seven"]
    utts = []
    for i in range(23):  # ids not in input order; empty and punctuation-only texts spread over batches
        text = "   " if i % 7 == 3 else "?!" if i % 9 == 5 else f"{words[i % 7]} {words[(i * 3) % 7]}."
        lang = "en" if i % 4 else "fr"
        utts.append(Utterance(f"u{(i * 11) % 23:02d}", f"/a/{i}.wav", text, lang, f"s{i % 3}"))
    phonemizer, rows_per_shard, valid_fraction, seed = Phonemizer(), 3, 0.3, 5
    context = _phonemizer_context(phonemizer)
    batches = _language_batches(utts, rows_per_shard)
    assert {lang: [len(b) for b in bs] for lang, bs in batches.items()} == {"en": [3] * 5 + [2], "fr": [3, 3]}

    def run():
        results = {
            lang: [
                phonemize_batch(
                    batch,
                    lang,
                    phonemizer,
                    context,
                    str(tmp_path / f"{lang}-{b}.parquet"),
                    valid_fraction,
                    seed,
                )
                for b, batch in enumerate(bs)
            ]
            for lang, bs in batches.items()
        }
        return {lang: [s for s, _ in r] for lang, r in results.items()}, {
            lang: [rows for _, rows in r] for lang, r in results.items()
        }

    summaries, ready = run()
    reference = _reference_jobs(utts, phonemizer, rows_per_shard, valid_fraction, seed)
    table = SymbolTable()
    table.extend(s for bs in summaries.values() for summary in bs for s in summary["symbols"])
    assert set(table.symbols[4:]) == {
        p for shards in reference.values() for s in shards for _, ps in s for p in ps
    }
    for lang, shards in reference.items():
        pieces = _shard_pieces([s["ready"] for s in summaries[lang]], rows_per_shard)
        assert len(pieces) == len(shards)
        for index, (shard, piece) in enumerate(zip(shards, pieces, strict=True)):
            spec = {
                "language": lang,
                "index": index,
                "path": str(tmp_path / lang / f"part-{index:05d}.parquet"),
                "slices": [(start, stop) for _, start, stop in piece],
                "symbols_version": table.version,
                "codec": {"kind": "encodec"},
                "min": 0.5,
                "max": 20.0,
            }
            summary, job = plan_shard(spec, table.symbols, *(ready[lang][b] for b, _, _ in piece))
            want = [{**u.to_dict(), "phonemes": table.encode(ps)} for u, ps in shard]
            assert job["rows"] == want and summary == {
                "path": spec["path"],
                "reused": False,
                "rows": len(want),
            }
            assert job["fingerprint"] == prepare._fingerprint(
                {"rows": want, "codec": {"kind": "encodec"}, "min": 0.5, "max": 20.0, "format": 1}
            )
    # Skips: en has empty texts at input positions 3, 10, 17 and "?!" at 5, 14 (position 21 is fr).
    en = _merge_batch_skips(summaries["en"]).data
    assert list(en) == ["empty_text", "unphonemizable_text"]
    assert en["empty_text"] == {"count": 3, "examples": [utts[i].id for i in (3, 10, 17)]}
    assert en["unphonemizable_text"] == {"count": 2, "examples": [utts[i].id for i in (5, 14)]}
    assert sum(s["phonemized"] for bs in summaries.values() for s in bs) == 20
    # A re-run reads each batch's cache: nothing phonemized, the same rows.
    again, ready_again = run()
    assert sum(s["phonemized"] for bs in again.values() for s in bs) == 0
    assert sum(s["cached"] for bs in again.values() for s in bs) == 20 and ready_again == ready
