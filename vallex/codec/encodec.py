"""EnCodec 24 kHz: mono audio <-> discrete codes (8 codebooks of 1024 entries at 6 kbps, 75 frames/s).

Weights. ``pretrained=True`` (the default, and the only setting that makes a usable TTS corpus) loads
``encodec_24khz-d7cc33bc.th`` from ``CodecSettings.checkpoint`` or from the torch hub cache, where
``EncodecModel.encodec_model_24khz(pretrained=True)`` stores it. Nothing here touches the network: a
missing file is an error that says where it looked and how to get it. ``pretrained=False`` builds a
random-init codec from ``seed`` for tests and offline demos, and says so loudly in the log.

Random init needs one extra step: EnCodec's codebooks start as zeros and are only filled in by k-means
during training, so an untrained model maps every frame to code 0. :func:`_init_random_codebooks`
fills them (seeded) so that the demo codes still depend on the audio and use the whole code range.

Batching rule: every clip is zero-padded to a whole number of frames (``ceil(len * 75 / 24000)``, 320
samples each) before encoding. EnCodec's encoder is causal, so a frame never sees later samples, and
the only thing batching could change is how the last partial frame is padded (EnCodec reflects the
signal at the edge, a batch would give zeros): padding every clip the same way makes a clip's codes
independent of what it is batched with (``tests/codec/test_codec.py`` checks batched == one by one).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("vallex.codec")

SAMPLE_RATE = 24000
FRAME_RATE = 75
HOP_LENGTH = SAMPLE_RATE // FRAME_RATE  # 320 samples per code frame
CODEBOOK_SIZE = 1024
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps the 24 kHz model was trained for
MODEL_NAME = "encodec_24khz"
# Hard-coded inside EncodecModel.encodec_model_24khz (encodec 0.1.1); its stem ends in the sha256 prefix.
CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"

# Keys of CodecSettings.to_dict() that describe the codec rather than configure it: accepted back by the
# constructor (data preparation rebuilds settings from the manifest dict) only if they still agree.
_DESCRIPTIVE_KEYS = ("name", "sample_rate", "frame_rate", "codebook_size", "num_codebooks")


class CodecError(RuntimeError):
    """The codec cannot be loaded or was given unusable input (says what would be right)."""


class CodecCheckpointError(CodecError, FileNotFoundError):
    """The pretrained EnCodec weights are not on this machine."""


@dataclass(init=False)
class CodecSettings:
    """How to build the codec. Picklable and JSON-friendly (``to_dict`` goes into the manifest)."""

    bandwidth: float = 6.0
    pretrained: bool = True
    checkpoint: str | None = None
    seed: int = 0

    def __init__(
        self,
        bandwidth: float = 6.0,
        pretrained: bool = True,
        checkpoint: str | os.PathLike | None = None,
        seed: int = 0,
        **described,
    ):
        if bandwidth not in BANDWIDTHS:
            raise ValueError(
                f"codec bandwidth {bandwidth!r} kbps: EnCodec 24 kHz supports {list(BANDWIDTHS)}"
            )
        self.bandwidth = float(bandwidth)
        self.pretrained = bool(pretrained)
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.seed = int(seed)
        # A manifest's codec dict round-trips through here; its descriptive keys must still be true.
        mine = self.to_dict()
        for key, value in described.items():
            if key not in _DESCRIPTIVE_KEYS:
                raise TypeError(
                    f"CodecSettings got an unknown key {key!r}; settings are bandwidth, pretrained, "
                    f"checkpoint, seed (descriptive keys {list(_DESCRIPTIVE_KEYS)} are checked)"
                )
            if value != mine[key]:
                raise ValueError(
                    f"codec {key}={value!r} does not match these settings, which give {key}={mine[key]!r}"
                )

    @property
    def num_codebooks(self) -> int:
        """Codebooks used at this bandwidth: kbps / (75 frames/s * 10 bits per code) -> 8 at 6 kbps."""
        bits_per_code = math.log2(CODEBOOK_SIZE)
        n = self.bandwidth * 1000 / (FRAME_RATE * bits_per_code)
        if n != int(n):  # unreachable for BANDWIDTHS; guards an edit of the constants above
            raise ValueError(f"bandwidth {self.bandwidth} kbps is not a whole number of codebooks ({n})")
        return int(n)

    def to_dict(self) -> dict:
        """What identifies the codes (for the manifest); fields without effect are left out, so a
        change of ``run.seed`` does not invalidate a corpus encoded with pretrained weights."""
        d = {
            "name": MODEL_NAME,
            "bandwidth": self.bandwidth,
            "sample_rate": SAMPLE_RATE,
            "frame_rate": FRAME_RATE,
            "codebook_size": CODEBOOK_SIZE,
            "num_codebooks": self.num_codebooks,
            "pretrained": self.pretrained,
        }
        if self.pretrained:
            d["checkpoint"] = self.checkpoint
        else:
            d["seed"] = self.seed
        return d


# ------------------------------------------------------------------------------------------------
# Loading


def hub_checkpoint_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (used by encodec) keeps the 24 kHz weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME


def checkpoint_url() -> str:
    from encodec.model import ROOT_URL

    return ROOT_URL.rstrip("/") + "/" + CHECKPOINT_NAME


def _missing_checkpoint(path: Path, explicit: bool) -> CodecCheckpointError:
    where = (
        f"the checkpoint given in the settings (prepare.codec.checkpoint): {path}"
        if explicit
        else f"the torch hub cache: {path} (torch.hub.get_dir() = {path.parent.parent}; TORCH_HOME moves it)"
    )
    return CodecCheckpointError(
        f"pretrained EnCodec weights not found. Looked in {where}.\n"
        f"Needed: the file {CHECKPOINT_NAME}. This code never downloads it. On a machine with network:\n"
        f"    curl -L -o {CHECKPOINT_NAME} {checkpoint_url()}\n"
        f"then copy it to {hub_checkpoint_path()} or point prepare.codec.checkpoint at it.\n"
        "For tests and offline demos only, prepare.codec.pretrained: false uses a random-init codec "
        "(its codes are meaningless for real TTS)."
    )


def _verify_checksum(path: Path) -> None:
    """encodec names its checkpoints <name>-<sha256 prefix>.th; check that prefix like torch.hub would."""
    stem = path.stem
    if not stem.startswith(MODEL_NAME + "-"):
        return  # a renamed or re-saved file: nothing to check against
    want = stem.split("-")[-1]
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(want):
        raise CodecError(
            f"EnCodec checkpoint {path} is corrupt or incomplete: its sha256 starts with "
            f"{sha.hexdigest()[: len(want)]}, its name says {want}; download it again from {checkpoint_url()}"
        )


def _init_random_codebooks(model, seed: int) -> None:
    """Give an untrained EnCodec usable codebooks, deterministically from ``seed``.

    Each residual codebook is drawn from a Gaussian matched (mean, half the std per dimension) to what
    that quantizer sees when the random encoder hears a seeded probe signal (harmonic tones + noise at
    random levels). Gaussian rather than k-means on the probe: with a short probe, k-means memorizes it
    and the later codebooks collapse to a single code. Measured on espeak speech here: 50-200 distinct
    codes per codebook over 2-5 s clips (zeros from stock init: 1).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    clips = []
    for _ in range(4):  # 4 s of probe: 300 frames, plenty for a mean and a std per dimension
        f0 = 80 + 220 * torch.rand(1, generator=gen)
        harmonics = sum(
            torch.sin(2 * math.pi * f0 * k * t + 2 * math.pi * torch.rand(1, generator=gen)) / k
            for k in range(1, 30)
        )
        mix = torch.rand(1, generator=gen)
        x = mix * harmonics / 3 + (1 - mix) * 0.3 * torch.randn(SAMPLE_RATE, generator=gen)
        envelope = torch.rand(8, generator=gen).repeat_interleave(SAMPLE_RATE // 8)
        gain = 10 ** (-3 * torch.rand(1, generator=gen))
        clips.append(x * envelope * gain)
    with torch.inference_mode():
        emb = model.encoder(torch.stack(clips)[:, None])  # [B, D, T]
    residual = emb.transpose(1, 2).reshape(-1, emb.shape[1]).clone()
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        mean, std = residual.mean(0), residual.std(0)
        embed = mean + 0.5 * std * torch.randn(book.codebook_size, residual.shape[1], generator=gen)
        book.embed.data.copy_(embed)
        book.embed_avg.data.copy_(embed)
        book.inited.data.fill_(1.0)
        dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed.t() + embed.pow(2).sum(1)[None]
        residual = residual - embed[dist.argmin(1)]


def load_encodec(settings: CodecSettings, device: str = "cpu"):
    """The EnCodec 24 kHz model for ``settings``, in eval mode on ``device``, bandwidth set."""
    import warnings

    import torch
    from encodec import EncodecModel

    def build():
        # encodec builds its convs with torch.nn.utils.weight_norm, deprecated in torch 2.x: not ours to fix.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            return EncodecModel.encodec_model_24khz(pretrained=False)  # architecture only: no download

    if settings.pretrained:
        explicit = settings.checkpoint is not None
        path = Path(settings.checkpoint).expanduser() if explicit else hub_checkpoint_path()
        if not path.is_file():
            raise _missing_checkpoint(path, explicit)
        _verify_checksum(path)
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
            model = build()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
            raise CodecError(
                f"EnCodec checkpoint {path} could not be loaded into the 24 kHz model ({type(e).__name__}: {e}); "
                f"it should be {CHECKPOINT_NAME} from {checkpoint_url()}"
            ) from None
        model.name = MODEL_NAME
        log.info("EnCodec 24 kHz: pretrained weights from %s, %g kbps", path, settings.bandwidth)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = build()
            _init_random_codebooks(model, settings.seed)
        log.warning(
            "EnCodec 24 kHz with RANDOM weights (codec.pretrained=false, seed %d): the codes are not real "
            "EnCodec codes; a model trained on them cannot make intelligible speech. For tests and "
            "offline demos only.",
            settings.seed,
        )
    model.set_target_bandwidth(settings.bandwidth)
    return model.eval().to(device)


# ------------------------------------------------------------------------------------------------
# Batched encode / decode


def num_frames(num_samples: int) -> int:
    """Code frames for a 24 kHz clip of ``num_samples`` samples: ``ceil(num_samples * 75 / 24000)``."""
    return -(-num_samples // HOP_LENGTH)


class AudioTokenizer:
    """Batched EnCodec encode/decode; picklable settings, model loaded lazily (will be used as a Ray Data
    map_batches callable-class member, one per actor, GPU when available)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, settings: CodecSettings, device: str | None = None):
        self.settings = settings
        self._device = device  # None -> cuda if available else cpu, decided where the model loads
        self._model = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "device": self._device}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"], state["device"])

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def model(self):
        if self._model is None:
            self._model = load_encodec(self.settings, self.device)
        return self._model

    @property
    def num_codebooks(self) -> int:
        return self.settings.num_codebooks

    @property
    def is_real_encodec(self) -> bool:
        """True only with pretrained weights: random-init codes are EnCodec-shaped, not EnCodec's."""
        return self.settings.pretrained

    def encode(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Mono float32 at 24 kHz -> int16 ``[num_codebooks, frames]`` each, one forward pass for the list.

        Pass clips of similar length together: the batch is padded to its longest clip.
        """
        import torch

        if not wavs:
            return []
        clips = []
        for i, w in enumerate(wavs):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim != 1 or w.size == 0:
                raise CodecError(
                    f"clip {i}: expected mono audio of shape [samples] at 24 kHz, got shape {w.shape}"
                )
            if not np.isfinite(w).all():
                raise CodecError(f"clip {i}: contains NaN or infinite samples")
            clips.append(w)
        frames = [num_frames(len(w)) for w in clips]
        batch = torch.zeros(len(clips), 1, max(frames) * HOP_LENGTH)  # zero-padded to whole frames
        for i, w in enumerate(clips):
            batch[i, 0, : len(w)] = torch.from_numpy(w)
        with torch.inference_mode():
            encoded = self.model.encode(batch.to(self.device))
        codes = encoded[0][0]  # one segment (the 24 kHz model has no segmenting): [B, K, T]
        codes = codes.to(torch.int16).cpu().numpy()
        return [np.ascontiguousarray(codes[i, :, :n]) for i, n in enumerate(frames)]

    def code_vectors(self) -> np.ndarray:
        """Float32 ``[num_codebooks, 1024, 128]``: each code's quantizer vector; a frame's latent (what the
        decoder turns into sound) is the sum of its codes' vectors."""
        import torch

        layers = self.model.quantizer.vq.layers[: self.num_codebooks]
        with torch.inference_mode():
            ids = torch.arange(CODEBOOK_SIZE, device=self.device)[None]
            vectors = [layer.decode(ids)[0].T.float().cpu().numpy() for layer in layers]  # [1024, 128] each
        return np.stack(vectors)

    def decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """int16 ``[num_codebooks, frames]`` each -> float32 mono at 24 kHz, ``frames * 320`` samples each."""
        import torch

        if not codes:
            return []
        k = self.num_codebooks
        mats = []
        for i, c in enumerate(codes):
            c = np.asarray(c)
            if c.ndim != 2 or c.shape[0] != k or c.shape[1] == 0:
                raise CodecError(f"codes {i}: expected shape [{k}, frames>0], got {c.shape}")
            if c.min() < 0 or c.max() >= CODEBOOK_SIZE:
                raise CodecError(
                    f"codes {i}: values must be in [0, {CODEBOOK_SIZE}), got {c.min()}..{c.max()}"
                )
            mats.append(c)
        longest = max(c.shape[1] for c in mats)
        batch = torch.zeros(len(mats), k, longest, dtype=torch.long)
        for i, c in enumerate(mats):
            batch[i, :, : c.shape[1]] = torch.from_numpy(c.astype(np.int64))
        with torch.inference_mode():
            # The decoder is causal too: padding frames at the end do not change earlier samples.
            audio = self.model.decode([(batch.to(self.device), None)])  # [B, 1, longest * 320]
        audio = audio[:, 0].float().cpu().numpy()
        return [np.ascontiguousarray(audio[i, : c.shape[1] * HOP_LENGTH]) for i, c in enumerate(mats)]
