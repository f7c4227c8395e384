"""Greedy synthesis from an imported checkpoint equals the reference implementation's (issue #5).

The reference is Plachtaa/VALL-E-X (``models/vallex.py`` ``VALLE.inference``, built on lifeiteng/vall-e). Its
released checkpoint cannot be fetched here, but what matters is that both implementations compute the same
function of the same weights, so this module:

1. builds the reference's ``VALLE`` the way its ``utils/generation.py`` does (``norm_first=True,
   add_prenet=False, prefix_mode=1, share_embedding=True, nar_scale_factor=1.0, prepend_bos=True,
   num_quantizers=8``), small (d_model 64, 4 heads, 2 layers; text vocabulary and languages are the
   reference's fixed 2048 and en/zh/ja), from a fixed seed, then moves every parameter off its initial
   value (positional alphas, LayerNorm gains and biases, zero biases, NAR stage rows) so none of them can
   be ignored or mis-wired without changing the output;
2. saves ``{"model": state_dict}`` -- the public checkpoint format -- and loads it with
   ``vallex.model.checkpoint.import_public``;
3. checks that the two state dicts match key for key and shape for shape (the import is a strict
   ``load_state_dict``) and hold the same values, tied NAR tables included;
4. runs greedy synthesis on both from the same prompt transcript + text ids, prompt codes (Long[1, Tp, 8]),
   prompt-transcript length (the reference's ``enroll_x_lens``) and prompt / text languages, and checks
   identical codes, codebook 1 (AR) and codebooks 2..8 (NAR) alike, plus the logits behind them: every AR
   decoding step and every NAR stage, to 1e-4.

Cases: same language (prompt en, text en) and cross-lingual (prompt en, text zh), each with weights that
decode to the frame limit and with weights whose EOS comes partway (the AR's two ways to stop).

How the calls are aligned (the reference's greedy path, ``VALLE.inference`` / ``topk_sampling``):

- ``top_k=1`` in the reference keeps the single largest logit and then draws with ``torch.multinomial`` from
  a distribution with one non-zero entry, so it is deterministic; vallex's ``generate(top_k=1)`` is argmax.
- The reference stops at EOS or once it holds more than ``16 * len(text)`` new frames (it computes one more
  step's logits and discards that sample); vallex's default ``max_frames`` is ``16 * len(text)``. Both return
  the new frames only, without the prompt and without EOS.
- The reference raises if EOS is the very first frame; vallex refuses EOS before ``min_frames=1``. No case
  here emits EOS first.
- Text languages are whole-utterance strings for the reference (its per-token list form has no vallex
  equivalent); vallex gets ``language`` for the text and ``prompt_language`` for the first
  ``prompt_phoneme_lens`` ids. vallex's language ids are the reference's (``PUBLIC_LANGUAGES``).

Run it against a checkout of the reference (its code is not, and must not be, part of this repository)::

    VALLEX_REFERENCE_REPO=/path/to/VALL-E-X .venv/bin/pytest tests/model/test_reference_equality.py

Without the variable the module is skipped. The reference's ``models/vallex.py`` needs torch, numpy and
matplotlib (``models/visualizer.py``) at import time, nothing else for inference.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from vallex.model.checkpoint import PUBLIC_LANGUAGES, import_public

REFERENCE = os.environ.get("VALLEX_REFERENCE_REPO")
if not REFERENCE:
    pytest.skip(
        "VALLEX_REFERENCE_REPO is not set (point it at a checkout of Plachtaa/VALL-E-X to compare with it)",
        allow_module_level=True,
    )

D_MODEL, NHEAD, NUM_LAYERS = 64, 4, 2
EOS = 1024  # the reference's NUM_AUDIO_TOKENS: its AR end token
LANG = {name: i for i, name in enumerate(PUBLIC_LANGUAGES)}
# name: (prompt language, text language, prompt transcript ids, text ids, prompt frames, input seed)
CASES = {
    "same-language": ("en", "en", 5, 8, 20, 3),
    "cross-lingual": ("en", "zh", 6, 9, 15, 4),
}
REFERENCE_PACKAGES = ("data", "models", "modules", "utils")  # its top-level names, generic enough to clash


def _import_reference(root: Path):
    """The reference's ``models.vallex`` module, imported from ``root`` and then taken back out of
    ``sys.modules`` / ``sys.path`` (its top-level package names are generic), whatever was there restored."""
    if not (root / "models" / "vallex.py").is_file():
        pytest.fail(
            f"VALLEX_REFERENCE_REPO={root} holds no models/vallex.py (not a Plachtaa/VALL-E-X checkout)"
        )

    def ours(name: str) -> bool:
        return name.split(".")[0] in REFERENCE_PACKAGES

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("models.vallex")
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert Path(module.__file__).resolve().is_relative_to(root.resolve()), module.__file__
    return module


@pytest.fixture(scope="module")
def reference_model():
    """The reference's VALLE, small, seeded, every parameter perturbed, in eval mode."""
    module = _import_reference(Path(REFERENCE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; threads only contend on a small machine
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = module.VALLE(
            D_MODEL,
            NHEAD,
            NUM_LAYERS,
            norm_first=True,
            add_prenet=False,
            prefix_mode=1,
            share_embedding=True,
            nar_scale_factor=1.0,
            prepend_bos=True,
            num_quantizers=8,
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # each tensor once: tied tables stay tied
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    yield model.eval()
    torch.set_num_threads(threads)


def _inputs(case: str):
    prompt_lang, text_lang, n_prompt_text, n_text, n_prompt_frames, seed = CASES[case]
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 2048, (1, n_prompt_text + n_text), generator=g)  # prompt transcript + text
    prompt = torch.randint(0, 1024, (1, n_prompt_frames, 8), generator=g)
    return text, prompt, n_prompt_text, prompt_lang, text_lang


def _recording(modules) -> tuple[list[list[torch.Tensor]], list]:
    """Per module, a copy of each output it produces (the reference filters its logits in place)."""
    records: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [
        m.register_forward_hook(lambda _m, _args, out, i=i: records[i].append(out.detach().float().clone()))
        for i, m in enumerate(modules)
    ]
    return records, handles


def _run_reference(model, case: str):
    text, prompt, n_prompt_text, prompt_lang, text_lang = _inputs(case)
    ar, ar_hooks = _recording([model.ar_predict_layer])
    nar, nar_hooks = _recording(model.nar_predict_layers)
    try:
        with torch.inference_mode(), torch.random.fork_rng():
            codes = model.inference(
                text,
                torch.tensor([text.shape[1]]),
                prompt,
                enroll_x_lens=n_prompt_text,
                top_k=1,
                temperature=1.0,
                prompt_language=prompt_lang,
                text_language=text_lang,
            )
    finally:
        for h in ar_hooks + nar_hooks:
            h.remove()
    return codes[0], ar[0], [stage[0] for stage in nar]


def _run_vallex(model, case: str):
    text, prompt, n_prompt_text, prompt_lang, text_lang = _inputs(case)
    ar, ar_hooks = _recording([model.ar_predict_layer])
    nar, nar_hooks = _recording(model.nar_predict_layers)
    try:
        (codes,) = model.generate(
            text,
            torch.tensor([text.shape[1]]),
            torch.tensor([LANG[text_lang]]),
            prompt_codes=prompt,
            prompt_language=torch.tensor([LANG[prompt_lang]]),
            prompt_phoneme_lens=torch.tensor([n_prompt_text]),
            top_k=1,
        )
    finally:
        for h in ar_hooks + nar_hooks:
            h.remove()
    return codes, ar[0], [stage[0] for stage in nar]


def _with_early_eos(model, case: str):
    """A copy of ``model`` whose EOS row is 1.05 x the row of a code its greedy decoding would emit for
    the first time partway: EOS then wins at that frame (or at an earlier close call) instead."""
    codes, _, _ = _run_reference(model, case)
    first = codes[:, 0].tolist()
    new = [t for t in range(1, len(first)) if first[t] not in first[:t]]  # frames with a first-time code
    assert new, f"greedy decoding repeats one code from the first frame on: {first[:8]}..."
    frame = next((t for t in new if t >= len(first) // 4), new[-1])  # partway if possible
    eos_model = copy.deepcopy(model)
    with torch.no_grad():
        w = eos_model.ar_predict_layer.weight
        w[EOS] = 1.05 * w[first[frame]]
    return eos_model


def _import(reference, tmp_path):
    path = tmp_path / "vallex-checkpoint.pt"
    torch.save({"model": reference.state_dict()}, path)
    return import_public(path, nhead=NHEAD)


def test_state_dict_matches_reference_one_to_one(reference_model, tmp_path):
    ours = _import(reference_model, tmp_path)
    theirs, mine = reference_model.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        assert mine[key].shape == tensor.shape, key
        assert torch.equal(mine[key], tensor), key
    # The reference ties nar_predict_layers[j] to nar_audio_embeddings[j + 2]; so must the import.
    for j in range(6):
        assert ours.nar_predict_layers[j].weight is ours.nar_audio_embeddings[j + 2].weight
    c = ours.config
    assert (c.d_model, c.nhead, c.num_layers, c.num_phonemes, c.num_languages) == (
        D_MODEL,
        NHEAD,
        NUM_LAYERS,
        2048,
        3,
    )
    assert (c.norm_first, c.prefix_mode, c.share_embedding, c.num_codebooks) == (True, 1, True, 8)


@pytest.mark.parametrize("stop", ["frame-limit", "eos"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_synthesis_equals_reference(reference_model, tmp_path, case, stop):
    reference = reference_model if stop == "frame-limit" else _with_early_eos(reference_model, case)
    ours = _import(reference, tmp_path)
    ref_codes, ref_ar, ref_nar = _run_reference(reference, case)
    our_codes, our_ar, our_nar = _run_vallex(ours, case)

    text, _, _, _, _ = _inputs(case)
    limit = 16 * text.shape[1]
    if stop == "frame-limit":
        assert ref_codes.shape[0] == limit  # the case exercises what it is named after
        # At the limit the reference computes one more step's logits and discards its sample.
        assert len(ref_ar) == len(our_ar) + 1
    else:
        assert 0 < ref_codes.shape[0] < limit
        assert len(ref_ar) == len(our_ar) == ref_codes.shape[0] + 1  # the last step emitted EOS

    assert our_codes.shape == ref_codes.shape == (ref_codes.shape[0], 8)
    frames_differing = (our_codes != ref_codes).any(0)
    assert torch.equal(our_codes[:, 0], ref_codes[:, 0]), "AR codebook 1 differs"
    assert torch.equal(our_codes, ref_codes), f"NAR codebooks differ: {frames_differing.tolist()}"

    # Finer: the logits behind every AR step and every NAR stage.
    for step, (mine, theirs) in enumerate(zip(our_ar, ref_ar, strict=False)):
        torch.testing.assert_close(
            mine, theirs, rtol=1e-4, atol=1e-4, msg=lambda m, s=step: f"AR step {s}: {m}"
        )
    assert len(our_nar) == len(ref_nar) == 7
    for stage, (mine, theirs) in enumerate(zip(our_nar, ref_nar, strict=True)):
        torch.testing.assert_close(
            mine, theirs, rtol=1e-4, atol=1e-4, msg=lambda m, s=stage: f"NAR codebook {s + 2}: {m}"
        )
