"""The tokenizer fitted to the corpus (mel_rvq) and open_tokenizer: shapes, determinism, codes that carry
the audio, decoding, and refusing tables that are missing or not the ones the manifest recorded."""

from __future__ import annotations

import numpy as np
import pytest

from vallex.codec import open_tokenizer
from vallex.codec.encodec import HOP_LENGTH, SAMPLE_RATE, AudioTokenizer, CodecError, num_frames
from vallex.codec.mel_rvq import (
    FITTED_NAME,
    MelRVQSettings,
    MelRVQTokenizer,
    fit_tables,
    load_tables,
    sha256,
    tables_bytes,
)

# Small fit so the whole file stays fast; the shapes are the production ones (8 x 1024, 80 bins).
SETTINGS = MelRVQSettings(seed=0, fit_frames=4096, fit_iterations=4)

FIT_TEXTS = [
    "The kettle is boiling in the kitchen.",
    "Please close the window before you leave.",
    "My sister walks the dog every morning.",
    "We bought fresh bread at the corner bakery.",
    "A small green boat sails under the old bridge.",
    "Seven yellow birds sing in the garden today.",
    "The teacher reads a long story to the children.",
    "Soft rain falls on the quiet village at night.",
]
HELD_OUT = ["Four white horses run fast over the hill.", "Her brother often cooks soup with rice."]


@pytest.fixture(scope="module")
def speech(one_thread) -> dict[str, list[np.ndarray]]:
    """Real espeak speech at 24 kHz: the fit set and two held-out sentences (another voice)."""
    from vallex.codec.audio import resample
    from vallex.data.demo_corpus import Espeak

    def say(espeak, text, voice):
        pcm = np.frombuffer(espeak.synthesize(text, voice), dtype="<i2").astype(np.float32) / 32768
        return resample(pcm, espeak.sample_rate, SAMPLE_RATE)

    with Espeak() as espeak:
        fit = [say(espeak, t, "en-us+m3" if i % 2 else "en-us+f2") for i, t in enumerate(FIT_TEXTS)]
        held = [say(espeak, t, "en-us+m1") for t in HELD_OUT]
    return {"fit": fit, "held": held}


@pytest.fixture(scope="module")
def tables(speech) -> dict:
    return fit_tables(speech["fit"], SETTINGS)


@pytest.fixture(scope="module")
def tokenizer(tables) -> MelRVQTokenizer:
    return MelRVQTokenizer(SETTINGS, tables)


def test_fit_is_deterministic_for_a_seed(speech, tables):
    again = fit_tables(speech["fit"], SETTINGS)
    assert tables_bytes(again, SETTINGS) == tables_bytes(tables, SETTINGS)
    other = fit_tables(speech["fit"], MelRVQSettings(seed=1, fit_frames=4096, fit_iterations=4))
    assert not np.array_equal(other["codebooks"], tables["codebooks"])
    assert tables["codebooks"].shape == (8, 1024, 80) and tables["codebooks"].dtype == np.float32


def test_encode_has_encodec_shapes_and_is_per_clip(tokenizer, speech):
    clips = [speech["held"][0][:n] for n in (1, 319, 320, 321, 24000, 24001)] + speech["held"]
    codes = tokenizer.encode(clips)
    for clip, c in zip(clips, codes, strict=True):
        assert c.dtype == np.int16 and c.shape == (8, num_frames(len(clip)))  # = ceil(len * 75 / 24000)
        assert c.min() >= 0 and c.max() < 1024
    # A clip's codes do not depend on what it is encoded with.
    assert np.array_equal(tokenizer.encode([speech["held"][1]])[0], codes[-1])
    assert np.array_equal(tokenizer.encode(speech["held"])[0], codes[-2])
    with pytest.raises(CodecError, match="clip 1: expected mono"):
        tokenizer.encode([speech["held"][0], np.zeros((2, 100), np.float32)])


def test_codes_carry_the_audio_of_unseen_speech(tokenizer, speech):
    """The centroids the codes pick rebuild the held-out clips' log-mel frames far better than codes
    that ignore the audio would (a constant code, or random codes), and different speech gets
    different codes."""
    from vallex.codec.mel_rvq import log_mel

    for wav in speech["held"]:
        codes = tokenizer.encode([wav])[0]
        target = (log_mel(wav, 80) - tokenizer.mean.numpy()) / tokenizer.std.numpy()

        def err(c, target=target):
            return float(np.mean((tokenizer.features(c).numpy() - target) ** 2))

        variance = float(np.mean((target - target.mean(0)) ** 2))
        constant = np.zeros_like(codes)
        random = np.random.default_rng(0).integers(0, 1024, codes.shape).astype(np.int16)
        assert err(codes) < 0.35 * variance, (err(codes), variance)
        assert err(codes) < 0.35 * err(constant) and err(codes) < 0.2 * err(random)
        assert len(np.unique(codes[0])) > 0.3 * codes.shape[1]  # the first stage follows the sounds
    a, b = (tokenizer.encode([w])[0] for w in speech["held"])
    n = min(a.shape[1], b.shape[1])
    assert np.mean(a[0, :n] == b[0, :n]) < 0.2


def test_code_vectors_sum_to_the_features_the_decoder_hears(tokenizer, speech):
    """What the recognizer reads (recognizer.inputs=features): each code's centroid; a frame's sum of
    them is the normalized log-mel the decoder inverts."""
    codes = tokenizer.encode(speech["held"][:1])[0]
    vectors = tokenizer.code_vectors()
    assert vectors.shape == (SETTINGS.num_codebooks, 1024, SETTINGS.n_mels) and vectors.dtype == np.float32
    summed = sum(vectors[k][codes[k].astype(np.int64)] for k in range(SETTINGS.num_codebooks))
    assert np.allclose(summed, tokenizer.features(codes).numpy(), atol=1e-5)
    # Later stages refine: a stage's centroids are smaller than the first's (the residual shrinks).
    norms = np.linalg.norm(vectors, axis=-1).mean(-1)
    assert norms[-1] < norms[0] / 2


def test_decode_gives_audio_of_the_codes_length(tokenizer, speech):
    codes = tokenizer.encode(speech["held"])
    wavs = tokenizer.decode(codes)
    for c, w in zip(codes, wavs, strict=True):
        assert w.dtype == np.float32 and w.shape == (c.shape[1] * HOP_LENGTH,)
        assert np.isfinite(w).all() and 0.01 < np.abs(w).max() <= 0.9 + 1e-6
    assert np.array_equal(tokenizer.decode(codes[:1])[0], wavs[0])  # Griffin-Lim is seeded
    # The decoded audio re-encodes to frames near the originals (it sounds like the same speech).
    again = tokenizer.encode(wavs[:1])[0]
    assert np.mean(again[0] == codes[0][0]) > 0.15
    with pytest.raises(CodecError, match=r"codes 0: values must be in \[0, 1024\)"):
        tokenizer.decode([np.full((8, 3), 1024, np.int16)])


def test_open_tokenizer_checks_the_fitted_file(tables, tmp_path, speech):
    data = tables_bytes(tables, SETTINGS)
    (tmp_path / FITTED_NAME).write_bytes(data)
    codec = {**SETTINGS.to_dict(), "fitted": FITTED_NAME, "sha256": sha256(data)}
    tok = open_tokenizer(codec, tmp_path)
    assert (tok.num_codebooks, tok.sample_rate, tok.is_real_encodec) == (8, 24000, False)
    assert np.array_equal(
        tok.encode(speech["held"][:1])[0], MelRVQTokenizer(SETTINGS, tables).encode(speech["held"][:1])[0]
    )

    with pytest.raises(CodecError, match="needs the prepared corpus folder"):
        open_tokenizer(codec, None)
    # Tampered: other tables under the same name.
    other = tables_bytes({**tables, "mean": tables["mean"] + 1}, SETTINGS)
    (tmp_path / FITTED_NAME).write_bytes(other)
    with pytest.raises(CodecError, match=rf"{FITTED_NAME}: sha256 .* but the manifest recorded"):
        open_tokenizer(codec, tmp_path)
    (tmp_path / FITTED_NAME).unlink()
    with pytest.raises(
        CodecError, match=rf"{FITTED_NAME}: the fitted mel_rvq codec of this corpus is missing"
    ):
        open_tokenizer(codec, tmp_path)
    # Tables of other settings, or a file that is not tables (a pickle is refused, never run).
    with pytest.raises(CodecError, match="fitted for other settings"):
        load_tables(data, "x.npz", MelRVQSettings(seed=5))
    with pytest.raises(CodecError, match="not a vallex mel_rvq tables file"):
        load_tables(b"\x80\x04K\x01.", "x.npz", SETTINGS)
    with pytest.raises(CodecError, match="kind 'dac'"):
        open_tokenizer({"kind": "dac"}, tmp_path)


def test_open_tokenizer_builds_encodec_from_its_manifest_dict():
    from vallex.codec.encodec import CodecSettings

    d = CodecSettings(pretrained=False, seed=3).to_dict()
    tok = open_tokenizer(d)
    assert isinstance(tok, AudioTokenizer) and tok.settings == CodecSettings(pretrained=False, seed=3)
    assert (tok.num_codebooks, tok.sample_rate, tok.is_real_encodec) == (8, 24000, False)
    assert open_tokenizer({**d, "kind": "encodec"}).settings == tok.settings
    assert open_tokenizer(CodecSettings(checkpoint="/x.th").to_dict()).is_real_encodec


def test_too_little_audio_to_fit_is_a_clear_error(speech):
    with pytest.raises(CodecError, match="too few to fit 1024 codes"):
        fit_tables([speech["held"][0][:24000]], SETTINGS)


def test_a_lower_frame_rate_codes_and_decodes_at_its_own_hop(tables, speech):
    """frame_rate 25 (the demo's): 960 samples per frame, codes that still rebuild the clip's own 25 Hz
    log-mel frames, audio of frames x 960 samples; the manifest says 25 and 75 stays 75 (old files)."""
    from vallex.codec.mel_rvq import log_mel

    slow = MelRVQSettings(seed=0, fit_frames=4096, fit_iterations=4, frame_rate=25)
    assert slow.hop_length == 960 and slow.to_dict()["frame_rate"] == 25
    assert SETTINGS.to_dict()["frame_rate"] == 75 and MelRVQSettings(frame_rate=37.5).hop_length == 640
    tok = MelRVQTokenizer(slow, tables)  # the 80-bin tables quantize frames of any hop
    wav = speech["held"][0]
    codes = tok.encode([wav[:1], wav[:960], wav[:961], wav])
    assert [c.shape for c in codes[:3]] == [(8, 1), (8, 1), (8, 2)]
    assert codes[3].shape == (8, -(-len(wav) // 960))
    assert abs(codes[3].shape[1] - len(wav) * 25 / SAMPLE_RATE) < 1  # 3x fewer frames than at 75 Hz
    target = (log_mel(wav, 80, 960) - tok.mean.numpy()) / tok.std.numpy()
    err = float(np.mean((tok.features(codes[3]).numpy() - target) ** 2))
    assert err < 0.35 * float(np.mean((target - target.mean(0)) ** 2))
    assert tok.decode(codes[3:])[0].shape == (codes[3].shape[1] * 960,)
    with pytest.raises(ValueError, match="frame_rate must be one of"):
        MelRVQSettings(frame_rate=30)
