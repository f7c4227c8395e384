"""Per-language validation losses and top-10 accuracies, all-reduced over the ranks of a run."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vallex.model.vallex import OUTPUT_KEYS

# Per-language sums all-reduced across ranks: the model's per-sample outputs, in its order.
EVAL_FIELDS = OUTPUT_KEYS


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(
    model_engine,
    valid_batches: dict[str, list],
    languages: list[str],
    device,
    train_stage: str,
    filler: dict[str, torch.Tensor],
) -> dict:
    """All-reduced per-language validation losses and top-10 accuracies.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively inside
    forward); a rank with fewer batches (or none: fewer validation rows than workers) runs ``filler``,
    a real batch whose results are discarded.
    """
    model_engine.eval()
    sums = torch.zeros(len(languages), len(EVAL_FIELDS), dtype=torch.float64, device=device)
    n_local = torch.tensor([sum(len(b) for b in valid_batches.values())], device=device)
    if dist.is_initialized():
        dist.all_reduce(n_local, op=dist.ReduceOp.MAX)
    n_max = int(n_local.item())
    work = [(li, b) for li, lang in enumerate(languages) for b in valid_batches.get(lang, [])]
    with torch.no_grad():
        for i in range(n_max):
            li, batch = work[i] if i < len(work) else (None, filler)
            out = model_engine(to_device(batch, device), train_stage=train_stage)
            if li is not None:
                sums[li] += torch.stack([out[f].sum().double() for f in EVAL_FIELDS])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model_engine.train()
    result = {}
    for li, lang in enumerate(languages):
        s = dict(zip(EVAL_FIELDS, sums[li].tolist(), strict=True))
        # A stage not run (train.train_stage=ar or nar) scored no tokens: its figures are None, not 0.
        ar = s["ar_loss_sum"] / s["ar_tokens"] if s["ar_tokens"] else None
        nar = s["nar_loss_sum"] / s["nar_tokens"] if s["nar_tokens"] else None
        result[lang] = {
            "ar_loss": ar,
            "nar_loss": nar,
            "loss": (ar or 0.0) + (nar or 0.0),
            "ar_top10": s["ar_top10_correct"] / s["ar_tokens"] if s["ar_tokens"] else None,
            "nar_top10": s["nar_top10_correct"] / s["nar_tokens"] if s["nar_tokens"] else None,
            "ar_tokens": int(s["ar_tokens"]),
            "nar_tokens": int(s["nar_tokens"]),
        }
    return result
