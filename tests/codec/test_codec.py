"""The codec wrapper: audio loading/resampling and batched EnCodec encode/decode (random-init weights)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from vallex.codec.audio import AudioError, load_audio, resample
from vallex.codec.encodec import (
    CHECKPOINT_NAME,
    CODEBOOK_SIZE,
    HOP_LENGTH,
    SAMPLE_RATE,
    AudioTokenizer,
    CodecCheckpointError,
    CodecError,
    CodecSettings,
    load_encodec,
    num_frames,
)

RANDOM = CodecSettings(pretrained=False, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AudioTokenizer(RANDOM, device="cpu")


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """A voiced, amplitude-modulated tone with noise: enough structure to exercise the codec."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 100 + 100 * rng.random()
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + rng.random() * 6)
    return (0.1 * voiced * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# settings


def test_num_codebooks_is_derived_from_bandwidth():
    assert {bw: CodecSettings(bandwidth=bw).num_codebooks for bw in (1.5, 3.0, 6.0, 12.0, 24.0)} == {
        1.5: 2,
        3.0: 4,
        6.0: 8,
        12.0: 16,
        24.0: 32,
    }
    with pytest.raises(ValueError, match="supports"):
        CodecSettings(bandwidth=5.0)


def test_settings_round_trip_through_the_manifest_dict():
    for s in (RANDOM, CodecSettings(checkpoint="/x/encodec.th")):
        d = s.to_dict()
        assert d["num_codebooks"] == 8 and d["frame_rate"] == 75 and d["sample_rate"] == SAMPLE_RATE
        assert CodecSettings(**d) == s
    # seed has no effect on pretrained weights, so it does not appear in (or invalidate) the manifest
    assert CodecSettings(seed=1).to_dict() == CodecSettings(seed=2).to_dict()
    with pytest.raises(ValueError, match="num_codebooks"):
        CodecSettings(**{**RANDOM.to_dict(), "num_codebooks": 4})


def test_num_frames_is_ceil_of_75_per_second():
    for n, want in ((1, 1), (320, 1), (321, 2), (24000, 75), (24001, 76)):
        assert num_frames(n) == want == int(np.ceil(n * 75 / 24000))


# ------------------------------------------------------------------------------------------------
# encode / decode


def test_encode_gives_int16_codes_of_the_right_shape(tokenizer):
    lengths = [24000, 24000 * 2 + 17, 321]
    codes = tokenizer.encode([_speechlike(n / SAMPLE_RATE, i) for i, n in enumerate(lengths)])
    for c, n in zip(codes, lengths, strict=True):
        assert c.dtype == np.int16 and c.shape == (8, num_frames(n))
        assert c.min() >= 0 and c.max() < CODEBOOK_SIZE
    # EnCodec's untrained codebooks are all zeros (every frame -> code 0); ours must carry information.
    assert all(len(np.unique(codes[1][q])) > 10 for q in range(8))
    assert tokenizer.encode([]) == []


def test_decode_gives_audio_of_the_right_length(tokenizer):
    codes = tokenizer.encode([_speechlike(1.0, 0), _speechlike(0.5, 1)])
    wavs = tokenizer.decode(codes)
    for w, c in zip(wavs, codes, strict=True):
        assert w.dtype == np.float32 and w.shape == (c.shape[1] * HOP_LENGTH,) and np.isfinite(w).all()
    # The decoder is causal: decoding alone or next to a longer clip gives the same samples.
    np.testing.assert_allclose(tokenizer.decode([codes[1]])[0], wavs[1], atol=1e-5)
    with pytest.raises(CodecError, match=r"expected shape \[8"):
        tokenizer.decode([codes[0][:4]])
    with pytest.raises(CodecError, match="values must be in"):
        tokenizer.decode([np.full((8, 3), CODEBOOK_SIZE, dtype=np.int16)])


def test_same_seed_same_codes_other_seed_other_codes(tokenizer):
    wav = _speechlike(1.0, 7)
    before = torch.get_rng_state()
    again = AudioTokenizer(CodecSettings(pretrained=False, seed=0), device="cpu").encode([wav])[0]
    assert torch.equal(before, torch.get_rng_state())  # building the codec leaves the caller's RNG alone
    np.testing.assert_array_equal(again, tokenizer.encode([wav])[0])
    other = AudioTokenizer(CodecSettings(pretrained=False, seed=1), device="cpu").encode([wav])[0]
    assert (other != again).mean() > 0.5


def test_batched_codes_equal_one_by_one_codes(tokenizer):
    wavs = [_speechlike(s, i) for i, s in enumerate((2.0, 0.7, 1.3337, 0.25))]
    batched = tokenizer.encode(wavs)
    frames_differing = frames_total = 0
    for w, b in zip(wavs, batched, strict=True):
        alone = tokenizer.encode([w])[0]
        assert alone.shape == b.shape
        frames_differing += int((alone != b).any(axis=0).sum())
        frames_total += b.shape[1]
    # Zero-padding to whole frames makes padding invisible; what can remain is float rounding flipping a
    # near-tie in the nearest-code search (the matmul order depends on the batch shape): rare.
    assert frames_differing <= 0.02 * frames_total


def test_encode_rejects_bad_audio(tokenizer):
    with pytest.raises(CodecError, match="clip 1.*mono"):
        tokenizer.encode([_speechlike(0.1, 0), np.zeros((2, 100), np.float32)])
    with pytest.raises(CodecError, match="NaN"):
        tokenizer.encode([np.full(100, np.nan, np.float32)])


def test_tokenizer_pickles_without_its_model(tokenizer):
    tokenizer.encode([_speechlike(0.1, 0)])  # model loaded
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone._model is None and clone.settings == RANDOM


# ------------------------------------------------------------------------------------------------
# pretrained loading (offline)


def test_missing_hub_checkpoint_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CodecCheckpointError) as e:
        load_encodec(CodecSettings(pretrained=True))
    msg = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / CHECKPOINT_NAME) in msg
    assert "https://dl.fbaipublicfiles.com/encodec/v0/" + CHECKPOINT_NAME in msg
    assert "pretrained: false" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_explicit_checkpoint_names_it(tmp_path):
    path = tmp_path / "weights" / "mine.th"
    with pytest.raises(CodecCheckpointError, match=str(path)):
        AudioTokenizer(CodecSettings(checkpoint=str(path)), device="cpu").encode([_speechlike(0.1, 0)])


def test_explicit_checkpoint_loads_with_weights_only(tokenizer, tmp_path):
    # A state dict saved from the random codec stands in for the real file: same loading code path.
    path = tmp_path / "encodec_copy.th"
    torch.save(tokenizer.model.state_dict(), path)
    loaded = AudioTokenizer(CodecSettings(pretrained=True, checkpoint=str(path)), device="cpu")
    wav = _speechlike(0.5, 3)
    np.testing.assert_array_equal(loaded.encode([wav])[0], tokenizer.encode([wav])[0])


def test_corrupt_checkpoints_are_reported(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CodecError, match="garbage.th.*could not be loaded"):
        load_encodec(CodecSettings(checkpoint=str(garbage)))
    # The official name carries a sha256 prefix, checked as torch.hub would.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints" / CHECKPOINT_NAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"half a download")
    with pytest.raises(CodecError, match="corrupt or incomplete"):
        load_encodec(CodecSettings())


# ------------------------------------------------------------------------------------------------
# audio files


def test_load_audio_reads_formats_and_downmixes(tmp_path):
    sr = 22050
    left = _speechlike(0.5, 0)[: sr // 2]
    stereo = np.stack([left, -0.5 * left], axis=1)
    for name, kwargs in (("a.wav", {}), ("a.flac", {}), ("a.ogg", {"subtype": "VORBIS"})):
        sf.write(tmp_path / name, stereo, sr, **kwargs)
        wav, rate = load_audio(tmp_path / name)
        assert rate == sr and wav.dtype == np.float32 and wav.ndim == 1 and len(wav) == len(left)
    wav, _ = load_audio(tmp_path / "a.flac")
    np.testing.assert_allclose(wav, 0.25 * left, atol=1e-3)  # mean of the two channels


def test_load_audio_errors_name_the_file(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _speechlike(1.0, 0), 16000, subtype="PCM_16")
    data = good.read_bytes()
    cases = {
        "truncated.wav": data[: len(data) // 2],  # libsndfile alone would read half and say nothing
        "header_only.wav": data[:30],
        "garbage.wav": b"definitely not audio" * 10,
        "empty.wav": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AudioError, match=name):
            load_audio(tmp_path / name)
    sf.write(tmp_path / "silent_zero.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="silent_zero.wav.*no samples"):
        load_audio(tmp_path / "silent_zero.wav")
    with pytest.raises(AudioError, match="missing.wav.*does not exist"):
        load_audio(tmp_path / "missing.wav")
    assert isinstance(AudioError("x"), ValueError)


def test_resample_length_and_pitch():
    sr_from, sr_to = 22050, SAMPLE_RATE
    t = np.arange(sr_from) / sr_from
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, sr_from, sr_to)
    assert out.dtype == np.float32 and len(out) == int(np.ceil(len(tone) * sr_to / sr_from))
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * sr_to / len(out)
    assert abs(peak_hz - 440) < 2
    for n, a, b in ((44101, 44100, 24000), (1, 16000, 24000), (1000, 24000, 24000)):
        assert len(resample(np.zeros(n, np.float32), a, b)) == int(np.ceil(n * b / a))
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10), np.float32), 16000, 24000)


# ------------------------------------------------------------------------------------------------
# bounded memory on any audio (rates, lengths, channel layouts)


def _tone(seconds: float, sr: int, hz: float = 440.0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x))


def test_resampling_any_rate_keeps_memory_bounded_and_pitch_right():
    """An off-grid rate (44 101 Hz: today's kernel would be 24000 x 44125 float64 taps, ~8.5 GB) and
    192 kHz, 30 s each: exact length, right pitch, and no big allocation (peak RSS rise < 1 GB)."""
    import resource

    from vallex.codec.audio import MAX_RATIO_TERM, resample_ratio

    for sr in (44101, 192000):
        tone = _tone(30.0, sr)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = resample(tone, sr, SAMPLE_RATE)
        rise_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert rise_mb < 1024, f"{sr} Hz: peak RSS rose by {rise_mb:.0f} MB"
        assert len(out) == -(-len(tone) * SAMPLE_RATE // sr) and out.dtype == np.float32
        assert abs(_peak_hz(out, SAMPLE_RATE) - 440) < 0.1
    # Every rate preparation accepts: a small filter bank, and a ratio within 5e-4 of the true one.
    for sr in [*range(8000, 192001, 97), 8004, 44101, 48001, 191999]:
        up, down = resample_ratio(sr, SAMPLE_RATE)
        assert max(up, down) <= MAX_RATIO_TERM and abs(up / down * sr / SAMPLE_RATE - 1) <= 5e-4, sr


def _count_decoded(monkeypatch) -> list[int]:
    """Frames decoded through soundfile from now on (every reader ends in SoundFile.read)."""
    decoded = []
    real = sf.SoundFile.read

    def read(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return decoded


def _encoder(min_duration: float = 0.5, max_duration: float = 20.0):
    """Preparation's per-actor reader, without its EnCodec model (not needed to read audio)."""
    from vallex.data.prepare import ShardEncoder

    enc = ShardEncoder.__new__(ShardEncoder)
    enc.min_duration, enc.max_duration = min_duration, max_duration
    return enc


def test_a_too_long_file_is_skipped_from_its_header_without_decoding(tmp_path, monkeypatch):
    """A 3-minute FLAC (small on disk: a tone compresses well) is skipped from its header with nothing
    decoded; a WAV whose header lies about its length (a streaming size) is decoded only up to the
    limit."""
    from vallex.data.prepare import SkipCounter

    sr = 8000
    sf.write(tmp_path / "long.flac", _tone(180.0, sr), sr)
    streaming = tmp_path / "streaming.wav"
    sf.write(streaming, _tone(60.0, sr), sr, subtype="PCM_16")
    data = bytearray(streaming.read_bytes())
    at = data.index(b"data")
    data[at + 4 : at + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # "unknown size", as ffmpeg writes to a pipe
    streaming.write_bytes(bytes(data))

    decoded = _count_decoded(monkeypatch)
    skips = SkipCounter()
    rows = [
        {"id": "long", "audio": str(tmp_path / "long.flac")},
        {"id": "streaming", "audio": str(streaming)},
    ]
    assert _encoder(max_duration=20.0)._load(rows[:1], skips) == []
    assert skips.data["too_long"]["examples"] == ["long"] and sum(decoded) == 0
    assert _encoder(max_duration=20.0)._load(rows[1:], skips) == []
    assert skips.data["too_long"]["examples"] == ["long", "streaming"]
    assert sum(decoded) <= 20 * sr + 1


def test_any_failure_on_one_file_is_a_counted_skip_with_its_reason(tmp_path, monkeypatch):
    """A decoder crash, a resampler crash, a rate out of range: each skips its file with the reason
    (and the error, for the report); the others are kept."""
    import vallex.codec.audio as audio
    from vallex.data.prepare import SkipCounter

    rows = []
    for name, sr in (("good", 16000), ("decoder", 16000), ("resampler", 22050), ("low_rate", 4000)):
        sf.write(tmp_path / f"{name}.wav", _tone(1.0, sr), sr)
        rows.append({"id": name, "audio": str(tmp_path / f"{name}.wav")})

    real_read, real_resample = sf.SoundFile.read, audio.resample

    def read(self, *args, **kwargs):
        if self.name.endswith("decoder.wav"):
            raise MemoryError("decoder ran out of memory")
        return real_read(self, *args, **kwargs)

    def resample_(wav, sr_from, sr_to):
        if sr_from == 22050:
            raise RuntimeError("resampler exploded")
        return real_resample(wav, sr_from, sr_to)

    monkeypatch.setattr(sf.SoundFile, "read", read)
    monkeypatch.setattr(audio, "resample", resample_)
    skips = SkipCounter()
    kept = _encoder()._load(rows, skips)
    assert [item[0]["id"] for item in kept] == ["good"] and len(kept[0][1]) == SAMPLE_RATE
    assert {r: e["examples"] for r, e in skips.data.items()} == {
        "audio_failed": ["decoder"],
        "resample_failed": ["resampler"],
        "unsupported_sample_rate": ["low_rate"],
    }
    assert "MemoryError: decoder ran out of memory" in skips.data["audio_failed"]["errors"][0]
    assert "RuntimeError: resampler exploded" in skips.data["resample_failed"]["errors"][0]


def test_surround_audio_leaves_the_lfe_channel_out_of_the_mix(tmp_path):
    """5.1 WAV (channel mask), 5.1 FLAC (its standard order), 5.1 Vorbis (LFE last), and a 4.1 WAV whose
    mask puts the LFE third: the mono mix is the mean of the other channels, and says so."""
    from vallex.codec.audio import read_audio

    sr = 16000
    speech, hum = _tone(1.0, sr, 440.0, 0.2), _tone(1.0, sr, 40.0, 0.9)

    def layout(channels: int, lfe: int) -> np.ndarray:
        x = np.stack([speech * (1 + 0.1 * c) for c in range(channels)], axis=1)
        x[:, lfe] = hum
        return x

    def expected(x: np.ndarray, lfe: int) -> np.ndarray:
        return np.delete(x, lfe, axis=1).mean(axis=1)

    cases = []
    x = layout(6, 3)
    sf.write(tmp_path / "a51.wav", x, sr, format="WAVEX", subtype="FLOAT")
    cases.append(("a51.wav", x, 3, "WAVE channel mask"))
    sf.write(tmp_path / "a51.flac", x, sr, subtype="PCM_24")
    cases.append(("a51.flac", x, 3, "5.1 order L R C LFE"))
    v = layout(6, 5)
    sf.write(tmp_path / "a51.ogg", v, sr, format="OGG", subtype="VORBIS")
    cases.append(("a51.ogg", v, 5, "Vorbis 5.1 order"))
    q = layout(5, 2)
    sf.write(tmp_path / "a41.wav", q, sr, format="WAVEX", subtype="FLOAT")
    data = bytearray((tmp_path / "a41.wav").read_bytes())
    fmt = data.index(b"fmt ") + 8
    data[fmt + 20 : fmt + 24] = (0x1 | 0x2 | 0x8 | 0x10 | 0x20).to_bytes(4, "little")  # FL FR LFE BL BR
    (tmp_path / "a41.wav").write_bytes(bytes(data))
    cases.append(("a41.wav", q, 2, "WAVE channel mask"))

    for name, x, lfe, source in cases:
        audio = read_audio(tmp_path / name)
        n = x.shape[1]
        assert audio.mix == f"mean of {n - 1} of {n} channels, LFE (channel {lfe + 1}) left out ({source})"
        tol = 0.02 if name.endswith(".ogg") else 1e-3  # Vorbis is lossy
        np.testing.assert_allclose(load_audio(tmp_path / name)[0], expected(x, lfe), atol=tol)
        assert abs(_peak_hz(audio.samples, sr) - 440) < 2  # no 40 Hz hum on top

    sf.write(tmp_path / "stereo.wav", np.stack([speech, hum], axis=1), sr)
    assert read_audio(tmp_path / "stereo.wav").mix == "mean of 2 channels"


def test_a_clip_the_codec_fails_on_is_a_counted_skip(tokenizer, monkeypatch, one_thread):
    """A batch that fails to encode is retried clip by clip: the bad clip is skipped with its error,
    the others get the codes they get alone."""
    from vallex.data.prepare import SkipCounter

    clips = [_speechlike(0.1 + 0.04 * i, i) for i in range(3)]
    kept = [
        ({"id": f"u{i}", "audio": f"u{i}.wav"}, w, len(w) / SAMPLE_RATE, "mono") for i, w in enumerate(clips)
    ]
    real = tokenizer.encode

    def encode(wavs):
        if any(len(w) == len(clips[1]) for w in wavs):
            raise RuntimeError("codec blew up")
        return real(wavs)

    enc = _encoder()
    enc.tokenizer, enc.codec_batch_size = tokenizer, 4
    monkeypatch.setattr(tokenizer, "encode", encode)
    skips = SkipCounter()
    items, codes = enc._encode(kept, skips)
    assert [item[0]["id"] for item in items] == ["u0", "u2"]
    for item, c in zip(items, codes, strict=True):
        np.testing.assert_array_equal(c, real([item[1]])[0])
    assert skips.data["encode_failed"]["examples"] == ["u1"]
    assert skips.data["encode_failed"]["errors"] == ["u1: RuntimeError: codec blew up"]


def test_codec_summary_names_what_made_the_codes(tmp_path):
    """The line a run logs about its codes: real EnCodec, random-weight EnCodec, or synthetic codes with
    no audio behind them (never "pretrained EnCodec" for a corpus vallex.data.synthetic wrote)."""
    import json

    from vallex.codec.tokenizer import codec_summary
    from vallex.data.synthetic import write_phonetic_corpus, write_synthetic_corpus

    assert codec_summary({"bandwidth": 6.0}) == "codec: EnCodec 24 kHz, pretrained weights, 6.0 kbps"
    random_codes = json.loads(
        (write_synthetic_corpus(tmp_path / "r", {"en": 4}) / "manifest.json").read_text()
    )
    assert codec_summary(random_codes["codec"]).startswith("codec: NOT real EnCodec codes")
    phonetic = json.loads((write_phonetic_corpus(tmp_path / "p", {"en": 4}) / "manifest.json").read_text())
    line = codec_summary(phonetic["codec"])
    assert line.startswith("codec: NOT audio codes: synthetic phonetic codes") and "pretrained" not in line
