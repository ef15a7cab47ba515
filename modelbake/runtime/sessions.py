"""The one place inference sessions are made, for every engine: the build's gates, verify and every loader.

Two engines run a tree's graphs. onnxruntime runs each file the build shipped (fp32, int8). OpenVINO, when
installed (the runtime image built with RUNTIME_OPENVINO=1, or ``pip install openvino``), runs the fp32 file
at the precision asked for: bf16 where the CPU computes it natively (AMX, AVX-512 BF16), where OpenVINO
reports it among the CPU's capabilities; f32 elsewhere. Its sessions answer the calls the loaders make of
onnxruntime's (``run``, ``get_inputs``, ``get_outputs``), so a loader never knows which engine it holds.

A tree's graphs are opened by :func:`checked_session`: from the bytes the manifest check hashed, their
external data included, never from a path an engine would open again after the check.

Threads: the ``threads`` argument, else $MODELBAKE_THREADS, else the CPUs this process is granted when that
is fewer than the machine has (:func:`cpus_granted`), else the engine's default (one per core), the same
setting for both engines. onnxruntime's inter-op threads stay at 1 and OpenVINO runs one stream
(its latency hint): the graphs run sequentially, and a second pool only competes for the cores.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelbake.manifest import read_graph
from modelbake.spec import external_data_name

THREADS_ENV = "MODELBAKE_THREADS"
ENGINES_ENV = "MODELBAKE_ENGINES"
ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
# OpenVINO's names for the precisions it computes in, as a variant spells them.
_OV_PRECISIONS = {"bf16": "bf16", "bfloat16": "bf16", "f32": "f32", "fp32": "f32", "float32": "f32"}


def threads_from_env() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive number of threads, or leave it unset")
    return int(value)


def cpus_granted(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The CPUs this process may use when that is fewer than the machine has, else None: its affinity mask
    (docker --cpuset-cpus) and its cgroup's CPU quota (docker --cpus, a Kubernetes CPU limit), rounded up.
    onnxruntime sizes its pool to the machine's physical cores whatever the container may use
    (microsoft/onnxruntime#29510): a pod limited to 2 CPUs on a 64-core node would run 64 threads a call."""
    machine = os.cpu_count() or 1
    granted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        granted = min(granted, max(1, math.ceil(quota)))
    return granted if granted < machine else None


def cgroup_cpu_quota(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs a cgroup quota grants this process (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``): the lowest from its own cgroup up to ``root``, None when none is set or none can
    be read (not Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy
            base, read = root, _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own
            base = next((root / n for n in ("cpu,cpuacct", "cpu") if (root / n).is_dir()), root / "cpu")
            read = _v1_quota
        else:
            continue
        # In a container its own cgroup is usually mounted as the root (the path named may not exist there);
        # each level up may set its own limit, and the lowest binds.
        own = base / path.strip("/")
        levels = [level for level in (own, *own.parents) if level.is_relative_to(base)]
        quotas += [quota for quota in map(read, levels) if quota is not None]
    return min(quotas) if quotas else None


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota, period = (int((folder / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def default_threads() -> int | None:
    """Threads for a session when none are asked for: $MODELBAKE_THREADS, else :func:`cpus_granted`, else
    None (the engine's own default)."""
    return threads_from_env() or cpus_granted()


def engine_of(variant: str) -> tuple[str, str]:
    """(engine, precision) of a variant name: "int8" is onnxruntime's int8 file, "openvino/bf16" OpenVINO
    running the fp32 file in bf16."""
    engine, _, precision = variant.rpartition("/")
    return engine or ONNXRUNTIME, precision


def checked_session(
    root: Path,
    model: dict[str, Any],
    entry: dict[str, Any],
    threads: int | None = None,
    *,
    variant: str | None = None,
    cache_dir: Path | None = None,
) -> Any:
    """A session of the manifest ONNX ``entry`` of ``model`` in the tree at ``root``: the graph and its
    external data read once, hashed and handed to the engine as bytes (:func:`modelbake.manifest.read_graph`).
    ``variant`` "openvino/<precision>" opens it with OpenVINO (compiled models cached in ``cache_dir``), any
    other with onnxruntime."""
    graph, external = read_graph(root, model, entry)
    engine, precision = engine_of(variant or str(entry.get("variant", "fp32")))
    if engine == OPENVINO:
        return openvino_session(graph, entry, threads, precision=precision, external=external, cache_dir=cache_dir)
    return session(graph, threads, external=external)


def session(
    model: Path | str | bytes, threads: int | None = None, *, external: dict[str, bytes] | None = None
) -> ort.InferenceSession:
    """A CPU session for an ONNX file, or its bytes with the contents of the external-data files it names
    (``external``: {location as written in the graph: bytes}; onnxruntime copies them while it builds)."""
    options = ort.SessionOptions()
    threads = threads or default_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if external:
        names = list(external)
        buffers = [external[name] for name in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail type; a graph whose weights file is gone is common
        data = None if isinstance(model, bytes) else Path(model).with_name(external_data_name(Path(model).name))
        if "escapes model directory" in str(exc):  # a security refusal, not a missing file
            raise PermissionError(
                f"{model}: refused, an external-data location in the graph points outside its folder; "
                "a graph's weights must lie beside it (NAME.onnx.data), rebuild or re-export it"
            ) from exc
        if data is not None and "External data path" in str(exc) and not data.is_file():
            raise FileNotFoundError(
                f"{model}: its weights are in {data.name}, which is not beside it; keep NAME.onnx and "
                "NAME.onnx.data together in one folder"
            ) from exc
        raise


def engines_enabled() -> tuple[str, ...]:
    """The engines ``auto`` may use: $MODELBAKE_ENGINES (a comma-separated list that names onnxruntime, which
    runs the reference every other variant is gated and timed against), else both."""
    value = os.environ.get(ENGINES_ENV, "").strip()
    if not value:
        return (ONNXRUNTIME, OPENVINO)
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    if ONNXRUNTIME not in names or not set(names) <= {ONNXRUNTIME, OPENVINO}:
        raise ValueError(
            f"{ENGINES_ENV}={value!r}: list onnxruntime and optionally openvino (onnxruntime,openvino), "
            "or leave it unset"
        )
    return names


@lru_cache(maxsize=1)
def openvino_facts() -> dict[str, Any] | None:
    """OpenVINO here: {"version", "precisions": what its CPU plugin computes in natively ("bf16", "f32")};
    None when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precisions = sorted({_OV_PRECISIONS[c.lower()] for c in capabilities if c.lower() in _OV_PRECISIONS} | {"f32"})
    return {"version": ov.__version__.split("-")[0], "precisions": precisions}


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as onnxruntime describes it (symbolic dimensions as strings)."""

    name: str
    shape: list[int | str]
    type: str


class OpenVinoSession:
    """An OpenVINO compiled model behind onnxruntime's session calls. ``precision`` is what OpenVINO computes
    in after compiling (it runs f32 where bf16 was asked of a CPU without it). One inference request per
    thread: a request holds its tensors, and a service runs requests from several threads."""

    def __init__(self, compiled: Any, entry: dict[str, Any]) -> None:
        self._compiled, self._local = compiled, threading.local()
        self._inputs = _described(entry, "inputs", compiled.inputs)
        self._outputs = _described(entry, "outputs", compiled.outputs)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        self.precision = _OV_PRECISIONS.get(hint, hint)

    def get_inputs(self) -> list[TensorInfo]:
        return self._inputs

    def get_outputs(self) -> list[TensorInfo]:
        return self._outputs

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)  # copies out of the request's tensors (share_outputs=False)
        by_name = {port.any_name: value for port, value in results.items()}
        return [np.asarray(by_name[name]) for name in (names or [t.name for t in self._outputs])]


def _described(entry: dict[str, Any], side: str, ports: list[Any]) -> list[TensorInfo]:
    """A graph's inputs or outputs from its manifest entry, else (a graph found by name) OpenVINO's view."""
    if side in entry:
        return [TensorInfo(t["name"], list(t["shape"]), t["dtype"]) for t in entry[side]]
    return [TensorInfo(p.any_name, _dims(p.partial_shape), p.element_type.to_dtype().name) for p in ports]


def _dims(shape: Any) -> list[int | str]:
    """An OpenVINO partial shape as onnxruntime gives one: fixed sizes as ints, dynamic ones as names."""
    return [d.get_length() if d.is_static else f"dim{i}" for i, d in enumerate(shape)]


def openvino_session(
    graph: bytes | Path,
    entry: dict[str, Any],
    threads: int | None = None,
    *,
    precision: str = "f32",
    external: dict[str, bytes] | None = None,
    cache_dir: Path | None = None,
) -> OpenVinoSession:
    """An OpenVINO CPU session of an ONNX graph (its bytes, or a file OpenVINO reads with its external data
    beside it; ``entry`` its manifest entry) computing in ``precision`` ("bf16" or "f32"). ``cache_dir``:
    OpenVINO's compiled-model cache (a second open of the same graph skips compiling). Bytes with external
    data are read from a private temporary folder holding exactly the checked bytes, removed once compiled
    (OpenVINO's ONNX reader looks for the data beside a file)."""
    import openvino as ov

    core = ov.Core()
    if cache_dir is not None:
        core.set_property({"CACHE_DIR": str(cache_dir)})
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads := threads or default_threads():
        config["INFERENCE_NUM_THREADS"] = threads
    if isinstance(graph, Path) or not external:
        source = str(graph) if isinstance(graph, Path) else graph
        return OpenVinoSession(core.compile_model(core.read_model(source), "CPU", config), entry)
    if any(Path(location).name != location for location in external):  # never a write outside the folder
        raise PermissionError(
            f"{entry['path']}: refused, an external-data location in the graph is not a file beside it; "
            "a graph's weights must lie beside it (NAME.onnx.data), rebuild or re-export it"
        )
    try:
        folder = Path(tempfile.mkdtemp(prefix="modelbake-ov-"))
    except OSError as exc:  # a read-only container without a tmpfs
        raise OSError(
            f"{entry['path']}: OpenVINO reads a graph with external data from files, and no temporary folder "
            f"can be written here ({exc.strerror}); mount one (docker run --tmpfs /tmp) or set TMPDIR"
        ) from exc
    try:
        name = Path(entry["path"]).name
        (folder / name).write_bytes(graph)
        for location, data in external.items():
            (folder / location).write_bytes(data)
        return OpenVinoSession(core.compile_model(core.read_model(str(folder / name)), "CPU", config), entry)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
