"""Which variant of an ONNX role to run: the machine's facts, and the choice from the build's timings.

The build measures every variant it ships on its own CPU and records the figures (``speed``) in each ONNX
entry, with the facts of that machine (:func:`machine`). ``auto`` trusts those figures only where they
apply: on a CPU with the same architecture and the same instruction-set extensions that onnxruntime's
int8 and fp32 kernels dispatch on. Elsewhere it runs fp32, the variant every gate compares against.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

from modelbake.manifest import Variant, onnx_entry

AUTO = "auto"
# The extensions onnxruntime's CPU kernels dispatch on (int8 GEMM above all): two CPUs that agree on these
# run a graph with the same kernels, so one's timings rank the variants for the other.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


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


def requested(variant: str | None, int8: bool = False) -> str:
    """A loader's variant request: ``auto`` (default), or an explicit variant; ``int8=True`` means int8."""
    if int8 and variant in (None, AUTO):
        return Variant.INT8
    value = variant or AUTO
    if value != AUTO and value not in set(Variant):
        raise ValueError(f"variant {value!r}: use auto or one of {', '.join(Variant)}")
    return value


def choose(model: dict[str, Any], role: str, variant: str = AUTO, here: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ONNX entry of ``model``'s ``role`` to run.

    An explicit variant must exist (LookupError naming what does). ``auto``: the entry with the smallest
    recorded batch-1 latency when the recording machine has this one's kernels, otherwise fp32.
    """
    if variant != AUTO:
        return onnx_entry(model, role, variant)
    fp32 = onnx_entry(model, role, Variant.FP32)
    timed = [e for e in model["files"] if e["role"] == role and "variant" in e and _batch1(e) is not None]
    if not timed or not all(same_kernels(e["speed"].get("machine"), here) for e in timed):
        return fp32
    return min(timed, key=lambda e: (_batch1(e), e["variant"] != Variant.FP32))


def _batch1(entry: dict[str, Any]) -> float | None:
    return entry.get("speed", {}).get("batch_ms", {}).get("1")
