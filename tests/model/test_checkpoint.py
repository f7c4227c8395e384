"""Model files: public VALL-E X format round trip, vallex format with metadata, shape errors, growing tables."""

from __future__ import annotations

import json

import pytest
import torch

from vallex.model.checkpoint import (
    CheckpointError,
    export_public,
    grow_languages,
    import_public,
    load_any,
    load_checkpoint,
    resize_phonemes,
    save_checkpoint,
)
from vallex.model.vallex import build_model, paper_config, tiny_config
from vallex.text.symbols import SPECIALS, symbols_fingerprint

SYMBOLS = [*SPECIALS, *(f"p{i}" for i in range(36))]  # 40 symbols
LANGS = ["en", "zh", "fr"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("tiny", num_phonemes=len(SYMBOLS), num_languages=len(LANGS), dropout=0.0, **overrides)


NUM_SYMBOLS = len(SYMBOLS)


def batch(language, seed=0, num_phonemes=NUM_SYMBOLS):
    g = torch.Generator().manual_seed(seed)
    return {
        "phonemes": torch.randint(1, num_phonemes, (3, 9), generator=g),
        "phoneme_lens": torch.tensor([9, 6, 4]),
        "codes": torch.randint(0, 1024, (3, 12, 8), generator=g),
        "code_lens": torch.tensor([12, 10, 7]),
        "language": torch.tensor(language),
        "nar_stage": torch.tensor([1, 4, 7]),
        "nar_prefix_lens": torch.tensor([3, 0, 2]),
    }


def outputs(model, b):
    model.eval()
    with torch.no_grad():
        out = model(b)
        return out["ar_loss_sum"], out["nar_loss_sum"], model.ar_logits(b)


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_public_format_round_trip_and_reference_keys(tmp_path):
    model = tiny()
    path = tmp_path / "vallex-checkpoint.pt"
    export_public(model, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"} and "ar_language_embedding.word_embeddings.weight" in raw["model"]
    back = import_public(path, tiny_config(num_phonemes=len(SYMBOLS), num_languages=len(LANGS), dropout=0.0))
    b = batch([0, 1, 2])
    assert_same(outputs(model, b), outputs(back, b))
    # Tied NAR weights stay tied after import, as the reference's share_embedding.
    assert back.nar_predict_layers[0].weight is back.nar_audio_embeddings[2].weight


def test_paper_state_dict_is_the_public_checkpoints_layout():
    """Key set and shapes of the reference's vallex-checkpoint.pt (374 keys, 370,539,524 parameters)."""
    with torch.device("meta"):
        model = build_model("paper", num_phonemes=2048, num_languages=3)
    sd = model.state_dict()
    assert len(sd) == 374 and model.num_parameters() == 370_539_524
    assert sd["ar_text_embedding.word_embeddings.weight"].shape == (2048, 1024)
    assert sd["ar_language_embedding.word_embeddings.weight"].shape == (3, 1024)
    assert sd["nar_language_embedding.word_embeddings.weight"].shape == (3, 1024)
    assert sd["ar_audio_embedding.word_embeddings.weight"].shape == (1026, 1024)
    assert sd["ar_predict_layer.weight"].shape == (1025, 1024)
    assert sd["nar_audio_embeddings.0.word_embeddings.weight"].shape == (1025, 1024)
    assert sd["nar_audio_embeddings.7.word_embeddings.weight"].shape == (1024, 1024)
    assert sd["nar_stage_embeddings.6.word_embeddings.weight"].shape == (1, 1024)
    assert sd["ar_decoder.layers.11.self_attn.in_proj_weight"].shape == (3072, 1024)
    assert sd["nar_decoder.layers.0.norm1.project_layer.weight"].shape == (2048, 1024)
    assert paper_config(num_phonemes=2048, num_languages=3).d_model == 1024


def test_shape_mismatch_names_every_tensor(tmp_path):
    path = tmp_path / "ckpt.pt"
    export_public(tiny(), path)
    wrong = tiny_config(num_phonemes=50, num_languages=4)
    with pytest.raises(CheckpointError) as e:
        import_public(path, wrong)
    msg = str(e.value)
    for key in (
        "ar_text_embedding.word_embeddings.weight: expected (50, 64), got (40, 64)",
        "nar_text_embedding.word_embeddings.weight: expected (50, 64), got (40, 64)",
        "ar_language_embedding.word_embeddings.weight: expected (4, 64), got (3, 64)",
        "nar_language_embedding.word_embeddings.weight: expected (4, 64), got (3, 64)",
    ):
        assert key in msg
    assert "4 tensor(s) with other shapes" in msg and str(path) in msg
    with pytest.raises(CheckpointError, match="missing key.*ar_decoder.layers.2"):
        import_public(path, tiny_config(num_phonemes=40, num_languages=3, num_layers=3))


def test_a_tiny_file_claiming_a_huge_model_is_refused_before_anything_is_built(tmp_path):
    """A 2 KB vallex checkpoint whose config claims d_model 4096 x 96 layers (~45 B parameters): refused
    from its shapes, under an address-space limit that any attempt to build that model would break."""
    import resource
    import time

    state = {k: v for k, v in tiny().state_dict().items() if k.endswith(".alpha")}  # a few scalars
    huge = {**tiny_config(num_phonemes=40, num_languages=3).__dict__, "d_model": 4096, "nhead": 32}
    huge["num_layers"], huge["dim_feedforward"] = 96, None
    path = tmp_path / "crafted.pt"
    torch.save(
        {
            "format": "vallex",
            "format_version": 1,
            "size": "tiny",
            "config": huge,
            "model": state,
            "languages": LANGS,
            "symbols": {"version": 1, "fingerprint": "", "list": SYMBOLS},
        },
        path,
    )
    assert path.stat().st_size < 4096
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    t0 = time.perf_counter()
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))  # 2 GB more than now, at most
    try:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.perf_counter() - t0 < 30  # seconds, not a 45 B-parameter init
    msg = str(e.value)
    assert str(path) in msg and "d_model=4096" in msg and "num_layers=96" in msg
    assert "missing key(s)" in msg and "(and " in msg and len(msg) < 2000  # a few named, the rest counted
    # A config outside the sane bounds is refused from the config alone.
    torch.save(
        {"format": "vallex", "format_version": 1, "config": {**huge, "num_layers": 10**9}, "model": {}}, path
    )
    with pytest.raises(CheckpointError, match=r"num_layers=1000000000 is not an integer in \[1, 1024\]"):
        load_checkpoint(path)


def test_mismatch_errors_list_a_few_tensors_and_count_the_rest(tmp_path):
    path = tmp_path / "ckpt.pt"
    export_public(tiny(), path)
    with pytest.raises(CheckpointError) as e:  # every width differs: ~100 mis-shaped tensors
        import_public(path, tiny_config(num_phonemes=40, num_languages=3, d_model=32, nhead=2))
    msg = str(e.value)
    shaped = int(msg.split(" tensor(s) with other shapes")[0].rsplit("\n", 1)[-1])
    assert shaped > 50 and f"(and {shaped - 5} more)" in msg
    assert msg.count("expected (") == 5 and len(msg) < 2000


def test_vallex_format_rebuilds_model_and_checks_symbols(tmp_path):
    model = tiny()
    path = tmp_path / "model.vallex.pt"
    save_checkpoint(model, path, languages=LANGS, symbols=SYMBOLS, symbols_version=2, size="tiny")
    back, meta = load_checkpoint(path, symbols=SYMBOLS)
    assert meta["languages"] == LANGS and meta["size"] == "tiny"
    assert meta["symbols"] == {"version": 2, "fingerprint": symbols_fingerprint(SYMBOLS), "list": SYMBOLS}
    assert back.config == model.config
    b = batch([2, 0, 1])
    assert_same(outputs(model, b), outputs(back, b))
    # A table that grew append-only grows the phoneme rows; old ids keep their outputs.
    grown, _ = load_checkpoint(path, symbols=[*SYMBOLS, "new1", "new2"])
    assert grown.config.num_phonemes == 42
    assert_same(outputs(model, b), outputs(grown, b))
    with pytest.raises(CheckpointError, match="first difference at id 5"):
        load_checkpoint(path, symbols=[*SYMBOLS[:5], "zz", *SYMBOLS[6:]])
    with pytest.raises(
        CheckpointError, match="a public VALL-E X checkpoint: load_any with its tokenizer file"
    ):
        export_public(model, tmp_path / "pub.pt")
        load_checkpoint(tmp_path / "pub.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_growing_keeps_old_outputs_bit_identical():
    model = tiny()
    b_old = batch([0, 1, 2])
    before = outputs(model, b_old)
    old_lang = model.ar_language_embedding.weight.detach().clone()
    grow_languages(model, 5)
    resize_phonemes(model, 47)
    after = outputs(model, b_old)
    assert_same(before, after)
    for name in ("ar_language_embedding", "nar_language_embedding"):
        w = getattr(model, name).weight
        assert w.shape == (5, 64) and w.requires_grad
        assert torch.equal(w[3], w[:3].mean(0)) and torch.equal(w[4], w[:3].mean(0))
    assert torch.equal(model.ar_language_embedding.weight[:3], old_lang)
    for name in ("ar_text_embedding", "nar_text_embedding"):
        w = getattr(model, name).weight
        assert w.shape == (47, 64) and torch.equal(w[40], w[:40].mean(0))
    # The new language and new phonemes are usable, and trainable.
    out = model({**batch([3, 4, 0], num_phonemes=47)})
    out["loss"].backward()
    assert model.ar_language_embedding.weight.grad[3:].abs().sum() > 0
    assert model.config.num_languages == 5 and model.config.num_phonemes == 47
    with pytest.raises(CheckpointError, match="cannot shrink"):
        grow_languages(model, 2)


def test_training_export_with_report_loads_like_a_checkpoint(tmp_path):
    """A run's model.pt (plain state dict) + report.json rebuild the model: width/depth from the tensors."""
    model = tiny(d_model=32, num_layers=3)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "report.json").write_text(
        json.dumps({"model": {"size": "tiny", "languages": LANGS, "num_symbols": len(SYMBOLS)}})
    )
    back, meta = load_any(tmp_path / "model.pt", symbols=[*SYMBOLS, "later"], dropout=0.0)
    assert (back.config.d_model, back.config.num_layers, back.config.num_phonemes) == (32, 3, 41)
    assert meta["languages"] == LANGS and meta["symbols"]["list"] == SYMBOLS
    b = batch([0, 2, 1])
    assert_same(outputs(model, b), outputs(back, b))
    with pytest.raises(CheckpointError, match="trained with 40"):
        load_any(tmp_path / "model.pt", symbols=SYMBOLS[:30])
    (tmp_path / "report.json").unlink()
    with pytest.raises(CheckpointError, match="report.json"):
        load_any(tmp_path / "model.pt", symbols=SYMBOLS)
