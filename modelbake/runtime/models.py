"""One entry point for services: open a model folder, get every model it holds, torch-free."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelbake.kinds import CLIP, REGRESSOR, RERANKER
from modelbake.manifest import ManifestError, Variant, check_files, read_manifest, require_manifest
from modelbake.runtime.clip import ClipEncoder, detect, detected_pairs
from modelbake.runtime.registry import loader_for
from modelbake.runtime.regressor import BoundaryRegressorONNX, WeightsNotFound
from modelbake.runtime.reranker import Reranker
from modelbake.runtime.variants import AUTO, OPENVINO_VARIANTS, requested
from modelbake.signature import check_signature
from modelbake.spec import REGRESSOR_ONNX


@dataclass
class Models:
    """Every model of a tree by kind and name, in manifest order; the first of a kind is its default."""

    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, kind: str, model: Any) -> None:
        self.by_kind.setdefault(kind, {})[model.name] = model

    def first(self, kind: str) -> Any | None:
        return next(iter(self.by_kind.get(kind, {}).values()), None)

    @property
    def clip(self) -> dict[str, ClipEncoder]:
        return self.by_kind.get(CLIP.name, {})

    @property
    def reranker(self) -> Reranker | None:
        return self.first(RERANKER.name)

    @property
    def regressor(self) -> BoundaryRegressorONNX | None:
        return self.first(REGRESSOR.name)

    def variants(self) -> dict[str, dict[str, dict[str, str]]]:
        """What each model runs: {kind: {name: {role: variant}}}."""
        return self._per_role("chosen")

    def engines(self) -> dict[str, dict[str, dict[str, str]]]:
        """The engine and precision each role runs: {kind: {name: {role: "onnxruntime/fp32"}}}."""
        return self._per_role("engines")

    def reasons(self) -> dict[str, dict[str, dict[str, str]]]:
        """Why each model runs that variant here: {kind: {name: {role: why}}} (e.g. "int8: 1.90x fp32 at batch 1
        here, cosine 0.9991 here")."""
        return self._per_role("why")

    def _per_role(self, attribute: str) -> dict[str, dict[str, dict[str, str]]]:
        return {
            kind: {name: dict(getattr(model, attribute, {})) for name, model in models.items()}
            for kind, models in self.by_kind.items()
        }

    @property
    def default_clip(self) -> ClipEncoder:
        if not self.clip:
            raise LookupError("the model folder holds no CLIP model")
        return next(iter(self.clip.values()))


def open_models(
    folder: Path | str,
    *,
    variant: str = AUTO,
    int8: bool = False,
    threads: int | None = None,
    manifest_sha256: str | None = None,
    allow_unverified: bool = False,
    public_key: Path | str | None = None,
) -> Models:
    """Check that every file of ``folder``'s manifest is there with its size, then load each model once with
    the loader registered for its kind (:mod:`modelbake.runtime.registry`). Each file a loader reads is read
    once and its sha256 checked on those bytes, which are what loads; a file nothing loads is hashed by
    ``verify``, not here.

    ``manifest_sha256`` (else $MODELBAKE_MANIFEST_SHA256, which the runtime image sets) pins the manifest
    itself. ``public_key`` (else $MODELBAKE_SIGNING_PUBLIC_KEY): the tree must carry a valid signature by its
    private key (:mod:`modelbake.signature`), checked before anything loads. A folder without a manifest is
    refused unless ``allow_unverified`` (or $MODELBAKE_ALLOW_UNVERIFIED=1): then it is searched as the seed's
    services did, CLIP ONNX pairs by name and the regressor by its look-up order, nothing verified and no
    reranker.
    ``variant``: ``auto`` (or $MODELBAKE_VARIANT) runs, per ONNX role, the variant the build measured
    fastest at batch 1 when this CPU has the build machine's kernels (same ISA flags) and no other engine is
    installed; otherwise each candidate (the shipped int8, OpenVINO on the fp32 file) is checked on its golden
    probe and timed here, and the fastest that passes runs (:mod:`modelbake.runtime.variant_check`, cached).
    ``fp32`` or ``int8`` (built with CLIP_INT8 / RERANKER_INT8; ``int8=True`` is the same) asks for one where a
    kind has it; ``openvino/bf16`` or ``openvino/f32`` runs the fp32 files with OpenVINO where it is installed.
    :meth:`Models.variants` says what each role runs (engine and precision), :meth:`Models.reasons` why.
    """
    folder = Path(folder)
    if not require_manifest(folder, allow_unverified, expected_sha256=manifest_sha256, public_key=public_key):
        return _open_by_names(folder, threads)
    manifest = read_manifest(folder, expected_sha256=manifest_sha256)
    check_signature(folder, public_key)
    check_files(folder, manifest["models"], quick=True)  # each loader hashes the bytes it loads
    models = Models()
    for model in manifest["models"]:
        loader = loader_for(model["kind"])
        asked = requested(variant, int8)
        # int8 for a kind that only has fp32; another engine runs any kind's fp32 file
        if asked not in (AUTO, *loader.variants, *OPENVINO_VARIANTS):
            asked = Variant.FP32
        models.add(model["kind"], loader(folder, model, variant=asked, threads=threads))
    return models


def _open_by_names(folder: Path, threads: int | None) -> Models:
    models = Models()
    for name in detected_pairs(folder):
        models.add(ClipEncoder.kind, ClipEncoder(folder, detect(folder, name), threads=threads, unverified=True))
    with contextlib.suppress(WeightsNotFound):
        regressor = BoundaryRegressorONNX.from_folder(folder, allow_unverified=True, threads=threads)
        models.add(BoundaryRegressorONNX.kind, regressor)
    if not models.clip and models.regressor is None:
        raise ManifestError(
            f"no manifest in {folder} and no model files by the original names (clip_<model>_*_encoder.onnx, "
            f"{REGRESSOR_ONNX}); point at a folder built by modelbake"
        )
    return models
