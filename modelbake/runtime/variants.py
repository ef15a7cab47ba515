"""Which variant of an ONNX role to run, and why: the machine's facts, the build's timings, a check here.

A variant is a file run by an engine at a precision: onnxruntime's ``fp32`` and ``int8`` (the files the
build shipped), and, where OpenVINO is installed, ``openvino/bf16`` or ``openvino/f32`` running the fp32
file (bf16 where OpenVINO says the CPU computes it natively: AMX, AVX-512 BF16).

The build measures every file variant it ships on its own CPU and records the figures (``speed``) in each
ONNX entry, with the facts of that machine (:func:`machine`). ``auto`` trusts those figures only where they
apply: on a CPU with the same architecture and the same instruction-set extensions that onnxruntime's
int8 and fp32 kernels dispatch on, and with no other engine to try. Otherwise a variant's speed *and*
accuracy are unknown (without VNNI, u8 x s8 products can saturate; bf16 keeps 8 bits of mantissa), so
``auto`` checks each candidate where the tree is opened (:mod:`.variant_check`: the golden probe under the
build's own thresholds, then timed beside onnxruntime fp32) and runs the fastest that passes, else fp32,
the variant every gate compares against.

``MODELBAKE_VARIANT`` (auto or a variant's name) sets what a loader asked for ``auto`` runs, process-wide.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from modelbake.manifest import Variant, onnx_entry
from modelbake.runtime import sessions, variant_check
from modelbake.runtime.sessions import OPENVINO, engine_of
from modelbake.runtime.variant_check import Choice

AUTO = "auto"
VARIANT_ENV = "MODELBAKE_VARIANT"
# The extensions onnxruntime's CPU kernels dispatch on (int8 GEMM above all): two CPUs that agree on these
# run a graph with the same kernels, so one's timings rank the variants for the other.
ISA_FLAGS = (
    *("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
    *("asimd", "asimddp", "i8mm", "bf16", "sve"),  # arm64's (its "Features" line): NEON, int8 dot products
)


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """This machine as the build records it: CPU model, architecture, ISA flags, onnxruntime version."""
    import onnxruntime as ort

    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu in ("unknown", "", platform.machine()):
                    cpu = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: no flags, so `auto` never trusts a table here
        pass
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "onnxruntime": ort.__version__,
        "cores": os.cpu_count() or 1,
    }


def same_kernels(recorded: dict[str, Any] | None, here: dict[str, Any] | None = None) -> bool:
    """Whether timings recorded on ``recorded`` rank variants for this machine (same arch and ISA flags)."""
    here = here or machine()
    if not recorded or not recorded.get("isa"):
        return False
    return recorded.get("arch") == here["arch"] and sorted(recorded["isa"]) == sorted(here["isa"])


# What OpenVINO can run: the fp32 file, at either precision.
OPENVINO_VARIANTS = (f"{OPENVINO}/bf16", f"{OPENVINO}/f32")
KNOWN = (*(str(v) for v in Variant), *OPENVINO_VARIANTS)


def requested(variant: str | None, int8: bool = False) -> str:
    """A loader's variant request: ``auto`` (default; $MODELBAKE_VARIANT when set), or an explicit variant;
    ``int8=True`` means int8."""
    if int8 and variant in (None, AUTO):
        return Variant.INT8
    value = variant or AUTO
    if value == AUTO and (forced := os.environ.get(VARIANT_ENV, "").strip().lower()):
        if forced != AUTO and forced not in KNOWN:
            raise ValueError(f"{VARIANT_ENV}={forced!r}: use auto or one of {', '.join(KNOWN)}, or leave it unset")
        return forced
    if value != AUTO and value not in KNOWN:
        raise ValueError(f"variant {value!r}: use auto or one of {', '.join(KNOWN)}")
    return value


def engine_variants(fp32: dict[str, Any]) -> list[str]:
    """The variants of other engines that may run ``fp32``'s file here: OpenVINO, when installed (and not left
    out of $MODELBAKE_ENGINES), at the best precision it computes in natively on this CPU. None at all for a
    file whose build recorded no ``gate`` for them (a tree built before modelbake tried other engines)."""
    enabled = sessions.engines_enabled()  # checked on every open, not only where OpenVINO is installed
    if OPENVINO not in enabled or not fp32.get("gate") or (facts := sessions.openvino_facts()) is None:
        return []
    return [f"{OPENVINO}/{'bf16' if 'bf16' in facts['precisions'] else 'f32'}"]


def choose(
    model: dict[str, Any],
    role: str,
    variant: str = AUTO,
    here: dict[str, Any] | None = None,
    *,
    root: Path | None = None,
    threads: int | None = None,
) -> Choice:
    """What ``model``'s ``role`` runs on this machine (``here``) and why.

    An explicit variant runs where the build shipped it, else fp32 (an int8 refused by its gate at build time
    is a normal outcome), the reason saying so. ``auto``: fp32 when it is the only one;
    the build's table (the smallest recorded latency on the role's workload) when the recording machine has this
    one's kernels; otherwise, given the tree's ``root``, each other variant checked and timed here
    (:func:`.variant_check.check_here`), else fp32.
    """
    if variant != AUTO:
        how = f" ({VARIANT_ENV})" if os.environ.get(VARIANT_ENV, "").strip().lower() == variant else ""
        if engine_of(variant)[0] == OPENVINO:
            return _openvino_asked(model, role, variant, how)
        if variant != Variant.FP32 and not any(
            e["role"] == role and e.get("variant") == variant for e in model["files"]
        ):  # an optional variant the build did not ship (refused by its gate, or not asked for)
            why = f"fp32: {variant} asked for{how}, but none was built for this role (see the build's notes)"
            return Choice(onnx_entry(model, role, Variant.FP32), why)
        return Choice(onnx_entry(model, role, variant), f"{variant}: asked for{how}")
    here = here or machine()
    fp32 = onnx_entry(model, role, Variant.FP32)
    others = [e for e in model["files"] if e["role"] == role and e.get("variant", Variant.FP32) != Variant.FP32]
    engines = engine_variants(fp32)
    if not others and not engines:
        return Choice(fp32, "fp32: the only variant built")
    timed = [e for e in (fp32, *others) if _timed_ms(e) is not None]
    trusted = len(timed) == 1 + len(others) and all(same_kernels(e["speed"].get("machine"), here) for e in timed)
    if trusted and not engines:  # the build's table ranks onnxruntime's files, never another engine
        best = min(timed, key=lambda e: (_timed_ms(e), e["variant"] != Variant.FP32))
        what = "fastest" if best is fp32 else f"{_timed_ms(fp32) / max(_timed_ms(best), 1e-9):.3g}x fp32"
        at = best["speed"]["at"]
        return Choice(best, f"{best['variant']}: {what} {at} on the build machine, whose ISA flags this CPU shares")
    if root is None:
        if trusted:
            where = "OpenVINO is installed"
        elif len(timed) < 1 + len(others):
            where = "the build timed them on another workload"
        else:
            where = "built on another CPU class"
        return Choice(fp32, f"fp32: {where}, and no tree to check the other variants in")
    return variant_check.check_here(root, model, fp32, others, here, threads, engines)


def _openvino_asked(model: dict[str, Any], role: str, variant: str, how: str) -> Choice:
    """An explicit OpenVINO variant: the fp32 file run by OpenVINO, at the precision asked for where this CPU
    computes it natively, else f32 (which OpenVINO would run anyway), the reason saying so."""
    fp32 = onnx_entry(model, role, Variant.FP32)
    facts = sessions.openvino_facts()
    if facts is None:
        why = f"fp32: {variant} asked for{how}, but OpenVINO is not installed here (runtime image: RUNTIME_OPENVINO=1)"
        return Choice(fp32, why)
    precision = engine_of(variant)[1]
    if precision not in facts["precisions"]:
        f32 = f"{OPENVINO}/f32"
        return Choice(fp32, f"{f32}: {variant} asked for{how}, this CPU computes no {precision}", name=f32)
    return Choice(fp32, f"{variant}: asked for{how}", name=variant)


def _timed_ms(entry: dict[str, Any]) -> float | None:
    """The build's median ms for ``entry`` on its role's workload; None when it was timed on another one
    (a tree built before the build timed what the open-time check times)."""
    speed = entry.get("speed", {})
    rows, positions = variant_check.workload(entry["role"])
    if speed.get("timed_at") != [rows, positions] or "at" not in speed:
        return None
    return speed.get("batch_ms", {}).get(str(rows))
