"""The languages vallex can prepare: ISO 639-1 codes and the espeak-ng voice that phonemizes each.

The ISO code is what a corpus manifest, a shard and the model's language embedding use; the voice is an
implementation detail of the text frontend. Every voice below exists in the espeak-ng data that
``espeakng_loader`` ships (checked by ``tests/text/test_text.py``, which phonemizes a sentence per language).

Codes are matched exactly (lower case, no region): ``en-US`` or ``EN`` would otherwise become a second
language next to ``en`` in the shards and the model. A near miss gets a suggestion in the error.
"""

from __future__ import annotations

import difflib

# ISO 639-1 -> espeak-ng voice (phonemizer's language tag). Where espeak has several accents, the one
# picked is the most widely spoken standard: US English, European French/Spanish/Portuguese, Mandarin.
LANGUAGE_VOICES: dict[str, str] = {
    "ar": "ar",  # Modern Standard Arabic; unvocalized text is read as espeak guesses the vowels
    "cs": "cs",
    "de": "de",
    "el": "el",
    "en": "en-us",
    "es": "es",
    "fi": "fi",
    "fr": "fr-fr",
    "hi": "hi",
    "hu": "hu",
    "id": "id",
    "it": "it",
    "ja": "ja",  # kana only: espeak's Japanese voice has no kanji dictionary (see vallex.text.phonemize)
    "ko": "ko",
    "nl": "nl",
    "pl": "pl",
    "pt": "pt",
    "ro": "ro",
    "ru": "ru",
    "sv": "sv",
    "tr": "tr",
    "uk": "uk",
    "zh": "cmn",  # Mandarin, from Han characters (simplified or traditional)
}

SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(sorted(LANGUAGE_VOICES))


def _suggest(code: str) -> str | None:
    """The supported code a user most likely meant by ``code``, or None."""
    low = code.strip().lower().replace("_", "-")
    base = low.split("-")[0]
    if base in LANGUAGE_VOICES:  # "EN", "en-US", "zh_CN"
        return base
    for iso, voice in LANGUAGE_VOICES.items():  # an espeak voice given instead of the ISO code: "cmn"
        if low == voice or base == voice:
            return iso
    close = difflib.get_close_matches(low, SUPPORTED_LANGUAGES, n=1, cutoff=0.5)
    return close[0] if close else None


def espeak_voice(language: str) -> str:
    """The espeak-ng voice for an ISO 639-1 code; ``ValueError`` naming the supported codes otherwise."""
    if isinstance(language, str) and language in LANGUAGE_VOICES:
        return LANGUAGE_VOICES[language]
    hint = _suggest(language) if isinstance(language, str) else None
    did_you_mean = f"; did you mean {hint!r}?" if hint else ""
    raise ValueError(
        f"unsupported language code {language!r}: use a lower-case ISO 639-1 code, one of "
        f"{', '.join(SUPPORTED_LANGUAGES)}{did_you_mean}"
    )
