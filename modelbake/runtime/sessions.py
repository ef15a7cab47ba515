"""The one place onnxruntime sessions are made: the build's gates, verify and every loader.

Threads: the ``threads`` argument, else $MODELBAKE_THREADS, else onnxruntime's default (one per core).
Inter-op threads stay at 1: the graphs run sequentially, and a second pool only competes for the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from modelbake.spec import external_data_name

THREADS_ENV = "MODELBAKE_THREADS"


def threads_from_env() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive number of threads, or leave it unset")
    return int(value)


def session(model: Path | str | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session for an ONNX file (or its bytes)."""
    options = ort.SessionOptions()
    threads = threads or threads_from_env()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
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
