"""The boundary regressor for services: the seed's weight look-up order, and a torch-free predictor.

Services that run the regressor with torch find its weights with :func:`find_weights` and load them with
``modelbake.producers.regressor_model.load_weights`` (weights_only); services without torch use
:class:`BoundaryRegressorONNX`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.errors import ModelbakeError
from modelbake.kinds import REGRESSOR
from modelbake.manifest import Role, checked_model, require_manifest, resolve_inside
from modelbake.runtime.registry import Loader, register_loader
from modelbake.signature import check_signature
from modelbake.spec import REGRESSOR_LOOKUP, REGRESSOR_ONNX_LOOKUP

log = logging.getLogger("modelbake")
LOOKUP_ENV = "MODELBAKE_REGRESSOR_LOOKUP"


class WeightsNotFound(ModelbakeError, FileNotFoundError):
    """No candidate weight file exists; the message lists every path tried."""


def lookup_order() -> tuple[str, ...]:
    """The seed's order, or the comma-separated paths in $MODELBAKE_REGRESSOR_LOOKUP."""
    override = os.environ.get(LOOKUP_ENV, "")
    paths = tuple(p.strip() for p in override.split(",") if p.strip())
    return paths or REGRESSOR_LOOKUP


def find_weights(
    folder: Path | str,
    order: tuple[str, ...] | None = None,
    *,
    allow_unverified: bool = False,
    manifest_sha256: str | None = None,
    public_key: Path | str | None = None,
) -> Path:
    """The regressor's PyTorch weights (a state dict for ``load_weights``) in the model folder ``folder``.

    With a manifest: the state dict it lists, its files checked (and the tree's signature when a public key
    is set, ``public_key`` or $MODELBAKE_SIGNING_PUBLIC_KEY), whatever else lies in the folder. Without
    one, only with ``allow_unverified`` (or $MODELBAKE_ALLOW_UNVERIFIED=1): the first existing file of
    ``order`` (default: the seed's look-up order, or $MODELBAKE_REGRESSOR_LOOKUP), unverified.
    """
    folder = Path(folder)
    if require_manifest(folder, allow_unverified, expected_sha256=manifest_sha256, public_key=public_key):
        check_signature(folder, public_key)
        model = checked_model(folder, BoundaryRegressorONNX.kind, manifest_sha256=manifest_sha256)
        entry = next(f for f in model["files"] if f["role"] == Role.WEIGHTS_STATE_DICT)
        return resolve_inside(folder, entry["path"])
    tried = []
    for candidate in order or lookup_order():
        path = folder / candidate
        tried.append(str(path))
        if path.is_file():
            log.warning("boundary regressor: no manifest in %s, %s is not verified", folder, path)
            return path
    raise WeightsNotFound(
        f"no boundary regressor weights; tried {', '.join(tried)}. Build them (modelbake regressor-seed --out "
        f"{folder}), train your own (modelbake train-regressor DATA OUT.pth), or set {LOOKUP_ENV}"
    )


@register_loader
class BoundaryRegressorONNX(Loader):
    """``predict(features) -> (n, 2)`` seconds (start_delta, end_delta) with onnxruntime."""

    kind = REGRESSOR.name

    def __init__(self, folder: Path, model: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(folder, model, **kwargs)
        self.session = self.onnx_session(model, Role.REGRESSOR)
        self.input_name = self.session.get_inputs()[0].name
        self.feature_dim = int(self.session.get_inputs()[0].shape[1])

    @classmethod
    def from_file(cls, onnx_path: Path, threads: int | None = None) -> BoundaryRegressorONNX:
        """An ONNX file outside any manifest: nothing is verified."""
        path = Path(onnx_path)
        model = {"name": path.stem, "kind": cls.kind, "files": [{"role": Role.REGRESSOR, "path": path.name}]}
        return cls(path.parent, model, threads=threads, unverified=True)

    @classmethod
    def from_folder(
        cls, folder: Path | str, name: str | None = None, *, allow_unverified: bool = False, **kwargs: Any
    ) -> BoundaryRegressorONNX:
        """Through the manifest (files checked). Without one, only with ``allow_unverified`` (or
        $MODELBAKE_ALLOW_UNVERIFIED=1): the first file of the ONNX look-up order, with a warning."""
        folder = Path(folder)
        if not require_manifest(folder, allow_unverified, expected_sha256=kwargs.get("manifest_sha256")):
            path = find_weights(folder, REGRESSOR_ONNX_LOOKUP, allow_unverified=True)
            return cls.from_file(path, threads=kwargs.get("threads"))
        return super().from_folder(folder, name, **kwargs)

    def predict(self, features: np.ndarray | list) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (n, {self.feature_dim}); got {tuple(np.shape(features))}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        return self.session.run(None, {self.input_name: x})[0]
