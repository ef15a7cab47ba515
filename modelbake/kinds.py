"""The model kinds, in one table: for each, its manifest ``kind``, the build stage that makes it (Dockerfile
target and fragment name), its folder in the tree, the producer module that runs the stage and the run-time
loader that reads it. Parameters name their stages from here, the producers register their stages from
here, the loaders take their ``kind`` from here. Stdlib-only, torch-free: the ground floor.

A kind that is not built in registers its stage (:func:`modelbake.producers.register_stage`) and its loader
(:func:`modelbake.runtime.registry.register_loader`) itself, as ``tests/test_registry.py`` does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str  # the manifest's "kind", the CLI's --<name>-only
    stage: str  # the Dockerfile target and the manifest fragment's name
    folder: str  # its own folder in the model tree (besides onnx/ and golden/)
    help: str
    producer: str  # the module whose run(out_root, values) is the stage (imports torch)
    loader: str  # the run-time module whose registered Loader reads it (torch-free)


CLIP = Kind(
    "clip", "clip-export", "clip", "CLIP models -> ONNX text/image encoders",
    "modelbake.producers.clip", "modelbake.runtime.clip",
)  # fmt: skip
RERANKER = Kind(
    "reranker", "reranker-cache", "reranker", "first loadable cross-encoder -> folder + ONNX",
    "modelbake.producers.reranker", "modelbake.runtime.reranker",
)  # fmt: skip
REGRESSOR = Kind(
    "regressor", "regressor-seed", "regressor", "deterministic boundary-regressor seed weights",
    "modelbake.producers.regressor", "modelbake.runtime.regressor",
)  # fmt: skip
KINDS: dict[str, Kind] = {k.name: k for k in (CLIP, RERANKER, REGRESSOR)}
PRODUCING_STAGES: tuple[str, ...] = tuple(k.stage for k in KINDS.values())
