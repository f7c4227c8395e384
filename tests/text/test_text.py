"""The text frontend: languages, espeak phonemization and the shared symbol table."""

from __future__ import annotations

import json
import pickle

import pytest

from vallex.text.languages import LANGUAGE_VOICES, SUPPORTED_LANGUAGES, espeak_voice
from vallex.text.phonemize import (
    PUNCTUATION,
    STRESS_MARKS,
    WORD_BOUNDARY,
    Phonemizer,
    normalize_text,
)
from vallex.text.symbols import SPECIALS, SymbolTable, SymbolTableError, symbols_fingerprint

SENTENCES = {
    "en": ["The church bells ring, and I like tea.", "How are you?"],
    "zh": ["今天的天气非常好。", "我每天早上喝一杯牛奶，你呢？"],
    "ar": ["ذَهَبَ الْوَلَدُ إِلَى الْمَدْرَسَةِ صَبَاحًا.", "كيف حالك؟"],
    "fr": ["Je bois un café chaque matin.", "Comment ça va ?"],
}

MANDARIN_TONES = {"˥˥", "˧˥", "˨˩˦", "˥˩", "˩˩"}


@pytest.fixture(scope="module")
def phonemizer():
    return Phonemizer()


# ------------------------------------------------------------------------------------------------
# languages


def test_required_languages_map_to_espeak_voices():
    want = {
        "en": "en-us",
        "zh": "cmn",
        "ja": "ja",
        "ar": "ar",
        "fr": "fr-fr",
        "de": "de",
        "es": "es",
        "it": "it",
        "pt": "pt",
        "ru": "ru",
        "ko": "ko",
        "hi": "hi",
    }
    for iso, voice in want.items():
        assert espeak_voice(iso) == voice
    assert set(want) <= set(SUPPORTED_LANGUAGES)


def test_every_supported_voice_exists_and_phonemizes(phonemizer):
    # One word per language through espeak: a voice missing from espeakng_loader's data would raise.
    words = {"ja": "こんにちは", "zh": "你好", "ar": "مرحبا", "hi": "नमस्ते", "ko": "안녕", "ru": "привет"}
    words |= {"el": "γεια", "uk": "привіт"}
    for lang in SUPPORTED_LANGUAGES:
        (out,) = phonemizer([words.get(lang, "Anna")], lang)
        assert out, f"{lang} ({LANGUAGE_VOICES[lang]}) gave no phonemes"


def test_unknown_language_error_lists_codes_and_suggests():
    with pytest.raises(ValueError) as e:
        espeak_voice("xx")
    msg = str(e.value)
    assert "'xx'" in msg and all(code in msg for code in ("en", "zh", "ar", "fr"))
    for wrong, meant in (("EN", "en"), ("en-US", "en"), ("zh_CN", "zh"), ("cmn", "zh"), ("fr-fr", "fr")):
        with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
            espeak_voice(wrong)


# ------------------------------------------------------------------------------------------------
# phonemization


def test_sentences_give_symbols_in_four_languages(phonemizer):
    for lang, texts in SENTENCES.items():
        out = phonemizer(texts, lang)
        assert len(out) == len(texts)
        for text, symbols in zip(texts, out, strict=True):
            assert symbols, f"{lang}: {text!r} gave no symbols"
            assert all(isinstance(s, str) and s and not s.isspace() for s in symbols)
            assert symbols[0] != WORD_BOUNDARY and symbols[-1] != WORD_BOUNDARY


def test_multi_character_phones_stay_one_symbol(phonemizer):
    (church,) = phonemizer(["church"], "en")
    assert church.count("tʃ") == 2 and "t" not in church
    (eye,) = phonemizer(["I like"], "en")
    assert "aɪ" in eye
    (zh,) = phonemizer(["请把窗户关上"], "zh")
    assert any(len(s) > 1 and s not in MANDARIN_TONES for s in zh)  # e.g. tɕh, ts.h, ua


def test_mandarin_tones_are_complete_single_symbols(phonemizer):
    # mā má mǎ mà ma: espeak's IPA mode writes tones 1 and 4 both as "5"; the ASCII pass restores them.
    (ma,) = phonemizer(["妈麻马骂吗"], "zh")
    tones = [s for s in ma if s in MANDARIN_TONES]
    assert tones == ["˥˥", "˧˥", "˨˩˦", "˥˩", "˩˩"]
    assert not any(ch.isdigit() for s in ma for ch in s)


def test_stress_and_punctuation_are_own_symbols(phonemizer):
    (en,) = phonemizer(["Hello, world!"], "en")
    assert en[-1] == "!" and "," in en and WORD_BOUNDARY in en
    assert en.index(",") + 1 == en.index(WORD_BOUNDARY)  # "," then the boundary before "world"
    assert "ˈ" in en
    for lang, texts in SENTENCES.items():
        for symbols in phonemizer(texts, lang):
            for s in symbols:  # a stress mark never sticks to a phone, in any language
                assert s in STRESS_MARKS or not any(m in s for m in STRESS_MARKS), (lang, s)
    # Script-specific punctuation becomes the same ASCII symbols everywhere.
    (zh,) = phonemizer(["你好，世界！"], "zh")
    (ar,) = phonemizer(["كيف حالك؟"], "ar")
    assert "," in zh and zh[-1] == "!" and ar[-1] == "?"
    assert normalize_text("Τι κάνεις;", "el").endswith("?")


def test_stress_and_punctuation_can_be_dropped_alike():
    plain = Phonemizer(with_stress=False, preserve_punctuation=False)
    for lang, texts in SENTENCES.items():
        for symbols in plain(texts, lang):
            assert symbols
            assert not set(symbols) & set(STRESS_MARKS) and not set(symbols) & set(PUNCTUATION), lang


def test_numbers_keep_their_separators(phonemizer):
    (pi,) = phonemizer(["pi is 3.14"], "en")
    (time,) = phonemizer(["at 10:30"], "en")
    assert "." not in pi and ":" not in time


def test_empty_and_blank_texts_give_empty_lists_without_shifting_others(phonemizer):
    texts = ["", "Hello there.", "   ", "...", "Good night!", "\n"]
    out = phonemizer(texts, "en")
    assert out[0] == out[2] == out[3] == out[5] == []
    # phonemizer's own punctuation restore shifts outputs after a blank text: ours must not.
    assert out[1] == phonemizer(["Hello there."], "en")[0]
    assert out[4] == phonemizer(["Good night!"], "en")[0]
    assert phonemizer([], "en") == []


def test_code_switching_keeps_espeak_reading_without_flags(phonemizer):
    (mixed,) = phonemizer(["我用iPhone打电话"], "zh")
    assert mixed and not any("(" in s or ")" in s for s in mixed)
    assert "aɪ" in mixed  # espeak read "iPhone" with its English voice
    # Han characters outside Chinese are not readable by espeak ("Chinese letter"): no phonemes.
    kanji, kana = phonemizer(["日本語です", "にほんごです"], "ja")
    assert kanji == [] and kana


def test_phonemizer_pickles_before_and_after_use(phonemizer):
    fresh = pickle.loads(pickle.dumps(Phonemizer(with_stress=False)))
    assert fresh.with_stress is False
    phonemizer(["warm up"], "en")  # the module fixture holds live espeak backends by now
    clone = pickle.loads(pickle.dumps(phonemizer))
    assert clone(["Hello"], "en") == phonemizer(["Hello"], "en")


def test_phonemizer_rejects_a_bare_string(phonemizer):
    with pytest.raises(TypeError, match="list of texts"):
        phonemizer("hello", "en")


# ------------------------------------------------------------------------------------------------
# symbol table


def test_new_table_has_specials_first():
    table = SymbolTable()
    assert table.symbols == list(SPECIALS) and table.version == 0
    assert (table.pad_id, table.bos_id, table.eos_id, table.unk_id) == (0, 1, 2, 3)
    assert table.encode(["<pad>", "<unk>"]) == [0, 3]


def test_extend_appends_sorted_and_never_renumbers(phonemizer, tmp_path):
    path = tmp_path / "symbols.json"
    table = SymbolTable.load_or_new(path)
    en = phonemizer(SENTENCES["en"], "en")
    added = table.extend(s for sym in en for s in sym)
    assert added == sorted(added) and table.symbols[len(SPECIALS) :] == added
    table.save(path)
    assert table.version == 1
    en_ids = [table.encode(s) for s in en]
    before = list(table.symbols)

    # A language added later: old ids identical, new symbols appended, version +1.
    later = SymbolTable.load(path)
    zh = phonemizer(SENTENCES["zh"], "zh")
    new = later.extend(s for sym in zh for s in sym)
    assert new and later.symbols[: len(before)] == before
    assert [later.encode(s) for s in en] == en_ids
    assert later.extend(["ə", "ˈ"]) == []  # already there: no change
    later.save(path)
    reloaded = SymbolTable.load(path)
    assert reloaded.version == 2 and reloaded.symbols == later.symbols
    assert reloaded.fingerprint == later.fingerprint != SymbolTable(before).fingerprint


def test_version_bumps_once_per_saved_change(tmp_path):
    path = tmp_path / "symbols.json"
    table = SymbolTable()
    table.extend(["a"])
    table.extend(["b"])  # same unsaved change: still one bump
    assert table.version == 1
    table.save(path)
    table.save(path)  # nothing new: no bump
    assert SymbolTable.load(path).version == 1
    table.extend(["c"])
    assert table.version == 2


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "symbols.json"
    table = SymbolTable()
    table.extend(["a", "b"])
    table.save(path)
    table.extend(["c"])
    table.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["symbols.json"]
    data = json.loads(path.read_text())
    assert data["symbols"][-3:] == ["a", "b", "c"] and data["version"] == 2
    assert data["fingerprint"] == symbols_fingerprint(data["symbols"])


def test_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "symbols.json"
    table = SymbolTable()
    table.extend(["a"])
    table.save(path)
    old = path.read_text()
    table.extend(["b"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vallex.text.symbols.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        table.save(path)
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["symbols.json"]


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SymbolTableError, match="nope.json"):
        SymbolTable.load(missing)
    assert len(SymbolTable.load_or_new(missing)) == len(SPECIALS)

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": 1, "symbols": ["<pad>"')
    with pytest.raises(SymbolTableError, match="corrupt.json"):
        SymbolTable.load(corrupt)
    with pytest.raises(SymbolTableError, match="corrupt.json"):
        SymbolTable.load_or_new(corrupt)  # never silently replaced by a fresh (renumbered) table

    edited = tmp_path / "edited.json"
    table = SymbolTable()
    table.extend(["a", "b"])
    table.save(edited)
    data = json.loads(edited.read_text())
    data["symbols"][-2:] = ["b", "a"]
    edited.write_text(json.dumps(data))
    with pytest.raises(SymbolTableError, match="edited.json.*fingerprint"):
        SymbolTable.load(edited)

    no_specials = tmp_path / "bad.json"
    no_specials.write_text(json.dumps({"version": 1, "symbols": ["a", "b"]}))
    with pytest.raises(SymbolTableError, match=r"bad.json.*<pad>"):
        SymbolTable.load(no_specials)


def test_reads_a_table_without_fingerprint(tmp_path):
    # The form vallex.data.synthetic writes.
    path = tmp_path / "symbols.json"
    symbols = [*SPECIALS, "p0", "p1"]
    path.write_text(json.dumps({"version": 1, "symbols": symbols}))
    table = SymbolTable.load(path)
    assert table.symbols == symbols and table.fingerprint == symbols_fingerprint(symbols)


def test_encode_unknown_raises_unless_allowed_and_decode_round_trips():
    table = SymbolTable()
    table.extend(["a", "b"])
    with pytest.raises(SymbolTableError, match=r"\['zz'\]"):
        table.encode(["a", "zz"])
    assert table.encode(["a", "zz"], allow_unknown=True) == [table.symbols.index("a"), table.unk_id]
    ids = table.encode(["b", "a"])
    assert table.decode(ids) == ["b", "a"]
    with pytest.raises(SymbolTableError, match="outside"):
        table.decode([len(table)])
    assert "a" in table and "zz" not in table and len(table) == len(SPECIALS) + 2
