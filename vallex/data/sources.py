"""Raw corpora: the list of utterances data preparation reads.

Three layouts (``corpus.layout``; by default detected from ``corpus.source``, see :func:`detect_layout`):

- ``manifest``: the generic format below (a file).
- ``ljspeech``: a folder with ``metadata.csv`` (``id|text|normalized text``, pipe-separated, no header,
  no quoting) and ``wavs/<id>.wav``. One language and one speaker for the whole corpus, given by
  ``corpus.language`` (required) and ``corpus.speaker`` (default: the folder's name). The normalized
  text is used when present, else the raw text.
- ``commonvoice``: a Common Voice locale folder with ``validated.tsv`` (tab-separated with a header:
  ``client_id, path, sentence`` and, in recent releases, ``locale``) and ``clips/<path>`` (mp3).
  speaker = ``client_id``; language = ``corpus.language`` when set, else the row's ``locale`` mapped to
  ISO 639-1 (``zh-CN`` -> ``zh``, ``sv-SE`` -> ``sv``). Rows whose clip is also listed in ``dev.tsv``
  (when that file exists) are the validation split; the rest get one from ``corpus.valid_fraction``.

The generic format is JSONL (one object per line) or CSV/TSV with a header, with the columns
``audio`` (path, relative to the manifest's folder or absolute), ``text``, ``language`` (ISO 639-1),
``speaker`` and optionally ``id`` and ``split`` (``train`` or ``valid``).

A missing column or a malformed line is an error naming the file and line; a row whose content is
bad (empty text, missing audio) is kept here and becomes a counted skip in preparation.

Text files are read as UTF-8; a UTF-8 byte-order mark (what spreadsheet programs write) is dropped, and
a UTF-16 file with a byte-order mark (Excel's "Unicode text") is decoded as such. Bytes that are not
UTF-8 (a Latin-1 or Windows-1252 export) and, in JSONL, escaped lone surrogates (``"\\ud800"``, which
no UTF-8 file, Parquet column or phonemizer can hold) are an error naming the file, the line and
how to convert it, never a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vallex.data.schema import SPLITS
from vallex.text.languages import LANGUAGE_VOICES, espeak_voice

REQUIRED_COLUMNS = ("audio", "text", "language", "speaker")
LAYOUTS = ("manifest", "ljspeech", "commonvoice")
LJSPEECH_METADATA = "metadata.csv"
COMMONVOICE_TSV = "validated.tsv"
COMMONVOICE_COLUMNS = ("client_id", "path", "sentence")
# Common Voice locales whose language is not the part before the region; None: no espeak voice fits.
_CV_LOCALES: dict[str, str | None] = {"zh-HK": None}  # Cantonese: espeak's Mandarin voice would be wrong


class ManifestError(ValueError):
    """A corpus manifest is malformed (names the file and line)."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute path
    text: str
    language: str
    speaker: str
    split: str | None = None  # None: assigned by preparation from corpus.valid_fraction

    def to_dict(self) -> dict:
        return asdict(self)


def _not_utf8(path: Path, lineno: int, line: bytes, error: UnicodeDecodeError) -> ManifestError:
    bad = line[error.start : error.end]
    return ManifestError(
        f"{path}:{lineno}: not UTF-8 text (bytes {bad.hex(' ')} at byte {error.start + 1} of the line: "
        f"{line[: error.start].decode('utf-8', 'replace')[-40:]!r} is followed by them); save the file "
        "as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out` for a Latin-1/Windows-1252 export"
    )


def text_lines(path: Path):
    """The lines of a text file (line endings kept, as ``csv`` wants them), decoded one at a time so a
    byte that is not UTF-8 is reported with its own line number; see the module docstring."""
    with path.open("rb") as f:
        head = f.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(
            codecs.BOM_UTF32_LE
        ):
            yield from _utf16_lines(path, head + f.read())
            return
        f.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, raw, e) from None


def _utf16_lines(path: Path, data: bytes):
    try:
        text = data.decode("utf-16")  # the byte-order mark says which byte order, and is dropped
    except UnicodeDecodeError as e:
        lineno = data[: e.start].decode("utf-16", "replace").count("\n") + 1
        raise ManifestError(
            f"{path}:{lineno}: the file starts with a UTF-16 byte-order mark but is not valid UTF-16 "
            f"({e.reason}); save it as UTF-8"
        ) from None
    yield from text.splitlines(keepends=True)


def _check_strings(row: dict, path: Path, lineno: int) -> None:
    """JSON can escape a lone surrogate (``"\\ud800"``), which no UTF-8 file or Arrow string can hold:
    preparation would crash writing it. Refused here, naming the key."""
    for key, value in row.items():
        for s in (key, value):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ManifestError(
                        f"{path}:{lineno}: {key!r} holds a lone surrogate {s[e.start]!r} (at character "
                        f"{e.start + 1}); it is not text: fix the line (a UTF-16 pair split in two?)"
                    ) from None


def _csv_rows(path: Path, delimiter: str, **kwargs):
    """Yield (row number, dict) of a CSV/TSV file with a header; the header is row 1. A csv error (a NUL
    byte, an unterminated quote) names the file and row."""
    reader = csv.DictReader(text_lines(path), delimiter=delimiter, **kwargs)
    try:
        yield reader.fieldnames
        yield from enumerate(reader, 2)
    except csv.Error as e:
        raise ManifestError(f"{path}:{reader.line_num}: not valid {path.suffix[1:].upper()} ({e})") from None


def _rows(path: Path):
    """Yield (line number, dict) from a JSONL or CSV/TSV manifest."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{lineno}: each line must be a JSON object")
            _check_strings(row, path, lineno)
            yield lineno, row
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, "\t" if suffix == ".tsv" else ",")
        fieldnames = next(rows)
        missing = [c for c in REQUIRED_COLUMNS if c not in (fieldnames or [])]
        if missing:
            raise ManifestError(
                f"{path}: header lacks columns {missing}; a manifest needs {list(REQUIRED_COLUMNS)} "
                f"(+ optional id, split), got {fieldnames}"
            )
        yield from rows
    else:
        raise ManifestError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .csv or .tsv")


def read_manifest(path: str | os.PathLike, languages: list[str] | None = None) -> list[Utterance]:
    """Read and check a manifest; keep only ``languages`` when given (empty/None keeps all)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"corpus manifest {str(path)!r} does not exist")
    base = path.parent
    keep = set(languages or [])
    seen: dict[str, int] = {}
    out = []
    for lineno, row in _rows(path):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ManifestError(
                f"{path}:{lineno}: missing keys {missing} (a row needs {list(REQUIRED_COLUMNS)})"
            )
        lang = str(row["language"]).strip()
        try:
            espeak_voice(lang)
        except ValueError as e:
            raise ManifestError(f"{path}:{lineno}: {e}") from None
        if keep and lang not in keep:
            continue
        split = (row.get("split") or None) and str(row["split"]).strip()
        if split is not None and split not in SPLITS:
            raise ManifestError(f"{path}:{lineno}: split must be one of {SPLITS} or empty, got {split!r}")
        audio = str(row["audio"])
        uid = str(row.get("id") or Path(audio).stem)
        if uid in seen:
            raise ManifestError(f"{path}:{lineno}: utterance id {uid!r} already used on line {seen[uid]}")
        seen[uid] = lineno
        out.append(
            Utterance(
                id=uid,
                audio=str(base / audio) if not os.path.isabs(audio) else audio,
                text=str(row["text"] or ""),
                language=lang,
                speaker=str(row["speaker"]),
                split=split,
            )
        )
    if keep:
        absent = sorted(keep - {u.language for u in out})
        if absent:
            found = sorted({u.language for u in out})
            raise ManifestError(f"{path}: no utterances for languages {absent} (found {found})")
    if not out:
        raise ManifestError(f"{path}: no utterances")
    return out


# ------------------------------------------------------------------------------------------------
# Corpus layouts


def detect_layout(source: str | os.PathLike) -> str:
    """``manifest`` for a file, ``ljspeech`` / ``commonvoice`` for a folder holding ``metadata.csv`` /
    ``validated.tsv``; :class:`ManifestError` otherwise."""
    path = Path(source)
    if path.is_file():
        return "manifest"
    if path.is_dir():
        if (path / COMMONVOICE_TSV).is_file():
            return "commonvoice"
        if (path / LJSPEECH_METADATA).is_file():
            return "ljspeech"
        raise ManifestError(
            f"corpus folder {str(path)!r} has neither {LJSPEECH_METADATA} (LJSpeech layout) nor "
            f"{COMMONVOICE_TSV} (Common Voice layout); give a manifest file or set corpus.layout"
        )
    raise ManifestError(f"corpus source {str(path)!r} does not exist")


def _check_language(lang: str, where: str) -> str:
    try:
        espeak_voice(lang)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None
    return lang


def _finish(out: list[Utterance], where: Path, languages: list[str] | None) -> list[Utterance]:
    keep = set(languages or [])
    if keep:
        found = sorted({u.language for u in out})
        out = [u for u in out if u.language in keep]
        absent = sorted(keep - {u.language for u in out})
        if absent:
            raise ManifestError(f"{where}: no utterances for languages {absent} (found {found})")
    if not out:
        raise ManifestError(f"{where}: no utterances")
    return out


def read_ljspeech(
    root: str | os.PathLike, language: str, speaker: str = "", languages: list[str] | None = None
) -> list[Utterance]:
    """An LJSpeech-style folder: ``metadata.csv`` (``id|text|normalized text``) + ``wavs/<id>.wav``."""
    root = Path(root)
    meta = root / LJSPEECH_METADATA
    if not meta.is_file():
        raise ManifestError(f"{meta}: not found; an LJSpeech corpus needs metadata.csv beside wavs/")
    if not language:
        raise ManifestError(
            f"{root}: an LJSpeech corpus has one language and no language column: set corpus.language "
            "(an ISO 639-1 code such as en)"
        )
    _check_language(language, f"{root} (corpus.language)")
    speaker = speaker or root.name
    seen: dict[str, int] = {}
    out = []
    reader = csv.reader(text_lines(meta), delimiter="|", quoting=csv.QUOTE_NONE)
    try:
        for lineno, fields in enumerate(reader, 1):
            if not fields or not any(x.strip() for x in fields):
                continue
            if len(fields) < 2 or not fields[0].strip():
                raise ManifestError(
                    f"{meta}:{lineno}: expected 'id|text|normalized text' (pipe-separated), got {'|'.join(fields)!r}"
                )
            uid = fields[0].strip()
            if uid in seen:
                raise ManifestError(f"{meta}:{lineno}: utterance id {uid!r} already used on line {seen[uid]}")
            seen[uid] = lineno
            text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
            out.append(
                Utterance(
                    id=uid,
                    audio=str((root / "wavs" / f"{uid}.wav").absolute()),
                    text=text.strip(),
                    language=language,
                    speaker=speaker,
                )
            )
    except csv.Error as e:
        raise ManifestError(f"{meta}:{reader.line_num}: not valid pipe-separated text ({e})") from None
    return _finish(out, meta, languages)


def commonvoice_language(locale: str) -> str:
    """ISO 639-1 code for a Common Voice locale (``en``, ``zh-CN``, ``sv-SE``); ValueError if unsupported."""
    locale = locale.strip()
    if locale in _CV_LOCALES and _CV_LOCALES[locale] is None:
        raise ValueError(
            f"Common Voice locale {locale!r} has no espeak voice here; set corpus.language to override"
        )
    lang = _CV_LOCALES.get(locale) or locale.split("-")[0].lower()
    if lang not in LANGUAGE_VOICES:
        raise ValueError(
            f"Common Voice locale {locale!r} maps to {lang!r}, which is not supported; supported: "
            f"{', '.join(sorted(LANGUAGE_VOICES))}"
        )
    return lang


def _tsv_rows(path: Path, required: tuple[str, ...]):
    rows = _csv_rows(path, "\t", quoting=csv.QUOTE_NONE)
    fieldnames = next(rows)
    missing = [c for c in required if c not in (fieldnames or [])]
    if missing:
        raise ManifestError(
            f"{path}: header lacks columns {missing}; a Common Voice TSV needs {list(required)} "
            f"(+ locale), got {fieldnames}"
        )
    yield from rows


def read_commonvoice(
    root: str | os.PathLike, language: str = "", languages: list[str] | None = None
) -> list[Utterance]:
    """A Common Voice locale folder: ``validated.tsv`` + ``clips/`` (see the module docstring)."""
    root = Path(root)
    tsv = root / COMMONVOICE_TSV
    if not tsv.is_file():
        raise ManifestError(f"{tsv}: not found; a Common Voice corpus needs validated.tsv beside clips/")
    if language:
        _check_language(language, f"{root} (corpus.language)")
    dev = root / "dev.tsv"
    valid_paths = {row["path"] for _, row in _tsv_rows(dev, ("path",))} if dev.is_file() else set()
    seen: dict[str, int] = {}
    out = []
    for lineno, row in _tsv_rows(tsv, COMMONVOICE_COLUMNS):
        if None in row.values() or None in row:
            raise ManifestError(
                f"{tsv}:{lineno}: wrong number of tab-separated fields (expected one per header column)"
            )
        clip = row["path"].strip()
        if not clip:
            raise ManifestError(f"{tsv}:{lineno}: empty 'path' (expected a file name under clips/)")
        if language:
            lang = language
        elif row.get("locale", "").strip():
            try:
                lang = commonvoice_language(row["locale"])
            except ValueError as e:
                raise ManifestError(f"{tsv}:{lineno}: {e}") from None
        else:
            raise ManifestError(
                f"{tsv}:{lineno}: no locale column or value: set corpus.language (an ISO 639-1 code)"
            )
        uid = Path(clip).stem
        if uid in seen:
            raise ManifestError(f"{tsv}:{lineno}: clip {clip!r} already listed on line {seen[uid]}")
        seen[uid] = lineno
        out.append(
            Utterance(
                id=uid,
                audio=str((root / "clips" / clip).absolute()),
                text=(row["sentence"] or "").strip(),
                language=lang,
                speaker=row["client_id"].strip(),
                split="valid" if clip in valid_paths else None,
            )
        )
    return _finish(out, tsv, languages)


def read_corpus(
    source: str | os.PathLike,
    layout: str = "auto",
    *,
    language: str = "",
    speaker: str = "",
    languages: list[str] | None = None,
) -> list[Utterance]:
    """Read a corpus in any supported layout (``auto`` detects it from ``source``)."""
    if layout in ("auto", ""):
        layout = detect_layout(source)
    if layout == "manifest":
        if Path(source).is_dir():
            raise ManifestError(
                f"corpus.layout is manifest but {str(source)!r} is a folder; give the manifest file"
            )
        return read_manifest(source, languages)
    if layout == "ljspeech":
        return read_ljspeech(source, language, speaker, languages)
    if layout == "commonvoice":
        return read_commonvoice(source, language, languages)
    raise ManifestError(f"unknown corpus layout {layout!r}; use one of {', '.join(LAYOUTS)} or auto")
