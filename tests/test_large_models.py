"""Models too large for one ONNX file: graph + external data, checked like every other file.

Protobuf caps a serialised model at 2 GiB; the trees the tests build lower the threshold to 1 MB
(conftest.EXTERNAL_DATA_BYTES), so the tiny text towers take the path ViT-H-14's image tower takes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXTERNAL_DATA_BYTES

from modelbake.manifest import ManifestError, Role, read_manifest
from modelbake.runtime.models import open_models
from modelbake.runtime.sessions import session
from modelbake.runtime.verify import verify


def _entries(root: Path) -> list[dict]:
    return [f for m in read_manifest(root)["models"] for f in m["files"]]


def test_graphs_over_the_threshold_ship_with_their_weights_beside_them(built_tree: Path) -> None:
    entries = _entries(built_tree)
    by_path = {f["path"]: f for f in entries}
    onnx_entries = [f for f in entries if f["format"] == "onnx"]
    paired = [f for f in onnx_entries if "external_data" in f]
    # Both kinds in one tree: the text towers (13 MB) are pairs, tiny-vit's image tower (0.5 MB) is one file.
    assert {f["path"] for f in paired} >= {
        "onnx/clip_tiny-vit_text_encoder.onnx",
        "onnx/clip_tiny-vit_text_encoder_int8.onnx",
        "onnx/clip_tiny-rn_image_encoder.onnx",
    }
    assert "onnx/clip_tiny-vit_image_encoder.onnx" in {f["path"] for f in onnx_entries if f not in paired}
    for entry in paired:
        data = by_path[entry["external_data"]]
        assert entry["external_data"] == entry["path"] + ".data"
        assert data["role"] == Role.ONNX_DATA and data["format"] == "onnx-data"
        assert entry["bytes"] < int(EXTERNAL_DATA_BYTES) < data["bytes"]
        # Every external tensor names the data file by its bare name: the pair moves as a folder.
        graph = onnx.load(built_tree / entry["path"], load_external_data=False)
        locations = {kv.value for t in graph.graph.initializer for kv in t.external_data if kv.key == "location"}
        assert locations == {Path(entry["path"]).name + ".data"}
    for entry in onnx_entries:
        if "external_data" not in entry:
            assert not (built_tree / (entry["path"] + ".data")).exists()


def test_a_moved_tree_loads_its_pairs_and_a_missing_data_file_is_named(built_tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "elsewhere" / "models"
    shutil.copytree(built_tree, root)
    here, there = open_models(built_tree, variant="fp32"), open_models(root, variant="fp32")
    texts = ["a dog on a beach", ""]
    np.testing.assert_array_equal(here.clip["tiny-vit"].encode_text(texts), there.clip["tiny-vit"].encode_text(texts))
    assert all(c.ok for c in verify(root))
    data = root / "onnx" / "clip_tiny-vit_text_encoder.onnx.data"
    data.unlink()
    with pytest.raises(ManifestError, match=r"clip_tiny-vit_text_encoder\.onnx\.data: listed .* but missing"):
        open_models(root)
    # Opened directly (no manifest in the way), the session names the file too, not onnxruntime's internals.
    with pytest.raises(FileNotFoundError, match=r"clip_tiny-vit_text_encoder\.onnx\.data, which is not beside it"):
        session(root / "onnx" / "clip_tiny-vit_text_encoder.onnx")


def test_an_external_data_location_outside_the_folder_is_a_refusal_not_a_missing_file(tmp_path: Path) -> None:
    """onnxruntime refuses a location that leaves the graph's folder; that is said as a refusal, not as the
    missing NAME.onnx.data it once was reported as (which sent users looking for a file)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "m").mkdir()
    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m" / "g.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    (path.parent / "g.onnx.data").rename(tmp_path / "outside.bin")  # the weights now lie outside the folder
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(PermissionError, match=r"g\.onnx: refused, an external-data location in the graph points"):
        session(path)


def test_each_model_reports_its_peak_memory_in_the_manifest_and_the_summary(
    download_run: tuple[Path, str, str],
) -> None:
    tree, stdout, _ = download_run
    # Bounds that hold on any machine: the stage's process has torch loaded, so its peak is at least what an
    # interpreter holds resident right after `import torch`; and no more than the machine's memory.
    probe = "import torch; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
    torch_resident = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout) * 1024
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    for model in read_manifest(tree)["models"]:
        if model["stage"] in ("clip-export", "reranker-cache"):
            assert torch_resident <= model["build"]["peak_rss_bytes"] <= memory, (model["name"], torch_resident)
            assert model["build"]["seconds"] > 0
    header = stdout.splitlines()[0].split()
    assert "peak" in header and "GB" in header


def test_a_model_too_large_for_the_memory_fails_in_one_line_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ViT-bigG-14's real parameter count (on the meta device) against a 16 GB machine's free memory."""
    from modelbake.params import SELECTION, defaults
    from modelbake.producers import clip, common
    from modelbake.producers.common import ProducerError

    checkpoint = tmp_path / "bigg.safetensors"
    checkpoint.write_bytes(b"not loaded")
    monkeypatch.setattr(common, "available_memory", lambda: 16_000_000_000)
    values = defaults(SELECTION, CLIP_MODELS=f"ViT-bigG-14@file:{checkpoint}")
    out = tmp_path / "models"
    with pytest.raises(ProducerError) as caught:
        clip.run(out, values)
    message = str(caught.value)
    assert "\n" not in message and "ViT-bigG-14" in message
    assert "2.54 B parameters (10.2 GB in fp32, the largest tower 7.4 GB) need about 27 GB" in message
    assert "16.0 GB is available" in message and "smaller model" in message
    assert not out.exists()
    monkeypatch.setenv(common.SKIP_MEMORY_CHECK_ENV, "1")
    with pytest.raises(ProducerError, match="OpenCLIP could not load it"):  # tried, and the dummy file fails
        clip.run(out, values)
