"""Time the gated variants of one ONNX role side by side on the build machine, and decide what ships.

A variant that is slower than fp32 at batch 1 here is not shipped unless the build forces it: int8 is not
faster everywhere (dynamic int8 made a real-size RN50 image tower 3.7-5.3x slower than fp32 on 2-core
machines, because its convolutions run as integer kernels with float glue around each one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.manifest import Variant
from modelbake.runtime.golden import probe_rows
from modelbake.runtime.sessions import session, threads_from_env
from modelbake.runtime.variants import machine

BATCHES = (1, 8)
ROUNDS = 5


@dataclass
class Candidate:
    """One gated graph of a role: its variant, file (external data beside it), gate figures and how it was made."""

    variant: Variant
    graph: Path
    figures: dict[str, Any]
    batch_ms: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.figures.get("method", "export"))


def measure(
    candidates: list[Candidate], probe: dict[str, np.ndarray], threads: int | None = None, rounds: int = ROUNDS
) -> None:
    """Fill each candidate's ``batch_ms``: median milliseconds per run at each of BATCHES.

    Interleaved (every round runs every candidate, in a rotating order) so that a noisy neighbour or a
    frequency change hits all of them alike; one untimed warm-up run each.
    """
    sessions = [session(c.graph, threads) for c in candidates]
    for size in BATCHES:
        feeds = probe_rows(probe, size)
        for s in sessions:
            s.run(None, feeds)
        times: list[list[float]] = [[] for _ in candidates]
        for r in range(rounds):
            for i in np.roll(np.arange(len(candidates)), r):
                start = time.perf_counter()
                sessions[i].run(None, feeds)
                times[i].append(time.perf_counter() - start)
        for candidate, ts in zip(candidates, times, strict=True):
            candidate.batch_ms[str(size)] = round(float(np.median(ts)) * 1e3, 4)


def decide(fp32: Candidate, others: list[Candidate], keep_slower: bool) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """(what ships besides fp32, what does not and why): per variant the fastest candidate at batch 1, if it
    beats fp32 at batch 1 or ``keep_slower``."""
    ships, dropped = [], []
    for variant in dict.fromkeys(c.variant for c in others):
        ranked = sorted((c for c in others if c.variant == variant), key=lambda c: c.batch_ms["1"])
        best = ranked[0]
        for c in ranked[1:]:
            dropped.append(_dropped(c, f"{best.method} was faster at batch 1 ({best.batch_ms['1']:.3g} ms)"))
        if best.batch_ms["1"] <= fp32.batch_ms["1"] or keep_slower:
            ships.append(best)
        else:
            ratio = best.batch_ms["1"] / fp32.batch_ms["1"]
            why = (
                f"{ratio:.2f}x slower than fp32 at batch 1 on the build machine ({best.batch_ms['1']:.3g} ms against "
                f"{fp32.batch_ms['1']:.3g} ms); INT8_SHIP=gated ships it anyway"
            )
            dropped.append(_dropped(best, why))
    return ships, dropped


def _dropped(candidate: Candidate, why: str) -> dict[str, Any]:
    return {"variant": str(candidate.variant), "method": candidate.method, "batch_ms": candidate.batch_ms, "why": why}


def record(candidate: Candidate, fp32: Candidate, threads: int | None) -> dict[str, Any]:
    """The ``speed`` block of a shipped variant's manifest entry."""
    return {
        "batch_ms": candidate.batch_ms,
        "vs_fp32": {b: round(fp32.batch_ms[b] / ms, 3) for b, ms in candidate.batch_ms.items() if ms > 0},
        "threads": threads or threads_from_env() or machine()["cores"],
        "rounds": ROUNDS,
        "machine": machine(),
    }
