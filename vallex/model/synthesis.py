"""Text -> EnCodec codes with a trained model: phonemize, encode ids, AR sample + NAR argmax.

The codec (codes -> wav) and the files are the entry point's business (``ray_jobs/synthesize.py``);
this module only needs the model, its language list and the symbol table it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vallex.model.vallex import VallexModel


@dataclass
class SamplingSettings:
    top_k: int = 0
    """Keep the k most likely codes at each AR step (0 = all, the reference's default; 1 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    temperature: float = 1.0
    """Softmax temperature of the AR sampling."""
    seed: int = 0
    """Seed of the AR sampling: the same seed, model and texts give the same codes."""
    max_frames: int | None = None
    """New frames per text at most (None = 16 per phoneme, as the reference)."""

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no filtering, 1 = greedy), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {self.max_frames}")

    def to_dict(self) -> dict:
        return asdict(self)


def language_id(languages: Sequence[str], language: str) -> int:
    """Position of ``language`` in the model's language list; an unknown one is an error naming the list."""
    if language not in languages:
        raise ValueError(f"language {language!r} is not one of the model's languages {list(languages)}")
    return list(languages).index(language)


def synthesize_codes(
    model: VallexModel,
    phoneme_ids: Sequence[Sequence[int]],
    language: int,
    settings: SamplingSettings,
    *,
    prompt_ids: Sequence[int] = (),
    prompt_codes: np.ndarray | None = None,
    prompt_language: int | None = None,
) -> list[np.ndarray]:
    """One int16 ``[Q, frames]`` per text (prompt excluded), ready for ``AudioTokenizer.decode``.

    ``prompt_ids`` / ``prompt_codes`` (``[Q, frames]``, as ``AudioTokenizer.encode`` gives) are one
    acoustic prompt and its transcript, shared by every text; ``prompt_language`` may differ from
    ``language`` (cross-lingual synthesis).
    """
    empty = [i for i, ids in enumerate(phoneme_ids) if len(ids) == 0]
    if empty:
        raise ValueError(f"texts {empty} yield no phonemes; give text the phonemizer can read")
    Q = model.config.num_codebooks
    device = next(model.parameters()).device
    B = len(phoneme_ids)
    rows = [list(prompt_ids) + list(ids) for ids in phoneme_ids]
    lens = torch.tensor([len(r) for r in rows])
    phonemes = torch.zeros(B, int(lens.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        phonemes[i, : len(r)] = torch.tensor(r)
    if prompt_codes is not None:
        pc = np.asarray(prompt_codes)
        if pc.ndim != 2 or pc.shape[0] != Q:
            raise ValueError(f"prompt codes have shape {pc.shape}, expected [{Q}, frames]")
        prompt = torch.from_numpy(pc.astype(np.int64).T.copy())[None].expand(B, -1, -1)
    else:
        prompt = None
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    out = model.generate(
        phonemes.to(device),
        lens.to(device),
        torch.full((B,), language, device=device),
        None if prompt is None else prompt.to(device),
        None if prompt_language is None else torch.full((B,), prompt_language, device=device),
        prompt_phoneme_lens=torch.full((B,), len(prompt_ids), device=device),
        top_k=settings.top_k,
        top_p=settings.top_p,
        temperature=settings.temperature,
        max_frames=settings.max_frames,
        generator=generator,
    )
    return [codes.T.to(torch.int16).cpu().numpy() for codes in out]
