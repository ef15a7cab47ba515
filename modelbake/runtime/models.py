"""One entry point for services: open a model folder, get every model it holds, torch-free."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from modelbake.manifest import ManifestError, check_files, read_manifest, resolve_inside
from modelbake.runtime.clip import ClipEncoder, detect, detected_pairs
from modelbake.runtime.regressor import BoundaryRegressorONNX, WeightsNotFound
from modelbake.runtime.reranker import Reranker
from modelbake.spec import MANIFEST_NAME, REGRESSOR_ONNX


@dataclass
class Models:
    clip: dict[str, ClipEncoder] = field(default_factory=dict)  # by name; the first is the default
    reranker: Reranker | None = None
    regressor: BoundaryRegressorONNX | None = None

    @property
    def default_clip(self) -> ClipEncoder:
        if not self.clip:
            raise LookupError("the model folder holds no CLIP model")
        return next(iter(self.clip.values()))


def open_models(folder: Path | str, *, int8: bool = False, threads: int | None = None) -> Models:
    """Check every file of ``folder``'s manifest (size + sha256), then load each model once.

    A folder without a manifest is searched as the seed's services did: CLIP ONNX pairs by name, the
    regressor by its look-up order; nothing is verified then (a warning says so) and there is no reranker.
    ``int8=True`` loads the dynamic-int8 CLIP and reranker variants (built with CLIP_INT8/RERANKER_INT8).
    """
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return _open_by_names(folder, threads)
    manifest = read_manifest(folder)
    check_files(folder, manifest["models"])
    models = Models()
    for model in manifest["models"]:
        if model["kind"] == "clip":
            models.clip[model["name"]] = ClipEncoder(folder, model, int8=int8, threads=threads)
        elif model["kind"] == "reranker" and models.reranker is None:
            models.reranker = Reranker(folder, model, int8=int8, threads=threads)
        elif model["kind"] == "regressor" and models.regressor is None:
            entry = next(f for f in model["files"] if f["role"] == "regressor")
            models.regressor = BoundaryRegressorONNX(resolve_inside(folder, entry["path"]), threads=threads)
    return models


def _open_by_names(folder: Path, threads: int | None) -> Models:
    models = Models()
    for name in detected_pairs(folder):
        models.clip[name] = ClipEncoder(folder, detect(folder, name), threads=threads)
    with contextlib.suppress(WeightsNotFound):
        models.regressor = BoundaryRegressorONNX.from_folder(folder, threads=threads)
    if not models.clip and models.regressor is None:
        raise ManifestError(
            f"no manifest in {folder} and no model files by the original names (clip_<model>_*_encoder.onnx, "
            f"{REGRESSOR_ONNX}); point at a folder built by modelbake"
        )
    return models
