"""`auto` where a tree is opened on a CPU the build did not measure: each shipped int8 is checked on its
golden probe under its build's thresholds and timed beside fp32 here, the choice cached and reported.

The CPU that opens the tree is faked (another class's signature), and timings are injected, so nothing here
depends on the CPU that runs the tests; the accuracy check runs for real (real sessions, real golden files).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

from modelbake.runtime import variant_check, variants
from modelbake.runtime.models import open_models

# Every role of the tiny tree that ships an int8 (download --int8 --int8-ship gated): two towers of two CLIPs
# and the reranker.
INT8_ROLES = 5


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This CPU as one of another class than the build machine's; the choices cached in a scratch folder."""
    other = {**variants.machine(), "cpu": "Another CPU", "isa": ["avx2", "fma", "another_class"]}
    monkeypatch.setattr(variants, "machine", lambda: other)
    cache = tmp_path / "variant-cache"
    monkeypatch.setenv(variant_check.CACHE_ENV, str(cache))
    monkeypatch.delenv(variants.VARIANT_ENV, raising=False)
    return cache


def _timed(monkeypatch: pytest.MonkeyPatch, int8_speedup: float) -> list[int]:
    """Injected timings: int8 ``int8_speedup`` times faster than fp32; returns the list of timed calls."""
    calls: list[int] = []

    def fake(runs: list[Any], feeds: dict[str, Any], budget_s: float = 0.0) -> list[float]:
        calls.append(len(runs))
        # each role's workload (variant_check.TIMED_AT): a tower one input, a reranker 8 pairs of <= 64 tokens
        rows, most = (8, 64) if "attention_mask" in feeds else (1, 16) if "input_ids" in feeds else (1, None)
        assert all(len(v) == rows and (most is None or v.shape[1] <= most) for v in feeds.values())
        return [2.0] + [2.0 / int8_speedup] * (len(runs) - 1)

    monkeypatch.setattr(variant_check, "time_here", fake)
    return calls


def test_on_another_cpu_class_auto_checks_times_and_caches_its_choice(
    built_tree: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _timed(monkeypatch, 2.0)
    models = open_models(built_tree)
    assert models.variants()["clip"]["tiny-vit"] == {"text_encoder": "int8", "image_encoder": "int8"}
    why = models.reasons()
    assert why["clip"]["tiny-vit"]["image_encoder"].startswith("int8: 2.00x fp32 at batch 1 here, cosine 0.9")
    assert re.match(  # 8 pairs, as many positions as the tiny probe has up to 64
        r"int8: 2\.00x fp32 at batch 8 x \d+ positions here, Kendall's tau 1\.0000 here",
        why["reranker"]["tiny-bert"]["reranker"],
    )
    assert why["regressor"]["boundary_regressor"] == {"regressor": "fp32: the only variant built"}
    assert calls == [2] * INT8_ROLES and len(list(elsewhere.glob("*.json"))) == INT8_ROLES

    # The second open reuses every choice: nothing is checked or timed again.
    def not_again(*_: Any, **__: Any) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(variant_check, "time_here", not_again)
    again = open_models(built_tree)
    assert again.variants() == models.variants()
    assert again.reasons()["clip"]["tiny-vit"]["image_encoder"].endswith("(checked here before, cached)")

    # Another CPU (another signature) checks for itself.
    third = {**variants.machine(), "cpu": "A third CPU"}
    monkeypatch.setattr(variants, "machine", lambda: third)
    calls = _timed(monkeypatch, 0.5)  # int8 slower there
    models = open_models(built_tree)
    assert set(models.variants()["clip"]["tiny-rn"].values()) == {"fp32"}
    why = models.reasons()["clip"]["tiny-rn"]["text_encoder"]
    assert re.match(r"fp32: int8 0\.50x fp32 at batch 1 x \d+ positions here, under 1\.1x \(", why)  # a query
    assert calls == [2] * INT8_ROLES and len(list(elsewhere.glob("*.json"))) == 2 * INT8_ROLES


def test_on_the_build_machines_class_the_build_table_decides(built_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(variants.VARIANT_ENV, raising=False)
    monkeypatch.setattr(variant_check, "check_here", None)  # never called: calling it would fail
    why = open_models(built_tree).reasons()["clip"]["tiny-vit"]["image_encoder"]
    assert why.endswith("at batch 1 on the build machine, whose ISA flags this CPU shares")


def test_no_cache_inside_the_tree_and_none_is_fine(built_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = {**variants.machine(), "isa": ["another_class"]}
    monkeypatch.setattr(variants, "machine", lambda: other)
    monkeypatch.setenv(variant_check.CACHE_ENV, str(built_tree / "cache"))
    calls = _timed(monkeypatch, 2.0)
    assert set(open_models(built_tree).variants()["clip"]["tiny-vit"].values()) == {"int8"}
    assert not (built_tree / "cache").exists() and calls == [2] * INT8_ROLES


def _rehash(tree: Path, relpath: str) -> None:
    """The manifest entry of ``relpath`` made to state the file's current bytes (as a build that made it would)."""
    manifest_path = tree / "model_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (tree / relpath).read_bytes()
    for model in manifest["models"]:
        for entry in model["files"]:
            if entry["path"] == relpath:
                entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest_path.write_text(json.dumps(manifest, indent=2))


def test_an_int8_that_misses_its_gate_here_is_refused_here_with_its_reason(
    tiny_sources: Path, tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if the build machine's int8 had passed its ranking gate and this CPU's does not: the tree's int8
    graph is one that ties every score (the int8-blind reranker's, shipped by a lenient build), under the
    tree's own gate (top 3, tau 0.9). Refused here, never timed; fp32 runs, and the reason says why."""
    from modelbake.sources.tiny import make_tiny_cross_encoder

    good, blind = tmp_path / "good", tmp_path / "blind"
    run_cli(
        "reranker-cache", "--reranker", f"tiny-bert@dir:{tiny_sources / 'reranker' / 'tiny-bert'}",
        "--reranker-int8", "--int8-ship", "gated", "--out", str(good), check=True,
    )  # fmt: skip
    run_cli("merge-manifest", str(good), check=True)
    source = make_tiny_cross_encoder(tmp_path / "blind-source", int8_blind=True)
    run_cli(
        "reranker-cache", "--reranker", f"tiny-bert@dir:{source}", "--reranker-int8", "--int8-ship", "gated",
        "--reranker-int8-top-k", "0", "--reranker-int8-min-tau", "-1", "--out", str(blind), check=True,
    )  # fmt: skip
    int8 = "onnx/reranker_tiny-bert_int8.onnx"
    shutil.copyfile(blind / int8, good / int8)
    _rehash(good, int8)

    calls = _timed(monkeypatch, 3.0)
    models = open_models(good)
    assert models.variants()["reranker"]["tiny-bert"] == {"reranker": "fp32"}
    assert (
        models.reasons()["reranker"]["tiny-bert"]["reranker"]
        == "fp32: int8 Kendall's tau 0.0000 here, below 0.9, top 3 changed"
    )
    assert calls == []  # nothing passed, nothing to time
    # verify says the same, and which CPU it ran on
    from modelbake.runtime.verify import verify

    rows = {(c.model, c.what): c for c in verify(good)}
    assert rows[("reranker:tiny-bert", "auto reranker")].detail.startswith("runs fp32: int8 Kendall's tau 0.0000")
    assert rows[("-", "cpu")].detail.startswith("Another CPU (")


def test_the_process_wide_override(built_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variants.VARIANT_ENV, "fp32")
    models = open_models(built_tree)
    assert {v for roles in models.variants()["clip"].values() for v in roles.values()} == {"fp32"}
    assert models.reasons()["reranker"]["tiny-bert"]["reranker"] == "fp32: asked for (MODELBAKE_VARIANT)"
    monkeypatch.setenv(variants.VARIANT_ENV, "int8")
    models = open_models(built_tree)
    assert models.variants()["clip"]["tiny-rn"] == {"text_encoder": "int8", "image_encoder": "int8"}
    assert models.variants()["regressor"]["boundary_regressor"] == {"regressor": "fp32"}  # it has no int8
    monkeypatch.setenv(variants.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match=r"MODELBAKE_VARIANT='fast': use auto or one of fp32, int8"):
        open_models(built_tree)


def test_the_real_timer_decides_either_way_and_says_which(built_tree: Path, elsewhere: Path) -> None:
    """No injected timings: whichever variant is faster on this CPU, the choice names its measured ratio."""
    models = open_models(built_tree)
    for role, why in models.reasons()["clip"]["tiny-vit"].items():
        assert re.fullmatch(
            r"int8: \d+\.\d\dx fp32 at batch 1( x 16 positions)? here, cosine 0\.\d{4} here|"
            r"fp32: int8 \d+\.\d\dx fp32 at batch 1( x 16 positions)? here, under 1\.1x \(cosine 0\.\d{4} here\)",
            why,
        ), (role, why)


def test_the_timer_gives_up_past_its_budget(built_tree: Path) -> None:
    from modelbake.runtime.sessions import session

    graph = built_tree / "onnx" / "boundary_regressor.onnx"
    runs = [session(graph, 1), session(graph, 1)]
    feeds = {runs[0].get_inputs()[0].name: np.zeros((1, runs[0].get_inputs()[0].shape[1]), np.float32)}
    medians = variant_check.time_here(runs, feeds)
    assert medians is not None and len(medians) == 2 and all(m > 0 for m in medians)
    assert variant_check.time_here(runs, feeds, budget_s=0.0) is None


def test_each_role_is_timed_on_its_workload_cut_from_its_probe() -> None:
    """An image at batch 1; a query's 16 tokens; a reranker's 8 pairs (the probe's rows repeated) of at most 64
    positions (variant_check.TIMED_AT); positions cut only where the graph's sequence axis is dynamic."""
    long = {k: np.arange(5 * 207).reshape(5, 207) for k in ("input_ids", "attention_mask")}
    pairs = variant_check.timed_feeds("reranker", long, {"input_ids", "attention_mask"})
    assert {k: v.shape for k, v in pairs.items()} == {"input_ids": (8, 64), "attention_mask": (8, 64)}
    np.testing.assert_array_equal(pairs["input_ids"][5], long["input_ids"][0, :64])  # rows repeated, then cut
    assert variant_check.timed_words(pairs) == "at batch 8 x 64 positions"
    short = variant_check.timed_feeds("reranker", {"input_ids": np.ones((3, 20), np.int64)}, {"input_ids"})
    assert short["input_ids"].shape == (8, 20)  # never longer than the probe: within the model's positions
    ids = {"input_ids": np.ones((4, 77), np.int64)}
    assert variant_check.timed_feeds("text_encoder", ids, {"input_ids"})["input_ids"].shape == (1, 16)
    assert variant_check.timed_feeds("text_encoder", ids, set())["input_ids"].shape == (1, 77)  # fixed axis
    image = variant_check.timed_feeds("image_encoder", {"image": np.zeros((4, 3, 8, 8), np.float32)}, set())
    assert image["image"].shape == (1, 3, 8, 8) and variant_check.timed_words(image) == "at batch 1"
