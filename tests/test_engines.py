"""The engine axis of `auto`: OpenVINO running a tree's fp32 graphs, checked on the golden probe under the
fp32 entry's gate, timed beside onnxruntime fp32 and chosen only where it passes and is faster.

Nothing here depends on the CPU that runs it. The opening CPU is faked (another class than the build
machine's), OpenVINO's facts are faked (which precisions it computes natively), timings are injected, and
bf16 is injected as its rounding of the outputs (8 bits of mantissa), since most of the project's CPUs
compute no bf16 and OpenVINO runs f32 there. The sessions, graphs, golden files and gates are real.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

from modelbake.runtime import sessions, variant_check, variants
from modelbake.runtime.models import open_models

FASTER, SLOWER = 0.5, 2.0  # OpenVINO's injected time, as a fraction of onnxruntime fp32's


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Another CPU class than the build machine's, OpenVINO allowed (conftest leaves it out by default),
    the choices and compiled models cached in a scratch folder."""
    other = {**variants.machine(), "cpu": "Another CPU", "isa": ["avx2", "fma", "another_class"]}
    monkeypatch.setattr(variants, "machine", lambda: other)
    monkeypatch.delenv(sessions.ENGINES_ENV, raising=False)
    monkeypatch.delenv(variants.VARIANT_ENV, raising=False)
    cache = tmp_path / "variant-cache"
    monkeypatch.setenv(variant_check.CACHE_ENV, str(cache))
    return cache


def _openvino_computes(monkeypatch: pytest.MonkeyPatch, *precisions: str) -> None:
    facts = sessions.openvino_facts()
    assert facts is not None, "OpenVINO is in the dev set (build/requirements-openvino.txt): install it"
    monkeypatch.setattr(sessions, "openvino_facts", lambda: {**facts, "precisions": sorted({"f32", *precisions})})


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (nearest, ties to even) and back: what a bf16 result keeps."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _bf16_injected(monkeypatch: pytest.MonkeyPatch, granted: str = "bf16") -> None:
    """OpenVINO sessions that report ``granted`` and round their outputs to bf16: the real compiled model
    (f32 on a CPU without bf16), with bf16's loss of precision injected on what it returns."""
    real = sessions.openvino_session

    def injected(*args: Any, **kwargs: Any) -> sessions.OpenVinoSession:
        session = real(*args, **kwargs)
        run = session.run
        session.run = lambda names, feeds: [_bf16(o) for o in run(names, feeds)]  # type: ignore[method-assign]
        session.precision = granted
        return session

    monkeypatch.setattr(sessions, "openvino_session", injected)


def _timed(monkeypatch: pytest.MonkeyPatch, openvino: float, int8: float = 1.0) -> list[list[str]]:
    """Injected timings as fractions of onnxruntime fp32's: OpenVINO's sessions ``openvino``, int8's ``int8``.
    Returns the kinds of sessions each timing call was given."""
    calls: list[list[str]] = []

    def fake(runs: list[Any], feeds: dict[str, Any], budget_s: float = 0.0) -> list[float]:
        kinds = [type(run).__name__ for run in runs]
        calls.append(kinds)
        assert kinds[0] == "InferenceSession"  # onnxruntime fp32 first: every ratio is over it
        return [2.0] + [2.0 * (openvino if k == "OpenVinoSession" else int8) for k in kinds[1:]]

    monkeypatch.setattr(variant_check, "time_here", fake)
    return calls


def test_auto_runs_openvino_where_it_passes_and_is_faster_then_reopens_from_both_caches(
    built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _openvino_computes(monkeypatch)  # no bf16 here: OpenVINO's candidate is f32
    calls = _timed(monkeypatch, FASTER)
    models = open_models(built_tree)
    clip = models.variants()["clip"]["tiny-vit"]
    assert clip == {"text_encoder": "openvino/f32", "image_encoder": "openvino/f32"}
    why = models.reasons()["clip"]["tiny-vit"]["image_encoder"]
    assert why.startswith("openvino/f32: 2.00x fp32 at batch 1 here (int8 1.00x, openvino/f32 2.00x), int8: cosine")
    assert "openvino/f32: cosine 1.0000 here" in why
    assert models.variants()["reranker"]["tiny-bert"] == {"reranker": "openvino/f32"}
    # the regressor's build records no reduced-precision gate (it has no int8): never another engine
    assert models.variants()["regressor"]["boundary_regressor"] == {"regressor": "fp32"}
    assert all(kinds[1:] == ["InferenceSession", "OpenVinoSession"] for kinds in calls) and len(calls) == 5
    # the same answers as onnxruntime, from the sessions the check opened (external-data text towers included)
    reference = open_models(built_tree, variant="fp32")
    texts = ["a photo of a cat", "a diagram"]
    for name, encoder in models.clip.items():
        assert type(encoder.sessions["text"]).__name__ == "OpenVinoSession"
        np.testing.assert_allclose(encoder.encode_text(texts), reference.clip[name].encode_text(texts), atol=1e-4)
    passages = ["a cat sat on the mat", "stock prices fell", "cats are small felines"]
    np.testing.assert_allclose(
        models.reranker.score("cats", passages), reference.reranker.score("cats", passages), atol=1e-5
    )
    compiled = sorted((elsewhere / "openvino").iterdir())
    assert compiled  # OpenVINO's compiled models, in the run-time cache folder, never in the tree

    def not_again(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached choice was timed again")

    monkeypatch.setattr(variant_check, "time_here", not_again)
    again = open_models(built_tree)
    assert again.variants() == models.variants()
    assert again.reasons()["reranker"]["tiny-bert"]["reranker"].endswith("(checked here before, cached)")
    assert type(again.reranker.session).__name__ == "OpenVinoSession"
    assert sorted((elsewhere / "openvino").iterdir()) == compiled  # compiled once, read back


def test_auto_never_runs_openvino_where_it_is_slower(
    built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _openvino_computes(monkeypatch)
    _timed(monkeypatch, SLOWER, int8=0.8)  # int8 1.25x, OpenVINO 0.5x
    models = open_models(built_tree)
    assert models.variants()["clip"]["tiny-rn"] == {"text_encoder": "int8", "image_encoder": "int8"}
    why = models.reasons()["clip"]["tiny-rn"]["text_encoder"]
    assert re.match(
        r"int8: 1\.25x fp32 at batch 1 x \d+ positions here \(int8 1\.25x, openvino/f32 0\.50x\), int8: cos", why
    )
    _timed(monkeypatch, SLOWER, int8=1.0)
    monkeypatch.setenv(variant_check.CACHE_ENV, str(elsewhere.with_name("second")))
    models = open_models(built_tree)
    assert models.variants()["reranker"]["tiny-bert"] == {"reranker": "fp32"}
    assert re.match(
        r"fp32: int8 1\.00x, openvino/f32 0\.50x fp32 at batch 8 x \d+ positions here, under 1\.1x \(int8: Kendall",
        models.reasons()["reranker"]["tiny-bert"]["reranker"],
    )


def test_bf16_where_the_cpu_computes_it_and_the_gate_refuses_a_reranker_bf16_cannot_rank(
    tiny_sources: Path, built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A CPU with native bf16 (faked), bf16's rounding injected: the tiny towers and reranker keep their
    gates (cosine, ranking) and run openvino/bf16 when it is faster; a reranker whose logits lie closer together
    than bf16 resolves (made so) is refused with the figures, never timed, and runs onnxruntime fp32."""
    from modelbake.sources.tiny import make_tiny_cross_encoder

    _openvino_computes(monkeypatch, "bf16")
    _bf16_injected(monkeypatch)
    _timed(monkeypatch, FASTER)
    models = open_models(built_tree)
    assert models.variants()["clip"]["tiny-vit"] == {"text_encoder": "openvino/bf16", "image_encoder": "openvino/bf16"}
    assert models.variants()["reranker"]["tiny-bert"] == {"reranker": "openvino/bf16"}
    assert "openvino/bf16: Kendall's tau 1.0000 here" in models.reasons()["reranker"]["tiny-bert"]["reranker"]

    source = make_tiny_cross_encoder(tmp_path / "bf16-blind-source", bf16_blind=True)
    tree = tmp_path / "bf16-blind"
    run_cli("reranker-cache", "--reranker", f"tiny-bert@dir:{source}", "--out", str(tree), check=True)
    run_cli("merge-manifest", str(tree), check=True)  # fp32 alone: its ranking gate passed at build
    calls = _timed(monkeypatch, FASTER)
    blind = open_models(tree)
    assert blind.variants()["reranker"]["tiny-bert"] == {"reranker": "fp32"}
    assert (
        blind.reasons()["reranker"]["tiny-bert"]["reranker"]
        == "fp32: openvino/bf16 Kendall's tau 0.0000 here, below 0.9, top 3 changed"
    )
    assert calls == []


def test_a_precision_asked_for_and_not_granted_is_refused(
    built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _openvino_computes(monkeypatch, "bf16")
    _bf16_injected(monkeypatch, granted="f32")  # as OpenVINO does on a CPU without bf16
    _timed(monkeypatch, FASTER, int8=0.8)
    why = open_models(built_tree).reasons()["reranker"]["tiny-bert"]["reranker"]
    assert re.match(r"int8: 1\.25x fp32 at batch 8 x \d+ positions here, Kendall's tau", why)  # OpenVINO never timed


def test_an_explicit_engine_and_the_engine_list(built_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _openvino_computes(monkeypatch)
    monkeypatch.setenv(variants.VARIANT_ENV, "openvino/bf16")
    models = open_models(built_tree)
    assert models.variants()["regressor"]["boundary_regressor"] == {"regressor": "openvino/f32"}
    assert models.reasons()["reranker"]["tiny-bert"]["reranker"] == (
        "openvino/f32: openvino/bf16 asked for (MODELBAKE_VARIANT), this CPU computes no bf16"
    )
    assert type(models.regressor.session).__name__ == "OpenVinoSession"
    features = np.random.default_rng(0).standard_normal((3, models.regressor.feature_dim)).astype(np.float32)
    np.testing.assert_allclose(
        models.regressor.predict(features), open_models(built_tree, variant="fp32").regressor.predict(features),
        atol=1e-5,
    )  # fmt: skip
    monkeypatch.setattr(sessions, "openvino_facts", lambda: None)
    why = open_models(built_tree).reasons()["reranker"]["tiny-bert"]["reranker"]
    assert why.startswith("fp32: openvino/bf16 asked for (MODELBAKE_VARIANT), but OpenVINO is not installed here")
    monkeypatch.setenv(sessions.ENGINES_ENV, "openvino")
    monkeypatch.setenv(variants.VARIANT_ENV, "auto")
    with pytest.raises(ValueError, match=r"MODELBAKE_ENGINES='openvino': list onnxruntime and optionally openvino"):
        open_models(built_tree)


def test_a_tree_built_before_engines_never_runs_another(
    built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """fp32 entries without a gate (trees of earlier modelbake releases): OpenVINO is not a candidate."""
    import json

    old = tmp_path / "old"
    shutil.copytree(built_tree, old)
    manifest = json.loads((old / "model_manifest.json").read_text())
    for model in manifest["models"]:
        for entry in model["files"]:
            if entry.get("variant") == "fp32":
                entry.pop("gate", None)
    (old / "model_manifest.json").write_text(json.dumps(manifest, indent=2))
    _openvino_computes(monkeypatch)
    calls = _timed(monkeypatch, FASTER)
    models = open_models(old)
    assert "openvino" not in json.dumps(models.variants())
    assert all("OpenVinoSession" not in kinds for kinds in calls)


def test_the_build_records_openvino_on_the_fp32_graph_under_the_int8_gates(
    built_tree: Path, tiny_sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the build has OpenVINO, it runs each fp32 graph at the best precision it computes there, under
    the reduced-precision gate, and records the figures (never failing the build: open time decides)."""
    import json

    from modelbake.params import defaults, for_stage
    from modelbake.producers.reranker import run
    from modelbake.sources.tiny import make_tiny_cross_encoder

    manifest = json.loads((built_tree / "model_manifest.json").read_text())
    recorded = {
        (model["name"], entry["role"]): entry["parity"].get("engines")
        for model in manifest["models"]
        for entry in model["files"]
        if entry.get("variant") == "fp32"
    }
    assert recorded[("boundary_regressor", "regressor")] is None  # no reduced-precision gate: nothing to run
    (name,) = recorded[("tiny-bert", "reranker")]
    assert re.fullmatch(r"openvino/(bf16|f32)", name)  # this CPU's: bf16 where OpenVINO computes it
    for key in [("tiny-vit", "image_encoder"), ("tiny-vit", "text_encoder"), ("tiny-bert", "reranker")]:
        figures = recorded[key][name]
        assert figures["passed"] is True or figures["why"], (key, figures)
        assert not figures["passed"] or figures["min_cosine"] >= 0.99, (key, figures)

    _openvino_computes(monkeypatch, "bf16")
    _bf16_injected(monkeypatch)
    source = make_tiny_cross_encoder(tmp_path / "bf16-blind-source", bf16_blind=True)
    values = defaults(for_stage("reranker-cache"), RERANKER_MODELS=f"tiny-bert@dir:{source}")
    (record,) = run(tmp_path / "tree", values)  # the build passes: fp32 keeps the score contract
    (fp32,) = [e for e in record["files"] if e.get("variant") == "fp32"]
    blind = fp32["parity"]["engines"]["openvino/bf16"]
    assert blind["passed"] is False and "the ranking changed on the probe queries" in blind["why"], blind


def test_a_tree_found_by_name_runs_on_openvino_when_asked(
    built_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No manifest (allow_unverified): OpenVINO opens the graph from its path, its inputs as it reads them."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for onnx in (built_tree / "onnx").glob("clip_tiny-vit_*_encoder.onnx*"):  # the text tower's data too
        shutil.copy(onnx, flat / onnx.name)
    shutil.copytree(built_tree / "clip", flat / "clip")
    monkeypatch.setenv(variants.VARIANT_ENV, "openvino/f32")
    found = open_models(flat, allow_unverified=True).clip["tiny-vit"]
    assert {type(s).__name__ for s in found.sessions.values()} == {"OpenVinoSession"}
    assert found.chosen == {"text_encoder": "openvino/f32", "image_encoder": "openvino/f32"}
    monkeypatch.delenv(variants.VARIANT_ENV)
    checked = open_models(built_tree, variant="fp32").clip["tiny-vit"]
    texts = ["a dog on a beach"]
    np.testing.assert_allclose(found.encode_text(texts), checked.encode_text(texts), atol=1e-4)


def test_openvino_never_writes_an_external_data_location_outside_its_folder(tmp_path: Path) -> None:
    """The bytes of a graph with external data go to a private temporary folder: a location that is not a
    plain file name there (the manifest check lets ``../onnx/NAME.onnx.data`` through when it names a listed
    file) is refused before anything is written."""
    outside = tmp_path / "outside.onnx.data"
    with pytest.raises(PermissionError, match="an external-data location in the graph is not a file beside it"):
        sessions.openvino_session(b"graph", {"path": "onnx/a.onnx"}, external={f"../../{outside}": b"w"})
    assert not outside.exists()
