"""Raw corpus manifests: the list of utterances data preparation reads.

The generic format is JSONL (one object per line) or CSV/TSV with a header, with the columns
``audio`` (path, relative to the manifest's folder or absolute), ``text``, ``language`` (ISO 639-1),
``speaker`` and optionally ``id`` and ``split`` (``train`` or ``valid``).

A missing column or a malformed line is an error naming the file and line; a row whose content is
bad (empty text, missing audio) is kept here and becomes a counted skip in preparation.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vallex.data.schema import SPLITS
from vallex.text.languages import espeak_voice

REQUIRED_COLUMNS = ("audio", "text", "language", "speaker")


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


def _rows(path: Path):
    """Yield (line number, dict) from a JSONL or CSV/TSV manifest."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}:{lineno}: each line must be a JSON object")
                yield lineno, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(
                    f"{path}: header lacks columns {missing}; a manifest needs {list(REQUIRED_COLUMNS)} "
                    f"(+ optional id, split), got {reader.fieldnames}"
                )
            for lineno, row in enumerate(reader, 2):
                yield lineno, row
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
