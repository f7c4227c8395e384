"""Model files: the public VALL-E X checkpoint format, vallex's own format, and growing the embeddings.

Two formats, both read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
pickled code):

- **Public VALL-E X** (Plachtaa/VALL-E-X ``vallex-checkpoint.pt``): ``{"model": state_dict}``. Our
  ``paper`` size with ``num_phonemes=2048, num_languages=3`` has its exact keys and shapes, so import and
  export are a checked ``load_state_dict`` / ``{"model": model.state_dict()}``; no renaming. The file
  carries no metadata: its id tables are the reference's, documented below, not ours. Given the same
  weights and token ids, vallex's greedy synthesis equals the reference's ``VALLE.inference`` code for
  code, all 8 codebooks, same-language and cross-lingual (``tests/model/test_reference_equality.py``, run
  against a checkout of the reference: ``VALLEX_REFERENCE_REPO=/path/to/VALL-E-X``).
- **vallex** (``save_checkpoint`` / ``load_checkpoint``): the same state dict plus everything needed to
  rebuild the model without guessing: the full ``VallexConfig``, the named size it came from, the ordered
  language list (position = language id) and the phoneme symbol list with its table version and
  fingerprint.

Using the public checkpoint's weights with vallex's data (facts from Plachtaa/VALL-E-X ``macros.py``,
``models/vallex.py``, ``utils/generation.py``):

- Languages: ``{"en": 0, "zh": 1, "ja": 2}`` (``PUBLIC_LANGUAGES``). Keep that order as the first three
  entries of the run's language list; ``grow_languages`` appends more rows (e.g. ``ar``) from their mean.
- Text: ``NUM_TEXT_TOKENS = 2048`` ids from the reference's own tokenizer (``utils/g2p`` symbols,
  ``PhonemeBpeTokenizer``), a vocabulary that does not match vallex's espeak symbol table id for id.
  vallex keeps its own table and *bridges* the text embeddings (``vallex.model.text_bridge``): given the
  reference's tokenizer file (``utils/g2p/bpe_69.json``: one id per IPA character), each vallex symbol
  starts from the mean of the reference rows that spell it, then training on every language together
  adapts them. ``load_any(..., vocab=)`` / ``train.init_vocab`` / ``add_language --base-vocab`` do this.
  (The alternative, feeding the reference tokenizer's own ids, would need its G2P stack: pypinyin,
  jieba, pyopenjtalk, eng_to_ipa; vallex phonemizes every language with espeak-ng instead.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from vallex.model.vallex import MODEL_SIZES, PHONEME_TABLES, VallexConfig, VallexModel, paper_config

FORMAT = "vallex"
FORMAT_VERSION = 1
log = logging.getLogger("vallex.model")

PUBLIC_LANGUAGES = ("en", "zh", "ja")  # VALLE.language_ID in the reference
LANGUAGE_TABLES = ("ar_language_embedding", "nar_language_embedding")
TEXT_KEY = "ar_text_embedding.word_embeddings.weight"
LANGUAGE_KEY = "ar_language_embedding.word_embeddings.weight"


class CheckpointError(ValueError):
    """A model file is missing, of the wrong format, or does not fit the model (names what is wrong)."""


# ------------------------------------------------------------------------------------- state dicts


# A model file states its own config, and a crafted one can claim any size: every config is held to these
# bounds (far above the ``paper`` size) and to the file's tensor shapes before a model is built, so a tiny
# file cannot make a loader allocate what its config claims.
CONFIG_BOUNDS = {
    "d_model": 65536,
    "nhead": 1024,
    "num_layers": 1024,
    "num_phonemes": 1 << 20,
    "num_languages": 1 << 16,
    "num_codebooks": 64,
    "codebook_size": 1 << 20,
    "dim_feedforward": 1 << 20,
    "max_prompt_frames": 1 << 24,
}
LISTED = 5  # mismatches named per kind in an error; the rest are counted


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - LISTED} more)" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def model_config(raw: dict, source: str, **overrides) -> VallexConfig:
    """A VallexConfig from a file's config dict (known fields only), within CONFIG_BOUNDS."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: its config is a {type(raw).__name__}, expected a map")
    fields = {f.name for f in dataclasses.fields(VallexConfig)}
    try:
        config = VallexConfig(**{**{k: v for k, v in raw.items() if k in fields}, **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid config ({e})") from None
    check_bounds(config, source)
    return config


def check_bounds(config: VallexConfig, source: str) -> None:
    for key, bound in CONFIG_BOUNDS.items():
        v = getattr(config, key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= bound:
            raise CheckpointError(f"{source}: config {key}={v!r} is not an integer in [1, {bound}]")


def expected_shapes(config: VallexConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a model of ``config``, without allocating it: one layer is built on the
    meta device and its keys repeated per layer (building all of them costs time per layer, even there)."""
    one = dataclasses.replace(config, num_layers=1)
    with torch.device("meta"):
        state = VallexModel(one).state_dict()
    out: dict[str, tuple[int, ...]] = {}
    for k, v in state.items():
        head, sep, rest = k.partition(".layers.0.")
        if sep:
            for i in range(config.num_layers):
                out[f"{head}.layers.{i}.{rest}"] = tuple(v.shape)
        else:
            out[k] = tuple(v.shape)
    return out


def check_fits(want: dict[str, tuple[int, ...]], state: dict, config: VallexConfig, source: str) -> None:
    """Every key of ``want`` in ``state`` with that shape and nothing else; else one error naming the
    first few missing, unexpected and mis-shaped tensors (expected vs got) and counting the rest."""
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shaped = [
        f"{k}: expected {want[k]}, got {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__}"
        for k in sorted(set(want) & set(state))
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != want[k]
    ]
    if missing or unexpected or shaped:
        c = config
        lines = [
            f"{source} does not fit the model (d_model={c.d_model}, nhead={c.nhead}, num_layers={c.num_layers}, "
            f"num_phonemes={c.num_phonemes}, num_languages={c.num_languages}):"
        ]
        if shaped:
            lines.append(f"{len(shaped)} tensor(s) with other shapes: {_listed(shaped)}")
        if missing:
            lines.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        raise CheckpointError("\n".join(lines))


def build_checked(config: VallexConfig, state: dict, source: str) -> VallexModel:
    """A model of ``config`` holding ``state``, built only once every tensor's shape is known to fit."""
    check_bounds(config, source)
    check_fits(expected_shapes(config), state, config, source)
    model = VallexModel(config)
    load_weights(model, state, source)
    return model


def load_weights(model: VallexModel, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` after checking every key and shape; a mismatch is one error that
    names ``source`` and the first few missing, unexpected and mis-shaped tensors (expected vs got)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_fits(want, state, model.config, source)
    model.load_state_dict(state)


def _read(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The file's dict; ``mmap=True`` maps the tensors instead of reading them (metadata at no cost)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # A file in torch's legacy (pre-zip) format cannot be mapped: read it.
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure is "not a weights-only file"
        raise CheckpointError(
            f"checkpoint {path} is not a weights-only torch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    return data


# -------------------------------------------------------------------------------- public format


def _public_state(data: dict, path) -> dict[str, torch.Tensor]:
    if "model" not in data or not isinstance(data["model"], dict):
        raise CheckpointError(
            f"checkpoint {path} has keys {sorted(data)[:8]}; the public VALL-E X format is {{'model': state_dict}}"
        )
    return data["model"]


def _table_rows(state: dict[str, torch.Tensor], source: str) -> tuple[int, int, int]:
    """(text rows, width, language rows) of a VALL-E X state dict (shapes only: mmap is fine)."""
    missing = [k for k in (TEXT_KEY, LANGUAGE_KEY) if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a VALL-E X state dict: no {missing}")
    rows, d_model = state[TEXT_KEY].shape
    return rows, d_model, state[LANGUAGE_KEY].shape[0]


def public_config(state: dict[str, torch.Tensor], **overrides) -> VallexConfig:
    """The config of a public-format state dict, read from its shapes: width, depth, feed-forward width,
    text rows and language rows. The head count changes no shape: it is the reference's 16 (``paper``)
    unless ``nhead=`` is given."""
    rows, d_model, languages = _table_rows(state, "the checkpoint")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("ar_decoder.layers.")}
    ff = state.get("ar_decoder.layers.0.linear1.weight")
    found = {
        "d_model": d_model,
        "num_layers": max(layers) + 1 if layers else 0,
        "num_phonemes": rows,
        "num_languages": languages,
        "dim_feedforward": None if ff is None or ff.shape[0] == 4 * d_model else ff.shape[0],
    }
    return paper_config(**{**found, **overrides})


def import_public(path: str | os.PathLike, config: VallexConfig | None = None, **overrides) -> VallexModel:
    """A model holding the public VALL-E X checkpoint's weights (``{"model": state_dict}``).

    ``config`` defaults to the one the tensors' shapes give (:func:`public_config`; for the real file:
    ``paper``, 2048 text tokens, 3 languages) with ``overrides`` (e.g. ``dropout=0.0``); a given config
    that does not fit is a ``CheckpointError`` naming every tensor. Ids follow the reference (languages
    ``PUBLIC_LANGUAGES``, text ids its tokenizer's): see the module docstring.
    """
    state = _public_state(_read(path), path)
    return build_checked(
        config or public_config(state, **overrides), state, f"public VALL-E X checkpoint {path}"
    )


def import_public_bridged(
    path: str | os.PathLike, *, symbols: Sequence[str], vocab: str | os.PathLike, **overrides
) -> tuple[VallexModel, dict]:
    """(model, metadata) from the public checkpoint with its text embeddings bridged to ``symbols``
    (vallex's table) through the reference tokenizer file ``vocab`` (``vallex.model.text_bridge``).

    The metadata is ``load_checkpoint``'s plus ``bridge``: which symbols started from which reference
    characters, and which from their mean."""
    from vallex.model.text_bridge import VocabError, bridge_text_embeddings
    from vallex.text.symbols import symbols_fingerprint

    state = _public_state(_read(path), path)
    table = _check_public(state, path, vocab)
    try:
        state, report = bridge_text_embeddings(state, list(symbols), table)
    except VocabError as e:
        raise CheckpointError(f"public VALL-E X checkpoint {path}: {e}") from None
    config = public_config(state, **overrides)
    model = build_checked(config, state, f"public VALL-E X checkpoint {path} (text bridged through {vocab})")
    log.info("public VALL-E X checkpoint %s: %s", path, report.summary())
    meta = {
        "size": "paper",  # public_config is paper's with the file's shapes (nhead, feed-forward: paper's)
        "config": dataclasses.asdict(config),
        "languages": list(PUBLIC_LANGUAGES),
        "symbols": {"version": None, "fingerprint": symbols_fingerprint(symbols), "list": list(symbols)},
        "bridge": report.to_json(),
    }
    return model, meta


def _check_public(state: dict[str, torch.Tensor], path, vocab) -> dict[str, int]:
    """A public state dict and its tokenizer file fit each other (three language rows, every token id a
    text row); returns the tokenizer's table. Works on a memory-mapped state (shapes only)."""
    from vallex.model.text_bridge import VocabError, check_vocab_fits, read_reference_vocab

    rows, _, languages = _table_rows(state, f"public VALL-E X checkpoint {path}")
    if languages != len(PUBLIC_LANGUAGES):
        raise CheckpointError(
            f"public VALL-E X checkpoint {path} has {languages} language rows; the format's languages "
            f"are {list(PUBLIC_LANGUAGES)} and a file with others does not say which they are"
        )
    try:
        table = read_reference_vocab(vocab)
        check_vocab_fits(table, rows)
    except VocabError as e:
        raise CheckpointError(f"public VALL-E X checkpoint {path}: {e}") from None
    return table


def export_public(model: VallexModel, path: str | os.PathLike) -> None:
    """Write ``{"model": state_dict}`` with the reference's key names (identical to ours)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


# ---------------------------------------------------------------------------------- vallex format


def save_checkpoint(
    model: VallexModel,
    path: str | os.PathLike,
    *,
    languages: Sequence[str],
    symbols: Sequence[str],
    symbols_version: int,
    size: str | None = None,
) -> None:
    """Weights + what rebuilding needs: config, size name, languages (id order), phoneme symbols."""
    from vallex.text.symbols import symbols_fingerprint

    c = model.config
    if len(languages) != c.num_languages:
        raise CheckpointError(
            f"{len(languages)} languages {list(languages)} for a model with {c.num_languages} language rows"
        )
    if len(symbols) != c.num_phonemes:
        raise CheckpointError(
            f"{len(symbols)} symbols for a model with {c.num_phonemes} phoneme rows; "
            "resize_phonemes(model, len(table)) first"
        )
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "size": size,
        "config": dataclasses.asdict(c),
        "languages": list(languages),
        "symbols": {
            "version": int(symbols_version),
            "fingerprint": symbols_fingerprint(symbols),
            "list": list(symbols),
        },
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a reader never sees half a file


def load_checkpoint(
    path: str | os.PathLike, *, symbols: Sequence[str] | None = None, **config_overrides
) -> tuple[VallexModel, dict]:
    """(model, metadata) from a vallex checkpoint; metadata = the file's ``size``, ``config``,
    ``languages``, ``symbols`` (version, fingerprint, list).

    ``symbols``: the table the caller will encode text with. The same list is fine; a table that extends
    the checkpoint's (append-only growth) grows the phoneme embeddings to fit (new rows = mean of the old);
    any other table is an error, since ids would mean other phonemes. ``config_overrides`` replace
    behaviour-only fields (e.g. ``dropout=0.0``); shapes come from the file.
    """
    data = _read(path)
    if data.get("format") != FORMAT:
        hint = (
            " (a public VALL-E X checkpoint: load_any with its tokenizer file, train.init_vocab)"
            if set(data) == {"model"}
            else ""
        )
        raise CheckpointError(f"checkpoint {path} is not a vallex checkpoint{hint}")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {data.get('format_version')}; this vallex reads {FORMAT_VERSION}"
        )
    fields = {f.name for f in dataclasses.fields(VallexConfig)}
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise CheckpointError(f"unknown model option(s) {unknown}; VallexConfig fields are {sorted(fields)}")
    source = f"vallex checkpoint {path}"
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{source} has no 'model' state dict")
    model = build_checked(model_config(data.get("config"), source, **config_overrides), data["model"], source)
    meta = {k: data[k] for k in ("size", "config", "languages", "symbols")}
    if symbols is not None:
        _check_extends(meta, symbols)
        if len(symbols) > len(meta["symbols"]["list"]):
            resize_phonemes(model, len(symbols))
    return model, meta


def _check_extends(meta: dict, symbols: Sequence[str]) -> None:
    """``symbols`` must be the checkpoint's table or an append-only extension of it."""
    saved = meta["symbols"]["list"]
    symbols = list(symbols)
    if symbols[: len(saved)] != saved:
        pairs = enumerate(zip(saved, symbols, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(saved), len(symbols)))
        raise CheckpointError(
            f"the symbol table ({len(symbols)} symbols) is not the checkpoint's ({len(saved)} symbols, "
            f"version {meta['symbols']['version']}) nor an extension of it (first difference at id {first}); "
            "use the symbols.json of the data the model was trained on"
        )


def load_training_export(
    path: str | os.PathLike,
    *,
    symbols: Sequence[str],
    report: str | os.PathLike | None = None,
    **config_overrides,
) -> tuple[VallexModel, dict]:
    """(model, metadata) from a training run's ``model.pt`` (a plain state dict) and its ``report.json``
    (default: beside it), which names the size and the languages; the metadata is ``load_checkpoint``'s.

    Width and depth are read from the tensors; the head count cannot be (it changes no shape), so it is the
    size's unless ``nhead=`` is given. ``symbols`` is the run's symbol table (it may have grown since).
    """
    data = _read(path)
    meta = _export_meta(path, data, symbols, report, **config_overrides)
    source = f"training export {path}"
    model = build_checked(model_config(meta["config"], source), data, source)
    if len(symbols) > len(meta["symbols"]["list"]):
        resize_phonemes(model, len(symbols))
    return model, meta


def _export_meta(path, data: dict, symbols: Sequence[str], report=None, **config_overrides) -> dict:
    """A training export's metadata from its report.json and its tensors' shapes (``data`` may be mmapped)."""
    import json

    from vallex.text.symbols import symbols_fingerprint

    path = Path(path)
    report = Path(report) if report else path.with_name("report.json")
    if not report.is_file():
        raise CheckpointError(
            f"{path} is a bare state dict; its run's report.json ({report}) is needed and missing"
        )
    info = json.loads(report.read_text()).get("model") or {}
    missing = [k for k in ("size", "languages", "num_symbols") if k not in info]
    if missing:
        raise CheckpointError(f"{report}: the 'model' section lacks {missing}")
    if TEXT_KEY not in data:
        raise CheckpointError(f"{path} is not a vallex model state dict (no ar_text_embedding)")
    d_model = data[TEXT_KEY].shape[1]
    layers = {int(k.split(".")[2]) for k in data if k.startswith("ar_decoder.layers.")}
    n = int(info["num_symbols"])
    symbols = list(symbols)
    if len(symbols) < n:
        raise CheckpointError(
            f"the symbol table has {len(symbols)} symbols but the model in {path} was trained with {n}: "
            "use the symbols.json of the data it was trained on"
        )
    config = MODEL_SIZES[info["size"]](
        num_phonemes=n,
        num_languages=len(info["languages"]),
        d_model=d_model,
        num_layers=max(layers) + 1,
        **config_overrides,
    )
    return {
        "size": info["size"],
        "config": dataclasses.asdict(config),
        "languages": list(info["languages"]),
        # The table's version when the model saw it is not recorded in report.json; the ids are its first n.
        "symbols": {"version": None, "fingerprint": symbols_fingerprint(symbols[:n]), "list": symbols[:n]},
    }


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"vallex"``, ``"public"`` (VALL-E X ``{"model": ...}``) or ``"export"`` (a run's bare state dict),
    read without loading the tensors."""
    return _kind(_read(path, mmap=True))


def _kind(data: dict) -> str:
    if data.get("format") == FORMAT:
        return "vallex"
    return "public" if set(data) == {"model"} else "export"


def checkpoint_metadata(
    path: str | os.PathLike, *, symbols: Sequence[str], vocab: str | os.PathLike | None = None
) -> dict:
    """What :func:`load_any` would return as metadata (``kind``, ``languages``, ``symbols``), checked the
    same way, without building the model: the tensors are memory-mapped, not read. For plans."""
    data = _read(path, mmap=True)
    kind = _kind(data)
    _vocab_matches_kind(path, kind, vocab)
    if kind == "public":
        _check_public(_public_state(data, path), path, vocab)
        return {"kind": kind, "languages": list(PUBLIC_LANGUAGES), "symbols": {"list": list(symbols)}}
    if kind == "vallex":
        meta = {k: data[k] for k in ("size", "config", "languages", "symbols")}
        _check_extends(meta, symbols)
        return {"kind": kind, **meta}
    return {"kind": kind, **_export_meta(path, data, symbols)}


def _vocab_matches_kind(path, kind: str, vocab) -> None:
    """A public checkpoint needs its tokenizer file; any other model must not be given one."""
    if vocab is not None and kind != "public":
        raise CheckpointError(
            f"a tokenizer file ({vocab}) goes with the public VALL-E X checkpoint only, but {path} is a vallex "
            "model whose phoneme ids are already vallex's: drop train.init_vocab (add_language.py: --base-vocab)"
        )
    if vocab is None and kind == "public":
        raise CheckpointError(
            f"{path} is a public VALL-E X checkpoint: its text ids are its own tokenizer's, not a vallex symbol "
            "table. Give that tokenizer file (utils/g2p/bpe_69.json from the Plachtaa/VALL-E-X repository) "
            "as train.init_vocab (ray_jobs/add_language.py: --base-vocab) to start vallex's phoneme embeddings "
            "from it (see vallex.model.text_bridge)"
        )


def load_any(
    path: str | os.PathLike,
    *,
    symbols: Sequence[str],
    vocab: str | os.PathLike | None = None,
    **config_overrides,
) -> tuple[VallexModel, dict]:
    """A vallex checkpoint, a training run's ``model.pt`` with its ``report.json`` beside it, or the public
    VALL-E X checkpoint with ``vocab`` (its tokenizer file) to bridge its text embeddings to ``symbols``."""
    kind = checkpoint_kind(path)
    _vocab_matches_kind(path, kind, vocab)
    if kind == "vallex":
        return load_checkpoint(path, symbols=symbols, **config_overrides)
    if kind == "public":
        return import_public_bridged(path, symbols=symbols, vocab=vocab, **config_overrides)
    return load_training_export(path, symbols=symbols, **config_overrides)


# ---------------------------------------------------------------------------------- growing tables


def _grow(module: nn.Module, rows: int) -> None:
    """Give a TokenEmbedding ``rows`` rows: old rows kept bit for bit, new rows = mean of the old ones.

    The mean (not noise) starts a new language/phoneme where the model's existing ones are on average,
    so its first outputs are an average of known behaviour rather than an out-of-distribution input.
    """
    old = module.word_embeddings
    n, d = old.weight.shape
    if rows < n:
        raise CheckpointError(f"cannot shrink an embedding from {n} to {rows} rows (ids would be lost)")
    if rows == n:
        return
    new = nn.Embedding(rows, d, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:n] = old.weight
        new.weight[n:] = old.weight.mean(0, keepdim=True)
    new.weight.requires_grad_(old.weight.requires_grad)
    module.word_embeddings = new


def grow_languages(model: VallexModel, num_languages: int) -> VallexModel:
    """Grow the AR and NAR language embeddings to ``num_languages`` rows (in place; returns the model).

    Existing rows are untouched, so every old language's outputs are bit-identical; build the optimizer
    after growing (its state refers to the old parameter tensors)."""
    for name in LANGUAGE_TABLES:
        _grow(getattr(model, name), num_languages)
    model.config.num_languages = num_languages
    return model


def resize_phonemes(model: VallexModel, num_phonemes: int) -> VallexModel:
    """Grow the AR and NAR phoneme embeddings to ``num_phonemes`` rows (in place; returns the model),
    after an append-only symbol table grew: old ids keep their rows, new ids start from the mean row."""
    for name in PHONEME_TABLES:
        _grow(getattr(model, name), num_phonemes)
    model.config.num_phonemes = num_phonemes
    return model


def consolidated_state_dict(model_engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0 (collective under ZeRO-3, where each rank holds a slice)."""
    if zero_stage == 3:
        # Gathers the partitioned parameters; every rank must call it. Returns the dict on rank 0.
        state = model_engine._zero3_consolidated_16bit_state_dict() or {}
    else:
        state = model_engine.module.state_dict()
    return {k: v.detach().float().cpu() for k, v in state.items()}
