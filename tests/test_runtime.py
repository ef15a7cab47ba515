"""The run-time side: torch-free, and verify catches what it must."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelbake.runtime.variants import machine
from modelbake.runtime.verify import verify

BUILD_TIME = ("torch", "open_clip", "transformers", "sentence_transformers", "onnxsim")


def test_runtime_imports_no_build_time_package() -> None:
    code = (
        "import sys, modelbake.runtime.verify, modelbake.runtime.__main__, modelbake.manifest, modelbake.spec;"
        "import modelbake.runtime.models, modelbake.runtime.registry, modelbake.runtime.sessions;"
        "import modelbake.cli, modelbake.params, modelbake.producers, modelbake.bake, modelbake.demo;"
        f"bad = [m for m in {BUILD_TIME!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"run-time modules pulled build-time packages: {proc.stdout}{proc.stderr}"


def test_verify_passes_on_a_fresh_tree(built_tree: Path) -> None:
    checks = verify(built_tree)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    inference = [c for c in checks if c.what.startswith("inference")]
    assert len(inference) == 11  # 2 CLIP x (text + image) x (fp32 + int8), reranker x 2, regressor
    replays = [c for c in checks if c.what.startswith("inputs")]
    assert len(replays) == 10 and all("identical" in c.detail or "0.0e+00" in c.detail for c in replays)


@pytest.mark.parametrize(
    "victim",
    [
        "onnx/clip_tiny-vit_image_encoder.onnx",
        "golden/reranker_tiny-bert.npz",
        "regressor/boundary_regressor_pretrained.safetensors",
    ],
)
def test_verify_catches_a_flipped_byte(built_tree: Path, tmp_path: Path, victim: str) -> None:
    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    data = bytearray((root / victim).read_bytes())
    data[-10] ^= 0x01
    (root / victim).write_bytes(bytes(data))
    failed = [c for c in verify(root) if not c.ok]
    assert failed and victim in failed[0].detail and "sha256" in failed[0].detail
    # The quick health check only sees sizes; a truncation is caught there too.
    (root / victim).write_bytes(bytes(data[:-1]))
    assert any(not c.ok and victim in c.detail for c in verify(root, quick=True))


def test_verify_cli_exit_codes(built_tree: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "modelbake.runtime", "verify", str(built_tree)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "checks ok" in ok.stdout
    # The CPU class it ran on, so a log says which class passed: its model and the ISA flags kernels use.
    here = machine()
    cpu = f"{here['cpu']} ({here['arch']}; {' '.join(here['isa']) or 'none known'}; onnxruntime "
    assert re.search(rf"^ok +- +cpu +{re.escape(cpu)}", ok.stdout, re.M), ok.stdout
    empty = subprocess.run(
        [sys.executable, "-m", "modelbake.runtime", "verify", str(tmp_path)], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "no manifest" in empty.stdout


def test_open_models_gives_all_three_without_torch(built_tree: Path) -> None:
    code = f"""
import sys, numpy as np
from modelbake.runtime.models import open_models
models = open_models({str(built_tree)!r})
clip = models.default_clip
text = clip.encode_text(["a dog", "", "café 東京"])
image = clip.encode_image([np.zeros((40, 50, 3), np.uint8)])
scores = models.reranker.score("person walking a dog", ["a man walks his dog", "a red car"])
ranked = models.reranker.rank("q", ["a", "b", "c"], top_k=2)
deltas = models.regressor.predict(np.zeros((4, models.regressor.feature_dim), np.float32))
print(list(models.clip), clip.name, text.shape, image.shape, scores.shape, len(ranked), deltas.shape)
print([m for m in ("torch", "open_clip", "transformers", "sentence_transformers") if m in sys.modules])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # The default CLIP model is the first one selected (CLIP_MODELS order), whatever its name.
    assert proc.stdout.splitlines() == ["['tiny-vit', 'tiny-rn'] tiny-vit (3, 32) (1, 32) (2,) 2 (4, 2)", "[]"]


def test_reranker_runtime_matches_sentence_transformers(built_tree: Path) -> None:
    from sentence_transformers import CrossEncoder

    from modelbake.runtime.reranker import Reranker

    reranker = Reranker.from_folder(built_tree, variant="fp32")
    query = "who is walking the dog"
    passages = ["a man is walking his dog", "", "dog " * 300, "café 東京 🚀", "people dance on the beach at night"]
    expected = CrossEncoder(str(built_tree / "reranker" / "tiny-bert")).predict([(query, p) for p in passages])
    got = reranker.score(query, passages)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [i for i, _ in reranker.rank(query, passages)] == list(np.argsort(-expected, kind="stable"))
    with pytest.raises(TypeError):
        reranker.score("q", "not a list")  # type: ignore[arg-type]


def test_reranker_batches_pairs_of_similar_length() -> None:
    from modelbake.runtime.reranker import length_batches

    lengths = np.array([50, 9, 10, 200, 11, 48, 12, 13, 60, 10])
    batches = length_batches(lengths, batch_size=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))  # each row once
    assert [lengths[b].tolist() for b in batches] == [[9, 10, 10], [11, 12, 13], [48, 50, 60], [200]]
    assert all(lengths[b].max() <= 1.25 * lengths[b].min() for b in batches)
    assert [len(b) for b in length_batches(np.full(70, 7), batch_size=32)] == [32, 32, 6]


def test_every_artifact_flipped_or_truncated_is_caught_by_load_and_verify(
    built_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncated: refused at open (sizes). Flipped: refused at open when a loader reads the file there
    (its bytes are hashed as they load), else by verify, which hashes every file; verify catches both."""
    from modelbake import manifest
    from modelbake.runtime.models import open_models

    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    paths = [f["path"] for m in manifest.read_manifest(root)["models"] for f in m["files"]]
    assert len(paths) > 20
    read, real = [], Path.read_bytes  # the loaders read each file once, whole
    monkeypatch.setattr(Path, "read_bytes", lambda p: read.append(p.relative_to(root).as_posix()) or real(p))
    open_models(root)
    monkeypatch.setattr(Path, "read_bytes", real)
    assert any(p.endswith(".onnx.data") for p in read) and any(p.endswith("tokenizer.json") for p in read)
    for rel in paths:
        original = (root / rel).read_bytes()
        for damaged in (original[:-1], original[:7] + bytes([original[7] ^ 0x20]) + original[8:]):
            (root / rel).write_bytes(damaged)
            if len(damaged) < len(original) or rel in read:
                with pytest.raises(manifest.ManifestError, match=re.escape(rel)):
                    open_models(root)
            else:
                open_models(root)  # nothing reads it at open: verify's to hash
            failed = [c for c in verify(root) if not c.ok]
            assert failed and rel in failed[0].detail, (rel, failed)
        (root / rel).write_bytes(original)
    assert all(c.ok for c in verify(root))


def test_missing_file_and_empty_folder(built_tree: Path, tmp_path: Path) -> None:
    from modelbake.manifest import ManifestError
    from modelbake.runtime.models import open_models

    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    (root / "onnx" / "boundary_regressor.onnx").unlink()
    with pytest.raises(
        ManifestError, match=re.escape("onnx/boundary_regressor.onnx: listed for model boundary_regressor but missing")
    ):
        open_models(root)
    with pytest.raises(ManifestError, match=r"no model_manifest\.json, so nothing there can be verified"):
        open_models(tmp_path / "empty")


def test_open_models_without_a_manifest_finds_files_by_the_seed_names(
    built_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed's flat layout: ONNX files beside each other, the regressor by its look-up order."""
    from modelbake.manifest import ManifestError
    from modelbake.runtime.models import open_models

    flat = tmp_path / "flat"
    flat.mkdir()
    for onnx in (built_tree / "onnx").glob("clip_*_encoder.onnx*"):  # with external data, where there is some
        shutil.copy(onnx, flat / onnx.name)
    shutil.copytree(built_tree / "clip", flat / "clip")  # tokenizer.json per model
    shutil.copy(built_tree / "onnx" / "boundary_regressor.onnx", flat / "boundary_regressor_pretrained.onnx")
    with pytest.raises(ManifestError, match="allow_unverified=True or MODELBAKE_ALLOW_UNVERIFIED=1"):
        open_models(flat)  # unverified loading is an explicit opt-in
    with caplog.at_level("WARNING", logger="modelbake"):
        found = open_models(flat, allow_unverified=True)
    assert sorted(found.clip) == ["tiny-rn", "tiny-vit"] and found.reranker is None
    assert "not verified" in caplog.text
    checked = open_models(built_tree, variant="fp32")  # the files copied above
    features = checked.default_clip.encode_text(["a dog on a beach"])
    np.testing.assert_allclose(
        found.clip["tiny-vit"].encode_text(["a dog on a beach"]),
        checked.clip["tiny-vit"].encode_text(["a dog on a beach"]),
        atol=1e-6,
    )
    feature_dim = found.regressor.feature_dim
    probe = np.resize(features, (3, feature_dim)).astype(np.float32)
    np.testing.assert_array_equal(found.regressor.predict(probe), checked.regressor.predict(probe))
    # The look-up order: the ONNX export's own path wins over the seed-named twin.
    (flat / "onnx").mkdir()
    shutil.copy(built_tree / "onnx" / "clip_tiny-vit_image_encoder.onnx", flat / "onnx" / "boundary_regressor.onnx")
    with pytest.raises(ValueError, match="features must have shape"):
        open_models(flat, allow_unverified=True).regressor.predict(probe)


def test_open_hashes_what_it_loads_and_verify_hashes_every_file(built_tree: Path, tmp_path: Path) -> None:
    """Opening a tree checks every listed file's presence and size, and the sha256 of the bytes each loader
    reads, as it reads them; a file no loader reads at open (a golden probe) is ``verify``'s to hash."""
    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    golden = next(root.glob("golden/*.npz"))
    data = bytearray(golden.read_bytes())
    data[-1] ^= 0xFF
    golden.write_bytes(bytes(data))
    opens = [sys.executable, "-c", f"from modelbake.runtime.models import open_models; open_models({str(root)!r})"]
    assert subprocess.run(opens, capture_output=True).returncode == 0
    verify = [sys.executable, "-m", "modelbake.runtime", "verify", str(root)]
    full = subprocess.run(verify, capture_output=True, text=True)
    assert full.returncode == 1 and golden.name in full.stdout and "does not match the manifest" in full.stdout
    golden.write_bytes(bytes(data[:-1]))  # a size that differs is refused at open
    shorter = subprocess.run(opens, capture_output=True, text=True)
    assert shorter.returncode == 1 and f"{golden.name}: size" in shorter.stderr
