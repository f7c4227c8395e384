"""The public VALL-E X checkpoint as a starting point: its text embeddings bridged to vallex's phoneme table
(spelling rules, rows, bit-identical outputs where the spellings coincide, errors), and an add-language
run from a public-format checkpoint end to end (Ray Train, DeepSpeed)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from vallex.data.synthetic import write_synthetic_corpus
from vallex.model.checkpoint import (
    CheckpointError,
    checkpoint_metadata,
    export_public,
    import_public,
    load_any,
)
from vallex.model.text_bridge import read_reference_vocab, spell
from vallex.model.vallex import VallexModel, paper_config
from vallex.text.symbols import SPECIALS

ROOT = Path(__file__).resolve().parents[2]
# A tokenizer file in the reference's format (HuggingFace tokenizers JSON, BPE without merges): its five
# bracketed specials, then one id per character: the characters of Plachtaa/VALL-E-X's bpe_69.json.
REF_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
REF_CHARS = list("!#*,-.=?NQ^_`abdefghijklmnopstuvwxyz~æçðŋɑɔəɛɥɪɫɯɸɹɾʃʊʑʒʰˈˌθ…⁼↑→↓")
# vallex symbols: single characters the reference has, multi-character phones, espeak conventions the
# reference writes differently, and sounds it has no character for (q, ʕ, ħ).
SYMBOLS = [
    *SPECIALS,
    *",._",
    "a",
    "ə",
    "k",
    "ˈ",
    "ç",
    "aɪ",
    "kh",
    "tɕh",
    "˧˥",
    "˨˩˦",
    "ɡ",
    "iː",
    "q",
    "ʕ",
    "ħ",
]
SINGLE = {",": ",", ".": ".", "_": "_", "a": "a", "ə": "ə", "k": "k", "ˈ": "ˈ", "ç": "ç", "˧˥": "↑", "ɡ": "g"}


def _vocab_file(path: Path) -> Path:
    vocab = {t: i for i, t in enumerate(REF_SPECIALS + REF_CHARS)}
    path.write_text(
        json.dumps(
            {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}, ensure_ascii=False
        )
    )
    return path


def _public_model(num_text_tokens: int = 80, num_languages: int = 3) -> VallexModel:
    """A tiny model in the reference's layout (paper's 16 heads), random weights."""
    torch.manual_seed(3)
    config = paper_config(
        d_model=64, num_layers=2, num_phonemes=num_text_tokens, num_languages=num_languages, dropout=0.0
    )
    return VallexModel(config).eval()


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    model = _public_model()
    export_public(model, root / "vallex-checkpoint.pt")
    return root / "vallex-checkpoint.pt", _vocab_file(root / "bpe.json"), model


def test_spelling_follows_the_reference_conventions():
    assert spell("˧˥") == "↑" and spell("˨˩˦") == "↓↑" and spell("˩˩") == ""  # tones as arrows
    assert spell("kh") == "kʰ" and spell("tsh") == "tsʰ" and spell("tɕh") == "tʃʰ"  # aspiration
    assert spell("s.") == "s`" and spell("ʐ") == "ɹ`"  # retroflexes
    assert spell("ɡ") == "g" and spell("iː") == "i" and spell("ɚ") == "əɹ"
    assert spell("h") == "h" and spell("aɪ") == "aɪ"
    assert spell("<unk>") == "[UNK]" and spell("<pad>") == "[PAD]" and spell("<bos>") == ""


def test_espeak_phones_of_the_references_languages_all_have_a_spelling(tmp_path):
    """Real espeak output for en, zh and ja (the public checkpoint's languages): every phone is spelled
    with the reference's characters; only diacritics it has no id for are left out, and Mandarin's
    neutral tone, which the reference does not write."""
    import unicodedata

    from vallex.model.text_bridge import reference_ids
    from vallex.text.phonemize import Phonemizer

    vocab = read_reference_vocab(_vocab_file(tmp_path / "bpe.json"))
    texts = {
        "en": [
            "The quick brown fox jumps over the lazy dog, doesn't it?",
            "She sells sea shells; thought, measure, judge, church, sing, very, yes, wet, bird, pure.",
        ],
        "zh": [
            "我是中国人，今天天气很好。",
            "上星期他用二十块钱买了一本书，你觉得怎么样？",
            "月亮出来了，学校里有很多学生。",
        ],
        "ja": [
            "ひとつ、ふたつ、みっつ。",
            "こんにちは、ちょっと まって ください。",
            "さくらが さいています。",
            "しんぶん、にゅうがく、ぎゅうにゅう。",
        ],
    }
    phonemize = Phonemizer()
    for lang, lines in texts.items():
        symbols = sorted({s for line in phonemize(lines, lang) for s in line})
        assert len(symbols) > 15, lang
        for s in symbols:
            ids, used, dropped = reference_ids(s, vocab)
            if s == "˩˩":
                assert ids == []  # the neutral tone: nothing in the reference's spelling either
                continue
            assert ids, (lang, s)
            assert all(unicodedata.combining(c) for c in dropped), (lang, s, dropped)
    spelled = {s: reference_ids(s, vocab)[1] for s in ("onɡ", "ər", "ai", "uo", "iɛ", "ts.", "ɴ", "nʲ")}
    assert spelled == {
        "onɡ": "ʊŋ",
        "ər": "əɹ`",
        "ai": "aɪ",
        "uo": "wo",
        "iɛ": "jɛ",
        "ts.": "ts`⁼",
        "ɴ": "N",
        "nʲ": "nj",
    }
    assert reference_ids("o̞", vocab)[1:] == ("o", "\u031e")  # lowered o: the mark has no id


def test_bridged_rows_and_identical_outputs_where_spellings_coincide(public):
    path, vocab_path, ref = public
    vocab = read_reference_vocab(vocab_path)
    model, meta = load_any(path, symbols=SYMBOLS, vocab=vocab_path, dropout=0.0)
    model.eval()
    assert meta["languages"] == ["en", "zh", "ja"] and meta["size"] == "paper"
    assert model.config.num_phonemes == len(SYMBOLS) and model.config.nhead == 16
    assert meta["bridge"]["unmapped"] == ["<bos>", "<eos>", "q", "ʕ", "ħ"]
    assert meta["bridge"]["mapped"]["tɕh"] == "tʃʰ" and meta["bridge"]["mapped"]["iː"] == "i"
    assert meta["bridge"]["partial"] == {}

    ids = {s: i for i, s in enumerate(SYMBOLS)}
    for table in ("ar_text_embedding", "nar_text_embedding"):
        old = getattr(ref, table).word_embeddings.weight
        new = getattr(model, table).word_embeddings.weight
        for sym, ch in SINGLE.items():
            assert torch.equal(new[ids[sym]], old[vocab[ch]]), (table, sym)
        assert torch.allclose(new[ids["aɪ"]], old[[vocab["a"], vocab["ɪ"]]].mean(0))
        assert torch.allclose(new[ids["tɕh"]], old[[vocab[c] for c in "tʃʰ"]].mean(0))
        assert torch.allclose(new[ids["iː"]], old[vocab["i"]])  # the length mark has no id: dropped
        chars = [i for t, i in vocab.items() if len(t) == 1]
        assert torch.allclose(new[ids["q"]], old[chars].mean(0))  # no spelling: the mean character
        assert torch.equal(new[ids["<unk>"]], old[vocab["[UNK]"]])
    # Every other tensor is the checkpoint's.
    ref_state, state = ref.state_dict(), model.state_dict()
    for k, v in ref_state.items():
        if "text_embedding" not in k:
            assert torch.equal(state[k], v), k

    # A text of symbols the reference spells with one character each: the bridged model on vallex ids
    # computes exactly what the public model computes on the reference's ids.
    text = [",", "a", "ˈ", "k", "ə", "_", "˧˥", "ɡ", "."]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1024, (2, 14, 8), generator=g)

    def batch(tokens):
        return {
            "phonemes": torch.tensor([tokens, tokens[:6] + [0, 0, 0]]),
            "phoneme_lens": torch.tensor([9, 6]),
            "codes": codes,
            "code_lens": torch.tensor([14, 11]),
            "language": torch.tensor([0, 1]),
            "nar_stage": torch.tensor([2, 5]),
            "nar_prefix_lens": torch.tensor([3, 0]),
        }

    ours = batch([ids[s] for s in text])
    theirs = batch([vocab[SINGLE[s]] for s in text])
    with torch.no_grad():
        a, b = model(ours), ref(theirs)
        for k in ("ar_loss_sum", "nar_loss_sum"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(model.ar_logits(ours), ref.ar_logits(theirs))


def test_public_checkpoint_errors_name_the_fix(public, tmp_path):
    path, vocab_path, _ = public
    with pytest.raises(CheckpointError, match=r"public VALL-E X checkpoint.*bpe_69\.json.*train\.init_vocab"):
        load_any(path, symbols=SYMBOLS)
    with pytest.raises(CheckpointError, match=r"nope\.json does not exist.*utils/g2p/bpe_69\.json"):
        load_any(path, symbols=SYMBOLS, vocab=tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps({"symbols": ["a"]}))
    with pytest.raises(CheckpointError, match=r"other\.json has no .*vocab"):
        checkpoint_metadata(path, symbols=SYMBOLS, vocab=tmp_path / "other.json")
    # A tokenizer with more ids than the checkpoint has rows belongs to another checkpoint.
    small = tmp_path / "small.pt"
    export_public(_public_model(num_text_tokens=20), small)
    for check in (
        load_any,
        checkpoint_metadata,
    ):  # checkpoint_metadata (plans, before Ray) checks it from the shapes alone
        with pytest.raises(
            CheckpointError, match="ids up to 69 but the checkpoint's text embeddings have 20 rows"
        ):
            check(small, symbols=SYMBOLS, vocab=vocab_path)
    # A public-format file with a fourth language row does not say which language that is.
    four = tmp_path / "four.pt"
    export_public(_public_model(num_languages=4), four)
    for check in (load_any, checkpoint_metadata):
        with pytest.raises(
            CheckpointError, match=r"4 language rows; the format's languages are \['en', 'zh', 'ja'\]"
        ):
            check(four, symbols=SYMBOLS, vocab=vocab_path)
    # A tokenizer file goes with a public checkpoint only: a vallex model's ids are already vallex's.
    from vallex.model.checkpoint import save_checkpoint

    ours = tmp_path / "ours.pt"
    save_checkpoint(
        _public_model(num_text_tokens=len(SYMBOLS)),
        ours,
        languages=["en", "zh", "ja"],
        symbols=SYMBOLS,
        symbols_version=1,
    )
    for check in (load_any, checkpoint_metadata):
        with pytest.raises(
            CheckpointError, match=r"goes with the public VALL-E X checkpoint only.*drop train\.init_vocab"
        ):
            check(ours, symbols=SYMBOLS, vocab=vocab_path)
    # A width 16 heads do not divide evenly: the caller's nhead is what counts, in the checks too.
    narrow = tmp_path / "narrow.pt"
    torch.manual_seed(0)
    export_public(
        VallexModel(paper_config(d_model=48, nhead=4, num_layers=1, num_phonemes=80, num_languages=3)), narrow
    )
    assert checkpoint_metadata(narrow, symbols=SYMBOLS, vocab=vocab_path)["languages"] == ["en", "zh", "ja"]
    assert load_any(narrow, symbols=SYMBOLS, vocab=vocab_path, nhead=4)[0].config.d_model == 48
    # Without a vocabulary the file still imports as the reference's own model (its ids, its languages).
    assert import_public(path, nhead=16).config.num_phonemes == 80


# ------------------------------------------------------------------------------------ end to end (Ray)


def test_add_language_to_a_public_checkpoint(ray_cluster, public, tmp_path):
    """add_language.py --base vallex-checkpoint.pt --base-vocab bpe.json: the run starts from the bridged
    public weights (its step-0 en loss is the bridged model's), keeps en/zh/ja's ids, adds ar after them,
    and says that ja (no shards) cannot be watched."""
    from vallex.data.collate import collate
    from vallex.data.corpus import PreparedCorpus
    from vallex.train.loop import _validation_batches, evaluate

    path, vocab_path, _ = public
    prep = write_synthetic_corpus(
        tmp_path / "prep", {"en": 24, "zh": 16, "ar": 12}, valid_per_language=4, frames=(15, 35)
    )
    # Give the corpus a phoneme table of IPA symbols (what preparation writes), same length as its ids.
    table = json.loads((prep / "symbols.json").read_text())
    n = len(table["symbols"])
    table["symbols"] = (SYMBOLS + [f"ʔ{i}" for i in range(n)])[:n]
    (prep / "symbols.json").write_text(json.dumps(table, ensure_ascii=False))
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest.pop("symbols_fingerprint", None)
    (prep / "manifest.json").write_text(json.dumps(manifest))

    main = runpy.run_path(str(ROOT / "ray_jobs" / "add_language.py"), run_name="vallex_test")["main"]
    out = tmp_path / "add"
    rc = main(
        [
            "--config",
            str(ROOT / "job.yaml"),
            f"--base={path}",
            f"--base-vocab={vocab_path}",
            "--new=ar",
            "--replay-ratio=0.5",
            f"--out={out}",
            f"run.output_dir={tmp_path / 'unused'}",
            f"run.prepared_dir={prep}",
            "model.dropout=0.0",
            "train.num_workers=1",  # one start of one process: the bridge is what this test is about
            "train.cpus_per_worker=0.5",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "data.window_rows=32",
            "train.intelligibility.samples=false",  # no listening samples: not what this test is about
            "train.intelligibility.text_gain=false",  # nor text gain (a second validation pass)
        ]
    )
    rep = json.loads((out / "forgetting_report.json").read_text())
    assert rc == (0 if rep["verdict"] == "ok" else 1)
    assert rep["old_languages"] == ["en", "zh", "ja"] and rep["unwatched_languages"] == ["ja"]
    assert rep["trained_languages"] == ["ar", "en", "zh"] and set(rep["languages"]) == {"ar", "en", "zh"}
    train_report = json.loads((out / "train" / "report.json").read_text())
    assert train_report["init_bridge"]["unmapped"][:2] == ["<bos>", "<eos>"]

    # Step 0 scores the bridged public model itself: evaluate it here, in process, on the same rows.
    corpus = PreparedCorpus.open(prep)
    model, _ = load_any(path, symbols=corpus.symbols, vocab=vocab_path, dropout=0.0)
    ids = {"en": 0, "zh": 1, "ja": 2, "ar": 3}
    tables = {lang: corpus.read_split(lang, "valid") for lang in ("en", "zh")}
    batches = _validation_batches(tables, ids, corpus.num_codebooks, 4, rank=0, world=1)
    filler = collate(
        {c: tables["en"].column(c).to_numpy(zero_copy_only=False) for c in tables["en"].column_names},
        ids,
        corpus.num_codebooks,
    )
    with torch.no_grad():
        here = evaluate(model, batches, ["en", "zh"], torch.device("cpu"), "both", filler)
    for lang in ("en", "zh"):
        assert rep["languages"][lang]["baseline"] == pytest.approx(here[lang]["loss"], rel=1e-5)

    from vallex.model.checkpoint import load_checkpoint

    _, meta = load_checkpoint(rep["model_file"])
    assert meta["languages"] == ["en", "zh", "ja", "ar"] and meta["symbols"]["list"] == corpus.symbols
