"""The code-level phoneme recognizer: its metric, what it scores, that it learns to read, its file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from vallex.data.corpus import PreparedCorpus
from vallex.data.schema import codes_matrix
from vallex.data.synthetic import write_phonetic_corpus
from vallex.eval.recognizer import (
    FORMAT_VERSION,
    RECOGNIZER_FILE,
    Recognizer,
    RecognizerError,
    RecognizerNet,
    RecognizerShape,
    _epoch_pool,
    edit_distance,
    greedy_ctc_decode,
    phoneme_error_rate,
    reference_phonemes,
    scored_mask,
    train_recognizer,
)

TINY = {"dim": 32, "hidden": 32, "layers": 2, "threads": 1, "log_every": 0}


def test_edit_distance_hand_cases():
    assert edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], []) == 3  # three deletions
    assert edit_distance([], [4, 5]) == 2  # two insertions
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 9, 3]) == 1  # one substitution
    # kitten -> sitting: k->s, e->i, +g
    assert edit_distance([ord(c) for c in "kitten"], [ord(c) for c in "sitting"]) == 3
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 1]) == 2  # delete the head, insert it at the end


def test_phoneme_error_rate_sums_edits_over_reference_lengths():
    refs = [[1, 2, 3], [4, 5]]
    hyps = [[1, 3], [4, 5, 6]]  # one deletion + one insertion
    assert phoneme_error_rate(refs, hyps) == pytest.approx(2 / 5)
    # Corpus-level, not a mean of per-utterance rates (that would be (1/3 + 1/2) / 2).
    assert phoneme_error_rate(refs, hyps) != pytest.approx((1 / 3 + 1 / 2) / 2)
    assert phoneme_error_rate([[1, 2]], [[3, 4, 5, 6]]) == pytest.approx(2.0)  # insertions exceed 1
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        phoneme_error_rate(refs, hyps[:1])
    with pytest.raises(ValueError, match="no scored phonemes"):
        phoneme_error_rate([[]], [[1]])


def test_greedy_ctc_decode_collapses_repeats_then_drops_blanks():
    assert greedy_ctc_decode([0, 5, 5, 0, 5, 6, 6, 0, 0]) == [5, 5, 6]
    assert greedy_ctc_decode([0, 0, 0]) == []


def test_reference_phonemes_scores_phones_and_tones_only():
    symbols = ["<pad>", "<bos>", "<eos>", "<unk>", "_", ",", "?", "ˈ", "ˌ", "a", "t", "˥˩"]
    row = [9, 4, 7, 10, 11, 5, 8, 9, 6, 3, 0]
    assert reference_phonemes(row, symbols) == [9, 10, 11, 9]
    assert scored_mask(symbols).tolist() == [False] * 9 + [True] * 3
    with pytest.raises(ValueError, match="outside the symbol table"):
        reference_phonemes([12], symbols)


# ------------------------------------------------------------------------------------------------
# Learning to read, on a corpus whose codes are a function of the phonemes


@pytest.fixture(scope="module")
def phonetic(tmp_path_factory, one_thread):
    root = write_phonetic_corpus(
        tmp_path_factory.mktemp("phonetic") / "prepare",
        {"en": 160, "fr": 80},
        valid_per_language=16,
        num_symbols=24,
        phonemes=(4, 12),
    )
    corpus = PreparedCorpus.open(root)
    rec = train_recognizer(corpus, steps=100, batch_size=16, lr=5e-3, seed=0, **TINY)
    return corpus, rec


def _rows(corpus: PreparedCorpus, lang: str) -> list[dict]:
    columns = ["phonemes", "codes", "frames", "num_codebooks"]
    return corpus.read_split(lang, "valid", columns=columns).to_pylist()


def _valid(corpus: PreparedCorpus, lang: str):
    rows = _rows(corpus, lang)
    codes = [codes_matrix(np.asarray(r["codes"]), r["frames"], r["num_codebooks"]) for r in rows]
    refs = [reference_phonemes(r["phonemes"], corpus.symbols) for r in rows]
    assert refs != [r["phonemes"] for r in rows]  # the word boundaries are gone
    return codes, refs


def test_recognizer_reads_phonetic_codes_far_below_chance(phonetic):
    corpus, rec = phonetic
    assert set(rec.meta["valid_per"]) == {"en", "fr"}
    assert rec.meta["valid_utterances"] == {"en": 16, "fr": 16}
    for lang in ("en", "fr"):
        codes, refs = _valid(corpus, lang)
        per = phoneme_error_rate(refs, rec.transcribe(codes))
        assert per == pytest.approx(rec.meta["valid_per"][lang])
        assert per < 0.15, (lang, per)
        assert [rec.reference_phonemes(r["phonemes"]) for r in _rows(corpus, lang)] == refs
        # The same network untrained: chance (19 phones; an alignment finds a few right by luck).
        torch.manual_seed(0)
        untrained = Recognizer(RecognizerNet(rec.shape, scored_mask(corpus.symbols)), rec.meta)
        assert phoneme_error_rate(refs, untrained.transcribe(codes)) > 0.8
    # It never emits what is not scored: the word boundary "_" is in every reference row's phonemes.
    hyps = rec.transcribe(_valid(corpus, "en")[0])
    assert corpus.symbols.index("_") not in {p for h in hyps for p in h}


def test_transcription_does_not_depend_on_batching(phonetic):
    corpus, rec = phonetic
    codes, _ = _valid(corpus, "fr")
    assert rec.transcribe(codes, batch_size=1) == rec.transcribe(codes, batch_size=32)
    assert rec.transcribe([codes[0][:, :0], codes[1]])[0] == []  # no frames, no phonemes
    with pytest.raises(ValueError, match=r"codes\[0\] has shape \(7, "):
        rec.transcribe([codes[0][:7]])
    bad = codes[0].copy()
    bad[0, 0] = 1024
    with pytest.raises(ValueError, match=r"codes\[0\] holds values in .* \[0, 1024\)"):
        rec.transcribe([bad])


def test_save_load_round_trip_weights_only(phonetic, tmp_path):
    corpus, rec = phonetic
    root = tmp_path / "prepare"
    shutil.copytree(corpus.root, root)
    assert Recognizer.load(root) is None  # none trained yet
    path = rec.save(str(root))
    assert path == str(root / RECOGNIZER_FILE)
    # The file holds only tensors and text: it loads with weights_only.
    payload = torch.load(path, weights_only=True)
    assert json.loads(payload["meta"])["valid_per"] == rec.meta["valid_per"]
    loaded = Recognizer.load(root)
    assert loaded.meta == rec.meta
    codes, _ = _valid(corpus, "en")
    assert loaded.transcribe(codes) == rec.transcribe(codes)
    assert list(root.glob(".recognizer.pt.*")) == []  # the atomic write left no temporary file

    (root / RECOGNIZER_FILE).write_bytes(b"not a torch file")
    with pytest.raises(RecognizerError, match=rf"{RECOGNIZER_FILE}: not a readable vallex recognizer"):
        Recognizer.load(root)


def test_load_refuses_another_symbol_table_or_codec(phonetic, tmp_path):
    corpus, rec = phonetic
    other = write_phonetic_corpus(tmp_path / "other", {"en": 4}, valid_per_language=1, num_symbols=30)
    rec.save(str(other))
    with pytest.raises(
        RecognizerError, match=r"recognizer\.pt was trained for symbol table .*24 symbols.*30 symbols"
    ):
        Recognizer.load(other)

    recoded = tmp_path / "recoded"
    shutil.copytree(corpus.root, recoded)
    manifest = json.loads((recoded / "manifest.json").read_text())
    manifest["codec"]["name"] = "encodec_24khz"
    (recoded / "manifest.json").write_text(json.dumps(manifest))
    rec.save(str(recoded))
    with pytest.raises(
        RecognizerError, match=r"another codec.*name: 'synthetic_phonetic' vs 'encodec_24khz'"
    ):
        Recognizer.load(recoded)


def test_training_is_deterministic_for_a_seed(phonetic):
    corpus, _ = phonetic
    runs = [train_recognizer(corpus, steps=5, batch_size=8, seed=s, **TINY) for s in (3, 3, 4)]
    states = [r.net.state_dict() for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    timing = ("train_seconds", "curve")
    assert {k: v for k, v in runs[0].meta.items() if k not in timing} == {
        k: v for k, v in runs[1].meta.items() if k not in timing
    }
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_small_languages_are_repeated_in_each_epoch():
    langs = ["en"] * 8 + ["ar"] * 2
    share = {a: Counter(langs[i] for i in _epoch_pool(langs, a)) for a in (1.0, 0.5, 0.0)}
    assert share == {1.0: {"en": 8, "ar": 2}, 0.5: {"en": 8, "ar": 4}, 0.0: {"en": 8, "ar": 8}}


def test_rows_too_short_for_a_ctc_alignment_are_counted_not_learnt(tmp_path):
    # One frame per phoneme: after the stride-2 convolution no row has a frame per phoneme.
    root = write_phonetic_corpus(tmp_path, {"en": 3}, valid_per_language=2, frames_per_phoneme=(1, 1))
    with pytest.raises(
        ValueError, match=r"no training utterance .*'en': \{'too short for its phonemes': 3\}"
    ):
        train_recognizer(PreparedCorpus.open(root), steps=1, **TINY)


def test_ensure_recognizer_finds_the_saved_one_without_training(phonetic, tmp_path, monkeypatch):
    from vallex.config import load_config
    from vallex.eval import recognizer as module

    corpus, rec = phonetic
    root = tmp_path / "prepare"
    shutil.copytree(corpus.root, root)
    rec.save(str(root))
    monkeypatch.setattr(module, "train_recognizer_on_ray", lambda cfg: pytest.fail("trained again"))
    assert module.ensure_recognizer(load_config(None, [f"run.prepared_dir={root}"])) == rec.meta
    assert rec.meta["inputs"] == "codes"  # the codec of this corpus gives no code vectors
    same = load_config(None, [f"run.prepared_dir={root}", "recognizer.inputs=codes"])
    assert module.ensure_recognizer(same) == rec.meta
    # Asked to read codec features, it does not reuse one that reads codes.
    monkeypatch.setattr(module, "train_recognizer_on_ray", lambda cfg: {"trained": cfg.recognizer.inputs})
    other = load_config(None, [f"run.prepared_dir={root}", "recognizer.inputs=features"])
    assert module.ensure_recognizer(other) == {"trained": "features"}


def test_the_convolution_keeps_every_frame_of_slow_codes():
    """CTC needs a time step per phone: 75 Hz codes are halved (37.5 Hz), 25 Hz ones are not (a phone
    lasts ~2 frames there)."""
    from vallex.eval.recognizer import conv_stride

    assert conv_stride({"frame_rate": 75}) == 2 and conv_stride({}) == 2  # EnCodec / older manifests
    assert conv_stride({"frame_rate": 37.5}) == 1 and conv_stride({"frame_rate": 25}) == 1


# ------------------------------------------------------------------------------------------------
# What a frame's codes become: the codec's own vectors (features) or a learned embedding per codebook

SYMBOLS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]


def _shape(features: int) -> RecognizerShape:
    return RecognizerShape(
        3, 16, len(SYMBOLS), dim=16, hidden=16, layers=1, stride=1, dropout=0.0, features=features
    )


def _silent_later_codebooks() -> np.ndarray:
    """A codec whose codebooks 2 and 3 do not change the sound: their vectors are zero."""
    vectors = np.zeros((3, 16, 4), dtype=np.float32)
    vectors[0] = np.random.default_rng(0).standard_normal((16, 4))
    return vectors


def test_codec_features_weigh_a_code_by_what_it_does_to_the_sound():
    """A synthesizer's wrong code in a codebook that barely changes the sound must not make a frame
    unreadable: read as the codec's vectors, it moves the frame by what it moves in the sound (here
    nothing); read as learned embeddings, every codebook weighs alike."""
    torch.manual_seed(0)
    vectors = _silent_later_codebooks()
    codes = torch.randint(0, 16, (2, 3, 10))
    lengths = torch.tensor([10, 7])
    later = codes.clone()
    later[:, 1:] = (
        codes[:, 1:] + 1 + torch.randint(0, 15, codes[:, 1:].shape)
    ) % 16  # every later code wrong
    first = codes.clone()
    first[:, 0] = (codes[:, 0] + 1) % 16

    net = RecognizerNet(_shape(4), scored_mask(SYMBOLS), vectors).eval()
    with torch.no_grad():
        # A frame is the projected sum of its codes' vectors.
        expected = net.project(torch.from_numpy(vectors[0])[codes[:, 0]])
        assert torch.allclose(net.embed_frames(codes), expected, atol=1e-6)
        out = net(codes, lengths)[0]
        assert torch.equal(net(later, lengths)[0], out)
        assert not torch.allclose(net(first, lengths)[0], out)

        learned = RecognizerNet(_shape(0), scored_mask(SYMBOLS)).eval()
        out = learned(codes, lengths)[0]
        assert (learned(later, lengths)[0] - out).abs().max() > 1e-3
        # Reading only the first codebook (a diagnosis) ignores the others, with either input.
        assert torch.equal(learned(later, lengths, codebooks=1)[0], learned(codes, lengths, codebooks=1)[0])
        assert not torch.allclose(
            learned(later, lengths, codebooks=2)[0], learned(codes, lengths, codebooks=2)[0]
        )


def test_a_recognizer_keeps_its_codec_vectors_in_its_file():
    """The vectors travel in the weights file (read with weights_only): evaluating never opens the codec."""
    torch.manual_seed(0)
    vectors = _silent_later_codebooks()
    shape = _shape(4)
    meta = {
        "format": FORMAT_VERSION,
        "shape": dataclasses.asdict(shape),
        "scored": scored_mask(SYMBOLS).tolist(),
    }
    rec = Recognizer(RecognizerNet(shape, scored_mask(SYMBOLS), vectors), meta)
    loaded = Recognizer.from_bytes(rec.to_bytes())
    assert torch.equal(loaded.net.codec_vectors, torch.from_numpy(vectors).reshape(48, 4))
    codes = [np.random.default_rng(i).integers(0, 16, (3, 9)).astype(np.int16) for i in range(3)]
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(codes).astype(np.int64))
        lengths = torch.full((3,), 9)
        assert torch.equal(loaded.net(batch, lengths)[0], rec.net(batch, lengths)[0])
    with pytest.raises(ValueError, match=r"codec vectors have shape \(3, 16, 5\), expected \(3, 16, 4\)"):
        RecognizerNet(shape, scored_mask(SYMBOLS), np.zeros((3, 16, 5), np.float32))


def test_training_reads_the_codec_vectors_when_the_codec_gives_them(phonetic, tmp_path):
    """inputs=features takes the vectors from the corpus's codec (EnCodec here: its quantizer's, whose
    sum is the latent the decoder hears); auto falls back to learned embeddings, saying why, for codes
    no codec made; features refuses those."""
    from vallex.codec.encodec import AudioTokenizer, CodecSettings

    corpus, _ = phonetic
    lines: list[str] = []
    rec = train_recognizer(corpus, steps=1, batch_size=4, inputs="auto", progress=lines.append, **TINY)
    assert rec.meta["inputs"] == "codes" and rec.shape.features == 0
    assert any("learned code embeddings" in line and "synthetic_phonetic" in line for line in lines)
    with pytest.raises(ValueError, match="made by 'synthetic_phonetic', not a codec with code vectors"):
        train_recognizer(corpus, steps=1, inputs="features", **TINY)

    root = tmp_path / "encodec"
    shutil.copytree(corpus.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["codec"] = {**manifest["codec"], "name": "encodec_24khz", "pretrained": False, "seed": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    rec = train_recognizer(PreparedCorpus.open(root), steps=1, batch_size=4, inputs="features", **TINY)
    tokenizer = AudioTokenizer(CodecSettings(pretrained=False, seed=0), device="cpu")
    vectors = tokenizer.code_vectors()
    assert rec.meta["inputs"] == "features" and rec.shape.features == vectors.shape[-1] == 128
    assert torch.equal(rec.net.codec_vectors, torch.from_numpy(vectors).reshape(8 * 1024, 128))
    # The sum of a frame's code vectors is EnCodec's own dequantized latent.
    codes = np.random.default_rng(0).integers(0, 1024, (8, 5))
    latent = tokenizer.model.quantizer.decode(torch.from_numpy(codes)[:, None])[0].T.detach().numpy()
    assert np.allclose(sum(vectors[k][codes[k]] for k in range(8)), latent, atol=1e-5)
