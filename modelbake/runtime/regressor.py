"""The boundary regressor for services: the seed's weight look-up order, and a torch-free predictor.

Services that run the regressor with torch find its weights with :func:`find_weights` and load them with
``modelbake.producers.regressor_model.load_weights`` (weights_only); services without torch use
:class:`BoundaryRegressorONNX`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from modelbake.manifest import checked_model, resolve_inside
from modelbake.spec import MANIFEST_NAME, REGRESSOR_LOOKUP, REGRESSOR_ONNX_LOOKUP

log = logging.getLogger("modelbake")
LOOKUP_ENV = "MODELBAKE_REGRESSOR_LOOKUP"


class WeightsNotFound(FileNotFoundError):
    """No candidate weight file exists; the message lists every path tried."""


def lookup_order() -> tuple[str, ...]:
    """The seed's order, or the comma-separated paths in $MODELBAKE_REGRESSOR_LOOKUP."""
    override = os.environ.get(LOOKUP_ENV, "")
    paths = tuple(p.strip() for p in override.split(",") if p.strip())
    return paths or REGRESSOR_LOOKUP


def find_weights(folder: Path, order: tuple[str, ...] | None = None) -> Path:
    """The first existing weight file of ``order`` (relative to ``folder``, or absolute)."""
    tried = []
    for candidate in order or lookup_order():
        path = folder / candidate
        tried.append(str(path))
        if path.is_file():
            log.info("boundary regressor weights: %s", path)
            return path
    raise WeightsNotFound(
        f"no boundary regressor weights; tried {', '.join(tried)}. Build them (modelbake regressor-seed --out "
        f"{folder}), train your own (modelbake train-regressor DATA OUT.pth), or set {LOOKUP_ENV}"
    )


class BoundaryRegressorONNX:
    """``predict(features) -> (n, 2)`` seconds (start_delta, end_delta) with onnxruntime."""

    def __init__(self, onnx_path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.feature_dim = int(self.session.get_inputs()[0].shape[1])

    @classmethod
    def from_folder(cls, folder: Path, threads: int | None = None) -> BoundaryRegressorONNX:
        """Through the manifest when there is one (files checked), else the first file of the ONNX look-up
        order (``spec.REGRESSOR_ONNX_LOOKUP``, unverified, with a warning)."""
        if not (folder / MANIFEST_NAME).is_file():
            path = find_weights(folder, REGRESSOR_ONNX_LOOKUP)
            log.warning("boundary regressor: no manifest in %s, %s is not verified", folder, path)
            return cls(path, threads=threads)
        model = checked_model(folder, "regressor")
        entry = next(f for f in model["files"] if f["role"] == "regressor")
        return cls(resolve_inside(folder, entry["path"]), threads=threads)

    def predict(self, features: np.ndarray | list) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (n, {self.feature_dim}); got {tuple(np.shape(features))}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        return self.session.run(None, {self.input_name: x})[0]
