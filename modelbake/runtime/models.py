"""One entry point for services: open a model folder, get every model it holds, torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modelbake.manifest import check_files, read_manifest, resolve_inside
from modelbake.runtime.clip import ClipEncoder
from modelbake.runtime.regressor import BoundaryRegressorONNX
from modelbake.runtime.reranker import Reranker


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


def open_models(folder: Path | str, *, threads: int | None = None) -> Models:
    """Check every file of ``folder``'s manifest (size + sha256), then load each model once."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest["models"])
    models = Models()
    for model in manifest["models"]:
        if model["kind"] == "clip":
            models.clip[model["name"]] = ClipEncoder(folder, model, threads=threads)
        elif model["kind"] == "reranker" and models.reranker is None:
            models.reranker = Reranker(folder, model, threads=threads)
        elif model["kind"] == "regressor" and models.regressor is None:
            entry = next(f for f in model["files"] if f["role"] == "regressor")
            models.regressor = BoundaryRegressorONNX(resolve_inside(folder, entry["path"]), threads=threads)
    return models
