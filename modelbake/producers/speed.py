"""Time the gated variants of one ONNX role side by side on the build machine, and decide what ships.

A variant that is slower than fp32 here on the role's workload is not shipped unless the build forces it:
int8 is not faster everywhere (dynamic int8 made a real-size RN50 image tower 3.7-5.3x slower than fp32 on
2-core machines, because its convolutions run as integer kernels with float glue around each one).

The workload and the timing are the open-time check's (:data:`.variant_check.TIMED_AT`,
:func:`.variant_check.time_here`): one image, one query's tokens, a batch of pairs for a reranker; paused,
interleaved rounds. So the build's table and the check rank variants on the same runs, and ``auto`` trusts
the table only when it was timed on the workload the check would use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.manifest import Variant
from modelbake.runtime.sessions import default_threads, session
from modelbake.runtime.variant_check import ROUNDS, dynamic_positions, time_here, timed_feeds, timed_words, workload
from modelbake.runtime.variants import machine


@dataclass
class Candidate:
    """One gated graph of a role: its variant, file (external data beside it), gate figures and how it was made."""

    variant: Variant
    graph: Path
    figures: dict[str, Any]
    batch_ms: dict[str, float] = field(default_factory=dict)  # rows of the role's workload -> median ms

    @property
    def method(self) -> str:
        return str(self.figures.get("method", "export"))

    @property
    def ms(self) -> float:
        """Median milliseconds per run on the role's workload."""
        return next(iter(self.batch_ms.values()))


@dataclass(frozen=True)
class Timing:
    """What the candidates were timed on: the role's workload spec and its words ("at batch 8 x 64 positions")."""

    role: str
    at: str

    def record(self) -> dict[str, Any]:
        rows, positions = workload(self.role)
        return {"timed_at": [rows, positions], "at": self.at}


def measure(candidates: list[Candidate], probe: dict[str, np.ndarray], role: str, threads: int | None = None) -> Timing:
    """Fill each candidate's ``batch_ms``: its median milliseconds per run on ``role``'s workload, cut from
    ``probe`` as the open-time check cuts it, timed as the check times (a warm-up, paused interleaved rounds)."""
    sessions = [session(c.graph, threads) for c in candidates]
    feeds = timed_feeds(role, probe, dynamic_positions(sessions[0]))
    medians = time_here(sessions, feeds, budget_s=math.inf)
    assert medians is not None  # no budget: every round runs
    rows = str(len(next(iter(feeds.values()))))
    for candidate, median in zip(candidates, medians, strict=True):
        candidate.batch_ms = {rows: round(median * 1e3, 4)}
    return Timing(role, timed_words(feeds))


def decide(
    fp32: Candidate, others: list[Candidate], keep_slower: bool, timing: Timing
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """(what ships besides fp32, what does not and why): per variant the fastest candidate on the role's
    workload, if it beats fp32 there or ``keep_slower``."""
    ships, dropped = [], []
    for variant in dict.fromkeys(c.variant for c in others):
        ranked = sorted((c for c in others if c.variant == variant), key=lambda c: c.ms)
        best = ranked[0]
        for c in ranked[1:]:
            dropped.append(_dropped(c, f"{best.method} was faster {timing.at} ({best.ms:.3g} ms)"))
        if best.ms <= fp32.ms or keep_slower:
            ships.append(best)
        else:
            why = (
                f"{best.ms / fp32.ms:.2f}x slower than fp32 {timing.at} on the build machine ({best.ms:.3g} ms "
                f"against {fp32.ms:.3g} ms); INT8_SHIP=gated ships it anyway"
            )
            dropped.append(_dropped(best, why))
    return ships, dropped


def _dropped(candidate: Candidate, why: str) -> dict[str, Any]:
    return {"variant": str(candidate.variant), "method": candidate.method, "batch_ms": candidate.batch_ms, "why": why}


def record(candidate: Candidate, fp32: Candidate, timing: Timing, threads: int | None) -> dict[str, Any]:
    """The ``speed`` block of a shipped variant's manifest entry."""
    return {
        "batch_ms": candidate.batch_ms,
        "vs_fp32": {b: round(fp32.batch_ms[b] / ms, 3) for b, ms in candidate.batch_ms.items() if ms > 0},
        **timing.record(),
        "threads": threads or default_threads() or machine()["cores"],
        "rounds": ROUNDS,
        "machine": machine(),
    }
