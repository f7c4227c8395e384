"""ray_jobs/synthesize.py end to end: tiny random model + random-init codec -> wav files + sidecar."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vallex.model.checkpoint import save_checkpoint
from vallex.model.vallex import build_model
from vallex.text.phonemize import Phonemizer
from vallex.text.symbols import SymbolTable

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello there.", "A second, longer sentence to say."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    table = SymbolTable()
    ph = Phonemizer()
    for lang, texts in (("en", TEXTS), ("fr", ["Bonjour à tous."])):
        for p in ph(texts, lang):
            table.extend(p)
    table.extend(["zzz"])  # a symbol no text uses
    table.save(d / "symbols.json")
    torch.manual_seed(0)
    model = build_model("tiny", num_phonemes=len(table), num_languages=2)
    save_checkpoint(
        model,
        d / "model.pt",
        languages=["en", "fr"],
        symbols=table.symbols,
        symbols_version=table.version,
        size="tiny",
    )
    t = np.arange(24000 // 2) / 24000  # 0.5 s prompt at 24 kHz
    sf.write(d / "prompt.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 24000)
    return d


def synthesize(setup, out, *extra):
    main = runpy.run_path(str(ROOT / "ray_jobs" / "synthesize.py"), run_name="vallex_test")["main"]
    argv = [
        "--checkpoint",
        str(setup / "model.pt"),
        "--symbols",
        str(setup / "symbols.json"),
        "--language",
        "en",
    ]
    for t in TEXTS:
        argv += ["--text", t]
    argv += ["--out", str(out), "--codec-random-init", "--max-frames", "30", "--device", "cpu", *extra]
    assert main(argv) == 0
    side = json.loads((out / "synthesis.json").read_text())
    wavs = [sf.read(out / f["file"], dtype="float32") for f in side["files"]]
    return side, wavs


def test_synthesize_writes_wavs_and_sidecar_deterministically(setup, tmp_path, capsys):
    side, wavs = synthesize(setup, tmp_path / "a", "--seed", "3", "--top-k", "50", "--temperature", "0.9")
    progress = capsys.readouterr().err  # each phase says what it does before doing it
    assert "synthesizing 2 text(s) in en (up to 30 frames each)" in progress
    assert "decoding the codes to audio with EnCodec" in progress
    assert [f["file"] for f in side["files"]] == ["000.wav", "001.wav"]
    assert [f["text"] for f in side["files"]] == TEXTS
    for f, (w, sr) in zip(side["files"], wavs, strict=True):
        assert sr == 24000 and 1 <= f["frames"] <= 30
        assert len(w) == f["frames"] * 320 and f["seconds"] == pytest.approx(len(w) / 24000)
        assert np.isfinite(w).all() and np.abs(w).max() <= 1.0
    assert side["checkpoint"]["languages"] == ["en", "fr"] and side["checkpoint"]["size"] == "tiny"
    assert side["language"] == "en" and side["prompt"] is None
    assert side["sampling"] == {"top_k": 50, "top_p": 1.0, "temperature": 0.9, "seed": 3, "max_frames": 30}
    assert side["codec"]["pretrained"] is False and side["codec"]["seed"] == 0
    assert side["symbols"]["fingerprint"] == side["checkpoint"]["symbols_fingerprint"]
    # Same seed -> same audio; another seed -> other codes.
    side_b, wavs_b = synthesize(setup, tmp_path / "b", "--seed", "3", "--top-k", "50", "--temperature", "0.9")
    for (w, _), (wb, _) in zip(wavs, wavs_b, strict=True):
        assert np.array_equal(w, wb)
    side_c, wavs_c = synthesize(setup, tmp_path / "c", "--seed", "4", "--top-k", "50", "--temperature", "0.9")
    assert any(
        len(w) != len(wc) or not np.array_equal(w, wc) for (w, _), (wc, _) in zip(wavs, wavs_c, strict=True)
    )


def test_greedy_cross_lingual_prompt_is_deterministic(setup, tmp_path):
    prompt = [
        "--prompt-audio",
        str(setup / "prompt.wav"),
        "--prompt-text",
        "Bonjour à tous.",
        "--prompt-language",
        "fr",
    ]
    side, wavs = synthesize(setup, tmp_path / "a", "--top-k", "1", "--seed", "1", *prompt)
    _, wavs_b = synthesize(
        setup, tmp_path / "b", "--top-k", "1", "--seed", "2", *prompt
    )  # greedy: seed unused
    for (w, _), (wb, _) in zip(wavs, wavs_b, strict=True):
        assert np.array_equal(w, wb)
    assert side["prompt"]["language"] == "fr" and side["prompt"]["frames"] == 38  # ceil(0.5 s * 75)
    assert side["sampling"]["top_k"] == 1
    # The prompt is heard: another voice of the same length (a 330 Hz tone, not 220 Hz) gives other
    # speech for the same texts, greedy and seeded alike. Dropping the prompt would make them equal.
    t = np.arange(24000 // 2) / 24000
    sf.write(tmp_path / "other.wav", 0.3 * np.sin(2 * np.pi * 330 * t), 24000)
    other = [*prompt[:1], str(tmp_path / "other.wav"), *prompt[2:]]
    side_o, wavs_o = synthesize(setup, tmp_path / "o", "--top-k", "1", "--seed", "1", *other)
    assert side_o["prompt"]["frames"] == 38
    assert all(
        len(w) != len(wo) or not np.array_equal(w, wo) for (w, _), (wo, _) in zip(wavs, wavs_o, strict=True)
    )


def test_unknown_language_is_a_clear_error(setup, tmp_path):
    with pytest.raises(ValueError, match=r"language 'de' is not one of the model's languages \['en', 'fr'\]"):
        synthesize(setup, tmp_path, "--language", "de")


def test_prepared_dir_decodes_with_the_corpus_codec(setup, tmp_path, capsys):
    """--prepared-dir: the codec that made the corpus's codes decodes (here a fitted mel_rvq codec);
    the same codes (same model and seed) then sound different from the random EnCodec's."""
    from vallex.codec.mel_rvq import FITTED_NAME, MelRVQSettings, fit_tables, sha256, tables_bytes
    from vallex.data.schema import MANIFEST_NAME
    from vallex.data.synthetic import write_synthetic_corpus

    prep = write_synthetic_corpus(tmp_path / "prep", {"en": 4, "fr": 4}, valid_per_language=2)
    settings = MelRVQSettings(fit_frames=1024, fit_iterations=2)
    noise = np.random.default_rng(0).standard_normal(24000 * 15).astype(np.float32) * 0.1
    data = tables_bytes(fit_tables([noise], settings), settings)
    (prep / FITTED_NAME).write_bytes(data)
    manifest = json.loads((prep / MANIFEST_NAME).read_text())
    manifest["codec"] = {**settings.to_dict(), "fitted": FITTED_NAME, "sha256": sha256(data)}
    (prep / MANIFEST_NAME).write_text(json.dumps(manifest))

    side, wavs = synthesize(setup, tmp_path / "mel", "--seed", "3", "--prepared-dir", str(prep))
    assert side["codec"] == manifest["codec"]
    assert "note: codec: NOT EnCodec: mel_rvq" in capsys.readouterr().out
    side_enc, wavs_enc = synthesize(setup, tmp_path / "enc", "--seed", "3")
    assert [f["frames"] for f in side["files"]] == [f["frames"] for f in side_enc["files"]]
    for f, (w, _), (we, _) in zip(side["files"], wavs, wavs_enc, strict=True):
        assert len(w) == len(we) == f["frames"] * 320 and not np.array_equal(w, we)
