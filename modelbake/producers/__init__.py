"""Build-time producers (torch, open_clip, sentence-transformers). Never imported by modelbake.runtime.

Every producing stage has one interface: ``run(out_root, values) -> list of model records``, where
``values`` maps parameter names of :mod:`modelbake.params` to typed values. It writes its files and a
manifest fragment under ``out_root`` (all or nothing), through the one generic export-and-validate loop in
``onnx_export``. The stages are registered here; the CLI, ``modelbake download`` and the Dockerfile's
targets are built from this registry. This module is stdlib-only: a stage's module (torch) is imported
only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelbake.kinds import KINDS
from modelbake.params import Param, for_stage

Values = dict[str, Any]
RunStage = Callable[[Path, Values], list[dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    name: str  # the Dockerfile target and the fragment's name: "clip-export"
    kind: str  # the model kind it writes (a loader of modelbake.runtime reads it)
    help: str
    run: RunStage

    @property
    def params(self) -> tuple[Param, ...]:
        return for_stage(self.name)

    @property
    def short(self) -> str:
        """``download --<short>-only``."""
        return self.kind


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


def _lazy(module: str) -> RunStage:
    """``module.run``, imported on the first call (the producers import torch)."""

    def run(out_root: Path, values: Values) -> list[dict[str, Any]]:
        return importlib.import_module(module).run(out_root, values)

    return run


for _kind in KINDS.values():
    register_stage(Stage(_kind.stage, _kind.name, _kind.help, _lazy(_kind.producer)))
