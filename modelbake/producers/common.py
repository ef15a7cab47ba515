"""What every producer shares: staged output (nothing half-written, even when killed: scratch lives beside
the output and the next run clears it; a whole tree swapped in by one rename), the model record, an offline
hub switch, tool versions, logging."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from modelbake.errors import ModelbakeError

log = logging.getLogger("modelbake")


class ProducerError(ModelbakeError):
    """A producer could not make what was asked; the message names the model, the problem and the fix."""


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def model_record(
    stage: str,
    kind: str,
    name: str,
    *,
    spec: str,
    source: dict[str, Any],
    tools: tuple[str, ...],
    files: list[dict[str, Any]],
    **sections: Any,
) -> dict[str, Any]:
    """One manifest model entry, the same shape for every kind (``sections``: preprocessing, details, notes)."""
    record = {"name": name, "kind": kind, "stage": stage, "spec": spec, "source": source}
    return {**record, "tools": tool_versions(*tools, "modelbake"), "files": files, **sections}


@contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face libraries with no hub at all inside the block (proves a saved folder is complete)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Where an export's memory peaks (bench/large_export.py, RSS sampled every 0.5 s): the whole PyTorch model,
# plus what torch.onnx.export holds for the tower it exports: about 4.7x the tower's weights while it
# serialises a graph under 2 GiB in memory (ViT-L-14's 1.2 GB image tower: 7.3 GB in all), about 2.2x above
# that, where it writes external data as it goes (ViT-H-14: 9.3 GB). Timing int8 beside fp32 holds both
# sessions and the quantiser's copies: about 3.8x the tower (ViT-H-14 with int8: 13.5 GB).
EXPORT_FACTOR_IN_MEMORY = 4.7
EXPORT_FACTOR_EXTERNAL = 2.2
INT8_FACTOR = 3.8
EXPORT_MEMORY_BASE = 500_000_000  # the interpreter and its libraries
SKIP_MEMORY_CHECK_ENV = "MODELBAKE_SKIP_MEMORY_CHECK"


def _peak_reset() -> None:
    with suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak resident memory in bytes (since the last reset, where Linux allows one)."""
    with suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def measured() -> Iterator[dict[str, Any]]:
    """What one model's build took, filled in on leaving the block: wall seconds and peak resident memory
    (reset at the start, so each model of a stage reports its own peak)."""
    _peak_reset()
    start = time.perf_counter()
    record: dict[str, Any] = {}
    yield record
    record.update(seconds=round(time.perf_counter() - start, 1), peak_rss_bytes=peak_rss())


def available_memory() -> int | None:
    """Bytes this process may still use: the kernel's MemAvailable, capped by a cgroup v2 limit (a container's
    or a Docker build's --memory); None when neither can be read."""
    limits = []
    with suppress(OSError, ValueError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        limits.append(int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024)
    with suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    return min(limits) if limits else None


def predicted_memory(towers: list[int], int8: bool = False) -> int:
    """Bytes exporting a model is expected to peak at, from the fp32 weights of each graph it exports
    (``towers``, bytes; they add up to the model): the model plus the exporter's copies of its largest
    tower, or with ``int8`` the int8 step's, whichever is more."""
    weights, largest = sum(towers), max(towers)
    export = max(t * (EXPORT_FACTOR_IN_MEMORY if t < 2**31 else EXPORT_FACTOR_EXTERNAL) for t in towers)
    peak = max(export, INT8_FACTOR * largest) if int8 else export
    return int(weights + peak + EXPORT_MEMORY_BASE)


def check_memory(what: str, towers: list[int], int8: bool = False) -> int:
    """Fail in one line, before anything loads, when exporting a model whose graphs hold ``towers`` bytes of
    fp32 weights (with its int8 variants) cannot fit in the memory available (:func:`predicted_memory`).
    Returns the prediction in bytes. $MODELBAKE_SKIP_MEMORY_CHECK=1 skips the refusal."""
    need = predicted_memory(towers, int8)
    have = available_memory()
    if have is not None and need > have and os.environ.get(SKIP_MEMORY_CHECK_ENV) != "1":
        with_int8 = " with int8 variants" if int8 else ""
        raise ProducerError(
            f"{what}: {sum(towers) / 4e9:.2f} B parameters ({sum(towers) / 1e9:.1f} GB in fp32, the largest tower "
            f"{max(towers) / 1e9:.1f} GB) need about {need / 1e9:.0f} GB of memory to export{with_int8}, and "
            f"{have / 1e9:.1f} GB is available here; use a machine (or a Docker memory limit) with more, or a "
            f"smaller model ({SKIP_MEMORY_CHECK_ENV}=1 tries anyway)"
        )
    return need
