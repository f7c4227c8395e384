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
