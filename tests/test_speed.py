"""Variants measured where they are built, shipped only when faster, chosen at run time from the table.

Timings are injected where a decision is tested (never a wall-clock threshold); the real timer runs once
to show it records every batch size for every candidate.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from modelbake.manifest import Role, Variant
from modelbake.params import defaults
from modelbake.producers import onnx_export
from modelbake.producers.onnx_export import ExportSettings, Int8Refused, OnnxExport, export_variants
from modelbake.producers.speed import Candidate, Timing, decide, measure
from modelbake.runtime.gates import min_row_cosine
from modelbake.runtime.registry import Loader
from modelbake.runtime.sessions import session
from modelbake.runtime.variant_check import workload
from modelbake.runtime.variants import AUTO, choose, machine, requested, same_kernels


class _Cnn(torch.nn.Module):
    """Three convolutions: a CNN to the exporter (static int8 is tried for it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 8, 3, stride=2),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def _settings(**changes: Any) -> ExportSettings:
    """The table's export settings with int8 on (and ``changes``)."""
    return replace(ExportSettings.from_values(defaults(), int8=True), **changes)


def _cnn_export(calibrate: bool = True, int8_min_cosine: float = 0.99) -> OnnxExport:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(20, 3, 16, 16, generator=gen)
    return OnnxExport(
        role=Role.IMAGE_ENCODER,
        module=_Cnn(),
        example={"pixel_values": images[:2]},
        probe={"pixel_values": images[2:5]},
        output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        atol=1e-4,
        min_cosine=0.999,
        int8_gate={"min_cosine": int8_min_cosine},
        calibration={"pixel_values": images[5:]} if calibrate else None,
    )


def _fake_timer(ms: dict[str, float]):
    """A stand-in for speed.measure: ms on the role's workload by quantisation method ('export' is fp32)."""

    def fake(candidates: list[Candidate], probe: dict[str, np.ndarray], role: str, *args: Any, **kwargs: Any):
        rows, _ = workload(role)
        for c in candidates:
            c.batch_ms = {str(rows): ms[c.method]}
        return Timing(role, f"at batch {rows}")

    return fake


def test_decide_drops_a_variant_slower_than_fp32_unless_forced() -> None:
    fp32 = Candidate(Variant.FP32, Path("a.onnx"), {}, {"1": 10.0})
    dynamic = Candidate(Variant.INT8, Path("b.onnx"), {"method": "quantize_dynamic"}, {"1": 30.0})
    static = Candidate(Variant.INT8, Path("c.onnx"), {"method": "quantize_static_qdq"}, {"1": 12.0})
    at = Timing(Role.IMAGE_ENCODER, "at batch 1")
    ships, dropped = decide(fp32, [dynamic, static], False, at)
    assert ships == []
    assert [(d["method"], d["why"].split(" (")[0]) for d in dropped] == [
        ("quantize_dynamic", "quantize_static_qdq was faster at batch 1"),
        ("quantize_static_qdq", "1.20x slower than fp32 at batch 1 on the build machine"),
    ]
    assert "INT8_SHIP=gated ships it anyway" in dropped[1]["why"]
    ships, _ = decide(fp32, [dynamic, static], True, at)
    assert ships == [static]
    static.batch_ms["1"] = 7.0
    ships, dropped = decide(fp32, [dynamic, static], False, at)
    assert ships == [static] and [d["method"] for d in dropped] == ["quantize_dynamic"]


def test_the_timer_times_every_candidate_on_the_roles_workload(tmp_path: Path) -> None:
    """The real timer, the open-time check's own, on what the check would time: one image for an image tower."""
    export = _cnn_export()
    fp32, _ = onnx_export._export(export, _settings(), tmp_path, "cnn.onnx")
    onnx_export._quantize(fp32, tmp_path / "cnn_int8.onnx")
    candidates = [Candidate(Variant.FP32, fp32, {}), Candidate(Variant.INT8, tmp_path / "cnn_int8.onnx", {})]
    timing = measure(candidates, {"pixel_values": export.probe["pixel_values"].numpy()}, Role.IMAGE_ENCODER, 1)
    assert timing.at == "at batch 1" and timing.record() == {"timed_at": [1, None], "at": "at batch 1"}
    for c in candidates:
        assert list(c.batch_ms) == ["1"] and c.ms > 0


def test_a_slower_int8_is_not_shipped_and_the_fp32_entry_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "measure", _fake_timer({"export": 1.0, "quantize_dynamic": 3.0}))
    files = export_variants(_cnn_export(calibrate=False), "cnn.onnx", tmp_path, _settings())
    onnx_files = [f for f in files if f["format"] == "onnx"]
    assert [f["variant"] for f in onnx_files] == ["fp32"] and not (tmp_path / "onnx" / "cnn_int8.onnx").exists()
    speed = onnx_files[0]["speed"]
    assert speed["batch_ms"] == {"1": 1.0} and speed["machine"] == machine()
    assert speed["timed_at"] == [1, None] and speed["at"] == "at batch 1"
    (dropped,) = speed["not_shipped"]
    assert dropped["method"] == "quantize_dynamic" and dropped["why"].startswith("3.00x slower than fp32")
    # Forced, it ships, with its ratio to fp32 recorded.
    files = export_variants(_cnn_export(calibrate=False), "cnn.onnx", tmp_path, _settings(int8_ship="gated"))
    int8 = next(f for f in files if f.get("variant") == "int8")
    assert int8["speed"]["vs_fp32"] == {"1": pytest.approx(1 / 3, abs=1e-3)}


def test_a_cnn_gets_a_static_qdq_candidate_and_the_faster_one_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timings = {"export": 5.0, "quantize_dynamic": 9.0, "quantize_static_qdq": 2.0}
    monkeypatch.setattr(onnx_export, "measure", _fake_timer(timings))
    files = export_variants(_cnn_export(), "cnn.onnx", tmp_path, _settings())
    int8 = next(f for f in files if f.get("variant") == "int8")
    assert int8["parity"]["method"] == "quantize_static_qdq" and int8["parity"]["calibration_inputs"] == 15
    # The recorded cosine is what the shipped graph gives here on its golden probe against PyTorch's outputs
    # (restating the gate's own threshold could not fail).
    with np.load(tmp_path / int8["golden"]) as golden:
        feeds = {k.removeprefix("input:"): golden[k] for k in golden.files if k.startswith("input:")}
        reference = {k.removeprefix("output:"): golden[k] for k in golden.files if k.startswith("output:")}
    outputs = session(tmp_path / int8["path"]).run(list(reference), feeds)
    cosine = min(min_row_cosine(r, o) for r, o in zip(reference.values(), outputs, strict=True))
    assert cosine == pytest.approx(int8["parity"]["min_cosine"], abs=1e-6)
    ops = {n.op_type for n in onnx.load(str(tmp_path / int8["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32 = next(f for f in files if f.get("variant") == "fp32")
    assert [d["method"] for d in fp32["speed"]["not_shipped"]] == ["quantize_dynamic"]


def test_every_int8_candidate_refused_ships_fp32_alone_and_says_why(tmp_path: Path) -> None:
    """int8 is optional: its gate refusing every candidate (a cosine nothing reaches) leaves fp32 shipped
    alone, each refusal in its entry's not_shipped; INT8_REQUIRED makes it fail, with nothing written."""
    files = export_variants(_cnn_export(int8_min_cosine=1.01), "cnn.onnx", tmp_path, _settings())
    (fp32,) = [f for f in files if f["format"] == "onnx"]
    assert fp32["variant"] == "fp32" and not list(tmp_path.rglob("*_int8.onnx"))
    refused = fp32["speed"]["not_shipped"]
    assert [d["method"] for d in refused] == ["quantize_dynamic", "quantize_static_qdq"]
    assert all(d["why"].startswith("refused by its gate: ") and "(required 1.01)" in d["why"] for d in refused)
    required = tmp_path / "required"
    required.mkdir()
    with pytest.raises(Int8Refused, match=r"INT8_REQUIRED=1 and no int8 variant ships: quantize_dynamic: refused"):
        export_variants(_cnn_export(int8_min_cosine=1.01), "cnn.onnx", required, _settings(int8_required=True))
    assert list(required.iterdir()) == []


def test_int8_required_fails_on_a_slower_int8_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "measure", _fake_timer({"export": 1.0, "quantize_dynamic": 3.0}))
    with pytest.raises(Int8Refused, match=r"quantize_dynamic: 3.00x slower than fp32"):
        export_variants(_cnn_export(calibrate=False), "cnn.onnx", tmp_path, _settings(int8_required=True))


def _model(ms: dict[str, float], isa: list[str]) -> dict[str, Any]:
    where = {**machine(), "isa": isa}
    return {
        "name": "m",
        "kind": "clip",
        "files": [
            {
                "path": f"{v}.onnx",
                "role": Role.IMAGE_ENCODER,
                "variant": v,
                "speed": {"batch_ms": {"1": t}, "timed_at": [1, None], "at": "at batch 1", "machine": where},
            }
            for v, t in ms.items()
        ],
    }


def test_auto_picks_what_the_table_says_on_the_same_kernels_and_checks_elsewhere() -> None:
    here = {**machine(), "isa": ["avx2", "fma"]}
    faster_int8 = _model({"fp32": 4.0, "int8": 2.5}, ["avx2", "fma"])
    choice = choose(faster_int8, Role.IMAGE_ENCODER, AUTO, here)
    assert choice.variant == "int8" and choice.why == (
        "int8: 1.6x fp32 at batch 1 on the build machine, whose ISA flags this CPU shares"
    )
    assert choose(_model({"fp32": 4.0, "int8": 5.0}, ["avx2", "fma"]), Role.IMAGE_ENCODER, AUTO, here).variant == "fp32"
    # Timed by an older build on another workload (batch 1 of the probe, no timed_at): not what the check
    # would time, so not trusted even on the same kernels.
    older = _model({"fp32": 4.0, "int8": 2.5}, ["avx2", "fma"])
    for entry in older["files"]:
        del entry["speed"]["timed_at"]
    assert choose(older, Role.IMAGE_ENCODER, AUTO, here).why.startswith("fp32: the build timed them on another work")
    # Measured on a VNNI machine: its int8 kernels are not the ones that would run here, nor its int8 error.
    # With the tree at hand the variants are checked here (tests/test_variant_check.py); without, fp32.
    vnni = _model({"fp32": 4.0, "int8": 1.0}, ["avx2", "avx512_vnni", "fma"])
    assert choose(vnni, Role.IMAGE_ENCODER, AUTO, here).why.startswith("fp32: built on another CPU class")
    assert choose(vnni, Role.IMAGE_ENCODER, "int8", here).why == "int8: asked for"
    # int8 asked for where the build shipped none (refused by its gate): fp32, saying so; never a LookupError
    fp32_only = {**vnni, "files": [e for e in vnni["files"] if e["variant"] == "fp32"]}
    fallback = choose(fp32_only, Role.IMAGE_ENCODER, "int8", here)
    assert fallback.variant == "fp32" and fallback.why.startswith("fp32: int8 asked for, but none was built")
    assert not same_kernels({"arch": here["arch"], "isa": []}, here)  # no flags recorded: never trusted
    with pytest.raises(ValueError, match="use auto or one of fp32, int8"):
        requested("fp16")
    assert requested(None, int8=True) == "int8" and requested(None) == AUTO


def test_a_loader_reports_the_variant_of_each_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "measure", _fake_timer({"export": 5.0, "quantize_dynamic": 1.0}))
    files = export_variants(_cnn_export(calibrate=False), "cnn.onnx", tmp_path, _settings())
    model = {"name": "cnn", "kind": "test", "files": files}
    loader = Loader(tmp_path, model)  # the table was recorded here, so auto trusts it
    assert loader.onnx(model, Role.IMAGE_ENCODER)["variant"] == "int8" and loader.chosen == {"image_encoder": "int8"}
    assert loader.why["image_encoder"].startswith("int8: 5x fp32 at batch 1 on the build machine")
    loader = Loader(tmp_path, model, variant="fp32")
    loader.onnx(model, Role.IMAGE_ENCODER)
    assert loader.variant == "fp32"


def test_a_reranker_int8_its_ranking_gate_refuses_ships_fp32_alone(tmp_path: Path) -> None:
    """The reranker's own int8 gate (its ranking per probe query) refuses the int8 of a model made for it: an
    outlier channel int8 cannot see past ties every score, on any CPU. The reranker ships in fp32 with the
    reason, as the first candidate even under RERANKER_STRICT (a refused int8 is no failed model); with
    INT8_REQUIRED the stage fails, naming the figures, and nothing is written."""
    from conftest import run_cli

    from modelbake.sources.tiny import make_tiny_cross_encoder

    blind = make_tiny_cross_encoder(tmp_path / "blind", int8_blind=True)
    args = ["--reranker", f"blind@dir:{blind}", "--reranker-int8", "--reranker-strict"]
    proc = run_cli("download", "--reranker-only", *args, "--out", str(tmp_path / "out"), check=True)
    assert "int8 (quantize_dynamic) not shipped: refused by its gate: the ranking changed" in proc.stderr  # log
    note = "note: reranker:blind: reranker int8 (quantize_dynamic) not shipped: refused by its gate: the ranking"
    assert note in proc.stdout  # and the summary
    (model,) = json.loads((tmp_path / "out" / "model_manifest.json").read_text())["models"]
    (graph,) = [f for f in model["files"] if f["format"] == "onnx"]
    assert graph["variant"] == "fp32" and "notes" not in model  # no fallback was taken
    (refused,) = graph["speed"]["not_shipped"]
    assert "Kendall's tau [0.0, 0.0, 0.0] (min 0.9 required)" in refused["why"]

    out = tmp_path / "required"
    proc = run_cli(*args, "--int8-required", "--out", str(out), script="reranker_cache.py")
    assert proc.returncode == 1, proc.stderr
    assert (
        "INT8_REQUIRED=1 and no int8 variant ships: quantize_dynamic: refused by its gate: the ranking" in proc.stderr
    )
    assert "top 3 kept per query [" in proc.stderr and "(min 0.9 required)" in proc.stderr
    assert list(out.rglob("*")) == []


def test_kendall_tau_is_tau_b() -> None:
    from modelbake.runtime.gates import kendall_tau

    scores = np.array([0.9, 0.5, 0.1, 0.3])
    assert kendall_tau(scores, scores) == 1.0 and kendall_tau(scores, -scores) == -1.0
    assert kendall_tau(scores, np.array([0.9, 0.5, 0.3, 0.1])) == pytest.approx(4 / 6)  # one pair of 6 swapped
    tied = np.array([0.9, 0.5, 0.5, 0.1])  # the model cannot tell two passages apart: no order to keep there
    assert kendall_tau(np.array([0.9, 0.6, 0.5, 0.1]), tied) == pytest.approx(5 / np.sqrt(6 * 5))
    assert kendall_tau(np.full(4, 0.5), scores) == 0.0 and kendall_tau(np.full(4, 0.5), np.full(4, 0.2)) == 1.0


def test_the_ranking_gate_passes_what_keeps_the_order_and_names_what_does_not(tmp_path: Path) -> None:
    """Real sessions: the fp32 graph of the tiny trained reranker keeps every probe query's order; the same
    graph judged against a reference whose top passages are swapped is refused, per query."""
    from sentence_transformers import CrossEncoder

    from modelbake.producers.common import ProducerError
    from modelbake.producers.reranker import RANKING_PROBE, _Logits, _ranking_gate, _tokenize
    from modelbake.sources.tiny import make_tiny_cross_encoder

    ce = CrossEncoder(str(make_tiny_cross_encoder(tmp_path / "ce")), device="cpu")
    graph = tmp_path / "ce.onnx"
    feeds = {q: _tokenize(ce, [(q, p) for p in ps]) for q, ps in RANKING_PROBE.items()}
    first = next(iter(feeds.values()))
    torch.onnx.export(
        _Logits(ce.model).eval(),
        tuple(first.values()),
        str(graph),
        input_names=list(first),
        output_names=["logits"],
        dynamic_axes={n: {0: "b", 1: "s"} for n in first},
        dynamo=False,
    )
    probe = [
        ({k: v.numpy() for k, v in feeds[q].items()}, np.asarray(ce.predict([(q, p) for p in ps])))
        for q, ps in RANKING_PROBE.items()
    ]
    figures = _ranking_gate(session(graph), probe, "sigmoid", 3, 0.9)
    assert figures["top_k_same"] == [True] * len(RANKING_PROBE) and figures["min_kendall_tau"] > 0.99
    spread = [np.ptp(reference) for _, reference in probe]
    assert min(spread) > 0.5, spread  # trained: its scores spread, as a real reranker's do
    swapped = [(f, r.copy()) for f, r in probe]
    reference = swapped[1][1]
    top = np.argsort(-reference)[:2]
    reference[top] = reference[top[::-1]]
    with pytest.raises(ProducerError, match=r"top 3 kept per query \[True, False, True\]"):
        _ranking_gate(session(graph), swapped, "sigmoid", 3, 0.9)
