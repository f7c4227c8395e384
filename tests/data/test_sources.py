"""Corpus layouts: LJSpeech-style and Common Voice folders built from real espeak speech, read and prepared.

Common Voice clips are written as MP3 (soundfile 0.13 / libsndfile >= 1.1 encode MP3), like the real corpus.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from vallex.config import ConfigError, CorpusSection
from vallex.data.demo_corpus import Espeak
from vallex.data.sources import (
    ManifestError,
    commonvoice_language,
    detect_layout,
    read_commonvoice,
    read_corpus,
    read_ljspeech,
)

ROOT = Path(__file__).resolve().parents[2]

EN = [
    ("LJ001-0001", "Printing, in the only sense with which we are concerned.", "Printing in the only sense."),
    ("LJ001-0002", "In being comparatively modern, 1 case.", "In being comparatively modern, one case."),
    ("LJ001-0003", "The invention of movable metal letters.", ""),
    ("LJ001-0004", "It was a fine day for a walk.", "It was a fine day for a walk."),
    ("LJ001-0005", "She read the book twice.", "She read the book twice."),
]
FR = [
    ("aaa", "Il fait beau aujourd'hui."),
    ("aaa", "Le chat dort sur le canapé."),
    ("bbb", "Nous partons demain matin."),
    ("bbb", "La musique est très douce."),
    ("ccc", "Elle aime les fleurs du jardin."),
    ("ccc", "Le train arrive à midi."),
]


def _speech(espeak: Espeak, text: str, voice: str) -> tuple[np.ndarray, int]:
    pcm = espeak.synthesize(text, voice)
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768, espeak.sample_rate


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """(LJSpeech folder, Common Voice folder), a few real espeak clips each."""
    root = tmp_path_factory.mktemp("layouts")
    lj, cv = root / "LJSpeech-1.1", root / "cv-corpus" / "fr"
    (lj / "wavs").mkdir(parents=True)
    (cv / "clips").mkdir(parents=True)
    with Espeak() as espeak:
        lines = []
        for uid, raw, norm in EN:
            wav, sr = _speech(espeak, norm or raw, "en-us")
            sf.write(lj / "wavs" / f"{uid}.wav", wav, sr, subtype="PCM_16")
            lines.append(f"{uid}|{raw}|{norm}")
        (lj / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

        header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"
        rows = []
        for i, (client, text) in enumerate(FR):
            clip = f"common_voice_fr_{1000 + i}.mp3"
            wav, sr = _speech(espeak, text, "fr")
            sf.write(cv / "clips" / clip, wav, sr, format="MP3")
            rows.append(f"{client}\t{clip}\ts{i}\t{text}\t\t2\t0\t\t\t\t\tfr\t")
        (cv / "validated.tsv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
        # dev.tsv names the held-out clips (Common Voice's own dev split -> vallex's valid split)
        (cv / "dev.tsv").write_text("\n".join([header, rows[0], rows[2]]) + "\n", encoding="utf-8")
    return lj, cv


def test_layouts_are_detected_and_read(corpora):
    lj, cv = corpora
    assert detect_layout(lj) == "ljspeech" and detect_layout(cv) == "commonvoice"
    assert detect_layout(lj / "metadata.csv") == "manifest"

    utts = read_corpus(lj, language="en", speaker="linda")
    assert [u.id for u in utts] == [e[0] for e in EN]
    assert {u.language for u in utts} == {"en"} and {u.speaker for u in utts} == {"linda"}
    assert utts[0].text == "Printing in the only sense."  # the normalized text when present
    assert utts[2].text == "The invention of movable metal letters."  # else the raw text
    assert all(Path(u.audio).is_file() and u.split is None for u in utts)
    assert {u.speaker for u in read_ljspeech(lj, "en")} == {"LJSpeech-1.1"}  # default: the folder's name

    utts = read_corpus(cv)
    assert [u.id for u in utts] == [f"common_voice_fr_{1000 + i}" for i in range(len(FR))]
    assert {u.language for u in utts} == {"fr"} and [u.speaker for u in utts] == [c for c, _ in FR]
    assert [u.split for u in utts] == ["valid", None, "valid", None, None, None]
    assert utts[1].text == FR[1][1] and all(Path(u.audio).is_file() for u in utts)
    assert sf.info(utts[0].audio).format == "MP3"
    assert {u.language for u in read_commonvoice(cv, language="fr")} == {"fr"}
    with pytest.raises(ManifestError, match=r"no utterances for languages \['en'\] \(found \['fr'\]\)"):
        read_corpus(cv, languages=["en"])


def test_commonvoice_locales():
    locales = ("en", "zh-CN", "zh-TW", "sv-SE", "es")
    assert [commonvoice_language(x) for x in locales] == ["en", "zh", "zh", "sv", "es"]
    with pytest.raises(ValueError, match="zh-HK"):
        commonvoice_language("zh-HK")
    with pytest.raises(ValueError, match=r"'eo'.*not supported; supported: ar, cs"):
        commonvoice_language("eo")


def test_layout_errors_name_file_line_and_what_is_expected(corpora, tmp_path):
    lj, cv = corpora
    with pytest.raises(ManifestError, match="neither metadata.csv .* nor validated.tsv"):
        read_corpus(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="set corpus.language"):
        read_corpus(lj)
    with pytest.raises(ManifestError, match="corpus.language.*xx"):
        read_corpus(lj, language="xx")
    with pytest.raises(ManifestError, match="is a folder"):
        read_corpus(lj, "manifest")

    bad = tmp_path / "lj"
    bad.mkdir()
    (bad / "metadata.csv").write_text("a|Hello.|Hello.\nno pipes here\n")
    with pytest.raises(ManifestError, match=r"metadata.csv:2: expected 'id\|text\|normalized text'"):
        read_corpus(bad, language="en")
    (bad / "metadata.csv").write_text("a|Hello.|Hello.\na|Again.|Again.\n")
    with pytest.raises(ManifestError, match=r"metadata.csv:2: utterance id 'a' already used on line 1"):
        read_corpus(bad, language="en")

    badcv = tmp_path / "cv"
    badcv.mkdir()
    (badcv / "validated.tsv").write_text("client_id\tsentence\tlocale\nx\tHi\ten\n")
    with pytest.raises(ManifestError, match=r"validated.tsv: header lacks columns \['path'\]"):
        read_corpus(badcv)
    (badcv / "validated.tsv").write_text(
        "client_id\tpath\tsentence\tlocale\nx\ta.mp3\tHi\ten\ny\tb.mp3\tHo\teo\n"
    )
    with pytest.raises(ManifestError, match=r"validated.tsv:3: .*'eo'"):
        read_corpus(badcv)
    (badcv / "validated.tsv").write_text("client_id\tpath\tsentence\nx\ta.mp3\tHi\n")
    with pytest.raises(ManifestError, match=r"validated.tsv:2: no locale .*set corpus.language"):
        read_corpus(badcv)
    assert read_corpus(badcv, language="de")[0].language == "de"
    (badcv / "validated.tsv").write_text("client_id\tpath\tsentence\nx\ta.mp3\n")
    with pytest.raises(ManifestError, match=r"validated.tsv:2: wrong number of tab-separated fields"):
        read_corpus(badcv, language="de")


def test_corpus_config_checks_layout_and_language():
    assert CorpusSection().layout == "auto"
    with pytest.raises(ConfigError, match="layout"):
        CorpusSection(layout="librispeech")
    with pytest.raises(ConfigError, match="language"):
        CorpusSection(language="english")


def test_prepare_entry_point_reads_both_layouts(ray_cluster, corpora, tmp_path):
    """ray_jobs/prepare.py on an LJSpeech folder (WAV), then a Common Voice folder (MP3) added to it."""
    lj, cv = corpora
    main = runpy.run_path(str(ROOT / "ray_jobs" / "prepare.py"), run_name="vallex_test")["main"]
    common = [
        "--config",
        str(ROOT / "job.yaml"),
        f"run.output_dir={tmp_path}",
        "prepare.codec.kind=encodec",  # a few clips: too little audio to fit job.yaml's mel_rvq codec
        "prepare.codec.pretrained=false",
        "prepare.rows_per_shard=4",
        "corpus.valid_fraction=0.3",
    ]
    assert main([*common, f"corpus.source={lj}", "corpus.language=en", "corpus.speaker=linda"]) == 0
    assert main([*common, f"corpus.source={cv}", "corpus.layout=commonvoice"]) == 0
    out = tmp_path / "prepare"
    manifest = json.loads((out / "manifest.json").read_text())
    en, fr = manifest["languages"]["en"], manifest["languages"]["fr"]
    assert sum(en["utterances"].values()) == len(EN) and en["speakers"] == 1
    assert (
        fr["utterances"]["valid"] >= 2 and sum(fr["utterances"].values()) == len(FR) and fr["speakers"] == 3
    )
    assert en["skipped_total"] == 0 and fr["skipped_total"] == 0
    table = pq.read_table(out / fr["shards"][0])
    assert set(table.column("speaker").to_pylist()) <= {"aaa", "bbb", "ccc"}
    assert all(
        abs(f - d * 75) <= 2
        for f, d in zip(table["frames"].to_pylist(), table["duration"].to_pylist(), strict=True)
    )


# ------------------------------------------------------------------------------------ text encodings

_HEADER = "audio,text,language,speaker"


def test_manifests_with_a_byte_order_mark_are_read(tmp_path):
    """Spreadsheet exports: UTF-8 with a BOM (CSV, JSONL) and Excel's UTF-16 "Unicode text" (TSV)."""
    from vallex.data.sources import read_manifest

    rows = [("a.wav", "Déjà vu.", "fr", "s1"), ("b.wav", "日本語です。", "ja", "s2")]
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + "\n".join([_HEADER, *map(",".join, rows)]).encode() + b"\n")
    jsonl = tmp_path / "m.jsonl"
    lines = [json.dumps(dict(zip(_HEADER.split(","), r, strict=True)), ensure_ascii=False) for r in rows]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    tsv = tmp_path / "m.tsv"
    tsv.write_bytes("\r\n".join(["\t".join(_HEADER.split(",")), *map("\t".join, rows)]).encode("utf-16"))
    assert tsv.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    for path in (csv_path, jsonl, tsv):
        utts = read_manifest(path)
        assert [(Path(u.audio).name, u.text, u.language, u.speaker) for u in utts] == rows, path


def test_text_that_is_not_utf8_is_an_error_naming_file_and_line(tmp_path):
    """A Latin-1 export, raw surrogate bytes, an escaped lone surrogate: a ManifestError naming the file
    and the line (and how to convert), never a bare UnicodeDecodeError or a crash later in preparation."""
    from vallex.data.sources import read_manifest

    good = "a.wav,Hello.,en,s1"
    cases = {
        "latin1.csv": "\n".join([_HEADER, good, "b.wav,Déjà vu.,fr,s2"]).encode("latin-1"),
        "latin1.tsv": "\n".join([_HEADER.replace(",", "\t"), "b.wav\tÇa va.\tfr\ts2"]).encode("cp1252"),
        "surrogate_bytes.jsonl": b'{"audio": "a.wav", "text": "ok", "language": "en", "speaker": "s"}\n'
        b'{"audio": "b.wav", "text": "\xed\xa0\x80", "language": "en", "speaker": "s"}\n',
    }
    lines = {"latin1.csv": 3, "latin1.tsv": 2, "surrogate_bytes.jsonl": 2}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ManifestError, match=rf"{name}:{lines[name]}: not UTF-8 text .*iconv"):
            read_manifest(tmp_path / name)

    escaped = tmp_path / "escaped.jsonl"
    escaped.write_text(
        '{"audio": "a.wav", "text": "ok", "language": "en", "speaker": "s"}\n'
        '{"audio": "b.wav", "text": "half a pair: \\ud83d", "language": "en", "speaker": "s"}\n'
    )
    with pytest.raises(ManifestError, match=r"escaped.jsonl:2: 'text' holds a lone surrogate"):
        read_manifest(escaped)

    lj = tmp_path / "lj"
    lj.mkdir()
    (lj / "metadata.csv").write_bytes("a|Hello.|Hello.\nb|Café crème.|Café crème.\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"metadata.csv:2: not UTF-8 text"):
        read_corpus(lj, language="fr")
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "validated.tsv").write_bytes("client_id\tpath\tsentence\nx\ta.mp3\tÀ bientôt.\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"validated.tsv:2: not UTF-8 text"):
        read_corpus(cv, language="fr")
