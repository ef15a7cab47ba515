"""The golden probe of an ONNX entry: the inputs the build ran it on and the outputs it recorded, read from
the listed ``.npz`` file once and checked against its digest (never unpickled)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.manifest import read_listed


def read_golden(root: Path, model: dict[str, Any], entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every array of ``entry``'s golden file: ``input:NAME``, ``output:NAME`` and ``raw:...`` probes."""
    data = read_listed(root, model, entry["golden"], by=entry["path"])
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def feeds_and_outputs(golden: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The graph's input feeds and its recorded outputs, by graph name."""
    feeds = {k.removeprefix("input:"): v for k, v in golden.items() if k.startswith("input:")}
    outputs = {k.removeprefix("output:"): v for k, v in golden.items() if k.startswith("output:")}
    return feeds, outputs


def probe_rows(probe: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``size`` rows of the probe inputs (repeated when the probe has fewer): a batch of that size to time."""
    rows = np.arange(size) % len(next(iter(probe.values())))
    return {name: array[rows] for name, array in probe.items()}
