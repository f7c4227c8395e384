"""Per-language validation records: where they go and how a person sees them.

Rank 0 sends each evaluation record to a :class:`MetricsSink` actor pinned to the driver's node, which
appends it to ``<train_dir>/metrics.jsonl`` — so metrics land next to the driver on any cluster,
without a shared filesystem. The driver drains the sink to print one compact line per evaluation,
and at the end writes ``report.json`` and a PNG of validation loss by language.
"""

from __future__ import annotations

import json
import math
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

    def restart_at(self, step: int | None) -> str | None:
        """Before a (re)started run appends: keep only the records up to ``step``, the step of the
        checkpoint it resumed from (None: none, keep nothing), and drop a torn last line. A note on what
        was cut (also shown by the driver), or None."""
        note = cut_metrics(self.path, step)
        if note:
            self.pending.append({"note": note})
        return note

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
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


def finite_only(value: Any, where: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every NaN/inf float replaced by None; their dotted paths appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(where or "value")
        return None
    if isinstance(value, dict):
        return {k: finite_only(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def strict_json(obj: Any, **kwargs) -> str:
    """Standard JSON (no NaN/Infinity tokens): non-finite numbers become null, and the object gets a
    ``nonfinite`` list naming where they were (a reader can tell "diverged" from "not measured")."""
    found: list[str] = []
    clean = finite_only(obj, "", found)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(found))
    return json.dumps(clean, allow_nan=False, **kwargs)


def _parse_lines(text: str, path) -> tuple[list[dict], bool]:
    """The records of a metrics.jsonl text, and whether its last line was torn (unterminated and not
    JSON: a writer killed mid-append, or one still writing). A bad line anywhere else is an error."""
    lines = text.split("\n")
    records, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated tail
                torn = True
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({line[:80]!r})") from None
    return records, torn


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a run being written, or killed mid-append) is
    left out; a resumed run cuts it from the file (:func:`cut_metrics`)."""
    p = Path(path)
    if not p.exists():
        return []
    return [r for r in _parse_lines(p.read_text(), p)[0] if "step" in r]


def cut_metrics(path: str | os.PathLike, step: int | None) -> str | None:
    """Rewrite metrics.jsonl (atomically) with only the records of steps <= ``step`` (None: none) and
    no torn tail: what a run restarting from the checkpoint of ``step`` continues. Records after that
    step belong to an abandoned timeline (a restart, a resume) and would otherwise be counted twice.
    Returns a note saying what was cut, or None when nothing was."""
    p = Path(path)
    if not p.exists():
        return None
    records, torn = _parse_lines(p.read_text(), p)
    keep = [r for r in records if step is not None and r.get("step", -1) <= step]
    dropped = len(records) - len(keep)
    if not dropped and not torn:
        return None
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
    os.replace(tmp, p)
    where = f"the checkpoint of step {step}" if step is not None else "the start (no checkpoint)"
    parts = [f"{dropped} record(s) after it"] if dropped else []
    parts += ["a torn last line (a write cut short)"] if torn else []
    return f"{p}: restarting from {where}: removed {' and '.join(parts)}"


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
        a = first["valid"].get(lang, {}).get("loss")
        b = last["valid"][lang]["loss"]
        if _number(a) and _number(b):
            rows.append(f"{lang:<10}{a:>18.3f}{b:>18.3f}{(b - a) / a * 100:>9.1f}%")
        else:  # diverged (non-finite: null in the file) or not evaluated at the first step
            rows.append(f"{lang:<10}{_fmt3(a):>18}{_fmt3(b):>18}{'-':>10}")
    return "\n".join(rows)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt3(x) -> str:
    return f"{x:.3f}" if _number(x) else "n/a"


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
        scored = [s for s in series if _number(s[1]["loss"])]  # a diverged evaluation is no one's best
        best_step, best = min(scored, key=lambda s: s[1]["loss"]) if scored else (None, None)
        a, b = series[0][1]["loss"], series[-1][1]["loss"]
        per_lang[lang] = {
            "first": series[0][1],
            "last": series[-1][1],
            "best": best,
            "best_step": best_step,
            "relative_change": (b - a) / a if _number(a) and _number(b) and a else None,
        }
    return {
        "steps": records[-1]["step"] if records else 0,
        "evaluations": len(records),
        "languages": per_lang,
        "realized_fractions": records[-1].get("realized_fractions", {}) if records else {},
        **extra,
    }
