"""Text -> phoneme symbols with espeak-ng (through phonemizer 3.4 and the library espeakng_loader ships).

The tokenization rule, the same for every language
---------------------------------------------------
1. The text is NFKC-normalized and script-specific punctuation is mapped to ASCII (``。``->``.``,
   ``、``/``،``->``,``, ``؟``->``?``, ``।``->``.``, Greek ``;``->``?``; dashes -> ``,``); quotes and
   brackets become spaces (they carry no sound).
2. The text is cut at punctuation runs. The kept marks, ``, . ! ? ; : ¡ ¿``, are one symbol each
   (a run such as ``...`` or ``!!`` keeps one of each distinct mark in order). A ``.``, ``,`` or ``:``
   between two digits is not punctuation (``3.14``, ``1,5``, ``10:30`` reach espeak whole).
3. Each piece between marks is phonemized by the language's espeak voice; espeak's own phoneme
   separator keeps multi-character phones whole (``tʃ``, ``aɪ``, ``ɑ̃``, ``tɕh``).
4. ``_`` (:data:`WORD_BOUNDARY`) goes before every word except the first; words are espeak's (it splits
   Mandarin into words and numbers into number words).
5. Stress marks ``ˈ`` ``ˌ`` are their own symbols, before the phone they stress (so a vowel is the same
   symbol in every language, stressed or not). Mandarin tones are their own symbols too, after the
   vowel, written as Chao tone letters (``˥`` high ... ``˩`` low): ``˥˥`` ``˧˥`` ``˨˩˦`` ``˥˩`` and the
   neutral ``˩˩``. espeak's ``-`` (a syllable-boundary hint, not a sound) is dropped.
6. A text that yields no phone at all (empty, blank, punctuation only) gives ``[]``.

Examples (with the defaults)::

    en "Hello, world!"  -> h ə l ˈ oʊ , _ w ˈ ɜː l d !
    zh "你好，世界！"    -> n i ˨˩˦ χ ˈ ɑu ˨˩˦ , _ s. ˈ i. ˥˩ _ tɕ ˈ iɛ ˥˩ !   (espeak reads 你好 as one word)

Why Mandarin needs a second espeak pass: in IPA mode espeak writes only the first character of a tone
(``55`` and ``51`` both come out as ``5``), which would merge tones 1 and 4. The same text is therefore
also phonemized in espeak's ASCII mode, whose phones carry the full tone, and the two are aligned phone
by phone (a mismatch, seen on none of the demo sentences, leaves that text unphonemized with a warning).

Code-switching and mixed script (one rule): the utterance's language voice reads the whole text. When
espeak itself recognizes a foreign word and reads it with another voice (Latin-script words inside
Mandarin, Arabic or Japanese are read as English), those phones are kept and espeak's ``(en)`` switch
markers are removed (phonemizer's ``language_switch="remove-flags"``). One exception: Han characters in
a language other than ``zh`` (Japanese kanji above all) are not read by espeak at all (it says "Chinese
letter"), so such a text gives ``[]`` with a warning: write Japanese in kana.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import unicodedata

from vallex.text.languages import espeak_voice

log = logging.getLogger("vallex.text")

# phonemizer logs a warning per batch for language switches and word-count mismatches. Routed to a
# logger outside "vallex" (vallex's console shows only its own loggers; a log file still gets them) with
# a NullHandler, so that a process without logging set up (a Ray worker) does not print them either.
_PHONEMIZER_LOG = logging.getLogger("phonemizer")
if not any(isinstance(h, logging.NullHandler) for h in _PHONEMIZER_LOG.handlers):
    _PHONEMIZER_LOG.addHandler(logging.NullHandler())

WORD_BOUNDARY = "_"
PUNCTUATION = (",", ".", "!", "?", ";", ":", "¡", "¿")
STRESS_MARKS = ("ˈ", "ˌ")
CHAO_LETTERS = {"1": "˩", "2": "˨", "3": "˧", "4": "˦", "5": "˥"}

# Step 1 of the rule. NFKC already maps full-width forms (，！？：；) and … -> ...
_TO_ASCII_PUNCT = {
    "。": ".",
    "｡": ".",
    "、": ",",
    "،": ",",
    "؛": ";",
    "؟": "?",
    "।": ".",
    "॥": ".",
    "–": ",",
    "—": ",",
    "’": "'",
    "‘": "'",
}
_SILENT = '"«»“”„‟‹›()[]{}「」『』《》〈〉【】〔〕・*'
_TRANSLATE = str.maketrans({**_TO_ASCII_PUNCT, **{c: " " for c in _SILENT}})
# Greek writes the question mark as ";" (U+037E, which NFKC turns into ";").
_LANGUAGE_PUNCT = {"el": str.maketrans({";": "?"})}

_MARK = r"(?:[!?;¡¿]|(?<!\d)[.,:]|[.,:](?!\d))"
_MARK_RUN = re.compile(rf"({_MARK}(?:\s*{_MARK})*)")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_FLAGS = re.compile(r"\([^)]*\)")  # espeak's language-switch markers: "(en)" ... "(cmn)"
_TRAILING_DIGITS = re.compile(r"\d+$")

_ESPEAK_READY = False


def _configure_espeak() -> None:
    """Point phonemizer at the libespeak-ng *and* the data folder that espeakng_loader ships.

    Both are needed: the library's compiled-in data path is the wheel builder's folder, so without
    ``set_data_path`` espeak fails with "Error processing file '/home/runner/.../phontab'". These are
    class-level settings, so each process (every Ray worker) runs this once before its first backend.
    """
    global _ESPEAK_READY
    if _ESPEAK_READY:
        return
    import espeakng_loader
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    EspeakWrapper.set_library(espeakng_loader.get_library_path())
    EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
    _ESPEAK_READY = True


def normalize_text(text: str, language: str) -> str:
    """Step 1 of the tokenization rule (exposed for tests and debugging)."""
    text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    if language in _LANGUAGE_PUNCT:
        text = text.translate(_LANGUAGE_PUNCT[language])
    return " ".join(text.split())  # newlines and tabs too: espeak reads one line per text


def _split(text: str) -> list[tuple[str, object]]:
    """Step 2: ``[("text", piece) | ("marks", [mark, ...])]`` in order."""
    out: list[tuple[str, object]] = []
    for i, part in enumerate(_MARK_RUN.split(text)):
        if i % 2:  # a captured punctuation run
            marks: list[str] = []
            for c in part:
                if c in PUNCTUATION and c not in marks:
                    marks.append(c)
            out.append(("marks", marks))
        elif part.strip():
            out.append(("text", part.strip()))
    return out


class _Voice:
    """The espeak state for one voice in one process: phonemizer's backend (+ an ASCII pass for cmn)."""

    def __init__(self, voice: str):
        from phonemizer.backend import EspeakBackend
        from phonemizer.backend.espeak.wrapper import EspeakWrapper
        from phonemizer.separator import Separator

        _configure_espeak()
        self.voice = voice
        # preserve_punctuation stays False: phonemizer's restore step misaligns a batch when a text is
        # blank or ends in an odd mark (seen here: outputs shifted onto the next text), and we cut at
        # punctuation ourselves anyway. Stress is always asked for and dropped later if unwanted.
        self.backend = EspeakBackend(
            voice,
            preserve_punctuation=False,
            with_stress=True,
            language_switch="remove-flags",
            words_mismatch="ignore",
            logger=_PHONEMIZER_LOG,
        )
        # Phones joined by " ", words by " _ ": split() then yields phones and "_" word boundaries.
        self.separator = Separator(phone=" ", word=f" {WORD_BOUNDARY} ", syllable="")
        self.lock = threading.Lock()  # an espeak instance keeps its state in C globals: one text at a time
        self.ascii = None
        if voice == "cmn":
            self.ascii = EspeakWrapper()
            self.ascii.set_voice(voice)

    def ipa(self, pieces: list[str]) -> list[list[str]]:
        """Raw espeak phones and "_" per piece, one batched phonemizer call."""
        lines = self.backend.phonemize(pieces, separator=self.separator, strip=True, njobs=1)
        return [line.split() for line in lines]

    def ascii_phones(self, piece: str) -> list[str]:
        """espeak's ASCII-mode phones of ``piece`` (flags and word-end markers removed)."""
        # The same loop as EspeakWrapper.text_to_phonemes, in ASCII mode (0x00) with "_" between phones;
        # phonemizer exposes only the IPA mode, hence the call one level down.
        text_ptr = ctypes.pointer(ctypes.c_char_p(piece.encode("utf-8")))
        mode = ord("_") << 8 | 0x00
        chunks = []
        while text_ptr.contents.value is not None:
            out = self.ascii._espeak.text_to_phonemes(text_ptr, 1, mode)
            if out:
                chunks.append(out.decode("utf-8"))
        raw = _FLAGS.sub("", " ".join(chunks))
        return [p for p in re.split(r"[\s_]+", raw) if p and p != "|"]


def _with_tones(ipa: list[str], ascii_phones: list[str]) -> list[str] | None:
    """Replace each IPA phone's truncated tone by the full one from the ASCII pass; None if misaligned."""
    phones = [t for t in ipa if t != WORD_BOUNDARY]
    if len(phones) != len(ascii_phones):
        return None
    out, k = [], 0
    for tok in ipa:
        if tok == WORD_BOUNDARY:
            out.append(tok)
            continue
        tone = _TRAILING_DIGITS.search(ascii_phones[k])
        k += 1
        if tone is None:
            out.append(tok)
        elif tok[-1:] in ("1", "2", "3", "4", "5", "ɜ"):  # espeak writes tone 3x as IPA "ɜ"
            out.append(tok[:-1])
            out.append("".join(CHAO_LETTERS[d] for d in tone.group() if d in CHAO_LETTERS))
        else:
            return None
    return out


# One _Voice per voice per process, shared by every Phonemizer there: Ray Data unpickles a fresh
# Phonemizer for each task, and a worker process runs many tasks.
_VOICES: dict[str, _Voice] = {}
_VOICES_LOCK = threading.Lock()
_HAN_WARNED: set[str] = set()  # languages already warned about in this process (then: debug)


def _voice(name: str) -> _Voice:
    with _VOICES_LOCK:
        if name not in _VOICES:
            _VOICES[name] = _Voice(name)
        return _VOICES[name]


class Phonemizer:
    """Picklable (it will be shipped to Ray Data workers): the espeak backends are created lazily per
    language in the process that uses them.

    ``with_stress=False`` drops the stress symbols and ``preserve_punctuation=False`` the punctuation
    symbols, in every language alike; Mandarin tones are lexical and always kept.
    """

    def __init__(self, with_stress: bool = True, preserve_punctuation: bool = True):
        self.with_stress = with_stress
        self.preserve_punctuation = preserve_punctuation

    def __getstate__(self) -> dict:
        # Only the settings travel: espeak state lives in the receiving process's own cache.
        return {"with_stress": self.with_stress, "preserve_punctuation": self.preserve_punctuation}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __call__(self, texts: list[str], language: str) -> list[list[str]]:
        """Phoneme symbols per text. An empty list for a text that yields no phonemes (empty / unphonemizable)."""
        voice_name = espeak_voice(language)
        if isinstance(texts, str):
            raise TypeError(
                "Phonemizer takes a list of texts, not one str (it would phonemize each character)"
            )
        segments: list[list[tuple[str, object]]] = []
        pieces: list[str] = []
        han = 0
        for text in texts:
            norm = normalize_text(str(text or ""), language)
            if voice_name != "cmn" and _HAN.search(norm):
                han += 1
                segments.append([])
                continue
            segs = []
            for kind, value in _split(norm):
                if kind == "text":
                    segs.append(("text", len(pieces)))
                    pieces.append(value)
                else:
                    segs.append((kind, value))
            segments.append(segs)
        if han:
            (log.warning if language not in _HAN_WARNED else log.debug)(
                "%s: %d text(s) contain Han characters, which espeak's %r voice cannot read (it says "
                "'Chinese letter'); they yield no phonemes. %s",
                language,
                han,
                voice_name,
                "Write Japanese in kana (convert kanji to their readings first)."
                if language == "ja"
                else "Remove them or transliterate them into this language.",
            )
            _HAN_WARNED.add(language)

        phones = self._phonemize_pieces(pieces, voice_name, language) if pieces else []
        return [self._assemble(segs, phones) for segs in segments]

    def _phonemize_pieces(self, pieces: list[str], voice_name: str, language: str) -> list[list[str]]:
        voice = _voice(voice_name)
        with voice.lock:
            raw = voice.ipa(pieces)
            if voice.ascii is not None:
                fixed = []
                for piece, toks in zip(pieces, raw, strict=True):
                    tones = _with_tones(toks, voice.ascii_phones(piece)) if toks else toks
                    if tones is None:
                        log.warning(
                            "%s: espeak's IPA and ASCII phones of %r do not align, so its tones are "
                            "unknown; the text containing it yields no phonemes",
                            language,
                            piece,
                        )
                    fixed.append(tones)
                raw = fixed
        return [self._clean(toks) if toks is not None else None for toks in raw]

    def _clean(self, toks: list[str]) -> list[str]:
        """Step 5 on one piece: split stress marks off, drop '-', collapse repeated boundaries."""
        out: list[str] = []
        for tok in toks:
            if tok == WORD_BOUNDARY:
                if out and out[-1] != WORD_BOUNDARY:
                    out.append(tok)
                continue
            tok = tok.replace("-", "")
            stress = [c for c in tok if c in STRESS_MARKS]
            phone = "".join(c for c in tok if c not in STRESS_MARKS)
            if stress and self.with_stress:
                out.append(stress[0])
            if phone:
                out.append(phone)
        while out and out[-1] == WORD_BOUNDARY:
            out.pop()
        return out

    def _assemble(self, segs: list[tuple[str, object]], phones: list[list[str] | None]) -> list[str]:
        out: list[str] = []
        has_phone = False
        for kind, value in segs:
            if kind == "marks":
                if self.preserve_punctuation:
                    out.extend(value)  # type: ignore[arg-type]
                continue
            toks = phones[value]  # type: ignore[index]
            if toks is None:  # tones unknown (see _phonemize_pieces)
                return []
            if not toks:
                continue
            if out:
                out.append(WORD_BOUNDARY)
            out.extend(toks)
            has_phone = True
        return out if has_phone else []
