"""The one phoneme symbol table shared by every language, saved beside the shards as ``symbols.json``.

Ids are positions in an append-only list, so an id written into a shard keeps its meaning forever:
adding a language later appends its new symbols (sorted, for a deterministic order) and never
renumbers the old ones, which is what lets a model trained on the old table keep its embeddings.

File format (what ``vallex.data.corpus`` reads)::

    {"version": 3, "symbols": ["<pad>", "<bos>", "<eos>", "<unk>", ...], "fingerprint": "sha256:..."}

``version`` goes up by one with each change of content (the first ``extend`` that adds symbols after a
load or save), so "same version" means "same id mapping"; ``fingerprint`` (sha256 of the list) lets a
reader check that, and a table edited by hand is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

from vallex.files import is_file, read_text, write_text

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # pad id 0


class SymbolTableError(ValueError):
    """A symbol table file is missing or corrupt, or a symbol/id is not in the table."""


def symbols_fingerprint(symbols: Sequence[str]) -> str:
    """sha256 of the symbol list; the same function as ``vallex.data.synthetic.symbols_fingerprint``."""
    return "sha256:" + hashlib.sha256(json.dumps(list(symbols)).encode()).hexdigest()


class SymbolTable:
    """Symbol <-> id mapping with the specials first (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3)."""

    def __init__(self, symbols: Sequence[str] = SPECIALS, version: int = 0):
        symbols = list(symbols)
        if tuple(symbols[: len(SPECIALS)]) != SPECIALS:
            raise SymbolTableError(f"a symbol table must start with {list(SPECIALS)}, got {symbols[:4]}")
        self.symbols: list[str] = symbols
        self.version: int = version
        self._ids = {s: i for i, s in enumerate(symbols)}
        if len(self._ids) != len(symbols):
            dupes = sorted({s for s in symbols if symbols.count(s) > 1})
            raise SymbolTableError(f"a symbol table must not repeat symbols; repeated: {dupes}")
        self._changed = False  # content changed since load/save: the version has already been bumped

    # ---------------------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike) -> SymbolTable:
        """Read ``path`` (a local path or a URI); a missing, unreadable or inconsistent file is a
        ``SymbolTableError`` naming it."""
        if not is_file(path):
            raise SymbolTableError(
                f"symbol table {path} does not exist; it is written by data preparation "
                "(ray_jobs/prepare.py) next to the shards"
            )
        try:
            data = json.loads(read_text(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SymbolTableError(
                f"symbol table {path} is not readable JSON ({e}); restore it from a backup"
            ) from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: object, path: str | os.PathLike) -> SymbolTable:
        """The table in ``data`` (the parsed content of ``path``), checked: its shape, and its symbols
        against the fingerprint stored with them, so a table reordered or edited by hand is refused."""
        if not isinstance(data, dict) or "symbols" not in data or "version" not in data:
            raise SymbolTableError(
                f'symbol table {path} must be a JSON object {{"version": int, "symbols": [...]}}'
            )
        symbols, version = data["symbols"], data["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SymbolTableError(f"symbol table {path}: version must be an integer >= 0, got {version!r}")
        if not isinstance(symbols, list) or not all(isinstance(s, str) and s for s in symbols):
            raise SymbolTableError(f"symbol table {path}: symbols must be a list of non-empty strings")
        want = data.get("fingerprint")
        if want is not None and want != symbols_fingerprint(symbols):
            raise SymbolTableError(
                f"symbol table {path}: the symbols do not match the stored fingerprint (edited by hand?); "
                "ids in the shards would no longer mean what they meant: restore the original file"
            )
        try:
            return cls(symbols, version)
        except SymbolTableError as e:
            raise SymbolTableError(f"symbol table {path}: {e}") from None

    @classmethod
    def load_or_new(cls, path: str | os.PathLike) -> SymbolTable:
        """The table at ``path``, or a new one (specials only, version 0) if there is no file.

        A file that exists but is corrupt is an error, never silently replaced: a fresh table would
        renumber every symbol the existing shards use.
        """
        return cls.load(path) if is_file(path) else cls()

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (locally a temporary file in the same folder + ``os.replace``; to a URI the
        encoded text in one upload, see :func:`vallex.files.write_bytes`): a reader, or a run killed
        mid-write, sees the old table or the new one, never half of one."""
        payload = {"version": self.version, "symbols": self.symbols, "fingerprint": self.fingerprint}
        write_text(path, json.dumps(payload, ensure_ascii=False, indent=1))
        self._changed = False

    # ------------------------------------------------------------------------------------- content
    def extend(self, symbols: Iterable[str]) -> list[str]:
        """Append the symbols not yet in the table, in sorted order; existing ids never change.

        Returns the added symbols (empty if none). The first extend that adds anything after a load
        or save bumps ``version`` by one; save() then persists it.
        """
        new = set()
        for s in symbols:
            if not isinstance(s, str) or not s:
                raise SymbolTableError(f"symbols must be non-empty strings, got {s!r}")
            if s not in self._ids:
                new.add(s)
        added = sorted(new)
        for s in added:
            self._ids[s] = len(self.symbols)
            self.symbols.append(s)
        if added and not self._changed:
            self.version += 1
            self._changed = True
        return added

    def encode(self, symbols: Sequence[str], *, allow_unknown: bool = False) -> list[int]:
        """Symbols -> ids.

        An unknown symbol raises by default: in data preparation the table is extended first, so an
        unknown symbol is a bug that would silently become ``<unk>`` in the shards. At inference a
        text may hold a phone never seen in training: ``allow_unknown=True`` maps it to ``<unk>``.
        """
        ids = self._ids
        if allow_unknown:
            unk = ids["<unk>"]
            return [ids.get(s, unk) for s in symbols]
        try:
            return [ids[s] for s in symbols]
        except KeyError:
            missing = sorted({s for s in symbols if s not in ids})
            raise SymbolTableError(
                f"symbols {missing} are not in the table (version {self.version}, {len(self)} symbols); "
                "extend() it first, or encode(..., allow_unknown=True) to map them to <unk>"
            ) from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> symbols (numpy integers welcome); an id outside the table raises."""
        out = []
        n = len(self.symbols)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise SymbolTableError(
                    f"id {i} is outside the symbol table (ids 0..{n - 1}, version {self.version})"
                )
            out.append(self.symbols[i])
        return out

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the symbol list: equal fingerprints mean identical id mappings."""
        return symbols_fingerprint(self.symbols)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._ids

    def __repr__(self) -> str:
        return f"SymbolTable(version={self.version}, {len(self)} symbols, {self.fingerprint[:15]})"
