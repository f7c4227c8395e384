"""One way to get the tokenizer that made a prepared corpus's codes: :func:`open_tokenizer`.

A manifest's ``codec`` dict names the codec. Two kinds exist:

- ``encodec`` (the dict has no ``kind``, or ``kind: encodec``): EnCodec 24 kHz, pretrained weights
  (production) or a seeded random init (tests); see :mod:`vallex.codec.encodec`.
- ``mel_rvq``: residual k-means over log-mel frames, fitted to the corpus by ``prepare`` and stored
  beside its shards (``fitted`` names the file, ``sha256`` its content); see :mod:`vallex.codec.mel_rvq`.

Both give ``encode(list of float32 24 kHz wavs) -> list of int16 [Q, T]``, ``decode`` back,
``num_codebooks``, ``sample_rate`` (24000) and ``is_real_encodec``.
"""

from __future__ import annotations

import logging
import os

from vallex.codec.encodec import CodecError

log = logging.getLogger("vallex.codec")

KINDS = ("encodec", "mel_rvq")


def codec_kind(codec: dict) -> str:
    kind = codec.get("kind", "encodec")
    if kind not in KINDS:
        raise CodecError(f"codec kind {kind!r} is not one of {list(KINDS)} (codec dict: {codec})")
    return kind


def codec_summary(codec: dict) -> str:
    """One line for logs, saying LOUDLY when the codes are not real EnCodec codes."""
    kind = codec_kind(codec)
    if kind == "mel_rvq":
        return (
            f"codec: NOT EnCodec: mel_rvq, a residual k-means over {codec.get('n_mels')}-bin log-mel frames "
            f"fitted to this corpus (seed {codec.get('seed')}; {codec.get('num_codebooks')} codebooks x "
            f"{codec.get('codebook_size')} at {codec.get('frame_rate')} Hz). Its codes carry the words but its "
            "audio is Griffin-Lim quality: for offline demos and tests; real TTS needs pretrained EnCodec"
        )
    if codec.get("name") == "synthetic_phonetic":  # vallex.data.synthetic's phonetic corpus: no audio at all
        return (
            "codec: NOT audio codes: synthetic phonetic codes made from the phonemes (vallex.data.synthetic), "
            "with no speech behind them. For tests and benchmarks only"
        )
    if codec.get("pretrained", True):
        return f"codec: EnCodec 24 kHz, pretrained weights, {codec.get('bandwidth')} kbps"
    return (
        f"codec: NOT real EnCodec codes: EnCodec with RANDOM weights (seed {codec.get('seed')}); the codes "
        "carry little of the speech and decode to noise. For tests only"
    )


def read_location(location: str) -> bytes:
    """The bytes of a local file or a URI (``s3://...``); ``FileNotFoundError`` if there is none."""
    from vallex.files import filesystem, is_uri

    if not is_uri(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_tokenizer(codec: dict, prepared_dir: str | os.PathLike | None = None, device: str | None = None):
    """The tokenizer a manifest's ``codec`` dict describes. ``prepared_dir`` (a folder or URI) is where a
    fitted codec's tables live; EnCodec does not need it."""
    kind = codec_kind(codec)
    if kind == "encodec":
        from vallex.codec.encodec import AudioTokenizer, CodecSettings

        settings = {k: v for k, v in codec.items() if k != "kind"}
        return AudioTokenizer(CodecSettings(**settings), device=device)

    from vallex.codec import mel_rvq
    from vallex.files import join

    for key in ("fitted", "sha256"):
        if key not in codec:
            raise CodecError(f"mel_rvq codec dict has no {key!r}; re-run ray_jobs/prepare.py (got {codec})")
    if prepared_dir is None:
        raise CodecError(
            "a mel_rvq codec is fitted to its corpus: open_tokenizer needs the prepared corpus folder "
            f"that holds {codec['fitted']}"
        )
    settings = mel_rvq.MelRVQSettings.from_dict(codec)
    path = join(str(prepared_dir), codec["fitted"])
    try:
        data = read_location(path)
    except FileNotFoundError:
        raise CodecError(
            f"{path}: the fitted mel_rvq codec of this corpus is missing; its codes cannot be decoded "
            "without it. Restore it, or re-run ray_jobs/prepare.py into a new folder"
        ) from None
    digest = mel_rvq.sha256(data)
    if digest != codec["sha256"]:
        raise CodecError(
            f"{path}: sha256 {digest[:16]}... but the manifest recorded {codec['sha256'][:16]}...: the fitted "
            "codec was changed or replaced since the codes were made; restore the original file"
        )
    return mel_rvq.MelRVQTokenizer(settings, mel_rvq.load_tables(data, path, settings))
