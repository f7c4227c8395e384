"""``data.weights=online`` on a Train worker: the weights and the rows of each stretch between evaluations.

Static weights reach the workers as one Ray Data stream the driver builds before training; online
weights are not known before the evaluation that sets them, so each worker reads its own rows:

- a *stretch* is the steps between two evaluations; its rows are one :class:`vallex.data.mixing.MixPlan`
  at the weights the last evaluation set, of exactly ``steps x grad_accum x batch_size x workers``
  rows, every language's stream continuing where the previous stretch left it
  (:class:`vallex.data.mixing.Stretches`);
- every rank computes the same plan and reads its own share of it (:func:`vallex.data.mixing.rank_share`:
  a contiguous part of each language's stream, the plan's per-language rows split exactly between the
  ranks), so the ranks draw disjoint rows of one stretch, each in the stretch's ratios, and a rank reads
  only the row groups holding its own rows;
- at the evaluation closing a stretch, the all-reduced per-language validation losses update the
  weights (:class:`vallex.data.online.OnlineWeights`) on every rank, and rank 0's log-weights are
  broadcast so that no rounding difference can ever split the ranks' plans;
- the checkpoint holds the weights' state and history and the streams' positions (:meth:`OnlineMix.state`),
  so a resumed run plans the next stretch exactly as the uninterrupted run would have.

Reads happen in the training process, one window at a time, with no read-ahead: a step waits for
its window's row groups. Bytes read per row delivered do not grow with ranks (bench/online_reads.py,
docs/BENCHMARKS.md). Not yet measured against the Ray Data stream of static weights; a read-ahead
thread would hide the reads on GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from vallex.data.mixing import MixPlan, Stretches, group_reader, numpy_batches, rank_rows
from vallex.data.online import OnlineSettings, OnlineWeights


class OnlineMix:
    """One rank's online weights and stretch positions; built by every rank alike."""

    def __init__(self, prior: dict[str, float], online: dict, base: MixPlan, state: dict | None = None):
        if state:
            self.weights = OnlineWeights.from_dict(state["weights"])
            self.stretches = Stretches.restore(base, state["stretches"])
        else:
            self.weights = OnlineWeights(
                dict(prior), OnlineSettings(**online["settings"]), online.get("reference")
            )
            self.stretches = Stretches(base)
        self.current: MixPlan | None = None  # the stretch being drawn
        self.drawn: dict[str, float] = {}  # its weights

    def state(self) -> dict:
        """Plain data for the checkpoint (vallex_state.json)."""
        return {"weights": self.weights.to_dict(), "stretches": self.stretches.state()}

    def batches(
        self,
        progress: dict,
        stretch_end: Callable[[int], int],
        *,
        rank: int,
        world: int,
        batch_size: int,
        grad_accum: int,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This rank's batches, stretch after stretch. A stretch is planned when its first batch is
        asked for, i.e. after the evaluation that ended the previous one updated the weights."""
        reader = group_reader()  # a tiny language's group is read once, not once per stretch
        while True:
            start = progress["step"]
            steps = stretch_end(start) - start
            self.drawn = self.weights.weights
            self.current = self.stretches.plan(self.drawn, steps * grad_accum * batch_size * world)
            yield from numpy_batches(
                rank_rows(self.current, rank, world, batch_size, reader=reader), batch_size
            )

    def update(self, step: int, valid: dict, device) -> dict:
        """At the evaluation that closes a stretch (a collective: every rank calls it): mark the
        stretch drawn, update the weights from the validation losses; the record's ``online`` entry."""
        rows = self.stretches.advance(self.current) if self.current is not None else {}
        drawn, self.current = self.drawn, None
        langs = list(self.weights.prior)
        by_rank = _gather([drawn.get(lang, 0.0) for lang in langs], device)
        losses = {lang: valid[lang]["loss"] for lang in langs if lang in valid}
        bad = sorted(lang for lang in langs if not _finite(losses.get(lang)))
        out: dict = {}
        if bad:  # the weights stay; the run decides (train.on_nonfinite) whether it goes on
            out["kept"] = f"no finite validation loss for {bad}: the weights stay as they were"
        else:
            self.weights.update(step, losses)
            self._weights_of_rank_0(device)
            out["signal"] = self.weights.history[-1]["signal"]
        out.update(
            {
                "weights": self.weights.weights,
                "stretch": {"index": self.stretches.index - 1, "weights": drawn, "rows": rows},
                "drawn_by_rank": [dict(zip(langs, w, strict=True)) for w in by_rank],
            }
        )
        return out

    def _weights_of_rank_0(self, device) -> None:
        """Every rank takes rank 0's log-weights: the losses are all-reduced, so the ranks' own updates
        agree already, but a rank whose plan differed by one row would draw other rows than the rest."""
        if not dist.is_initialized():
            return
        langs = list(self.weights.logits)
        t = torch.tensor([self.weights.logits[lang] for lang in langs], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        self.weights.logits = dict(zip(langs, t.tolist(), strict=True))
        self.weights.history[-1]["weights"] = self.weights.weights


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _gather(values: list[float], device) -> list[list[float]]:
    """Each rank's ``values`` (a collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [t.tolist()]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
