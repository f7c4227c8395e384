"""Per-language validation records: where they go and how a person sees them.

Rank 0 sends each evaluation record to a :class:`MetricsSink` actor pinned to the driver's node, which
appends it to ``<train_dir>/metrics.jsonl`` — so metrics land next to the driver on any cluster,
without a shared filesystem. The driver drains the sink to print one compact line per evaluation,
and at the end writes ``report.json`` and a PNG of validation loss (and text gain, PER) by language.
Rank 0 also sends each evaluation's listening samples, which the sink decodes into ``<train_dir>/samples/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ray

from vallex.files import save_figure


@ray.remote(num_cpus=0)
class MetricsSink:
    """Collects evaluation records from rank 0; appends them to metrics.jsonl as they arrive."""

    def __init__(
        self, path: str, truncate: bool, tensorboard_dir: str | None = None, codec: tuple | None = None
    ):
        self.path = Path(path)
        self.codec = codec  # (manifest codec dict, prepared dir): decodes the listening samples
        self.tokenizer = None
        self.codec_error: str | None = None  # why samples cannot be decoded (said once)
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
                for key in ("loss", "ar_loss", "nar_loss", "ar_top10", "nar_top10", *INTELLIGIBILITY_KEYS):
                    if v.get(key) is not None:
                        self.tb.add_scalar(f"valid_{key}/{lang}", v[key], step)
            for lang, f in record.get("realized_fractions", {}).items():
                self.tb.add_scalar(f"mix_fraction/{lang}", f, step)
            online = record.get("online") or {}
            for lang, w in online.get("weights", {}).items():  # data.weights=online: the next stretch's
                self.tb.add_scalar(f"online_weight/{lang}", w, step)
            for lang, x in (online.get("signal") or {}).items():
                self.tb.add_scalar(f"online_signal/{lang}", x, step)
            self.tb.flush()

    def samples(self, step: int, payload: dict) -> list[str]:
        """Decode rank 0's listening samples (codes per language) into ``samples/step_<N>/`` and TensorBoard."""
        from vallex.eval.intelligibility import open_codec, write_samples

        if self.codec is None or not payload or self.codec_error:
            return []
        try:
            if self.tokenizer is None:
                self.tokenizer = open_codec(*self.codec)
            paths = write_samples(self.path.parent, step, payload, self.tokenizer, self.tb)
        except Exception as e:  # noqa: BLE001 - listening is for people; training goes on without it
            self.codec_error = f"{type(e).__name__}: {e}"
            print(f"WARNING: listening samples are off: the codec cannot decode them ({self.codec_error})")
            return []
        if self.tb is not None:
            self.tb.flush()
        return [str(p) for p in paths]

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


def sink_on_this_node(
    path: str, truncate: bool, tensorboard_dir: str | None = None, codec: tuple | None = None
):
    """A MetricsSink scheduled on the calling (driver) node. ``codec``: ``(manifest codec dict,
    prepared dir)`` to decode listening samples with."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return MetricsSink.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ).remote(path, truncate, tensorboard_dir, codec)


def flat_metrics(record: dict) -> dict[str, float]:
    """What every rank reports to Ray Train at an evaluation (Tune sees rank 0's): step, train loss,
    ``<loss>/<lang>`` for loss, ar_loss, nar_loss, and the mean and max of ``loss`` over languages."""
    out: dict[str, float] = {"step": record["step"]}
    if record["train_loss"] is not None:
        out["train_loss"] = record["train_loss"]
    if record.get("padding_fraction") is not None:
        out["padding_fraction"] = record["padding_fraction"]
    for lang, v in sorted(record["valid"].items()):
        for key in ("loss", "ar_loss", "nar_loss", *INTELLIGIBILITY_KEYS):
            if v.get(key) is not None:
                out[f"{key}/{lang}"] = v[key]
    losses = [v["loss"] for v in record["valid"].values()]
    if losses:
        out["loss_mean"] = sum(losses) / len(losses)
        out["loss_max"] = max(losses)
    gains = [v["text_gain"] for v in record["valid"].values() if v.get("text_gain") is not None]
    if gains:
        out["text_gain_mean"] = sum(gains) / len(gains)
        out["text_gain_min"] = min(gains)
    pers = [v["per"] for v in record["valid"].values() if v.get("per") is not None]
    if pers:
        out["per_mean"] = sum(pers) / len(pers)
        out["per_max"] = max(pers)
    for lang, w in (record.get("online") or {}).get("weights", {}).items():
        out[f"online_weight/{lang}"] = w
    return out


# Per-language figures of vallex.eval.intelligibility, when measured (higher text gain, lower PER = better).
INTELLIGIBILITY_KEYS = ("text_gain", "ar_text_gain", "nar_text_gain", "per", "per_floor")


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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_record(rec: dict, max_steps: int) -> str:
    """One compact terminal line: step, train loss, per-language valid AR/NAR loss, text gain (AR, nats
    per frame) and PER of synthesized speech (with the recognizer's floor on the ground truth), mix,
    throughput."""
    valid = sorted(rec["valid"].items())
    langs = " ".join(f"{lang} {_fmt(v['ar_loss'])}/{_fmt(v['nar_loss'])}" for lang, v in valid)
    parts = [f"valid ar/nar {langs}"]
    if any(v.get("text_gain") is not None for _, v in valid):
        parts.append("text gain " + " ".join(f"{lang} {_fmt(v.get('text_gain'))}" for lang, v in valid))
    if any(v.get("per") is not None for _, v in valid):
        parts.append(
            "PER " + " ".join(f"{lang} {_pct(v.get('per'))}/{_pct(v.get('per_floor'))}" for lang, v in valid)
        )
    fr = " ".join(f"{lang}:{f:.2f}" for lang, f in sorted(rec.get("realized_fractions", {}).items()))
    pad = rec.get("padding_fraction")
    online = rec.get("online") or {}
    if online.get("weights"):  # data.weights=online: what the next stretch draws
        parts.append(
            "next weights " + " ".join(f"{lang}:{w:.2f}" for lang, w in sorted(online["weights"].items()))
        )
    return (
        f"step {rec['step']:>5}/{max_steps} | train {_fmt(rec['train_loss'])} | {' | '.join(parts)} | "
        f"mix {fr} ({rec.get('languages_per_batch', 0):.1f} lang/batch, "
        f"{'-' if pad is None else f'{pad:.0%}'} padding) | {rec.get('samples_per_s', 0):.1f} utt/s"
    )


def loss_table(records: list[dict]) -> str:
    """Per language at the first and last evaluation: validation loss (AR+NAR) and its change, text
    gain (nats/frame) and PER of synthesized speech (with the recognizer's floor on the ground truth),
    when the run measured them."""
    if not records:
        return "(no evaluations)"
    first, last = records[0], records[-1]
    has_gain = any(v.get("text_gain") is not None for v in last["valid"].values())
    has_per = any(v.get("per") is not None for v in last["valid"].values())
    head = f"{'language':<10}{'loss first':>12}{'last':>9}{'change':>9}"
    if has_gain:
        head += f"{'text gain first':>17}{'last':>7}"
    if has_per:
        head += f"{'PER first':>11}{'last':>7}{'floor':>7}"
    rows = [f"first = step {first['step']}, last = step {last['step']}", head]
    for lang in sorted(last["valid"]):
        a = first["valid"].get(lang, {}).get("loss")
        b = last["valid"][lang]["loss"]
        change = f"{(b - a) / a * 100:>8.1f}%" if _number(a) and _number(b) and a else f"{'-':>9}"
        row = f"{lang:<10}{_fmt3(a):>12}{_fmt3(b):>9}{change}"
        if has_gain:
            row += f"{_fmt3(first['valid'].get(lang, {}).get('text_gain')):>17}"
            row += f"{_fmt3(last['valid'][lang].get('text_gain')):>7}"
        if has_per:
            row += f"{_pct(first['valid'].get(lang, {}).get('per')):>11}{_pct(last['valid'][lang].get('per')):>7}"
            row += f"{_pct(last['valid'][lang].get('per_floor')):>7}"
        rows.append(row)
    return "\n".join(rows)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt3(x) -> str:
    """A figure with 3 decimals; ``-`` when not measured (None), ``n/a`` when not a finite number."""
    if x is None:
        return "-"
    return f"{x:.3f}" if _number(x) else "n/a"


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """PNG: validation loss (AR+NAR) by language over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    panels = [("ar_loss", "AR validation loss"), ("nar_loss", "NAR validation loss")]
    if any(v.get("text_gain") is not None for r in records for v in r["valid"].values()):
        panels.append(("text_gain", "text gain (nats/frame; 0 = text ignored)"))
    if any(v.get("per") is not None for r in records for v in r["valid"].values()):
        panels.append(("per", "PER of synthesized speech (dotted: ground truth)"))
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(10, 4 * rows), squeeze=False)
    axes = axes.flatten()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lang in enumerate(sorted(records[-1]["valid"])):
        steps = [r["step"] for r in records if lang in r["valid"]]
        for ax, (key, _) in zip(axes, panels, strict=False):
            values = [r["valid"][lang].get(key) for r in records if lang in r["valid"]]
            color = colors[i % len(colors)]
            ax.plot(
                steps, [float("nan") if v is None else v for v in values], marker=".", label=lang, color=color
            )
            if key == "per":
                floor = [r["valid"][lang].get("per_floor") for r in records if lang in r["valid"]]
                ax.plot(steps, [float("nan") if v is None else v for v in floor], linestyle=":", color=color)
    for ax, (_, title) in zip(axes, panels, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def online_history(records: list[dict]) -> list[dict]:
    """data.weights=online: per evaluation, the weights it set for the next stretch, the signal that
    moved them, and the stretch it closed (weights drawn, rows per language)."""
    return [
        {"step": r["step"], **{k: r["online"].get(k) for k in ("weights", "signal", "stretch")}}
        for r in records
        if r.get("online")
    ]


def plot_online_weights(records: list[dict], path: str | os.PathLike) -> bool:
    """PNG of the online weights by language: each stretch's weights over the steps it covered, and
    the signal at each evaluation. False (nothing written) without online records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = online_history(records)
    if not history:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    langs = sorted(history[-1]["weights"])
    steps = [0] + [h["step"] for h in history]
    for lang in langs:
        drawn = [h["stretch"]["weights"].get(lang, 0.0) for h in history] + [history[-1]["weights"][lang]]
        top.step(steps, drawn, where="post", label=lang)
        signal = [(h["step"], (h["signal"] or {}).get(lang)) for h in history if h["signal"]]
        bottom.plot(
            [s for s, _ in signal],
            [float("nan") if x is None else x for _, x in signal],
            marker=".",
            label=lang,
        )
    top.set_title("online weights (each stretch's, from the step it starts)")
    bottom.set_title("signal at each evaluation (larger = more rows next)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


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
        # Intelligibility: first / best / last, best = highest text gain, lowest PER.
        for key, better in (("text_gain", max), ("per", min)):
            points = [(step, v[key]) for step, v in series if v.get(key) is not None]
            if points:
                best_step_k, best_k = better(points, key=lambda p: p[1])
                per_lang[lang][key] = {
                    "first": points[0][1],
                    "best": best_k,
                    "best_step": best_step_k,
                    "last": points[-1][1],
                    **({"floor": series[-1][1].get("per_floor")} if key == "per" else {}),
                }
    return {
        "steps": records[-1]["step"] if records else 0,
        "evaluations": len(records),
        "languages": per_lang,
        "realized_fractions": records[-1].get("realized_fractions", {}) if records else {},
        **extra,
    }
