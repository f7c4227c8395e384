"""A run's facts, resolved once on the driver: the typed, immutable :class:`RunPlan`.

``job.yaml`` -> :class:`vallex.config.Config` -> :func:`plan_run` -> ``RunPlan`` -> the mixer (which rows
are drawn) and every Train worker (which model, which languages, which ids). Everything that needs no
Ray is checked while the plan is built, so a wrong language, weights map or weights file fails before
a cluster is started. Training builds one plan; a Tune trial is the search's base plan with other
weights (:meth:`RunPlan.with_weights`); add-language builds the config its plan is made from.

The plan is plain data (strings, numbers, tuples, dicts of them): it pickles to Ray workers and into
Tune's experiment state, and holds no tensors (the ``train.init_from`` weights travel apart, through
the object store: see :func:`initial_state`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vallex.config import ONLINE_WEIGHTS, Config
from vallex.data.weights import resolve_weights

log = logging.getLogger("vallex.train")


def row_budget(train, max_steps: int | None = None) -> int:
    """Rows the ranks of a run consume in all: steps x micro-batches x batch size x workers (what
    ``unimax`` splits and what the mixed stream must hold). ``max_steps`` overrides ``train.max_steps``
    (a Tune trial runs ``tune.max_steps_per_trial``)."""
    steps = train.max_steps if max_steps is None else max_steps
    return steps * train.grad_accum * train.batch_size * train.num_workers


def check_prepared(languages, corpus, prepared_dir: str, *, key: str = "data.languages") -> None:
    """Every language asked for has prepared shards: else name them, what is prepared, and the fix."""
    unknown = sorted(set(languages) - set(corpus.languages))
    if unknown:
        raise ValueError(
            f"{key}: {unknown} have no prepared shards in {prepared_dir} "
            f"(prepared: {sorted(corpus.languages)}); run ray_jobs/prepare.py for them first"
        )


@dataclass(frozen=True)
class RunPlan:
    """What a training run draws and builds, resolved from the config and the prepared corpus."""

    prepared_dir: str
    """The prepared shards (a folder or a URI)."""
    languages: tuple[str, ...]
    """The trained (mixed) languages, sorted."""
    eval_languages: tuple[str, ...]
    """Languages validated at every evaluation: the trained ones and those the initial model knows
    that the corpus can validate (their forgetting is watched)."""
    init_languages: tuple[str, ...]
    """The languages ``init_from``'s model knew (empty for a fresh model)."""
    model_languages: tuple[str, ...]
    """The model's languages in id order: ``init_from``'s keep their ids, new ones follow."""
    counts: dict[str, int]
    """Train rows per trained language."""
    weights: dict[str, float]
    """Sampling weights per trained language, summing to 1 (normalized here, nowhere else)."""
    budget_rows: int
    """Rows the run consumes in all (:func:`row_budget`)."""
    model_config: dict[str, Any]
    """``VallexConfig`` fields of the model to build."""
    size: str
    num_symbols: int
    num_codebooks: int
    seed: int
    valid_max_rows: int
    """Validation rows per language (0: all)."""
    storage_path: str
    """Ray Train's storage (checkpoints)."""
    init_from: str = ""
    init_bridge: dict | None = None
    """How a public checkpoint's text embeddings were mapped (report.json), or None."""
    weights_spec: Any = field(default=None, compare=False)
    """What ``data.weights`` said (a policy, map or file), for messages only."""
    online: dict | None = None
    """``data.weights=online``: ``{"settings": data.online's update settings, "reference": the
    reachable loss per language or None}``; ``weights`` are then the prior the run starts from."""

    @property
    def language_ids(self) -> dict[str, int]:
        return {lang: i for i, lang in enumerate(self.model_languages)}

    def with_weights(self, weights: Mapping[str, float], **changes) -> RunPlan:
        """This plan with other sampling weights (a Tune trial), normalized and checked like data.weights."""
        resolved = resolve_weights(dict(weights), self.counts, budget=self.budget_rows)
        return dataclasses.replace(self, weights=resolved, weights_spec=dict(weights), **changes)

    def summary(self) -> str:
        """One log line: languages with their rows, and the weights."""
        return (
            f"languages {', '.join(f'{lang} ({self.counts[lang]} utt)' for lang in self.languages)}; "
            + ("online sampling weights, starting at " if self.online is not None else "sampling weights ")
            + ", ".join(f"{lang}={w:.3f}" for lang, w in self.weights.items())
        )


def _log_codec(codec: dict) -> None:
    """Say which codec made the codes; LOUDLY when they are not real EnCodec codes."""
    from vallex.codec.tokenizer import codec_summary

    line = codec_summary(codec)
    if codec.get("kind", "encodec") != "encodec" or not codec.get("pretrained", True):
        log.warning("%s", line)
    else:
        log.info("%s", line)


def plan_run(cfg: Config, *, corpus=None, max_steps: int | None = None) -> RunPlan:
    """The run's plan (see the module docstring); ``max_steps`` overrides ``train.max_steps``."""
    return plan_and_initial_state(cfg, corpus=corpus, max_steps=max_steps)[0]


def plan_and_initial_state(cfg: Config, *, corpus=None, max_steps: int | None = None):
    """``(plan, init_state)``: ``init_state`` is ``train.init_from``'s state dict grown to this run's
    languages and symbols, or None for a fresh model (it is loaded anyway to know the model's shape)."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.model.vallex import MODEL_SIZES

    corpus = corpus or PreparedCorpus.open(cfg.prepared_dir)
    _log_codec(corpus.codec)
    asked = list(cfg.data.languages) or list(corpus.languages)
    check_prepared(asked, corpus, cfg.prepared_dir)
    train_counts = corpus.counts("train")
    counts = {lang: int(train_counts[lang]) for lang in asked}  # in data.languages' order, as weights.json
    languages = sorted(asked)
    budget = row_budget(cfg.train, max_steps)
    online = _online_settings(cfg, languages) if cfg.data.weights == ONLINE_WEIGHTS else None
    spec, key = (cfg.data.online.prior, "data.online.prior") if online else (cfg.data.weights, "data.weights")
    try:
        weights = resolve_weights(spec, counts, alpha=cfg.data.alpha, budget=budget)
    except (ValueError, OSError) as e:
        raise ValueError(f"{key}: {e}") from None
    init_state, init_languages, bridge = None, [], None
    if cfg.train.init_from:
        model, meta = _grown_initial_model(cfg, corpus, languages)
        init_languages = list(meta["languages"])
        model_languages = init_languages + sorted(set(languages) - set(init_languages))
        model_config = dataclasses.asdict(model.config)
        size = meta["size"] or cfg.model.size
        bridge = meta.get("bridge")
        init_state = model.state_dict()
        log.info(
            "starting from %s (%s, languages %s); model languages now %s",
            cfg.train.init_from,
            size,
            init_languages,
            model_languages,
        )
    else:
        model_languages = sorted(languages)
        size = cfg.model.size
        model_config = dataclasses.asdict(
            MODEL_SIZES[size](
                num_phonemes=corpus.num_symbols, num_languages=len(model_languages), **cfg.model.overrides()
            )
        )
    plan = RunPlan(
        prepared_dir=cfg.prepared_dir,
        languages=tuple(languages),
        # Every language the model knows and the corpus can validate is evaluated, trained or not.
        eval_languages=tuple(sorted(set(languages) | (set(init_languages) & set(corpus.languages)))),
        init_languages=tuple(init_languages),
        model_languages=tuple(model_languages),
        counts=counts,
        weights=weights,
        budget_rows=budget,
        model_config=model_config,
        size=size,
        num_symbols=corpus.num_symbols,
        num_codebooks=corpus.num_codebooks,
        seed=cfg.run.seed,
        valid_max_rows=cfg.data.valid_max_rows,
        storage_path=cfg.storage_path,
        init_from=cfg.train.init_from,
        init_bridge=bridge,
        weights_spec=cfg.data.weights,
        online=online,
    )
    return plan, init_state


def _online_settings(cfg: Config, languages) -> dict:
    """``data.online`` checked (the update settings, the reference losses): what every worker's
    :class:`vallex.data.online.OnlineWeights` is built from."""
    from vallex.data.online import OnlineSettings, resolve_reference

    o = cfg.data.online
    settings = OnlineSettings(signal=o.signal, step_size=o.step_size, smoothing=o.smoothing, floor=o.floor)
    return {"settings": vars(settings), "reference": resolve_reference(o.reference, languages, o.signal)}


def initial_state(cfg: Config, plan: RunPlan, corpus=None) -> dict | None:
    """``train.init_from``'s state dict grown to ``plan``'s languages and symbols (None without one)."""
    if not plan.init_from:
        return None
    from vallex.data.corpus import PreparedCorpus

    corpus = corpus or PreparedCorpus.open(plan.prepared_dir)
    model, _ = _grown_initial_model(cfg, corpus, plan.languages)
    return model.state_dict()


def _grown_initial_model(cfg: Config, corpus, languages):
    """The ``train.init_from`` model, its phoneme table grown to the corpus's symbols and its language
    table to the checkpoint's languages plus ``languages``; (model, meta)."""
    from vallex.model.checkpoint import grow_languages, load_any

    path = Path(cfg.train.init_from)
    if not path.is_file():
        raise FileNotFoundError(
            f"train.init_from: {path} does not exist (expected a vallex checkpoint, a run's model.pt, or the "
            "public VALL-E X vallex-checkpoint.pt with train.init_vocab)"
        )
    try:
        model, meta = load_any(
            path,
            symbols=corpus.symbols,
            vocab=cfg.train.init_vocab or None,
            dropout=cfg.model.dropout,
            activation_checkpointing=cfg.model.activation_checkpointing,
        )
    except ValueError as e:
        raise ValueError(f"train.init_from: {e}") from None
    known = list(meta["languages"])
    # The checkpoint's languages keep their ids; new ones get the next rows.
    grow_languages(model, len(known) + len(set(languages) - set(known)))
    unwatched = sorted(set(known) - set(corpus.languages))
    if unwatched:
        log.warning(
            "WARNING: the model knows %s but %s has no validation data for them: their forgetting "
            "cannot be watched; prepare them too (a small replay subset is enough)",
            unwatched,
            cfg.prepared_dir,
        )
    return model, meta
