"""One config schema for every vallex job.

A run is described by one YAML file (``job.yaml`` at the top level is the default) whose top-level
sections map onto the dataclasses below. Each field's docstring is its documentation: ``--help`` of
every ``ray_jobs`` entry point prints them. After ``--config FILE``, ``key.sub=value`` arguments
override single fields (values are parsed as YAML, so ``train.max_steps=20``,
``data.weights={en: 0.7, ar: 0.3}`` and ``data.languages=[en,zh]`` all work).

Everything is checked before any Ray work starts: unknown keys (with the closest valid key suggested),
wrong types and impossible values raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vallex.files import is_uri


class ConfigError(ValueError):
    """A config value is wrong. ``key`` is the dotted path of the offending field."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclass
class RunSection:
    """Where a run writes and how it is seeded."""

    name: str = "demo"
    """Run name: the folder of Ray Train results under ``train.storage_path``."""
    output_dir: str = "runs/demo"
    """Root of this run's files: ``corpus/`` (demo audio), ``prepare/`` (shards), ``train/`` (metrics, report)."""
    seed: int = 0
    """Seed for data splits, mixing order and model init; the same seed gives the same run."""
    prepared_dir: str = ""
    """Prepared shards (``ray_jobs/prepare.py`` writes them, training reads them): a folder, or cloud
    storage (``s3://bucket/path``, ``gs://bucket/path``); empty means ``<output_dir>/prepare``.
    Lets several runs (Tune trials, add-language) share one prepared corpus."""

    def __post_init__(self):
        _require(
            bool(self.name.strip()) and not set("/\\") & set(self.name) and self.name not in (".", ".."),
            "name",
            f"must be a folder name (not '.' or '..', no '/' or '\\'), got {self.name!r}",
        )
        _require(bool(self.output_dir), "output_dir", "must be a path")
        _require(
            not is_uri(self.output_dir),
            "output_dir",
            f"must be a local (or mounted) folder, got {self.output_dir!r}; put the prepared shards in "
            "cloud storage with run.prepared_dir=s3://... and checkpoints with train.storage_path=s3://...",
        )
        if is_uri(self.prepared_dir):
            from vallex.storage import uri_problem

            problem = uri_problem(self.prepared_dir)
            _require(problem is None, "prepared_dir", f"{self.prepared_dir!r}: {problem}")


@dataclass
class CorpusSection:
    """The raw corpus that ``ray_jobs/prepare.py`` reads."""

    source: str = "demo"
    """``demo`` synthesizes the embedded multilingual demo corpus with espeak-ng into ``<output_dir>/corpus``;
    otherwise the path of a manifest (JSONL or CSV with audio, text, language, speaker[, split]), an
    LJSpeech-style folder (metadata.csv + wavs/) or a Common Voice folder (validated.tsv + clips/)."""
    layout: str = "auto"
    """How ``source`` is laid out: ``manifest``, ``ljspeech``, ``commonvoice``, or ``auto`` (a file is a
    manifest, a folder with validated.tsv is Common Voice, one with metadata.csv is LJSpeech)."""
    language: str = ""
    """ISO 639-1 code of a single-language corpus: required for ``ljspeech``; for ``commonvoice`` it
    overrides the ``locale`` column. Unused for manifests (they name each row's language)."""
    speaker: str = ""
    """Speaker name of an ``ljspeech`` corpus (one speaker); empty uses the folder's name."""
    languages: list[str] = field(default_factory=list)
    """ISO 639-1 codes to prepare (``[en, zh]``); empty means every language in the source."""
    valid_fraction: float = 0.1
    """Fraction of each language's utterances held out for validation when the source has no split column."""
    demo_scale: float = 1.0
    """``source: demo`` only: fraction (0..1) of the demo's ~3,000 generated sentences to synthesize
    besides its 256 hand-written ones (1: ~2 h of audio; 0: the hand-written ones only, ~9 min)."""

    def __post_init__(self):
        _require(bool(self.source), "source", "must be 'demo' or the path of a manifest or corpus folder")
        _require(
            self.layout in ("auto", "manifest", "ljspeech", "commonvoice"),
            "layout",
            f"must be one of auto, manifest, ljspeech, commonvoice (got {self.layout!r})",
        )
        if self.language:
            from vallex.text.languages import espeak_voice

            try:
                espeak_voice(self.language)
            except ValueError as e:
                _require(False, "language", str(e))
        _require(0.0 < self.valid_fraction < 1.0, "valid_fraction", "must be in (0, 1)")
        _require(0.0 <= self.demo_scale <= 1.0, "demo_scale", "must be in [0, 1]")


@dataclass
class CodecSection:
    """The codec that turns audio into codes: EnCodec 24 kHz, or a tokenizer fitted to the corpus."""

    kind: str = "encodec"
    """``encodec``: EnCodec 24 kHz (pretrained weights: the production path). ``mel_rvq``: a residual
    k-means over log-mel frames fitted to this corpus by prepare (seeded by ``run.seed``) and stored
    beside its shards (``codec_mel_rvq.npz``); the same code shape as EnCodec, codes that carry the
    words, Griffin-Lim audio: for offline demos and air-gapped machines without EnCodec weights."""
    bandwidth: float = 6.0
    """Target bandwidth in kbps; 6.0 gives the 8 codebooks VALL-E X models (mel_rvq: 8 k-means stages)."""
    pretrained: bool = True
    """EnCodec only: load the pretrained weights (torch hub cache or ``checkpoint``). ``false`` uses a
    random-init codec whose codes carry little speech: only for tests, and logged loudly."""
    checkpoint: str = ""
    """EnCodec only: explicit path of ``encodec_24khz-d7cc33bc.th``; empty looks in the torch hub cache."""
    mel_bins: int = 80
    """mel_rvq only: mel bands per frame (the vectors the k-means stages quantize)."""
    fit_utterances: int = 400
    """mel_rvq only: training utterances read to fit it (a seeded sample, balanced across languages)."""
    fit_frames: int = 40000
    """mel_rvq only: frames (1/75 s each) the k-means sees, a seeded sample of those utterances' frames;
    bounds the fit's time (~fit_frames x 1024 x mel_bins x 2 FLOPs per iteration and stage) and memory."""
    fit_iterations: int = 10
    """mel_rvq only: Lloyd iterations per k-means stage."""
    frame_rate: float = 75.0
    """mel_rvq only: code frames per second, 75 (EnCodec's rate, hop 320) or 50, 37.5, 25: sequences 1.5-3x
    shorter, each frame a longer slice of a phone. The demo uses 25 so its model learns to read in minutes
    on 2 cores; losses and text gains per frame are then not comparable with 75 Hz figures."""

    def __post_init__(self):
        _require(
            self.kind in ("encodec", "mel_rvq"), "kind", f"must be encodec or mel_rvq (got {self.kind!r})"
        )
        _require(
            self.bandwidth in (1.5, 3.0, 6.0, 12.0, 24.0), "bandwidth", "must be one of 1.5, 3, 6, 12, 24"
        )
        _require(self.mel_bins >= 8, "mel_bins", "must be >= 8")
        _require(self.fit_utterances >= 1, "fit_utterances", "must be >= 1")
        _require(self.fit_frames >= 1024, "fit_frames", "must be >= 1024 (one frame per code)")
        _require(self.fit_iterations >= 1, "fit_iterations", "must be >= 1")
        _require(
            self.frame_rate in (75.0, 50.0, 37.5, 25.0), "frame_rate", "must be 75, 50, 37.5 or 25 (frames/s)"
        )


@dataclass
class PrepareSection:
    """Data preparation: phonemes + EnCodec tokens -> per-language Parquet shards."""

    codec: CodecSection = field(default_factory=CodecSection)
    """Codec settings (EnCodec, or the mel_rvq tokenizer fitted to the corpus)."""
    min_duration: float = 0.5
    """Clips shorter than this many seconds are skipped (counted in the manifest)."""
    max_duration: float = 20.0
    """Clips longer than this many seconds are skipped (counted in the manifest)."""
    codec_actors: int = 2
    """Size of the Ray Data actor pool that runs EnCodec (one GPU each when GPUs exist)."""
    codec_batch_size: int = 8
    """Clips per EnCodec forward pass."""
    rows_per_shard: int = 2000
    """Rows per Parquet shard."""

    def __post_init__(self):
        _require(self.min_duration >= 0, "min_duration", "must be >= 0")
        _require(
            self.max_duration > self.min_duration,
            "max_duration",
            f"must be greater than min_duration ({self.min_duration})",
        )
        _require(self.codec_actors >= 1, "codec_actors", "must be >= 1")
        _require(self.codec_batch_size >= 1, "codec_batch_size", "must be >= 1")
        _require(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")


WEIGHT_POLICIES = ("uniform", "proportional", "temperature", "unimax")
ONLINE_WEIGHTS = "online"  # data.weights: weights that move at every evaluation (data.online.*)


@dataclass
class OnlineSection:
    """``data.weights=online``: the weights move at every evaluation, towards the languages furthest
    from what they can reach (vallex.data.online; exponentiated-gradient, as DoReMi's update). Each
    stretch of rows between two evaluations is drawn at the weights the last evaluation set."""

    prior: str | dict[str, float] = "temperature"
    """Where the weights start and what smoothing pulls them back to: a policy (uniform, proportional,
    temperature with data.alpha, unimax), a map {en: 0.5, ar: 0.5}, or a best_weights.json."""
    signal: Literal["excess", "forgetting"] = "excess"
    """excess: a language's validation loss above its reference loss (its reachable loss) gets it more
    rows; needs data.online.reference. forgetting: no reference; a language whose validation loss rose
    above its own best gets more rows, the others keep the prior."""
    reference: str | dict[str, float] = ""
    """signal=excess: each language's reachable validation loss (AR+NAR), as a map {en: 5.1, ar: 6.0},
    the path of a reference run's report.json (each language's best loss), or a Tune best_weights.json
    (its solo runs' losses, tune.reference=solo). A run's own first evaluation is no reference: its
    excess would reward the languages that cannot learn more."""
    step_size: float = 1.0
    """How far one evaluation moves the log-weights per nat of signal."""
    smoothing: float = 0.1
    """Share of the prior mixed into the weights at every update (0 = none; 1 = the prior, fixed)."""
    floor: float = 0.2
    """Share of the rows spread evenly over the languages whatever the signal (each gets at least
    floor / languages): none is starved while another catches up."""


@dataclass
class DataSection:
    """Which prepared languages to train on and how to mix them."""

    languages: list[str] = field(default_factory=list)
    """Languages to train on; empty means every language in the prepared corpus."""
    weights: str | dict[str, float] = "temperature"
    """Sampling weights: a policy (uniform, proportional, temperature, unimax), an explicit map
    ``{en: 0.5, ar: 0.5}``, the path of a Tune ``best_weights.json``, or ``online`` (weights updated at
    every evaluation from the per-language validation losses: see data.online)."""
    online: OnlineSection = field(default_factory=OnlineSection)
    """With data.weights=online: how the weights move."""
    alpha: float = 0.5
    """Temperature policy exponent: p(lang) ~ n_lang ** alpha (0 = uniform, 1 = proportional)."""
    window_rows: int = 2048
    """Rows planned together: each window holds every language's exact share, rows interleaved, so
    ratios hold over the run and every batch holds several languages (larger = fewer shard re-reads)."""
    shuffle_buffer: int = 256
    """Rows in the local shuffle buffer each worker draws batches from."""
    max_tokens: int = 0
    """Token budget per batch (like lhotse's max-duration); 0 = off: every batch holds train.batch_size
    rows. Above 0 a batch holds rows of similar length while rows x (longest phoneme sequence + longest
    frame count) <= max_tokens, and train.batch_size becomes the most rows a batch may hold (set it high
    enough that the budget binds first). Phonemes count because the AR and NAR run over
    [phonemes ; frames]: that padded width is what memory pays for. An utterance costing more than the
    budget alone stops the run, naming it."""
    bucket_rows: int = 1024
    """With max_tokens: rows each worker gathers and sorts by length before cutting them into batches,
    emitted in a seeded random order. Larger = less padding, more memory per worker."""
    valid_max_rows: int = 1000
    """Validation rows per language (the first ones, in shard order); 0 = every row. Each worker reads
    its own share of them from the prepared shards, so this bounds each evaluation's time and each
    worker's memory on a large corpus; corpora with fewer validation rows per language are evaluated
    on all of them, as before this key existed."""

    def __post_init__(self):
        if isinstance(self.weights, str):
            _require(bool(self.weights), "weights", f"must be one of {WEIGHT_POLICIES}, a map or a file")
            w = self.weights
            names = (*WEIGHT_POLICIES, ONLINE_WEIGHTS)
            if w not in names and not (w.endswith(".json") or "/" in w or os.sep in w):
                close = difflib.get_close_matches(w, names, n=1)
                hint = f"Did you mean {close[0]!r}? " if close else ""
                _require(
                    False,
                    "weights",
                    f"unknown policy {w!r}. {hint}Use one of {', '.join(names)}, a map "
                    "{en: 0.5, ar: 0.5}, or the path of a best_weights.json",
                )
        else:
            for lang, w in self.weights.items():
                _require(
                    math.isfinite(w) and w >= 0, f"weights.{lang}", f"must be a finite weight >= 0, got {w}"
                )
            _require(sum(self.weights.values()) > 0, "weights", "at least one weight must be > 0")
        _require(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        _require(self.window_rows >= 1, "window_rows", "must be >= 1")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _require(self.max_tokens >= 0, "max_tokens", "must be >= 0 (0 = fixed batches of train.batch_size)")
        _require(self.bucket_rows >= 1, "bucket_rows", "must be >= 1")
        _require(self.valid_max_rows >= 0, "valid_max_rows", "must be >= 0 (0 = every validation row)")


@dataclass
class ModelSection:
    """The VALL-E X model."""

    size: str = "tiny"
    """Named size: tiny (tests, CPU demo), small, paper (1024 wide, 16 heads, 12 layers)."""
    d_model: int = 0
    """Override the size's width (0 keeps the size's value)."""
    nhead: int = 0
    """Override the size's attention heads (0 keeps the size's value)."""
    num_layers: int = 0
    """Override the size's layer count (0 keeps the size's value)."""
    dropout: float = 0.1
    """Dropout in the transformer layers."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (long utterances at paper size)."""

    def __post_init__(self):
        for key in ("d_model", "nhead", "num_layers"):
            _require(getattr(self, key) >= 0, key, "must be >= 0 (0 keeps the named size's value)")
        if self.d_model and self.nhead:
            _require(self.d_model % self.nhead == 0, "d_model", f"must be divisible by nhead ({self.nhead})")
        _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    def overrides(self) -> dict[str, Any]:
        """The fields that replace the named size's defaults."""
        out: dict[str, Any] = {
            "dropout": self.dropout,
            "activation_checkpointing": self.activation_checkpointing,
        }
        out.update({k: getattr(self, k) for k in ("d_model", "nhead", "num_layers") if getattr(self, k)})
        return out


@dataclass
class GuardSection:
    """Forgetting guard: compare each language's validation loss with its best (or a baseline run)."""

    max_rise: float = 0.2
    """Relative rise above the reference loss that trips the guard (0.2 = 20% worse)."""
    per_language: dict[str, float] = field(default_factory=dict)
    """Per-language overrides of max_rise, e.g. ``{ar: 0.5}`` for a language still being learned."""
    baseline: str = ""
    """An earlier run's report.json: its final losses are the references (else this run's best)."""
    metric: Literal["loss", "ar_loss", "nar_loss", "text_gain", "per"] = "loss"
    """What to watch: a validation loss (loss = AR + NAR, ar_loss, nar_loss: trips when it rises more
    than max_rise above its reference), ``text_gain`` (how much the model reads its text, nats/frame:
    trips when it falls more than max_rise below its reference, or below ``floor``) or ``per`` (phoneme
    error rate of synthesized speech, needs a recognizer beside the shards: trips when it rises). See
    ``train.intelligibility``."""
    floor: float = 0.05
    """metric=text_gain: a language whose reference text gain is at least this (nats/frame; it has
    learnt to read) trips when its text gain drops below it. Languages below the floor are not judged
    yet: an unread language's gain is noise around 0, and a relative fall of noise means nothing."""
    action: Literal["warn", "stop"] = "warn"
    """warn: log loudly and go on; stop: checkpoint and end the run at once."""

    def __post_init__(self):
        _require(self.max_rise > 0, "max_rise", "must be > 0")
        _require(self.floor >= 0, "floor", "must be >= 0 (nats/frame)")
        for lang, v in self.per_language.items():
            _require(v > 0, f"per_language.{lang}", "must be > 0")


@dataclass
class IntelligibilitySection:
    """Whether the model says its text, measured at every evaluation (``vallex.eval.intelligibility``)."""

    text_gain: bool = True
    """Text gain per language: validation loss with every utterance's phonemes replaced by another
    validation utterance's of the same language (a fixed derangement) minus the loss with its own
    phonemes, nats/frame (AR and NAR). 0 = the model ignores its text. Costs a second validation pass."""
    per_utterances: int = 2
    """Validation utterances per language synthesized at each evaluation (a fixed, seeded subset) and
    transcribed by the recognizer beside the shards (``recognizer.pt``) for the phoneme error rate;
    0 = off. Without a recognizer only the listening samples are synthesized. Synthesis is most of an
    evaluation's cost (docs/BENCHMARKS.md, bench/evaluation.py): raise it for a final evaluation."""
    samples: bool = True
    """Write one synthesized utterance per language at each evaluation to ``train/samples/step_<N>/``
    and TensorBoard, decoded with the preparation's codec."""
    top_k: int = 10
    """AR sampling of the synthesis: top-k (1 = greedy), seeded per utterance (``run.seed``), so every
    evaluation decodes the same texts with the same random numbers and only the model changes."""
    temperature: float = 1.0
    """AR sampling temperature of the synthesis."""
    max_length_ratio: float = 1.5
    """Synthesized frames at most this many times the ground-truth utterance's (a model that never
    says EOS costs bounded time)."""

    def __post_init__(self):
        _require(self.per_utterances >= 0, "per_utterances", "must be >= 0 (0 = off)")
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 = no filtering, 1 = greedy)")
        _require(self.temperature >= 0, "temperature", "must be >= 0")
        _require(self.max_length_ratio > 0, "max_length_ratio", "must be > 0")


@dataclass
class TrainSection:
    """Distributed training with Ray Train + DeepSpeed."""

    num_workers: int = 2
    """Ray Train workers (data-parallel ranks); the most workers when elastic (min_workers > 0)."""
    min_workers: int = 0
    """Elastic training: > 0 lets Ray Train run with min_workers..num_workers workers as nodes come and
    go (spot), restarting from the latest checkpoint at the new size; 0 = always num_workers."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    use_gpu: bool = False
    """One GPU per worker, NCCL, bf16; false trains on CPU with gloo."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker needs besides its CPUs (and GPU): a custom resource only your
    training nodes advertise (``ray start --resources='{"trainer": 1}'``) keeps workers off the head and
    tells elastic training how many can run, e.g. ``{trainer: 1}``."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 or bf16 (bf16 works on CPU and GPU)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain DDP), 1, 2 or 3."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO-Offload to host RAM: ``optimizer`` (optimizer states, stage >= 1) or ``all`` (optimizer
    states and weights, stage 3): bigger models per GPU at the cost of step time (no gain on CPU-only runs)."""
    max_steps: int = 300
    """Optimizer steps in the run."""
    batch_size: int = 8
    """Utterances per worker per micro-step (with data.max_tokens: the most a micro-step may hold)."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 30
    """Linear warmup steps (capped at max_steps), then cosine decay to 10% of ``lr`` at ``max_steps``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    train_stage: Literal["both", "ar", "nar"] = "both"
    """Train the AR and NAR together (both) or one of them."""
    eval_every: int = 50
    """Evaluate every language's validation split every this many steps (and at the first and last step)."""
    checkpoint_every: int = 100
    """Save a DeepSpeed checkpoint and report it to Ray Train every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage; the newest (what a restart resumes from) is always kept besides."""
    keep_best_by: str = ""
    """Keep the best checkpoints by this metric, lower is better: ``loss_mean``, ``loss_max``,
    ``loss/<lang>`` (also ``ar_loss/``, ``nar_loss/``); each then holds a model.pt and the run ends with
    ``best_model.pt`` beside ``model.pt``. Empty keeps the newest."""
    tracking: list[Literal["mlflow", "wandb"]] = field(default_factory=list)
    """Experiment trackers besides TensorBoard (always written): ``[mlflow]``, ``[wandb]`` or both.
    Worker rank 0 opens the run with Ray's ``setup_mlflow`` / ``setup_wandb``, logs the config, then at
    every evaluation the metrics reported to Ray Train (``loss/<lang>``, ``loss_mean``, ...) at that
    step. Needs ``pip install 'vallex[tracking]'``."""
    tracking_uri: str = ""
    """MLflow tracking URI (``http://host:5000``, ``sqlite:///path/mlflow.db``, ``databricks``); empty
    means ``sqlite:///<output_dir>/mlflow.db`` (written on worker rank 0's node)."""
    tracking_project: str = ""
    """MLflow experiment and W&B project of the run; empty means ``run.name``."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B: ``offline`` writes ``<output_dir>/train/wandb/offline-run-*`` on worker rank 0's node (no
    network; upload later with ``wandb sync``); ``online`` streams to W&B and needs ``WANDB_API_KEY`` in
    the workers' environment (``job.runtime_env.env_vars``)."""
    storage_path: str = ""
    """Ray Train storage (local dir, NFS, s3://, gs://); empty means ``<output_dir>/ray_results``."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from by restarting from the latest checkpoint."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers: PACK (fewest nodes, Ray's default), SPREAD, STRICT_PACK (one node)
    or STRICT_SPREAD (each worker on its own node: one GPU node per worker)."""
    init_from: str = ""
    """Start from a trained model: a vallex checkpoint or a run's ``model.pt`` (its report.json beside it).
    Its languages keep their ids, new ones in ``data.languages`` get new rows; the phoneme embedding grows
    if the corpus's symbol table extends the model's; the shape is the checkpoint's (``model.size`` is
    ignored). Every language the model knows is evaluated, trained or not, first at step 0. The public
    VALL-E X checkpoint (``vallex-checkpoint.pt``, languages en/zh/ja) works too, with ``init_vocab``."""
    init_vocab: str = ""
    """With a public VALL-E X ``init_from``: its tokenizer file (``utils/g2p/bpe_69.json`` from
    Plachtaa/VALL-E-X). Each phoneme symbol's embedding starts from the reference rows that spell it
    (``vallex.model.text_bridge``); training then adapts them."""
    guard: GuardSection = field(default_factory=GuardSection)
    """The forgetting guard."""
    intelligibility: IntelligibilitySection = field(default_factory=IntelligibilitySection)
    """Text gain, phoneme error rate of synthesized speech and listening samples at every evaluation."""
    on_nonfinite: Literal["stop", "guard"] = "stop"
    """A validation loss that is NaN/inf: ``stop`` ends the run at that evaluation (no checkpoint of
    it), naming the language; ``guard`` counts it as a forgetting-guard trip of that language (then
    ``guard.action`` decides). A NaN/inf training loss always stops."""

    def __post_init__(self):
        _require(self.num_workers >= 1, "num_workers", "must be >= 1")
        _require(
            0 <= self.min_workers <= self.num_workers,
            "min_workers",
            f"must be in [0, num_workers={self.num_workers}] (0 = fixed size)",
        )
        _require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        for name, amount in self.worker_resources.items():
            _require(amount > 0, f"worker_resources.{name}", f"must be > 0, got {amount}")
            _require(
                name not in ("CPU", "GPU"),
                f"worker_resources.{name}",
                "set CPUs with train.cpus_per_worker and GPUs with train.use_gpu",
            )
        _require(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")
        _require(
            self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"
        )
        for key in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        if self.offload == "optimizer":
            _require(self.zero_stage >= 1, "offload", "optimizer offload needs train.zero_stage >= 1")
        if self.offload == "all":
            _require(self.zero_stage == 3, "offload", "offloading the weights (all) needs train.zero_stage=3")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _require(len(set(self.tracking)) == len(self.tracking), "tracking", "names a tracker twice")
        import importlib.util

        for i, name in enumerate(self.tracking):  # before any Ray work, not at a worker's first import
            _require(
                importlib.util.find_spec(name) is not None,
                f"tracking[{i}]",
                f"{name} is not installed; pip install 'vallex[tracking]'",
            )
        _require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited")
        if self.keep_best_by:  # the shape of the name here; its language once the corpus is open
            kind, _, lang = self.keep_best_by.partition("/")
            stage_ok = {"ar_loss": self.train_stage != "nar", "nar_loss": self.train_stage != "ar"}
            _require(
                (not lang and kind in ("loss_mean", "loss_max", "train_loss", "objective"))
                or (bool(lang) and kind in ("loss", "ar_loss", "nar_loss") and stage_ok.get(kind, True)),
                "keep_best_by",
                f"{self.keep_best_by!r} is not a metric this run reports: loss_mean, loss_max, train_loss, "
                f"or loss/<lang>, ar_loss/<lang>, nar_loss/<lang> (a stage train.train_stage={self.train_stage} "
                "trains)",
            )
        _require(
            not self.init_vocab or bool(self.init_from),
            "init_vocab",
            "only goes with train.init_from (the public VALL-E X checkpoint it is the tokenizer of)",
        )
        watched = {
            "text_gain": self.intelligibility.text_gain,
            "per": self.intelligibility.per_utterances > 0,
        }
        _require(
            watched.get(self.guard.metric, True),
            "guard.metric",
            f"{self.guard.metric} is not measured: set train.intelligibility."
            + ("text_gain=true" if self.guard.metric == "text_gain" else "per_utterances > 0"),
        )


@dataclass
class TuneSection:
    """Ray Tune search over the language sampling weights (``ray_jobs/tune.py``): short training runs,
    one per trial, scored on the per-language validation losses; writes ``<output_dir>/tune/``."""

    num_samples: int = 8
    """Search trials (the baselines and reference runs come on top of these)."""
    max_steps_per_trial: int = 100
    """Training steps per trial; every baseline and reference run gets the same budget."""
    eval_every: int = 25
    """Evaluate every this many steps inside a trial: where ASHA may stop a poor trial early."""
    objective: Literal["normalized_max", "max", "mean", "spread"] = "normalized_max"
    """What the search minimizes: normalized_max = the worst language's loss relative to its
    ``reference`` (the default: balances the languages' remaining progress, not their raw difficulty);
    max / mean = worst / mean raw loss; spread = max - min raw loss (gameable: every language equally
    bad scores well). The mean loss breaks ties."""
    normalize: Literal["excess", "ratio"] = "excess"
    """normalized_max: ``loss - reference`` (excess loss, as DoReMi) or ``loss / reference``."""
    reference: str | dict[str, float] = "solo"
    """Per-language reference losses for normalized_max: ``solo`` runs one short reference run per
    language with the whole trial budget on that language alone (what it reaches at best); or a map
    ``{en: 5.1, ar: 6.3}``; or the path of a training run's report.json (its last losses)."""
    metric: Literal["loss", "ar_loss", "nar_loss"] = "loss"
    """Which validation loss is scored (loss = AR + NAR)."""
    tie_tolerance: float = 0.01
    """Objectives within this fraction of the best count as tied; the lowest mean loss wins among them."""
    space: Literal["stick", "logits", "temperature"] = "stick"
    """Search space: stick (stick-breaking, uniform over the weight simplex), logits (softmax of
    per-language logits) or temperature (one alpha, p ~ n ** alpha)."""
    min_weight: float = 0.01
    """Every language keeps at least this weight in a search trial (0 lets the search drop one)."""
    search: Literal["optuna", "random"] = "optuna"
    """optuna = Optuna's TPE (told how the baselines scored); random = independent random draws."""
    scheduler: Literal["asha", "none", "pbt"] = "asha"
    """asha stops trials that trail the others at an evaluation (time = training step); none runs all;
    pbt = Population Based Training: ``num_samples`` trials train side by side, and every
    ``pbt_interval`` steps the worse ones continue from a better one's checkpoint with its weights
    perturbed (a weight *schedule* per trial; tune.search is not used: the population is drawn at random)."""
    pbt_interval: int = 0
    """pbt: steps between perturbations (each trial's run is cut into segments this long); 0 means
    max_steps_per_trial // 4 (at least 1)."""
    pbt_sigma: float = 0.3
    """pbt: how far a perturbation moves the weights: each language's log-weight (above min_weight)
    gets Gaussian noise of this standard deviation, then the weights are renormalized."""
    pbt_resample: float = 0.25
    """pbt: the chance that a perturbation draws new weights from the whole space instead."""
    pbt_quantile: float = 0.25
    """pbt: the fraction of the population (rounded up, at most half) that clones the best as often."""
    grace_steps: int = 0
    """ASHA never stops a trial before this step; 0 means half of max_steps_per_trial."""
    baselines: list[str] = field(default_factory=lambda: ["uniform", "proportional", "temperature", "unimax"])
    """Weight policies trained with the same budget and reported beside the search (``data.weights``
    policies; temperature uses ``baseline_alpha``)."""
    baseline_alpha: float = 0.3
    """The temperature baseline's alpha."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it from the cluster: each trial needs train.num_workers x
    train.cpus_per_worker CPUs (and GPUs) plus 1 CPU for Ray Data and 0.01 for its driver."""
    max_failures: int = 1
    """Times a failed trial is retried; a trial that still fails is recorded (trials.csv) and the
    search goes on. Re-running the same command resumes an interrupted search."""

    def __post_init__(self):
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(self.max_steps_per_trial >= 1, "max_steps_per_trial", "must be >= 1")
        _require(self.eval_every >= 1, "eval_every", "must be >= 1")
        _require(
            0 <= self.grace_steps <= self.max_steps_per_trial,
            "grace_steps",
            f"must be in [0, max_steps_per_trial={self.max_steps_per_trial}]",
        )
        _require(self.tie_tolerance >= 0, "tie_tolerance", "must be >= 0")
        _require(0.0 <= self.min_weight < 1.0, "min_weight", "must be in [0, 1)")
        _require(0.0 <= self.baseline_alpha <= 1.0, "baseline_alpha", "must be in [0, 1]")
        for i, name in enumerate(self.baselines):
            _require(name in WEIGHT_POLICIES, f"baselines[{i}]", f"must be one of {WEIGHT_POLICIES}")
        _require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0 (0 = derive)")
        _require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited")
        _require(
            0 <= self.pbt_interval < self.max_steps_per_trial,
            "pbt_interval",
            f"must be in [0, max_steps_per_trial={self.max_steps_per_trial}) (0 = a quarter of it)",
        )
        _require(self.pbt_sigma > 0 and math.isfinite(self.pbt_sigma), "pbt_sigma", "must be > 0")
        _require(0.0 <= self.pbt_resample <= 1.0, "pbt_resample", "must be in [0, 1]")
        _require(0.0 < self.pbt_quantile <= 0.5, "pbt_quantile", "must be in (0, 0.5]")
        _require(
            self.scheduler != "pbt" or self.num_samples >= 2,
            "num_samples",
            "must be >= 2 with tune.scheduler=pbt (a population: the worse trials clone the better)",
        )
        if isinstance(self.reference, str):
            _require(bool(self.reference), "reference", "must be 'solo', a map or a report.json path")
        else:
            for lang, v in self.reference.items():
                _require(math.isfinite(v), f"reference.{lang}", f"must be a finite loss, got {v}")


@dataclass
class RecognizerSection:
    """The phoneme recognizer that scores intelligibility (``ray_jobs/recognizer.py``; saved beside the shards)."""

    steps: int = 1000
    """Training steps (one batch each) over every language's prepared train split."""
    batch_size: int = 16
    """Utterances per step (batches hold utterances of similar length)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW; linear warmup, cosine decay to 10%)."""
    dim: int = 128
    """Width of the code embeddings and the convolution."""
    hidden: int = 128
    """Half the transformer's feed-forward width (lstm: units per direction)."""
    layers: int = 4
    """Encoder layers."""
    encoder: Literal["transformer", "lstm"] = "transformer"
    """transformer (4 heads, pre-norm) or lstm (bidirectional): the transformer learns as fast per step and
    costs several times less per step on CPU (bench/recognizer.py)."""
    inputs: Literal["auto", "features", "codes"] = "auto"
    """What a frame's codes become: ``features`` = the codec's own code vectors, summed (the quantized
    frame its decoder hears; frozen, then a linear layer), ``codes`` = a learned embedding per
    codebook, summed, or ``auto`` = features when the codec gives them (mel_rvq, EnCodec), else codes. With ``codes`` a synthesizer's wrong code in a fine codebook, which barely changes
    the sound, can make the frame unreadable: synthesized PER near 100% on speech whose first codebook
    reads at the floor (docs/BENCHMARKS.md "Where synthesized PER is lost")."""
    cpus: int = 2
    """CPUs of the Ray task that trains it (its torch threads)."""
    max_utterances: int = 0
    """Most training utterances read per language (0 = all; the recognizer holds them in memory)."""
    alpha: float = 0.5
    """A language's share of the training batches goes as n ** alpha (n: its utterances; small
    languages' rows are repeated): 1 = proportional, 0 = every language equally."""
    log_every: int = 100
    """Log the CTC loss and elapsed time every this many steps."""
    eval_every: int = 0
    """Also score every language's validation split every this many steps (0 = only at the end)."""

    def __post_init__(self):
        for key in ("steps", "batch_size", "dim", "hidden", "layers", "cpus", "log_every"):
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.encoder != "transformer" or self.dim % 4 == 0, "dim", "must be divisible by 4 (heads)")
        _require(self.max_utterances >= 0, "max_utterances", "must be >= 0 (0 = all)")
        _require(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        _require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 = only at the end)")
        _require(self.inputs in ("auto", "features", "codes"), "inputs", "must be auto, features or codes")


@dataclass
class JobSection:
    """How ``ray job submit`` runs this file on a cluster."""

    entrypoint: str = "python ray_jobs/demo.py --config job.yaml"
    """The command the cluster runs."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env for the job (working_dir, pip, env_vars)."""


@dataclass
class Config:
    """A whole vallex run."""

    run: RunSection = field(default_factory=RunSection)
    job: JobSection = field(default_factory=JobSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    tune: TuneSection = field(default_factory=TuneSection)
    recognizer: RecognizerSection = field(default_factory=RecognizerSection)

    # Paths derived from run.output_dir, so a user sets one folder.
    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def corpus_dir(self) -> Path:
        return self.output_dir / "corpus"

    @property
    def prepared_dir(self) -> str:
        """The prepared corpus (``run.prepared_dir`` resolved): a URI as given, else an absolute path
        (Ray tasks may run elsewhere)."""
        if is_uri(self.run.prepared_dir):
            return self.run.prepared_dir.rstrip("/")
        return os.path.abspath(self.run.prepared_dir or self.output_dir / "prepare")

    @property
    def train_dir(self) -> Path:
        return self.output_dir / "train"

    @property
    def storage_path(self) -> str:
        """Ray Train storage: absolute, because Ray resolves relative paths against its own cwd."""
        if self.train.storage_path:
            sp = self.train.storage_path
            return sp if is_uri(sp) else os.path.abspath(sp)
        return str((self.output_dir / "ray_results").resolve())

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data for another process (Ray Train workers, Tune trials), with the values
        of ``job.runtime_env.env_vars`` replaced by ``<redacted>``: they are only needed to submit the job
        (``ray_jobs/submit.py`` reads ``cfg.job``), and a copy must never carry them further. Anything
        written to disk or logged goes through :func:`redact` as well."""
        return redact(dataclasses.asdict(self), urls=False)


# ---------------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks, YAML files, dotted overrides.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a map of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a section (a map of keys)"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(e)
        inner = [e for e in errors if e.key != key]  # the right shape, a bad item: name the item
        if inner:
            raise inner[0]
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown key.{hint} Valid keys here: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e.key}" if prefix else e.key, e.message) from None


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a nested dict (as loaded from YAML) into a :class:`Config`."""
    cfg = _build(Config, data or {})
    _check_cross_section(cfg)
    return cfg


def _check_cross_section(cfg: Config) -> None:
    if cfg.data.weights == ONLINE_WEIGHTS:
        _require(
            cfg.data.max_tokens == 0,
            "data.max_tokens",
            "data.weights=online draws each stretch between evaluations in whole batches of "
            "train.batch_size rows; token-budget batches (data.max_tokens > 0) are not supported with it "
            "yet: set data.max_tokens=0 or use static weights",
        )
    if isinstance(cfg.data.weights, dict) and cfg.data.languages:
        extra = sorted(set(cfg.data.weights) - set(cfg.data.languages))
        _require(
            not extra,
            "data.weights",
            f"weights for {extra}, which data.languages ({cfg.data.languages}) does not train",
        )
    if cfg.data.languages and cfg.corpus.languages:
        missing = sorted(set(cfg.data.languages) - set(cfg.corpus.languages))
        _require(
            not missing,
            "data.languages",
            f"{missing} are not prepared (corpus.languages is {cfg.corpus.languages})",
        )


def check_local_paths(cfg: Config) -> None:
    """The files a run reads on the machine that starts it exist (a weights file, the guard's
    baseline, ``train.init_from`` and its tokenizer): checked by the entry points before Ray starts.
    Not in the sections' own checks: workers rebuild the config where these files need not be."""
    named = {
        "data.weights": cfg.data.weights if isinstance(cfg.data.weights, str) else "",
        "train.guard.baseline": cfg.train.guard.baseline,
        "train.init_from": cfg.train.init_from,
        "train.init_vocab": cfg.train.init_vocab,
    }
    if named["data.weights"] in (*WEIGHT_POLICIES, ONLINE_WEIGHTS):
        named["data.weights"] = ""
    if cfg.data.weights == ONLINE_WEIGHTS:
        prior, reference = cfg.data.online.prior, cfg.data.online.reference
        named["data.online.prior"] = prior if isinstance(prior, str) and prior not in WEIGHT_POLICIES else ""
        named["data.online.reference"] = reference if isinstance(reference, str) else ""
    for key, path in named.items():
        _require(not path or is_uri(path) or Path(path).is_file(), key, f"no such file: {path!r}")


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``train.max_steps=20`` -> (["train", "max_steps"], 20). Values are parsed as YAML scalars/flows."""
    if "=" not in arg:
        raise ConfigError(arg, "overrides look like key.sub=value (e.g. train.max_steps=20)")
    key, raw = arg.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(arg, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override applied."""
    import copy

    out = copy.deepcopy(data)
    for arg in overrides:
        path, value = parse_override(arg)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(path), f"{part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def derive_config(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{dotted key: value}`` changed (``{"train.guard.action": "warn"}``),
    validated again: the one way a run's config is derived from another's (Tune trials, add-language).
    Like :meth:`Config.to_dict`, the copy carries no ``job.runtime_env.env_vars`` values."""
    data = cfg.to_dict()
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = data
        for part in sections:
            if not isinstance(node.get(part), dict):
                raise ConfigError(key, f"{part!r} is not a section")
            node = node[part]
        node[name] = value
    return config_from_dict(data)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p}: the top level must be a map of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(e.key, f"{e.message}{where}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the run's config as YAML, atomically, without secrets (:func:`redact`)."""
    from vallex.files import write_text

    write_text(path, yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------------------------------------------
# Secrets: what a config may carry that must never be written to disk or logged.

REDACTED = "<redacted>"
MASK = "***"
# user:password@ (or a lone token@) after a scheme; query parameters whose name says credential.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@?#\s]+)@")
_URL_SECRET_PARAM = re.compile(
    r"(?P<lead>[?&;])(?P<name>[^=&#\s]*(?:token|key|secret|password|passwd|pwd|sig|signature|credential|auth)"
    r"[^=&#\s]*)=(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``https://user:pw@host`` ->
    ``https://user:***@host``, ``https://TOKEN@host`` -> ``https://***@host``, ``?token=abc`` ->
    ``?token=***`` (also ``key``, ``secret``, ``password``, ``sig``, ``X-Amz-Credential``, ...). Text
    without ``://`` is returned unchanged."""
    if "://" not in text:
        return text

    def userinfo(m: re.Match) -> str:
        user, sep, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"

    text = _URL_USERINFO.sub(userinfo, text)
    return _URL_SECRET_PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}", text)


def redact(data: dict[str, Any], *, urls: bool = True) -> dict[str, Any]:
    """A copy of a config dict (``dataclasses.asdict(Config)``) fit to be written or logged: every value
    of ``job.runtime_env.env_vars`` becomes ``<redacted>`` (the names stay, so a reader sees which were
    set), and with ``urls`` every string holding a URL has its credentials masked (:func:`mask_url`:
    ``train.tracking_uri``, a ``pip`` index URL, ...). The one place vallex strips secrets: every writer
    and logger of a config goes through it (``Config.to_dict`` with ``urls=False``, since a worker
    still needs the real tracking URI)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if urls and isinstance(value, str):
            return mask_url(value)
        return value

    out = walk(data)
    env = ((out.get("job") or {}).get("runtime_env") or {}).get("env_vars")
    if isinstance(env, dict):
        out["job"]["runtime_env"]["env_vars"] = {str(k): REDACTED for k in env}
    return out


# ---------------------------------------------------------------------------------------------------
# Documentation: field docstrings (the string literal under each field) for --help.


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_help(cls: type = Config, prefix: str = "", sections: tuple[str, ...] | None = None) -> str:
    """A plain-text listing of every key, its default and its documentation."""
    lines = []
    default = cls()
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            if sections is not None and not prefix and f.name not in sections:
                continue
            doc = (type(value).__doc__ or "").strip()
            lines.append(f"\n{key}:  {doc}" if not prefix else f"  {key}:  {doc}")
            lines.append(config_help(type(value), key + ".", sections))
            continue
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key}={shown}\n      {docs.get(f.name, '')}")
    return "\n".join(line for line in lines if line)
