"""Per-language validation records: where they go and how a person sees them.

Rank 0 sends each evaluation record to a :class:`MetricsSink` actor pinned to the driver's node, which
appends it to ``<train_dir>/metrics.jsonl`` — so metrics land next to the driver on any cluster,
without a shared filesystem. The driver drains the sink to print one compact line per evaluation,
and at the end writes ``report.json`` and a PNG of validation loss by language.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray


@ray.remote(num_cpus=0)
class MetricsSink:
    """Collects evaluation records from rank 0; appends them to metrics.jsonl as they arrive."""

    def __init__(self, path: str, truncate: bool, tensorboard_dir: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate and self.path.exists():
            self.path.unlink()
        self.pending: list[dict] = []
        self.tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending.append(record)
        if self.tb is not None:
            step = record["step"]
            if record["train_loss"] is not None:  # None at step 0 (evaluated before training)
                self.tb.add_scalar("train/loss", record["train_loss"], step)
            self.tb.add_scalar("train/lr", record["lr"], step)
            self.tb.add_scalar("train/samples_per_s", record["samples_per_s"], step)
            if record.get("padding_fraction") is not None:
                self.tb.add_scalar("train/padding_fraction", record["padding_fraction"], step)
            for lang, v in record["valid"].items():
                for key in ("loss", "ar_loss", "nar_loss", "ar_top10", "nar_top10"):
                    if v[key] is not None:
                        self.tb.add_scalar(f"valid_{key}/{lang}", v[key], step)
            for lang, f in record.get("realized_fractions", {}).items():
                self.tb.add_scalar(f"mix_fraction/{lang}", f, step)
            self.tb.flush()

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


def sink_on_this_node(path: str, truncate: bool, tensorboard_dir: str | None = None):
    """A MetricsSink scheduled on the calling (driver) node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return MetricsSink.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ).remote(path, truncate, tensorboard_dir)


def flat_metrics(record: dict) -> dict[str, float]:
    """What every rank reports to Ray Train at an evaluation (Tune sees rank 0's): step, train loss,
    ``<loss>/<lang>`` for loss, ar_loss, nar_loss, and the mean and max of ``loss`` over languages."""
    out: dict[str, float] = {"step": record["step"]}
    if record["train_loss"] is not None:
        out["train_loss"] = record["train_loss"]
    if record.get("padding_fraction") is not None:
        out["padding_fraction"] = record["padding_fraction"]
    for lang, v in sorted(record["valid"].items()):
        for key in ("loss", "ar_loss", "nar_loss"):
            if v[key] is not None:
                out[f"{key}/{lang}"] = v[key]
    losses = [v["loss"] for v in record["valid"].values()]
    if losses:
        out["loss_mean"] = sum(losses) / len(losses)
        out["loss_max"] = max(losses)
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_record(rec: dict, max_steps: int) -> str:
    """One compact terminal line: step, train loss, per-language valid AR/NAR loss, throughput."""
    langs = " ".join(
        f"{lang} {_fmt(v['ar_loss'])}/{_fmt(v['nar_loss'])}" for lang, v in sorted(rec["valid"].items())
    )
    fr = " ".join(f"{lang}:{f:.2f}" for lang, f in sorted(rec.get("realized_fractions", {}).items()))
    pad = rec.get("padding_fraction")
    return (
        f"step {rec['step']:>5}/{max_steps} | train {_fmt(rec['train_loss'])} | valid ar/nar {langs} | "
        f"mix {fr} ({rec.get('languages_per_batch', 0):.1f} lang/batch, "
        f"{'-' if pad is None else f'{pad:.0%}'} padding) | {rec.get('samples_per_s', 0):.1f} utt/s"
    )


def loss_table(records: list[dict]) -> str:
    """Per-language validation loss (AR+NAR) at the first and last evaluation."""
    if not records:
        return "(no evaluations)"
    first, last = records[0], records[-1]
    rows = [
        f"{'language':<10}{'first (step ' + str(first['step']) + ')':>18}{'last (step ' + str(last['step']) + ')':>18}{'change':>10}"
    ]
    for lang in sorted(last["valid"]):
        a = first["valid"][lang]["loss"]
        b = last["valid"][lang]["loss"]
        rows.append(f"{lang:<10}{a:>18.3f}{b:>18.3f}{(b - a) / a * 100:>9.1f}%")
    return "\n".join(rows)


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """PNG: validation loss (AR+NAR) by language over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for lang in sorted(records[-1]["valid"]):
        steps = [r["step"] for r in records if lang in r["valid"]]
        for ax, key in zip(axes, ("ar_loss", "nar_loss"), strict=True):
            values = [r["valid"][lang][key] for r in records if lang in r["valid"]]
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker=".", label=lang)
    for ax, title in zip(axes, ("AR validation loss", "NAR validation loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_report(records: list[dict], extra: dict[str, Any]) -> dict:
    """report.json: per language first/best/last validation loss and accuracies, plus run facts."""
    per_lang: dict[str, dict] = {}
    for lang in sorted(records[-1]["valid"]) if records else []:
        series = [(r["step"], r["valid"][lang]) for r in records if lang in r["valid"]]
        best_step, best = min(series, key=lambda s: s[1]["loss"])
        per_lang[lang] = {
            "first": series[0][1],
            "last": series[-1][1],
            "best": best,
            "best_step": best_step,
            "relative_change": (series[-1][1]["loss"] - series[0][1]["loss"]) / series[0][1]["loss"],
        }
    return {
        "steps": records[-1]["step"] if records else 0,
        "evaluations": len(records),
        "languages": per_lang,
        "realized_fractions": records[-1].get("realized_fractions", {}) if records else {},
        **extra,
    }
