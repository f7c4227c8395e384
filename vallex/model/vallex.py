"""VALL-E X: a multilingual neural-codec language model for zero-shot TTS.

Zhang et al. 2023, "Speak Foreign Languages with Your Own Voice" (arXiv:2303.03926), on VALL-E
(Wang et al. 2023, arXiv:2301.02111). Phonemes in, EnCodec tokens out (24 kHz, 75 frames/s, 8 residual
codebooks of 1024 at 6 kbps). Two transformers share nothing but the data:

    AR   p(c_t,1 | x, c_<t,1)             causal over [text ; BOS codebook-1 ...], predicts codebook 1 and EOS
    NAR  p(c_:,j | x, c_:,<j, prompt)      bidirectional, one network for j = 2..8 told j by AdaLN

Facts taken from the public reference implementation, Plachtaa/VALL-E-X (``models/vallex.py``,
``modules/transformer.py``, ``modules/embedding.py``, ``modules/activation.py``, ``macros.py``,
``utils/generation.py``), whose training code is lifeiteng/vall-e (``valle/models/valle.py``, VALLE.forward):

- Released checkpoint ``vallex-checkpoint.pt`` = ``{'model': state_dict}`` of
  ``VALLE(1024, 16, 12, norm_first=True, add_prenet=False, prefix_mode=1, share_embedding=True,
  nar_scale_factor=1.0, prepend_bos=True, num_quantizers=8)``; text vocab ``NUM_TEXT_TOKENS = 2048``
  (``models/macros.py``), languages ``{"en": 0, "zh": 1, "ja": 2}`` (``VALLE.language_ID``).
  Our ``paper`` size with ``num_phonemes=2048, num_languages=3`` has the same keys and shapes (370,539,524
  parameters, tied weights counted once), so the checkpoint loads with no renaming; only the id tables
  (phoneme symbols, language order) differ and need mapping, not the weights' layout.
- Layers: pre-norm transformer encoder layers, ReLU feed-forward of 4 x d_model, dropout 0.1, packed
  q|k|v attention (``in_proj_weight``), final LayerNorm; the NAR's norms (and final norm) are
  ``AdaptiveLayerNorm``: ``gain, bias = Linear(stage_embedding)``, output ``gain * LN(x) + bias``; the
  stage embedding is ``nar_stage_embeddings[j-2]`` (one row each, 7 of them).
- Nothing is shared between AR and NAR: each has its own text embedding, language embedding, positions.
- Positions: fixed sinusoids times a scalar ``alpha`` (learned for AR text/audio, frozen at 1 for NAR), added
  to the embeddings, then dropout (0.1; 0.0 for the NAR text). Text and audio count positions from 0 apart.
- Language: ``language_embedding(lang_id)`` is added to every phoneme embedding, before positions, in AR and
  NAR alike; at inference the prompt's phonemes get the prompt's language and the target's the target's
  (``x[:, :enroll_x_lens] += emb(prompt_lang); x[:, enroll_x_lens:] += emb(text_lang)``).
- AR vocabularies: ``ar_audio_embedding`` has 1026 rows (codes, EOS = 1024, BOS = 1025, BOS prepended);
  ``ar_predict_layer`` has 1025 outputs (codes + EOS), no bias. Attention: text attends to all text (not to
  audio); audio attends to all text and causally to audio; padded keys are masked.
- NAR vocabularies: ``nar_audio_embeddings[0]`` has 1025 rows, ``[1..7]`` 1024; 7 ``nar_predict_layers``
  (1024 outputs, no bias). ``share_embedding``: ``nar_predict_layers[j].weight is
  nar_audio_embeddings[j + 2].weight`` for j < 6 (the layer predicting codebook j+2, 1-based, shares the
  table that embeds codebook j+3 -- the reference's indexing, kept for the checkpoint).
- NAR training: one stage j is drawn uniformly per batch; the input is sum_{k<j} emb_k(c_k); prefix mode 1
  takes the first ``p ~ U[floor(len_min/4), 2 floor(len_min/4))`` frames (at most 225 = 3 s) of the same
  utterance as the acoustic prompt, where all 8 codebooks are summed, and computes the loss only after it.
- AR training: targets are codebook 1 then EOS. (The reference also scores EOS at every padded position;
  we do not, so a sample's loss does not depend on its batch-mates.)
- Inference (``VALLE.inference``): text = prompt phonemes + target phonemes; the AR continues
  ``[BOS, prompt codebook 1]`` by sampling (``top_k=-100``, i.e. no filtering, temperature 1) until EOS or
  ``16 x len(text)`` new frames; then the NAR fills codebooks 2..8 by argmax, stage by stage, with the prompt's
  8 codebooks summed as prefix. The returned codes exclude the prompt.

Deviations (all per-sample, to make losses exact per language and independent of batching):

- The NAR stage and the prompt length are drawn per sample, not per batch; the distribution of each is the
  reference's (prefix from the sample's own length). In ``eval()`` mode they come from a hash of the
  sample's content, so validation is deterministic, padding-invariant, and scores the same utterance at the
  same stage every time. ``batch["nar_stage"]`` / ``batch["nar_prefix_lens"]`` (Long[B]) override both.
- The returned ``loss`` is token-mean AR + token-mean NAR (the reference halves a summed loss).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vallex.model.modules import SinePositionalEmbedding, TokenEmbedding, Transformer

IGNORE = -100  # target id that cross_entropy skips
TRAIN_STAGES = ("ar", "nar", "both")
BATCH_KEYS = ("phonemes", "phoneme_lens", "codes", "code_lens", "language")
# The model's phoneme (text) embedding tables: grown, bridged and checked by vallex.model.checkpoint
# and vallex.model.text_bridge.
PHONEME_TABLES = ("ar_text_embedding", "nar_text_embedding")

OUTPUT_KEYS = (
    "ar_loss_sum",
    "ar_tokens",
    "ar_top10_correct",
    "nar_loss_sum",
    "nar_tokens",
    "nar_top10_correct",
)


@dataclass
class VallexConfig:
    d_model: int
    """Transformer width, shared by AR and NAR (reference: 1024)."""
    nhead: int
    """Attention heads (reference: 16); must divide d_model."""
    num_layers: int
    """Layers in each of the AR and NAR transformers (reference: 12)."""
    num_phonemes: int
    """Phoneme vocabulary size, specials included; id 0 is padding (reference: 2048)."""
    num_languages: int
    """Rows of the language embedding (reference: 3, en/zh/ja)."""
    num_codebooks: int = 8
    """EnCodec codebooks Q: the AR predicts the first, the NAR the other Q - 1."""
    codebook_size: int = 1024
    """Entries per codebook K; the AR's EOS is id K and its BOS id K + 1."""
    dropout: float = 0.1
    """Dropout in feed-forward, residuals and positional embeddings (reference: 0.1)."""
    attention_dropout: float | None = None
    """Dropout on attention weights; None = ``dropout`` (reference). 0 lets CPU SDPA use its fused kernel
    instead of materialising and masking every [L, L] attention matrix (~2x faster steps on CPU)."""
    prefix_mode: int = 1
    """NAR acoustic prompt: 1 = a random-length prefix of the same utterance (reference), 0 = none."""
    norm_first: bool = True
    """Pre-norm layers (reference); False = post-norm."""
    dim_feedforward: int | None = None
    """Feed-forward width; None = 4 x d_model (reference)."""
    max_prompt_frames: int = 225
    """Cap on the NAR training prefix: 225 frames = 3 s at 75 Hz (reference)."""
    share_embedding: bool = True
    """Tie nar_predict_layers[j] to nar_audio_embeddings[j + 2] (reference; needed to load its checkpoint)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of storing them (less memory, ~1.3x compute)."""

    def __post_init__(self):
        positive = ("d_model", "nhead", "num_layers", "num_languages", "codebook_size", "max_prompt_frames")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"VallexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.nhead:
            raise ValueError(
                f"VallexConfig.d_model={self.d_model} must be divisible by nhead={self.nhead} "
                f"(each head gets d_model / nhead dimensions)"
            )
        if (self.d_model // self.nhead) % 2 or self.d_model % 2:
            raise ValueError(
                f"VallexConfig.d_model={self.d_model} must be even (sine positions pair sin/cos)"
            )
        if self.num_phonemes < 2:
            raise ValueError(
                f"VallexConfig.num_phonemes must be >= 2 (id 0 is padding), got {self.num_phonemes}"
            )
        if self.num_codebooks < 2:
            raise ValueError(
                f"VallexConfig.num_codebooks must be >= 2 (AR predicts codebook 1, NAR the rest), got {self.num_codebooks}"
            )
        if self.prefix_mode not in (0, 1):
            raise ValueError(
                f"VallexConfig.prefix_mode must be 0 (no prompt) or 1 (prefix prompt), got {self.prefix_mode}"
            )
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"VallexConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dim_feedforward is None:
            self.dim_feedforward = 4 * self.d_model
        elif self.dim_feedforward < 1:
            raise ValueError(f"VallexConfig.dim_feedforward must be >= 1 or None, got {self.dim_feedforward}")

    @property
    def eos_id(self) -> int:
        return self.codebook_size

    @property
    def bos_id(self) -> int:
        return self.codebook_size + 1


class _Batch(NamedTuple):
    phonemes: torch.Tensor  # Long[B, S], S = max phoneme_lens, 0 beyond each length
    text_valid: torch.Tensor  # Bool[B, S]
    codes: torch.Tensor  # Long[B, T, Q], T = max code_lens, 0 beyond each length
    code_lens: torch.Tensor  # Long[B]
    audio_valid: torch.Tensor  # Bool[B, T]
    language: torch.Tensor  # Long[B]


class VallexModel(nn.Module):
    def __init__(self, config: VallexConfig):
        super().__init__()
        self.config = c = config
        d, K, Q = c.d_model, c.codebook_size, c.num_codebooks

        def transformer(adaptive: bool) -> Transformer:
            return Transformer(
                d,
                c.nhead,
                c.num_layers,
                c.dim_feedforward,
                c.dropout,
                c.attention_dropout,
                c.norm_first,
                adaptive,
                c.activation_checkpointing,
            )

        # AR: [text ; BOS c_1 ... c_T] -> c_1 ... c_T EOS over codebook 1.
        self.ar_text_embedding = TokenEmbedding(d, c.num_phonemes)
        self.ar_language_embedding = TokenEmbedding(d, c.num_languages)
        self.ar_text_position = SinePositionalEmbedding(d, c.dropout, learnable_alpha=True)
        self.ar_audio_embedding = TokenEmbedding(d, K + 2)  # codes, EOS, BOS
        self.ar_audio_position = SinePositionalEmbedding(d, c.dropout, learnable_alpha=True)
        self.ar_decoder = transformer(adaptive=False)
        self.ar_predict_layer = nn.Linear(d, K + 1, bias=False)  # codes, EOS

        # NAR: [text ; sum of codebooks known so far] -> codebook j, for j = 2..Q.
        self.nar_text_embedding = TokenEmbedding(d, c.num_phonemes)
        self.nar_language_embedding = TokenEmbedding(d, c.num_languages)
        self.nar_text_position = SinePositionalEmbedding(d, 0.0, learnable_alpha=False)
        # Codebook 1's table has the reference's extra row (id K); the others have exactly K.
        self.nar_audio_embeddings = nn.ModuleList(
            [TokenEmbedding(d, K + 1)] + [TokenEmbedding(d, K) for _ in range(Q - 1)]
        )
        self.nar_audio_position = SinePositionalEmbedding(d, c.dropout, learnable_alpha=False)
        self.nar_stage_embeddings = nn.ModuleList(TokenEmbedding(d, 1) for _ in range(Q - 1))
        self.nar_decoder = transformer(adaptive=True)
        self.nar_predict_layers = nn.ModuleList(nn.Linear(d, K, bias=False) for _ in range(Q - 1))
        if c.share_embedding:
            # VALL-E sec. 4.2.2: "the weights of the j-th prediction layer are the same as the (j+1)-th
            # acoustic embedding layer", with the reference's indices.
            for j in range(Q - 2):
                self.nar_predict_layers[j].weight = self.nar_audio_embeddings[j + 2].weight

    def num_parameters(self) -> int:
        """Distinct parameters (tied tensors once), trainable or not (the NAR's frozen alphas count)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ inputs

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> _Batch:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; VallexModel.forward needs {list(BATCH_KEYS)}")
        c = self.config
        phonemes, phoneme_lens, codes, code_lens, language = (batch[k] for k in BATCH_KEYS)
        B = phonemes.shape[0]
        shapes = {
            "phonemes": (phonemes.ndim == 2, "Long[B, S]"),
            "phoneme_lens": (phoneme_lens.shape == (B,), "Long[B]"),
            "codes": (
                codes.ndim == 3 and codes.shape[0] == B and codes.shape[2] == c.num_codebooks,
                f"Long[B, T, {c.num_codebooks}]",
            ),
            "code_lens": (code_lens.shape == (B,), "Long[B]"),
            "language": (language.shape == (B,), "Long[B]"),
        }
        for name, (ok, want) in shapes.items():
            if not ok:
                raise ValueError(
                    f"batch[{name!r}] has shape {tuple(batch[name].shape)}, expected {want} with B={B}"
                )
        S, T, s_min, t_min = torch.stack(
            [phoneme_lens.max(), code_lens.max(), phoneme_lens.min(), code_lens.min()]
        ).tolist()  # one host sync
        if s_min < 1 or t_min < 1 or phonemes.shape[1] < S or codes.shape[1] < T:
            raise ValueError(
                f"lengths must be in [1, padded width]: phoneme_lens span [{s_min}, {S}] for phonemes of "
                f"width {phonemes.shape[1]}, code_lens span [{t_min}, {T}] for codes of {codes.shape[1]} frames"
            )
        text_valid = torch.arange(S, device=phonemes.device) < phoneme_lens[:, None]
        audio_valid = torch.arange(T, device=codes.device) < code_lens[:, None]
        # Padding may hold anything (even -1): make it id 0 so embeddings accept it; masks hide it.
        phonemes = phonemes[:, :S].long().masked_fill(~text_valid, 0)
        codes = codes[:, :T].long().masked_fill(~audio_valid[..., None], 0)
        bad = {
            f"phonemes outside [0, {c.num_phonemes})": (phonemes < 0) | (phonemes >= c.num_phonemes),
            f"codes outside [0, {c.codebook_size})": (codes < 0) | (codes >= c.codebook_size),
            f"language outside [0, {c.num_languages})": (language < 0) | (language >= c.num_languages),
        }
        if bool(torch.stack([m.any() for m in bad.values()]).any()):  # one host sync for all three checks
            for what, m in bad.items():
                if m.any():
                    rows = sorted({int(i) for i in m.reshape(B, -1).any(1).nonzero().flatten()})
                    raise ValueError(f"batch has {what} in samples {rows}")
        return _Batch(phonemes, text_valid, codes, code_lens.long(), audio_valid, language.long())

    def _text(self, which: str, phonemes: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        """Phoneme + language embedding, then positions. ``language`` is Long[B] or per phoneme Long[B, S]."""
        emb = getattr(self, f"{which}_text_embedding")(phonemes)
        lang = getattr(self, f"{which}_language_embedding")(language)
        return getattr(self, f"{which}_text_position")(emb + (lang[:, None] if language.ndim == 1 else lang))

    # ---------------------------------------------------------------------- AR

    @staticmethod
    def _ar_mask(text_valid: torch.Tensor, audio_valid: torch.Tensor) -> torch.Tensor:
        """Bool[B, 1, L, L], True = may attend, over the sequence [text (S) ; audio (Ta)].

        Text rows see all text and no audio (the phonemes are encoded once, as a prefix LM);
        audio rows see all text and audio up to themselves. Padded keys are hidden everywhere.
        """
        S, L = text_valid.shape[1], text_valid.shape[1] + audio_valid.shape[1]
        q = torch.arange(L, device=text_valid.device)[:, None]
        k = torch.arange(L, device=text_valid.device)[None, :]
        structure = (k < S) | ((q >= S) & (k <= q))
        keys = torch.cat([text_valid, audio_valid], dim=1)
        return structure[None, None] & keys[:, None, None, :]

    def _ar(self, b: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits Float[B, T+1, K+1] and targets Long[B, T+1] (IGNORE after each sample's EOS)."""
        c = self.config
        T = b.codes.shape[1]
        first = b.codes[..., 0]
        steps = torch.arange(T + 1, device=first.device)[None]
        targets = F.pad(first, (0, 1))
        targets = torch.where(steps == b.code_lens[:, None], c.eos_id, targets)
        targets = targets.masked_fill(steps > b.code_lens[:, None], IGNORE)
        inputs = F.pad(first, (1, 0), value=c.bos_id)  # teacher forcing: BOS c_1 ... c_T

        x = self._text("ar", b.phonemes, b.language)
        y = self.ar_audio_position(self.ar_audio_embedding(inputs))
        mask = self._ar_mask(b.text_valid, steps <= b.code_lens[:, None])
        h, _ = self.ar_decoder(torch.cat([x, y], dim=1), mask)
        return self.ar_predict_layer(h[:, x.shape[1] :]), targets

    def ar_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """AR logits Float[B, T+1, K+1]: row t predicts codebook-1 frame t (row T_b: EOS) from frames < t."""
        return self._ar(self._check_batch(batch))[0]

    # --------------------------------------------------------------------- NAR

    def _nar_draw(
        self, b: _Batch, batch: dict[str, torch.Tensor], hashed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample NAR stage Long[B] in [1, Q-1] (0-based codebook to predict) and prompt prefix Long[B]."""
        c = self.config
        B, T, Q = b.codes.shape
        if self.training and not hashed:
            u_stage, u_prefix = torch.rand(2, B, device=b.codes.device, dtype=torch.float64)
        else:
            u_stage, u_prefix = _content_hash_units(b)
        stage = 1 + (u_stage * (Q - 1)).long().clamp(max=Q - 2)
        low = b.code_lens // 4  # reference: p ~ U[floor(len/4), 2 floor(len/4)), capped at 3 s
        prefix = (low + (u_prefix * low).long()).clamp(max=c.max_prompt_frames)
        if c.prefix_mode == 0:
            prefix = torch.zeros_like(prefix)
        if "nar_stage" in batch:
            stage = batch["nar_stage"].to(stage)
        if "nar_prefix_lens" in batch:
            prefix = batch["nar_prefix_lens"].to(prefix)
        if bool(((stage < 1) | (stage >= Q) | (prefix < 0) | (prefix >= b.code_lens)).any()):
            raise ValueError(
                f"nar_stage must be in [1, {Q - 1}] and nar_prefix_lens in [0, code_lens); "
                f"got stages {stage.tolist()}, prefixes {prefix.tolist()}, code_lens {b.code_lens.tolist()}"
            )
        return stage, prefix

    def validation_nar_draw(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The NAR stage and prompt prefix (Long[B] each) eval mode scores each sample at: a hash of its
        own content, text included. Passed back as ``batch["nar_stage"]`` / ``batch["nar_prefix_lens"]``
        they score a changed input (the same codes with another utterance's text) at the same positions.
        Uses no parameters (no collective under ZeRO-3)."""
        return self._nar_draw(self._check_batch(batch), batch, hashed=True)

    def _stage_condition(self, stage: torch.Tensor) -> torch.Tensor:
        """Stage embeddings Float[B, 1, d] for AdaLN. Each table is called (not indexed) for ZeRO-3."""
        row = stage.new_zeros(1)
        table = torch.cat([emb(row) for emb in self.nar_stage_embeddings])  # [Q-1, d]
        return table[stage - 1][:, None]

    def _nar(self, b: _Batch, stage: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample NAR loss sums and top-10 hits, Float[B] each."""
        B, T, Q = b.codes.shape
        in_prefix = torch.arange(T, device=b.codes.device)[None] < prefix[:, None]  # [B, T]
        # VALL-E eq. (4)-(5): the input at frame t is sum_{k<j} emb_k(c_t,k); inside the prompt prefix,
        # all Q codebooks are known and summed.
        y = self.nar_audio_embeddings[0](b.codes[..., 0])
        for k in range(1, Q):
            known = in_prefix | (k < stage)[:, None]
            y = y + self.nar_audio_embeddings[k](b.codes[..., k]) * known[..., None].to(y.dtype)
        x = self._text("nar", b.phonemes, b.language)
        y = self.nar_audio_position(y)
        keys = torch.cat([b.text_valid, b.audio_valid], dim=1)[:, None, None, :]  # bidirectional, pads hidden
        h, _ = self.nar_decoder(torch.cat([x, y], dim=1), keys, self._stage_condition(stage))
        h = h[:, x.shape[1] :]

        targets = b.codes.gather(2, stage[:, None, None].expand(B, T, 1)).squeeze(2)
        targets = targets.masked_fill(in_prefix | ~b.audio_valid, IGNORE)  # loss only after the prompt
        # Samples are grouped by stage so each one's own predict layer runs on it; every layer is called,
        # on zero rows if need be, so all parameters take part (DDP) and are gathered (ZeRO-3).
        counts = torch.bincount(stage - 1, minlength=Q - 1).tolist()
        order = torch.argsort(stage, stable=True)
        parts = [
            _token_stats(layer(hs), ts)
            for layer, hs, ts in zip(
                self.nar_predict_layers, h[order].split(counts), targets[order].split(counts), strict=True
            )
        ]
        unsort = torch.argsort(order)
        loss_sum = torch.cat([p[0] for p in parts])[unsort]
        top10 = torch.cat([p[1] for p in parts])[unsort]
        return loss_sum, top10

    # ----------------------------------------------------------------- forward

    def forward(self, batch: dict[str, torch.Tensor], train_stage: str = "both") -> dict[str, torch.Tensor]:
        """Per-sample sums Float[B] (``OUTPUT_KEYS``, zeros for a stage not run) and ``loss``, the scalar to
        backpropagate: token-mean AR loss + token-mean NAR loss over the stages run.

        batch: phonemes Long[B, S] (0-padded), phoneme_lens Long[B], codes Long[B, T, Q] (anything beyond
        code_lens), code_lens Long[B], language Long[B]; optional nar_stage / nar_prefix_lens Long[B].
        AR tokens per sample: code_len + 1 (the EOS); NAR tokens: code_len - prompt prefix.
        """
        if train_stage not in TRAIN_STAGES:
            raise ValueError(f"train_stage must be one of {TRAIN_STAGES}, got {train_stage!r}")
        b = self._check_batch(batch)
        # Separate tensors per key: a caller may all-reduce them in place.
        out = {key: torch.zeros(b.codes.shape[0], device=b.codes.device) for key in OUTPUT_KEYS}
        loss = torch.zeros((), device=b.codes.device)
        if train_stage in ("ar", "both"):
            logits, targets = self._ar(b)
            out["ar_loss_sum"], out["ar_top10_correct"] = _token_stats(logits, targets)
            out["ar_tokens"] = (b.code_lens + 1).float()
            loss = loss + out["ar_loss_sum"].sum() / out["ar_tokens"].sum()
        if train_stage in ("nar", "both"):
            stage, prefix = self._nar_draw(b, batch)
            out["nar_loss_sum"], out["nar_top10_correct"] = self._nar(b, stage, prefix)
            out["nar_tokens"] = (b.code_lens - prefix).float()
            loss = loss + out["nar_loss_sum"].sum() / out["nar_tokens"].sum()
        out["loss"] = loss
        return out

    # --------------------------------------------------------------- inference

    @torch.inference_mode()
    def generate(
        self,
        phonemes: torch.Tensor,
        phoneme_lens: torch.Tensor,
        language: torch.Tensor,
        prompt_codes: torch.Tensor | None = None,
        prompt_language: torch.Tensor | None = None,
        *,
        prompt_phoneme_lens: torch.Tensor | None = None,
        prompt_code_lens: torch.Tensor | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        max_frames: int | None = None,
        min_frames: int = 1,
        generator: torch.Generator | None = None,
        batched: bool | None = None,
    ) -> list[torch.Tensor]:
        """Synthesize codes: AR sampling of codebook 1, then NAR argmax of codebooks 2..Q. One Long[T, Q] per sample.

        As the reference's inference, ``phonemes[b]`` is the prompt's transcript followed by the text to say:
        its first ``prompt_phoneme_lens[b]`` phonemes (default 0) belong to ``prompt_codes[b]`` (Long[B, Tp, Q],
        first ``prompt_code_lens[b]`` frames; default all) and get ``prompt_language[b]`` (default ``language``);
        the rest get ``language[b]``. Prompt and target languages may differ (cross-lingual synthesis).
        The returned codes exclude the prompt.

        top_k: keep the k most likely tokens (0 = all, the reference's default; 1 = greedy). top_p: nucleus mass.
        max_frames: new AR frames at most (default 16 per phoneme, as the reference). min_frames: EOS is
        refused before this many frames (the reference raises instead when EOS comes first).
        batched: decode the AR for all samples at once (one KV cache, padded text keys hidden; each sample
        stops at its own EOS), which needs equal prompt lengths; None = batched when they are equal. Greedy
        codes are the same either way; sampled codes are reproducible per seed but differ between the two,
        since the batch draws its random numbers together. Runs in eval mode (no dropout) whatever the
        model's mode.
        """
        c = self.config
        B = phonemes.shape[0]
        device = phonemes.device
        if prompt_codes is None:
            prompt_codes = torch.zeros(B, 0, c.num_codebooks, dtype=torch.long, device=device)
        if prompt_codes.ndim != 3 or prompt_codes.shape[0] != B or prompt_codes.shape[2] != c.num_codebooks:
            raise ValueError(
                f"prompt_codes has shape {tuple(prompt_codes.shape)}, expected [B={B}, Tp, {c.num_codebooks}]"
            )
        if prompt_language is None:
            prompt_language = language
        if prompt_phoneme_lens is None:
            prompt_phoneme_lens = torch.zeros(B, dtype=torch.long, device=device)
        if prompt_code_lens is None:
            prompt_code_lens = torch.full((B,), prompt_codes.shape[1], dtype=torch.long, device=device)
        if bool((prompt_phoneme_lens >= phoneme_lens).any()):
            raise ValueError(
                "each sample needs target phonemes after its prompt: prompt_phoneme_lens < phoneme_lens"
            )
        same_prompt_len = bool((prompt_code_lens == prompt_code_lens[0]).all())
        if batched and not same_prompt_len:
            raise ValueError("batched decoding needs prompts of one length; pass batched=None or False")
        batched = same_prompt_len if batched is None else batched

        S = phonemes.shape[1]
        positions = torch.arange(S, device=device)[None]
        text_valid = positions < phoneme_lens[:, None]
        langs = torch.where(
            positions < prompt_phoneme_lens[:, None], prompt_language[:, None], language[:, None]
        )
        limits = torch.full((B,), max_frames, device=device) if max_frames is not None else 16 * phoneme_lens
        sampling = dict(top_k=top_k, top_p=top_p, temperature=temperature, generator=generator)
        was_training = self.training
        self.eval()
        try:
            if batched:
                Tp = int(prompt_code_lens[0])
                text = phonemes.long().masked_fill(~text_valid, 0)
                firsts = self._ar_generate(
                    text, text_valid, langs, prompt_codes[:, :Tp, 0].long(), limits, min_frames, sampling
                )
            else:
                firsts = []
                for i in range(B):
                    n, Tp = int(phoneme_lens[i]), int(prompt_code_lens[i])
                    firsts += self._ar_generate(
                        phonemes[i : i + 1, :n].long(),
                        text_valid[i : i + 1, :n],
                        langs[i : i + 1, :n],
                        prompt_codes[i : i + 1, :Tp, 0].long(),
                        limits[i : i + 1],
                        min_frames,
                        sampling,
                    )
            results = []
            for i in range(B):
                n, Tp = int(phoneme_lens[i]), int(prompt_code_lens[i])
                prompt = prompt_codes[i : i + 1, :Tp].long()
                results.append(
                    self._nar_generate(
                        phonemes[i : i + 1, :n].long(), langs[i : i + 1, :n], prompt, firsts[i]
                    )
                )
            return results
        finally:
            self.train(was_training)

    def _ar_generate(
        self, text, text_valid, lang, prompt_first, limits, min_frames: int, sampling: dict
    ) -> list[torch.Tensor]:
        """Codebook 1 for each sample, Long[1, Tg_b], continuing [BOS, prompt] one frame at a time with a
        KV cache. Padded text (``text_valid`` False) is hidden from every query; a sample that has ended
        (EOS or its frame limit) keeps decoding a dummy token until the last one ends, and is cut at its end.
        """
        c = self.config
        B = text.shape[0]
        x = self._text("ar", text, lang)
        inputs = F.pad(prompt_first, (1, 0), value=c.bos_id)
        y = self.ar_audio_position(self.ar_audio_embedding(inputs))
        audio_valid = torch.ones_like(inputs, dtype=torch.bool)
        h, cache = self.ar_decoder(
            torch.cat([x, y], dim=1), self._ar_mask(text_valid, audio_valid), use_cache=True
        )
        keys = torch.cat([text_valid, audio_valid], dim=1)  # what later frames may attend to
        lengths = torch.zeros(B, dtype=torch.long, device=text.device)
        done = torch.zeros(B, dtype=torch.bool, device=text.device)
        frames: list[torch.Tensor] = []
        while True:
            logits = self.ar_predict_layer(h[:, -1]).float()
            if len(frames) < min_frames:
                logits[:, c.eos_id] = float("-inf")
            token = sample_token(logits, **sampling)
            ended = ~done & (token == c.eos_id)
            lengths = torch.where(ended, len(frames), lengths)
            done = done | ended
            token = token.masked_fill(done, 0)  # a finished sample's dummy input; cut below
            frames.append(token)
            full = ~done & (len(frames) >= limits)
            lengths = torch.where(full, len(frames), lengths)
            done = done | full
            if bool(done.all()):
                break
            # The new frame sits at audio position len(BOS + prompt) + len(frames) - 1 and sees every real key.
            keys = F.pad(keys, (0, 1), value=True)
            y = self.ar_audio_position(
                self.ar_audio_embedding(token[:, None]), offset=inputs.shape[1] + len(frames) - 1
            )
            h, cache = self.ar_decoder(y, keys[:, None, None, :], past_kvs=cache, use_cache=True)
        out = torch.stack(frames, dim=1)
        return [out[i : i + 1, : int(lengths[i])] for i in range(B)]

    def _nar_generate(self, text, lang, prompt, first) -> torch.Tensor:
        """Codebooks 2..Q by argmax, stage by stage, after the prompt prefix. Returns Long[Tg, Q]."""
        c = self.config
        Tp = prompt.shape[1]
        x = self._text("nar", text, lang)
        y = self.nar_audio_embeddings[0](torch.cat([prompt[..., 0], first], dim=1))
        if c.prefix_mode == 1:  # the prompt prefix carries all codebooks from the start, as in training
            for k in range(1, c.num_codebooks):
                y[:, :Tp] += self.nar_audio_embeddings[k](prompt[..., k])
        codes = [first]
        for k in range(1, c.num_codebooks):
            cond = self._stage_condition(torch.tensor([k], device=text.device))
            h, _ = self.nar_decoder(torch.cat([x, self.nar_audio_position(y)], dim=1), None, cond)
            codes.append(self.nar_predict_layers[k - 1](h[:, x.shape[1] + Tp :]).argmax(-1))
            if k < c.num_codebooks - 1:
                y[:, Tp:] += self.nar_audio_embeddings[k](codes[-1])
                if c.prefix_mode == 0:
                    y[:, :Tp] += self.nar_audio_embeddings[k](prompt[..., k])
        return torch.stack(codes, dim=-1)[0]


# ---------------------------------------------------------------------- helpers


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy sum and top-10 hits over non-IGNORE targets. logits [B, T, V] -> Float[B] x 2."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    top = logits.topk(min(10, logits.shape[-1]), dim=-1).indices
    hits = (top == targets[..., None]).any(-1) & (targets != IGNORE)
    return ce.sum(1), hits.float().sum(1)


def _content_hash_units(b: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Two numbers in [0, 1) per sample, fixed by the sample's own tokens and lengths (not its batch-mates)."""
    t = torch.arange(1, b.codes.shape[1] + 1, device=b.codes.device)
    s = torch.arange(1, b.phonemes.shape[1] + 1, device=b.codes.device)
    key = (b.codes[..., 0] * t).sum(1) + (b.phonemes * s).sum(1) * 7919 + b.code_lens * 104729
    key = key % (2**31 - 1)

    def mix(mult: int) -> torch.Tensor:  # multiply-xorshift, all within int64
        h = (key * mult) % 2**32
        h = h ^ (h >> 15)
        h = (h * 0x5BD1E995) % 2**32
        h = h ^ (h >> 13)
        return h.double() / 2**32

    return mix(0x3C6EF372), mix(0x27D4EB2F)


def sample_token(
    logits: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits Float[B, V] -> Long[B]. top_k=1 or temperature=0 is argmax."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus (Holtzman et al. 2019): the smallest head of the sorted distribution with mass >= top_p.
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------- named sizes


def tiny_config(**kwargs) -> VallexConfig:
    """64 wide, 2 heads, 2 layers: tests and CPU smoke runs."""
    return VallexConfig(**{"d_model": 64, "nhead": 2, "num_layers": 2, **kwargs})


def small_config(**kwargs) -> VallexConfig:
    """256 wide, 4 heads, 4 layers (~10 M parameters): a CPU-trainable demo."""
    return VallexConfig(**{"d_model": 256, "nhead": 4, "num_layers": 4, **kwargs})


def paper_config(**kwargs) -> VallexConfig:
    """1024 wide, 16 heads, 12 layers: the public VALL-E X checkpoint's architecture."""
    return VallexConfig(**{"d_model": 1024, "nhead": 16, "num_layers": 12, **kwargs})


MODEL_SIZES = {"tiny": tiny_config, "small": small_config, "paper": paper_config}


def build_model(size: str, *, num_phonemes: int, num_languages: int, **overrides) -> VallexModel:
    """A fresh model of a named size; ``overrides`` replace any VallexConfig field (e.g. dropout=0.0)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    fields = {f.name for f in dataclasses.fields(VallexConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; VallexConfig fields are {sorted(fields)}")
    return VallexModel(MODEL_SIZES[size](num_phonemes=num_phonemes, num_languages=num_languages, **overrides))
