"""The one place onnxruntime sessions are made: the build's gates, verify and every loader.

A tree's graphs are opened by :func:`checked_session`: from the bytes the manifest check hashed, their
external data included, never from a path onnxruntime would open again after the check.

Threads: the ``threads`` argument, else $MODELBAKE_THREADS, else onnxruntime's default (one per core).
Inter-op threads stay at 1: the graphs run sequentially, and a second pool only competes for the cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from modelbake.manifest import read_graph
from modelbake.spec import external_data_name

THREADS_ENV = "MODELBAKE_THREADS"


def threads_from_env() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive number of threads, or leave it unset")
    return int(value)


def checked_session(
    root: Path, model: dict[str, Any], entry: dict[str, Any], threads: int | None = None
) -> ort.InferenceSession:
    """A session of the manifest ONNX ``entry`` of ``model`` in the tree at ``root``: the graph and its
    external data read once, hashed and handed to onnxruntime as bytes (:func:`modelbake.manifest.read_graph`)."""
    graph, external = read_graph(root, model, entry)
    return session(graph, threads, external=external)


def session(
    model: Path | str | bytes, threads: int | None = None, *, external: dict[str, bytes] | None = None
) -> ort.InferenceSession:
    """A CPU session for an ONNX file, or its bytes with the contents of the external-data files it names
    (``external``: {location as written in the graph: bytes}; onnxruntime copies them while it builds)."""
    options = ort.SessionOptions()
    threads = threads or threads_from_env()
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
