"""Start vallex's phoneme embeddings from the public VALL-E X checkpoint's text embeddings.

The public checkpoint (Plachtaa/VALL-E-X ``vallex-checkpoint.pt``) was trained on text ids from its own
tokenizer, ``utils/g2p/bpe_69.json``: a HuggingFace ``tokenizers`` file whose model is a BPE *with no
merges* over IPA characters, so one id per character, ``_`` between words, ``[UNK]`` for the rest. Its
G2P is not vallex's either: it writes Mandarin tones as arrows (``→ ↑ ↓↑ ↓``), aspiration as ``ʰ``,
retroflexes with a backtick, and has no length marks; vallex phonemizes with espeak-ng into one symbol
per phone (``aɪ``, ``tɕh``, Chao tone letters ``˧˥``).

The bridge gives every symbol of the run's table the embedding of how the reference *spells* it: the
symbol is rewritten into the reference's conventions (:data:`SYMBOL_SPELLING`, then
:data:`CHARACTER_SPELLING`), and its row is the mean of the reference's trained rows for those
characters (one character: that row exactly). A diacritic the reference has no character for is
left out (``o̞`` -> ``o``, reported as *partial*); a symbol none of whose characters the reference
knows starts from the mean of all the reference's character rows, as a grown row would. AR and NAR text
tables are bridged alike; every other tensor is the checkpoint's.

This is a warm start, not an identity: a multi-character phone becomes one position instead of
several, and espeak's phones are not the reference G2P's. Fine-tune on every language together
(``train.init_from`` + ``train.init_vocab``; ``ray_jobs/add_language.py --base-vocab``), with the
step-0 evaluation as the baseline the forgetting guard compares against.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vallex.model.vallex import PHONEME_TABLES

log = logging.getLogger("vallex.model")

# Whole vallex symbols the reference spells differently: espeak's Mandarin (cmn) phones written as
# utils/g2p/mandarin.py's chinese_to_ipa writes them (bopomofo -> IPA, tones as arrows). Checked first.
SYMBOL_SPELLING = {
    "˥˥": "→",  # tone 1
    "˧˥": "↑",  # tone 2
    "˨˩˦": "↓↑",  # tone 3
    "˥˩": "↓",  # tone 4
    "˩˩": "",  # neutral tone: the reference writes nothing
    "s.": "s`",  # ㄕ
    "ts.": "ts`⁼",  # ㄓ (unaspirated: the reference marks it)
    "ts.h": "ts`ʰ",  # ㄔ
    "i.": "ɹ`",  # the apical vowel after a retroflex (shi, zhi)
    "i̪": "ɹ",  # ... after a dental sibilant (si, zi)
    "ʐ": "ɹ`",  # ㄖ
    "ər": "əɹ`",  # ㄦ (er)
    "tɕ": "tʃ",  # ㄐ (tʃ⁼ there; espeak's tɕ is also Japanese ち, which the reference writes without ⁼)
    "tɕh": "tʃʰ",  # ㄑ
    "ɕ": "ʃ",  # ㄒ
    "χ": "x",  # ㄏ
    "ai": "aɪ",  # ㄞ
    "ei": "eɪ",  # ㄟ
    "ɑu": "ɑʊ",  # ㄠ
    "ou": "oʊ",  # ㄡ
    "onɡ": "ʊŋ",  # ㄨㄥ
    "uo": "wo",  # medials: i -> j, u -> w, ü -> ɥ
    "ua": "wa",
    "uai": "waɪ",
    "uei": "weɪ",
    "iou": "joʊ",
    "iɑ": "jɑ",
    "iɛ": "jɛ",
    "yɛ": "ɥɛ",
    "yæ": "ɥæ",
}
# Characters the reference has no id for, written the way its English/Mandarin G2P would; applied to
# each character, then to the parts of a character the reference lacks (NFD: õ -> o + a tilde).
CHARACTER_SPELLING = {
    "ɡ": "g",  # U+0261 (espeak) vs ASCII g (reference)
    "ː": "",  # no length marks in the reference
    "ᵻ": "ɪ",
    "ɐ": "ə",
    "ʌ": "ə",
    "ɜ": "ə",
    "ɒ": "ɑ",
    "ɚ": "əɹ",
    "ɝ": "əɹ",
    "ɽ": "ɾ",  # Japanese flap: espeak's retroflex, the reference's tap
    "ᵝ": "",  # Japanese u's compression: the reference writes a bare ɯ
    "ɴ": "N",  # Japanese moraic n (ん), which the reference writes N
    "ʲ": "j",  # palatalization (Japanese nʲ, ɡʲ: にゅ, ぎゅ) as the glide
    ";": ",",
    ":": ",",
    "¡": "!",
    "¿": "?",
}
SPECIAL_SPELLING = {"<pad>": "[PAD]", "<unk>": "[UNK]"}


class VocabError(ValueError):
    """The reference tokenizer file is missing or not the format the bridge reads (names the file)."""


def read_reference_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Token -> id of the reference tokenizer file (``utils/g2p/bpe_69.json`` in Plachtaa/VALL-E-X).

    The file is a HuggingFace ``tokenizers`` JSON with ``{"model": {"type": "BPE", "vocab": {...},
    "merges": [...]}}``; read as plain JSON (the ``tokenizers`` package is not needed)."""
    path = Path(path)
    if not path.is_file():
        raise VocabError(
            f"reference tokenizer {path} does not exist; it is utils/g2p/bpe_69.json in the Plachtaa/VALL-E-X "
            "repository the public checkpoint comes from"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"reference tokenizer {path} is not readable JSON ({e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict) or not vocab:
        raise VocabError(
            f'reference tokenizer {path} has no {{"model": {{"vocab": {{token: id}}}}}} table '
            "(expected a HuggingFace tokenizers file such as bpe_69.json)"
        )
    bad = [t for t, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise VocabError(f"reference tokenizer {path}: ids must be integers >= 0; bad token(s) {bad[:5]}")
    return dict(vocab)


def spell(symbol: str) -> str:
    """How the reference tokenizer would write the sound of one vallex symbol (may be empty)."""
    if symbol in SYMBOL_SPELLING:
        return SYMBOL_SPELLING[symbol]
    if symbol.startswith("<") and symbol.endswith(">"):  # vallex's specials
        return SPECIAL_SPELLING.get(symbol, "")
    # espeak cmn marks aspiration with a trailing "h" after a stop or affricate (ph, th, kh, tsh).
    if len(symbol) > 1 and symbol.endswith("h") and symbol[-2] in "ptks":
        symbol = symbol[:-1] + "ʰ"
    return "".join(CHARACTER_SPELLING.get(ch, ch) for ch in unicodedata.normalize("NFC", symbol))


def reference_ids(symbol: str, vocab: dict[str, int]) -> tuple[list[int], str, str]:
    """(ids, characters used, characters dropped) for ``symbol``: the reference ids that spell it.

    A character the vocabulary lacks is split into its base and marks (NFD) and what of those it has is
    used (``õ`` -> ``o``); the rest is dropped. A special (``[UNK]``) is one id."""
    spelled = spell(symbol)
    if spelled.startswith("[") and spelled in vocab:
        return [vocab[spelled]], spelled, ""
    ids, used, dropped = [], "", ""
    for ch in spelled:
        parts = ch if ch in vocab else unicodedata.normalize("NFD", ch)
        for part in parts:
            part = CHARACTER_SPELLING.get(part, part) if part != ch else part
            if part in vocab:
                ids.append(vocab[part])
                used += part
            else:
                dropped += part
    return ids, used, dropped


@dataclass
class BridgeReport:
    """How each symbol of the run's table got its row."""

    mapped: dict[str, str] = field(default_factory=dict)
    """symbol -> the reference characters whose rows were averaged."""
    partial: dict[str, str] = field(default_factory=dict)
    """symbol -> the characters of its spelling the reference has no id for (left out of the mean)."""
    unmapped: list[str] = field(default_factory=list)
    """Symbols started from the mean of the reference's rows."""

    @property
    def coverage(self) -> float:
        """The fraction of symbols whose whole spelling the reference has."""
        n = len(self.mapped) + len(self.unmapped)
        return (len(self.mapped) - len(self.partial)) / n if n else 0.0

    def summary(self) -> str:
        def shown(items) -> str:
            items = list(items)
            return " ".join(items[:20]) + (" ..." if len(items) > 20 else "")

        n = len(self.mapped) + len(self.unmapped)
        return (
            f"{len(self.mapped) - len(self.partial)}/{n} symbols ({self.coverage:.0%}) start from the reference's "
            f"text embeddings"
            + (f"; {len(self.partial)} in part ({shown(self.partial)})" if self.partial else "")
            + (f"; {len(self.unmapped)} from their mean ({shown(self.unmapped)})" if self.unmapped else "")
        )

    def to_json(self) -> dict:
        return {
            "coverage": self.coverage,
            "mapped": self.mapped,
            "partial": self.partial,
            "unmapped": self.unmapped,
        }


def check_vocab_fits(vocab: dict[str, int], rows: int) -> None:
    """The tokenizer's ids must be rows of the checkpoint's text embeddings."""
    too_big = {t: i for t, i in vocab.items() if i >= rows}
    if too_big:
        raise VocabError(
            f"the reference tokenizer has ids up to {max(too_big.values())} but the checkpoint's text "
            f"embeddings have {rows} rows: the tokenizer is not this checkpoint's"
        )


def bridge_text_embeddings(
    state: dict[str, torch.Tensor], symbols: Sequence[str], vocab: dict[str, int]
) -> tuple[dict[str, torch.Tensor], BridgeReport]:
    """A copy of the public ``state`` whose AR and NAR text tables have one row per ``symbols`` entry.

    ``vocab`` is :func:`read_reference_vocab`'s table. Ids at or past the checkpoint's rows are an error
    (the file is not this checkpoint's tokenizer)."""
    check_vocab_fits(vocab, state[f"{PHONEME_TABLES[0]}.word_embeddings.weight"].shape[0])
    report = BridgeReport()
    plan: list[list[int]] = []
    for s in symbols:
        ids, used, dropped = reference_ids(s, vocab)
        plan.append(ids)
        if not ids:
            report.unmapped.append(s)
            continue
        report.mapped[s] = used
        if dropped:
            report.partial[s] = dropped
    char_ids = sorted({i for t, i in vocab.items() if len(t) == 1})  # the trained character rows
    out = dict(state)
    for name in PHONEME_TABLES:
        key = f"{name}.word_embeddings.weight"
        old = state[key]
        fallback = old[char_ids].mean(0) if char_ids else old.mean(0)
        new = torch.empty(len(symbols), old.shape[1], dtype=old.dtype)
        for row, ids in enumerate(plan):
            new[row] = old[ids].mean(0) if ids else fallback
        out[key] = new
    return out, report
