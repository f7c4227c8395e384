"""VallexModel: reference layout, per-sample losses, causality, padding invariance, learning, generation."""

from __future__ import annotations

import pytest
import torch

from vallex.model.vallex import MODEL_SIZES, OUTPUT_KEYS, VallexConfig, build_model

NUM_PHONEMES, NUM_LANGUAGES, Q, K = 40, 3, 8, 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("tiny", num_phonemes=NUM_PHONEMES, num_languages=NUM_LANGUAGES, **overrides)


def make_batch(lens, code_lens, seed=0, pad_value=7):
    """Random utterances; padding beyond each length is filled with junk, as the model must ignore it."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = len(lens), max(lens), max(code_lens)
    phonemes = torch.randint(1, NUM_PHONEMES, (B, S), generator=g)
    codes = torch.randint(0, K, (B, T, Q), generator=g)
    for i, (s, t) in enumerate(zip(lens, code_lens, strict=True)):
        phonemes[i, s:] = 0
        codes[i, t:] = pad_value
    return {
        "phonemes": phonemes,
        "phoneme_lens": torch.tensor(lens),
        "codes": codes,
        "code_lens": torch.tensor(code_lens),
        "language": torch.randint(0, NUM_LANGUAGES, (B,), generator=g),
    }


def select(batch, i, S=None, T=None):
    """Sample i alone, optionally re-padded to S phonemes / T frames with different junk."""
    one = {k: v[i : i + 1].clone() for k, v in batch.items()}
    s, t = int(one["phoneme_lens"]), int(one["code_lens"])
    if S is not None:
        ph = torch.full((1, S), 0, dtype=torch.long)
        ph[:, :s] = one["phonemes"][:, :s]
        one["phonemes"] = ph
    if T is not None:
        codes = torch.full((1, T, Q), 1023, dtype=torch.long)  # junk, but a valid id is not required
        codes[:, :t] = one["codes"][:, :t]
        one["codes"] = codes
    return one


# ----------------------------------------------------------------------- config and sizes


def test_unknown_size_and_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown model size 'huge'.*\['paper', 'small', 'tiny'\]"):
        build_model("huge", num_phonemes=10, num_languages=1)
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['d_modle'\]"):
        build_model("tiny", num_phonemes=10, num_languages=1, d_modle=32)
    with pytest.raises(ValueError, match="d_model=100 must be divisible by nhead=3"):
        VallexConfig(d_model=100, nhead=3, num_layers=1, num_phonemes=10, num_languages=1)
    with pytest.raises(ValueError, match="prefix_mode"):
        VallexConfig(d_model=64, nhead=2, num_layers=1, num_phonemes=10, num_languages=1, prefix_mode=2)
    assert set(MODEL_SIZES) == {"tiny", "small", "paper"}


def reference_state_dict_shapes(d=1024, layers=12, text=2048, langs=3, q=8, k=1024):
    """Keys and shapes of Plachtaa/VALL-E-X ``VALLE(1024, 16, 12, prefix_mode=1, share_embedding=True,
    prepend_bos=True, num_quantizers=8)`` (models/vallex.py, modules/transformer.py, modules/embedding.py,
    modules/activation.py; NUM_TEXT_TOKENS=2048 in models/macros.py, 3 languages in VALLE.language_ID)."""
    shapes = {}

    def emb(name, rows):
        shapes[f"{name}.word_embeddings.weight"] = (rows, d)

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def layer_norm(name):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (d,)

    def ada_norm(name):
        linear(f"{name}.project_layer", d, 2 * d)
        layer_norm(f"{name}.norm")

    def decoder(name, norm):
        for i in range(layers):
            p = f"{name}.layers.{i}"
            shapes[f"{p}.self_attn.in_proj_weight"] = (3 * d, d)
            shapes[f"{p}.self_attn.in_proj_bias"] = (3 * d,)
            linear(f"{p}.self_attn.out_proj", d, d)
            linear(f"{p}.linear1", d, 4 * d)
            linear(f"{p}.linear2", 4 * d, d)
            norm(f"{p}.norm1")
            norm(f"{p}.norm2")
        norm(f"{name}.norm")

    for side in ("ar", "nar"):
        emb(f"{side}_text_embedding", text)
        emb(f"{side}_language_embedding", langs)
        shapes[f"{side}_text_position.alpha"] = shapes[f"{side}_audio_position.alpha"] = (1,)
    emb("ar_audio_embedding", k + 2)
    decoder("ar_decoder", layer_norm)
    linear("ar_predict_layer", d, k + 1, bias=False)
    emb("nar_audio_embeddings.0", k + 1)
    for j in range(1, q):
        emb(f"nar_audio_embeddings.{j}", k)
        emb(f"nar_stage_embeddings.{j - 1}", 1)
        linear(f"nar_predict_layers.{j - 1}", d, k, bias=False)
    decoder("nar_decoder", ada_norm)
    return shapes


def test_paper_size_has_the_reference_checkpoint_layout_and_parameter_count():
    with torch.device("meta"):  # shapes only: no 1.5 GB of memory, no init time
        model = build_model("paper", num_phonemes=2048, num_languages=3)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_state_dict_shapes()
    # 155,357,186 AR + 215,182,338 NAR; six NAR predict layers are the embedding tables of codebooks 3..8.
    assert model.num_parameters() == 370_539_524
    for j in range(6):
        assert model.nar_predict_layers[j].weight is model.nar_audio_embeddings[j + 2].weight
    assert not model.nar_text_position.alpha.requires_grad and model.ar_text_position.alpha.requires_grad


# ------------------------------------------------------------------------------ forward


def test_per_sample_outputs_and_token_counts():
    model = tiny()
    batch = make_batch([9, 5, 7], [30, 12, 21])
    batch["nar_stage"] = torch.tensor([1, 7, 3])
    batch["nar_prefix_lens"] = torch.tensor([8, 0, 5])
    out = model(batch)
    for key in OUTPUT_KEYS:
        assert out[key].shape == (3,) and out[key].dtype == torch.float32, key
    assert out["ar_tokens"].tolist() == [31, 13, 22]  # frames + EOS
    assert out["nar_tokens"].tolist() == [22, 12, 16]  # frames after the prompt prefix
    assert (out["ar_top10_correct"] <= out["ar_tokens"]).all() and (
        out["nar_top10_correct"] <= out["nar_tokens"]
    ).all()
    expected = out["ar_loss_sum"].sum() / 66 + out["nar_loss_sum"].sum() / 50
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert (
        model.ar_text_embedding.weight.grad is not None
        and model.nar_stage_embeddings[6].weight.grad is not None
    )

    ar_only = model(batch, train_stage="ar")
    assert ar_only["nar_loss_sum"].eq(0).all() and ar_only["nar_tokens"].eq(0).all()
    nar_only = model(batch, train_stage="nar")
    assert nar_only["ar_tokens"].eq(0).all() and nar_only["nar_tokens"].tolist() == [22, 12, 16]
    with pytest.raises(ValueError, match="train_stage must be one of"):
        model(batch, train_stage="AR")


def test_bad_batches_name_the_problem():
    model = tiny()
    batch = make_batch([4, 3], [10, 6])
    batch["codes"][1, 2, 5] = K
    with pytest.raises(ValueError, match=r"codes outside \[0, 1024\) in samples \[1\]"):
        model(batch)
    batch = make_batch([4, 3], [10, 6])
    with pytest.raises(ValueError, match=r"batch\['codes'\] has shape"):
        model({**batch, "codes": batch["codes"][..., :4]})
    with pytest.raises(KeyError, match="language"):
        model({k: v for k, v in batch.items() if k != "language"})


def test_ar_is_causal_over_audio_and_blind_to_padding():
    model = tiny().eval()
    batch = make_batch([8, 6], [20, 14])
    base = model.ar_logits(batch)
    assert base.shape == (2, 21, K + 1)

    t = 9  # change codebook-1 frame t: logits rows 0..t (which predict frames <= t) must not move
    changed = {**batch, "codes": batch["codes"].clone()}
    changed["codes"][:, t, 0] = (changed["codes"][:, t, 0] + 1) % K
    after = model.ar_logits(changed)
    torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(after[:, t + 1], base[:, t + 1])

    # Codebooks 2..Q never reach the AR; neither do frames or phonemes beyond the lengths.
    other = {**batch, "codes": batch["codes"].clone(), "phonemes": batch["phonemes"].clone()}
    other["codes"][..., 1:] = 3
    other["codes"][1, 14:] = 99
    other["phonemes"][1, 6:] = 5
    torch.testing.assert_close(model.ar_logits(other)[1, :15], base[1, :15])
    torch.testing.assert_close(model.ar_logits(other)[0], base[0])


def test_a_samples_losses_do_not_depend_on_padding_or_batch_mates():
    model = tiny().eval()
    batch = make_batch([6, 11], [15, 37], seed=3)
    together = model(batch)
    alone = model(select(batch, 0))
    repadded = model(select(batch, 0, S=20, T=50))
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(alone[key][0], together[key][0], rtol=1e-4, atol=1e-4, msg=key)
        torch.testing.assert_close(repadded[key][0], together[key][0], rtol=1e-4, atol=1e-4, msg=key)
    # eval-mode NAR draws are a function of the sample: the same numbers every time
    again = model(batch)
    torch.testing.assert_close(again["nar_loss_sum"], together["nar_loss_sum"])

    # Training mode, no dropout, samples at different NAR stages in one batch: still per sample.
    model = tiny(dropout=0.0).train()
    batch["nar_stage"], batch["nar_prefix_lens"] = torch.tensor([2, 6]), torch.tensor([3, 9])
    together = model(batch)
    alone = model(select(batch, 0, T=40))
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(alone[key][0], together[key][0], rtol=1e-4, atol=1e-4, msg=key)


def test_training_draws_cover_the_stages_and_the_reference_prefix_range():
    model = tiny().train()
    b = model._check_batch(make_batch([5] * 64, [40] * 63 + [3]))
    stages, prefixes = zip(*(model._nar_draw(b, {}) for _ in range(20)), strict=True)
    stages, prefixes = torch.cat(stages), torch.stack(prefixes)
    assert set(stages.tolist()) == set(range(1, Q))
    assert prefixes[:, :63].min() >= 10 and prefixes[:, :63].max() <= 19  # [len/4, 2 len/4)
    assert prefixes[:, 63].eq(0).all()  # too short for a prompt


def test_tiny_model_overfits_a_few_utterances():
    model = tiny(dropout=0.0)
    batch = make_batch([7, 9, 5], [24, 30, 18], seed=1)

    def eval_losses():  # eval mode: each sample's NAR stage and prompt are fixed, so before/after compare
        with torch.no_grad():
            out = model.eval()(batch)
        model.train()
        return (out["ar_loss_sum"].sum() / out["ar_tokens"].sum()).item(), (
            out["nar_loss_sum"].sum() / out["nar_tokens"].sum()
        ).item()

    ar0, nar0 = eval_losses()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(batch)["loss"]  # training draws: a new stage and prompt per sample every step
        opt.zero_grad()
        loss.backward()
        opt.step()
    ar1, nar1 = eval_losses()
    assert ar0 > 6.0 and ar1 < 0.1, (ar0, ar1)  # from ~ln(1025) to memorised codebook 1 and EOS
    assert nar1 < 0.1 * nar0, (nar0, nar1)


def test_bf16_autocast_and_activation_checkpointing():
    batch = make_batch([6, 4], [16, 10])
    batch["nar_stage"], batch["nar_prefix_lens"] = torch.tensor([3, 5]), torch.tensor([4, 2])
    plain = tiny(dropout=0.0)
    plain(batch)["loss"].backward()
    ckpt = tiny(dropout=0.0, activation_checkpointing=True)
    out = ckpt(batch)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], plain(batch)["loss"])
    g0 = plain.ar_decoder.layers[0].linear1.weight.grad
    torch.testing.assert_close(ckpt.ar_decoder.layers[0].linear1.weight.grad, g0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert abs(out["loss"].item() - plain(batch)["loss"].item()) < 0.1 * plain(batch)["loss"].item()


# ---------------------------------------------------------------------------- generate


def test_generate_greedy_is_deterministic_and_valid():
    model = tiny().eval()
    batch = make_batch([8, 5], [1, 1])
    args = (batch["phonemes"], batch["phoneme_lens"], batch["language"])
    first = model.generate(*args, top_k=1, max_frames=12)
    second = model.generate(*args, top_k=1, max_frames=12)
    assert len(first) == 2
    for a, b in zip(first, second, strict=True):
        assert a.dtype == torch.long and a.ndim == 2 and a.shape[1] == Q and 1 <= a.shape[0] <= 12
        assert a.min() >= 0 and a.max() < K
        assert torch.equal(a, b)

    # generate() decodes without dropout whatever the mode, and leaves the mode as it found it.
    model.train()
    assert all(
        torch.equal(a, b) for a, b in zip(first, model.generate(*args, top_k=1, max_frames=12), strict=True)
    )
    assert model.training

    # Sampling with a seeded generator is reproducible too, and within the codebook.
    s1 = model.generate(*args, top_k=50, top_p=0.9, max_frames=8, generator=torch.Generator().manual_seed(5))
    s2 = model.generate(*args, top_k=50, top_p=0.9, max_frames=8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) and a.max() < K for a, b in zip(s1, s2, strict=True))


def test_generate_kv_cache_matches_teacher_forced_logits():
    """Greedy AR tokens from the cached decoder equal the argmax of the full-sequence AR logits."""
    model = tiny().eval()
    batch = make_batch([9], [1])
    codes = model.generate(
        batch["phonemes"], batch["phoneme_lens"], batch["language"], top_k=1, max_frames=15
    )[0]
    T = codes.shape[0]
    forced = {**batch, "codes": codes[None], "code_lens": torch.tensor([T])}
    logits = model.ar_logits(forced)[0]
    assert torch.equal(logits[:T, :K].argmax(-1), codes[:, 0])


def test_generate_with_a_cross_lingual_prompt():
    model = tiny().eval()
    prompt = make_batch([6], [10], seed=4)
    target = make_batch([5], [1], seed=5)
    phonemes = torch.cat([prompt["phonemes"], target["phonemes"]], dim=1)  # prompt transcript, then text
    out = model.generate(
        phonemes,
        torch.tensor([11]),
        torch.tensor([2]),  # target language
        prompt_codes=prompt["codes"],
        prompt_language=torch.tensor([0]),
        prompt_phoneme_lens=torch.tensor([6]),
        top_k=1,
        max_frames=10,
    )[0]
    assert out.shape[1] == Q and 1 <= out.shape[0] <= 10 and out.max() < K
    # The prompt's language matters: the same call with a same-language prompt differs somewhere
    # (AR or NAR), since language embeddings are added to every phoneme.
    same = model.generate(
        phonemes, torch.tensor([11]), torch.tensor([2]), prompt_codes=prompt["codes"],
        prompt_language=torch.tensor([2]), prompt_phoneme_lens=torch.tensor([6]), top_k=1, max_frames=10,
    )[0]  # fmt: skip
    assert out.shape != same.shape or not torch.equal(out, same)


def test_batched_generation_equals_one_at_a_time():
    """Batched AR decoding (one KV cache, padded text hidden, each sample stopping at its own EOS or
    limit) gives the same greedy codes as decoding each sample alone, with and without a shared prompt."""
    model = tiny().eval()
    b = make_batch([9, 4, 13, 6], [1, 1, 1, 1], seed=3)
    args = (b["phonemes"], b["phoneme_lens"], b["language"])
    alone = model.generate(*args, top_k=1, max_frames=40, batched=False)
    together = model.generate(*args, top_k=1, max_frames=40, batched=True)
    lengths = [a.shape[0] for a in alone]
    assert 40 in lengths and min(lengths) < 40 and len(set(lengths)) >= 3  # EOS and limit both met
    assert all(torch.equal(a, t) for a, t in zip(alone, together, strict=True))

    prompt = make_batch([5], [12], seed=8)
    phonemes = torch.cat([prompt["phonemes"].expand(4, -1), b["phonemes"]], dim=1)
    # each row: the prompt's 5 phonemes, then its own text (padding moved after the text)
    for i, n in enumerate(b["phoneme_lens"].tolist()):
        phonemes[i, 5 : 5 + n] = b["phonemes"][i, :n]
        phonemes[i, 5 + n :] = 0
    kwargs = dict(
        prompt_codes=prompt["codes"].expand(4, -1, -1),
        prompt_language=torch.zeros(4, dtype=torch.long),
        prompt_phoneme_lens=torch.full((4,), 5),
        top_k=1,
        max_frames=30,
    )
    lens = b["phoneme_lens"] + 5
    alone = model.generate(phonemes, lens, b["language"], **kwargs, batched=False)
    together = model.generate(phonemes, lens, b["language"], **kwargs)  # auto: equal prompt lengths
    assert all(torch.equal(a, t) for a, t in zip(alone, together, strict=True))

    with pytest.raises(ValueError, match="batched decoding needs prompts of one length"):
        model.generate(
            phonemes,
            lens,
            b["language"],
            **kwargs,
            prompt_code_lens=torch.tensor([12, 11, 12, 12]),
            batched=True,
        )
