"""``auto`` where the build's table does not decide: check each candidate variant here, time it, cache the choice.

An int8 graph's speed *and* its accuracy depend on the CPU that runs it (onnxruntime's u8 x s8 kernels can
saturate on x86-64 without VNNI; ARM and VNNI/AMX machines round differently), and so do another engine's
(OpenVINO in bf16 where AMX computes it: faster than int8 there, slower than onnxruntime's fp32 on a CPU
without AMX). So a build machine's gate and timings do not carry over to another CPU class, and no build
can time an engine for the CPU a tree is opened on. Each candidate runs the golden probe its build recorded
and must meet the thresholds its build gate used (``gate`` in its manifest entry: an int8 file's own, the
fp32 file's for another engine running it); a non-finite output or a miss refuses it here. The survivors
are timed beside onnxruntime fp32 on the role's workload (:data:`TIMED_AT`: one image, one query's tokens, a
batch of pairs for a reranker; a warm-up, then interleaved rounds within a time budget), and the fastest runs
only when it is at least MIN_SPEEDUP times faster than fp32 here.

The choice is cached per (CPU signature, engine versions, threads, the files' sha256, the workload) as one
JSON file in $MODELBAKE_VARIANT_CACHE, else ~/.cache/modelbake/variants when that can be written; never
inside the model tree. OpenVINO's compiled models are cached in its ``openvino`` folder. A read-only
container simply checks again at each start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.errors import first_line
from modelbake.manifest import ManifestError, Role, Variant
from modelbake.runtime import sessions
from modelbake.runtime.gates import kendall_tau, min_row_cosine, top_k_kept
from modelbake.runtime.golden import feeds_and_outputs, probe_rows, read_golden
from modelbake.runtime.sessions import checked_session, default_threads

log = logging.getLogger("modelbake")


@dataclass
class Choice:
    """The ONNX entry a role runs, why, and the session the check here already opened for it (if any);
    what :func:`modelbake.runtime.variants.choose` returns."""

    entry: dict[str, Any]
    why: str
    session: Any = None
    name: str | None = None  # another engine's variant running ``entry`` ("openvino/bf16"); None: the file's own

    @property
    def variant(self) -> str:
        return self.name or str(self.entry.get("variant", Variant.FP32))


CACHE_ENV = "MODELBAKE_VARIANT_CACHE"
ROUNDS = 7
MIN_ROUNDS = 3
BUDGET_S = 30.0  # the timing's total; a CPU too slow to finish MIN_ROUNDS in it runs fp32
# int8 must be this much faster here to replace fp32: a tie within timing noise (1.00x was measured on an
# AVX2 CPU for ViT-B/32's text tower) is no reason to give up fp32's accuracy.
MIN_SPEEDUP = 1.1
# What each role is timed on: (rows, at most this many positions where the graph's sequence axis is dynamic)
# of its golden probe's inputs, rows repeated where the probe has fewer. Engines compare differently by shape,
# so the timing runs what the role runs. A tower serves one image or one query at a time; a query's ids are
# cut after its end-of-text token, so 16 positions, not the probe's 77. A reranker scores a query's
# candidates in batches: OpenVINO bf16 against onnxruntime fp32 ran 0.93x on 1 pair of 16 tokens, 2.00x on 8
# pairs of 64 and 2.17x on 32 pairs of 96 (MiniLM-L6, AVX-512 BF16, 2 threads). 64 positions keep the check's
# cost near a tower's.
TIMED_AT: dict[str, tuple[int, int | None]] = {Role.TEXT_ENCODER: (1, 16), Role.RERANKER: (8, 64)}
# A pause before each timed run: a session's worker threads spin for a while after a run (onnxruntime's and
# OpenVINO's pools alike), and on a 2-core machine the previous session's spinning slows the next one. Single
# runs back to back measured OpenVINO bf16 1.31x onnxruntime fp32 (ViT-B/32 image, AVX-512 BF16) where each
# session timed alone in 0.5 s blocks gave 1.97x; 10 ms pauses gave 1.30x, 50 ms 2.44x.
QUIET_S = 0.05


def cache_dir(root: Path) -> Path | None:
    """Where choices are cached: $MODELBAKE_VARIANT_CACHE, else ~/.cache/modelbake/variants; None when it
    cannot be written or would lie inside the model tree ``root``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    folder = Path(configured).absolute() if configured else Path(os.path.expanduser("~/.cache/modelbake/variants"))
    if not folder.is_absolute() or folder.resolve().is_relative_to(root.resolve()):
        return None  # no home to expand "~" in (a uid without a passwd entry), or inside the model tree
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def openvino_cache(folder: Path | None) -> Path | None:
    """OpenVINO's compiled-model cache: ``openvino`` in the choices' folder (None: compile at every open)."""
    return None if folder is None else folder / "openvino"


def workload(role: str) -> tuple[int, int | None]:
    """What ``role`` is timed on: (rows, at most this many positions), :data:`TIMED_AT`."""
    return TIMED_AT.get(role, (1, None))


def timed_feeds(role: str, feeds: dict[str, np.ndarray], dynamic: set[str]) -> dict[str, np.ndarray]:
    """The inputs ``role`` is timed on here (:data:`TIMED_AT`), from its golden probe's ``feeds``; positions
    are cut only in the inputs named in ``dynamic`` (a graph with a fixed sequence axis runs what it takes)."""
    rows, positions = workload(role)
    batch = probe_rows(feeds, rows)
    return {k: v[:, :positions] if positions and k in dynamic and v.ndim == 2 else v for k, v in batch.items()}


def dynamic_positions(run: Any) -> set[str]:
    """The inputs of session ``run`` whose second axis (positions) is not fixed in the graph."""
    return {i.name for i in run.get_inputs() if len(i.shape) == 2 and not isinstance(i.shape[1], int)}


def timed_words(workload: dict[str, np.ndarray]) -> str:
    """What ``workload`` is, in a reason's words: "at batch 1", "at batch 8 x 64 positions"."""
    first = next(iter(workload.values()))
    return f"at batch {len(first)}" + (f" x {first.shape[1]} positions" if first.ndim == 2 else "")


def _key(here: dict[str, Any], entries: list[dict[str, Any]], threads: int | None, engines: list[str]) -> str:
    signature = {
        "cpu": here.get("cpu"),
        "arch": here.get("arch"),
        "isa": sorted(here.get("isa", [])),
        "onnxruntime": here.get("onnxruntime"),
        "threads": threads or default_threads() or 0,  # what the sessions will use
        "files": [[e.get("variant"), e["sha256"], e.get("gate")] for e in entries],
        "engines": [[name, (sessions.openvino_facts() or {}).get("version")] for name in engines],
        "timed": workload(entries[0]["role"]),  # a new workload times again
    }
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


def _cached(folder: Path | None, key: str, candidates: dict[str, dict[str, Any]]) -> Choice | None:
    if folder is None:
        return None
    try:
        doc = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    name = doc.get("variant")
    if name not in candidates:
        return None
    entry = candidates[name]
    own = name == entry.get("variant")
    return Choice(entry, f"{doc['why']} (checked here before, cached)", name=None if own else name)


def _store(folder: Path | None, key: str, choice: Choice) -> None:
    if folder is None:
        return
    try:  # atomic: a reader never sees half a file
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", suffix=".json", delete=False) as f:
            json.dump({"variant": choice.variant, "why": choice.why}, f)
        os.replace(f.name, folder / f"{key}.json")
    except OSError as exc:
        log.debug("variant choice not cached in %s: %s", folder, exc)


def accuracy_here(run: Any, root: Path, model: dict[str, Any], entry: dict[str, Any]) -> tuple[bool, str]:
    """``entry``'s graph (session ``run``) on its golden probe against the recorded reference outputs, under
    its recorded ``gate``: (passes, the figures in words)."""
    gate = entry.get("gate")
    if not gate:
        return False, "no gate recorded (built before modelbake checked variants where they run)"
    feeds, recorded = feeds_and_outputs(read_golden(root, model, entry))
    names, reference = list(recorded), list(recorded.values())
    outputs = run.run(names, feeds)
    if not all(np.isfinite(o).all() for o in outputs):
        return False, "non-finite outputs here"
    words, ok = [], True

    def measured(name: str, value: float, minimum: float) -> None:
        nonlocal ok
        ok &= value >= minimum
        words.append(f"{name} {value:.4f} here" + ("" if value >= minimum else f", below {minimum:g}"))

    if "min_cosine" in gate:
        cosine = min(min_row_cosine(r, o) for r, o in zip(reference, outputs, strict=True))
        measured("cosine", cosine, gate["min_cosine"])
    if "min_tau" in gate:
        scores, ref = np.ravel(outputs[0]), np.ravel(reference[0])
        measured("Kendall's tau", kendall_tau(scores, ref), gate["min_tau"])
        if not top_k_kept(scores, ref, int(gate.get("top_k", 0))):
            ok = False
            words.append(f"top {gate['top_k']} changed")
    return ok, ", ".join(words)


def time_here(runs: list[Any], feeds: dict[str, np.ndarray], budget_s: float = BUDGET_S) -> list[float] | None:
    """Median seconds per run of each session on ``feeds``, interleaved (each round runs all, in a rotating
    order, each run after a QUIET_S pause), after one warm-up each; None when ``budget_s`` ran out before
    MIN_ROUNDS rounds."""
    start = time.perf_counter()
    for run in runs:
        run.run(None, feeds)
    times: list[list[float]] = [[] for _ in runs]
    for r in range(ROUNDS):
        if time.perf_counter() - start > budget_s:
            break
        for i in np.roll(np.arange(len(runs)), r):
            time.sleep(QUIET_S)
            t = time.perf_counter()
            runs[i].run(None, feeds)
            times[i].append(time.perf_counter() - t)
    if len(times[0]) < MIN_ROUNDS:
        return None
    return [float(np.median(ts)) for ts in times]


def check_here(
    root: Path,
    model: dict[str, Any],
    fp32: dict[str, Any],
    others: list[dict[str, Any]],
    here: dict[str, Any],
    threads: int | None,
    engines: list[str] | None = None,
) -> Choice:
    """The variant of one role to run on this CPU: each of ``others`` (onnxruntime's other files) and of
    ``engines`` (other engines running ``fp32``'s file, under its ``gate``) checked on its golden probe, the
    ones that pass timed beside onnxruntime fp32; the fastest, or fp32. Cached (see the module's doc)."""
    engines = engines or []
    folder = cache_dir(root)
    key = _key(here, [fp32, *others], threads, engines)
    candidates = {str(e["variant"]): e for e in (fp32, *others)} | {name: fp32 for name in engines}
    if (cached := _cached(folder, key, candidates)) is not None:
        return cached
    started = time.perf_counter()
    passed, refusals = [], []
    for name in list(candidates)[1:]:
        entry = candidates[name]
        try:
            run = checked_session(root, model, entry, threads, variant=name, cache_dir=openvino_cache(folder))
        except (ManifestError, MemoryError):
            raise  # the tree itself is wrong, or the machine is out of memory: no candidate hides that
        except Exception as exc:  # an engine that cannot open the graph here is not a candidate here
            refusals.append(f"{name} could not be opened here: {first_line(exc)}")
            continue
        if (ran := getattr(run, "precision", None)) and not name.endswith(f"/{ran}"):  # asked for, not granted
            refusals.append(f"{name} runs {ran} here")
            continue
        ok, words = accuracy_here(run, root, model, entry)
        if ok:
            passed.append((name, run, words))
        else:
            refusals.append(f"{name} {words}")
    if passed:
        choice = _fastest(root, model, candidates, passed, threads)
        if refusals:  # the others too: a candidate that could not even be tried is part of the answer
            choice.why += f"; refused: {'; '.join(refusals)}"
    else:
        choice = Choice(fp32, "fp32: " + "; ".join(refusals))
    log.info("%s runs %s (checked here in %.2f s)", fp32["role"], choice.why, time.perf_counter() - started)
    _store(folder, key, choice)
    return choice


def _fastest(
    root: Path,
    model: dict[str, Any],
    candidates: dict[str, dict[str, Any]],
    passed: list[tuple[str, Any, str]],
    threads: int | None,
) -> Choice:
    """The candidates that ``passed`` (name, session, figures) timed beside onnxruntime fp32: the fastest when
    it is at least MIN_SPEEDUP faster, else fp32; the reason gives every one's ratio."""
    fp32 = candidates["fp32"]
    fp32_run = checked_session(root, model, fp32, threads)
    feeds, _ = feeds_and_outputs(read_golden(root, model, fp32))
    workload = timed_feeds(fp32["role"], feeds, dynamic_positions(fp32_run))
    at = timed_words(workload)
    medians = time_here([fp32_run, *(run for _, run, _ in passed)], workload)
    if medians is None:
        return Choice(fp32, f"fp32: timing the variants here took over {BUDGET_S:g} s", fp32_run)
    ratios = [medians[0] / m for m in medians[1:]]
    i = int(np.argmax(ratios))
    name, run, words = passed[i]
    timed = f"{name} {ratios[0]:.2f}x"
    if len(passed) > 1:  # each one's figures: why the others lost is part of the answer
        timed = ", ".join(f"{n} {r:.2f}x" for (n, _, _), r in zip(passed, ratios, strict=True))
        words = "; ".join(f"{n}: {w}" for n, _, w in passed)
    if ratios[i] < MIN_SPEEDUP:
        return Choice(fp32, f"fp32: {timed} fp32 {at} here, under {MIN_SPEEDUP:g}x ({words})", fp32_run)
    entry = candidates[name]
    also = f" ({timed})" if len(passed) > 1 else ""
    why = f"{name}: {ratios[i]:.2f}x fp32 {at} here{also}, {words}"
    return Choice(entry, why, run, name=None if name == entry.get("variant") else name)
