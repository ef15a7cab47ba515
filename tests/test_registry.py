"""A new model kind needs a stage and a loader, registered, and nothing else: this module registers a
throwaway kind ("doubler": y = 2x, exported by the real exporter) and it flows through `modelbake download`
(stage, merge), verify (golden replay and its own input replay) and open_models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelbake import cli
from modelbake.fs import staged_output
from modelbake.manifest import Role, onnx_entry, read_manifest, resolve_inside, write_fragment
from modelbake.producers import STAGES, Stage, Values, register_stage
from modelbake.producers.common import model_record
from modelbake.producers.onnx_export import ExportSettings, OnnxExport, export_variants
from modelbake.runtime.models import open_models
from modelbake.runtime.registry import LOADERS, Loader, register_loader
from modelbake.runtime.sessions import session
from modelbake.runtime.verify import verify

KIND = "doubler"


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _run_doubler(out_root: Path, values: Values) -> list[dict[str, Any]]:
    """The stage: one ONNX graph through the generic export-and-gate loop, plus its fragment."""
    with staged_output(out_root) as root:
        export = OnnxExport(
            role=Role.MODEL,
            module=_Double(),
            example={"x": torch.ones(2, 3)},
            probe={"x": torch.arange(12, dtype=torch.float32).reshape(4, 3)},
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            atol=1e-6,
            min_cosine=0.999,
            raw_golden={"numbers": np.arange(12).reshape(4, 3)},
        )
        files = export_variants(export, "doubler.onnx", root, ExportSettings.from_values(values))
        models = [
            model_record(
                "doubler-stage",
                KIND,
                "twice",
                spec="twice",
                source={"type": "generated", "id": "x2"},
                tools=("torch",),
                files=files,
            )
        ]
        write_fragment(root, "doubler-stage", models)
    return models


class Doubler(Loader):
    kind = KIND

    def __init__(self, folder: Path, model: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(folder, model, **kwargs)
        self.session = session(resolve_inside(folder, self.onnx(model, Role.MODEL)["path"]))

    def __call__(self, numbers: list[list[int]]) -> np.ndarray:
        return self.session.run(None, {"x": np.asarray(numbers, dtype=np.float32)})[0]

    @classmethod
    def replay(cls, root: Path, model: dict, entry: dict, golden: dict[str, np.ndarray]) -> tuple[bool, str] | None:
        same = np.array_equal(golden["raw:numbers"].astype(np.float32), golden["input:x"])
        return same, f"numbers {'identical' if same else 'DIFFER'}"


@pytest.fixture
def doubler_kind() -> Iterator[None]:
    register_stage(Stage("doubler-stage", KIND, "doubles its input", _run_doubler))
    register_loader(Doubler)
    try:
        yield
    finally:
        del STAGES["doubler-stage"], LOADERS[KIND]


def test_a_registered_kind_flows_through_download_verify_and_open_models(doubler_kind: None, tmp_path: Path) -> None:
    assert cli.main(["download", f"--{KIND}-only", "--out", str(tmp_path)]) == 0
    (model,) = read_manifest(tmp_path)["models"]
    assert (model["kind"], model["name"], model["stage"]) == (KIND, "twice", "doubler-stage")
    graph = onnx_entry(model, Role.MODEL)
    assert graph["parity"]["max_abs_diff"] == 0.0 and graph["golden"] == "golden/doubler.npz"

    checks = {c.what: c for c in verify(tmp_path)}
    assert checks["inference doubler.onnx"].ok and checks["inputs doubler.onnx"].detail == "numbers identical"
    assert all(c.ok for c in checks.values())

    models = open_models(tmp_path)
    assert list(models.by_kind) == [KIND] and models.clip == {} and models.reranker is None
    assert models.first(KIND)([[1, 2, 3]]).tolist() == [[2.0, 4.0, 6.0]]


def test_an_unregistered_kind_is_refused_at_load_with_the_known_kinds(doubler_kind: None, tmp_path: Path) -> None:
    assert cli.main(["download", f"--{KIND}-only", "--out", str(tmp_path)]) == 0
    del LOADERS[KIND]
    try:
        with pytest.raises(LookupError, match=r"no run-time loader for model kind 'doubler' .*clip, regressor"):
            open_models(tmp_path)
        assert not next(c for c in verify(tmp_path) if c.what.startswith("inference")).ok
    finally:
        LOADERS[KIND] = Doubler
