"""Fail closed at run time: what a service loads is what was built and checked, or it is refused.

Each test here failed on the code before it: manifest-less loading was silently allowed, the manifest itself
was not pinned, a file swapped after its check loaded, unlisted weights shadowed listed ones,
NaN passed the gates, verify showed tracebacks, and the merge re-timed the user's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelbake import manifest as manifest_module
from modelbake.manifest import MANIFEST_PIN_ENV, PUBLIC_KEY_ENV, ManifestError, finalize, read_manifest
from modelbake.runtime.clip import ClipEncoder
from modelbake.runtime.models import open_models
from modelbake.runtime.regressor import BoundaryRegressorONNX, find_weights
from modelbake.runtime.verify import run_golden, verify
from modelbake.spec import FRAGMENTS_DIR, MANIFEST_NAME


@pytest.fixture
def tree(built_tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(built_tree, root)
    return root


def _digest(root: Path) -> str:
    return hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()


def test_a_tree_without_manifest_is_refused_unless_opted_in(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree / MANIFEST_NAME).unlink()
    monkeypatch.delenv("MODELBAKE_ALLOW_UNVERIFIED", raising=False)
    for load in (open_models, ClipEncoder.from_folder, BoundaryRegressorONNX.from_folder, find_weights):
        with pytest.raises(ManifestError, match="nothing there can be verified") as err:
            load(tree)
        assert "allow_unverified=True or MODELBAKE_ALLOW_UNVERIFIED=1" in str(err.value), load
    monkeypatch.setenv("MODELBAKE_ALLOW_UNVERIFIED", "1")
    assert sorted(open_models(tree).clip) == ["tiny-rn", "tiny-vit"]
    assert find_weights(tree).name == "boundary_regressor_pretrained.pth"


def test_a_configured_pin_or_key_refuses_a_missing_manifest_even_when_opted_in(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODELBAKE_ALLOW_UNVERIFIED=1 once returned before the pin and the key were looked at: a pinned, signed
    tree with its manifest deleted loaded by name with a warning. A reader that expects a verified tree
    refuses every way in, whatever the opt-in says."""
    digest = _digest(tree)
    (tree / MANIFEST_NAME).unlink()
    monkeypatch.setenv("MODELBAKE_ALLOW_UNVERIFIED", "1")
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    loads = (open_models, ClipEncoder.from_folder, BoundaryRegressorONNX.from_folder, find_weights)
    for setting, value, said in (
        (MANIFEST_PIN_ENV, f"sha256:{digest}", "the manifest is pinned"),
        (PUBLIC_KEY_ENV, str(tree / "public.pem"), "a public key is set"),
    ):
        monkeypatch.setenv(setting, value)
        for load in loads:
            with pytest.raises(ManifestError, match=f"no model_manifest.json, and {said} .*even with MODELBAKE_ALLOW"):
                load(tree)
        monkeypatch.delenv(setting)
    with pytest.raises(ManifestError, match="the manifest is pinned"):
        open_models(tree, manifest_sha256=digest)  # given as an argument, too
    assert sorted(open_models(tree).clip) == ["tiny-rn", "tiny-vit"]  # neither set: the opt-in still works


def test_the_manifest_itself_is_pinned(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = _digest(tree)
    assert open_models(tree, manifest_sha256=f"sha256:{digest}").default_clip
    doc = json.loads((tree / MANIFEST_NAME).read_text())
    doc["models"][0]["preprocessing"]["mean"] = [0.0, 0.0, 0.0]  # an edit no file check would see
    (tree / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    with pytest.raises(ManifestError, match=f"is not the pinned {digest}"):
        open_models(tree, manifest_sha256=digest)
    pin = tmp_path / "manifest.sha256"
    pin.write_text(f"{digest}  /models/model_manifest.json\n")  # sha256sum's format, as the image writes it
    monkeypatch.setenv(MANIFEST_PIN_ENV, f"@{pin}")
    with pytest.raises(ManifestError, match="swapped or edited"):
        read_manifest(tree)
    assert next(c for c in verify(tree) if not c.ok).what == "manifest"
    monkeypatch.setenv(MANIFEST_PIN_ENV, f"sha256:{_digest(tree)}")  # a mounted tree states its own digest
    assert read_manifest(tree)["models"]
    monkeypatch.setenv(MANIFEST_PIN_ENV, "unpinned")  # or opts out, by name
    assert read_manifest(tree)["models"]
    monkeypatch.setenv(MANIFEST_PIN_ENV, "0123")
    with pytest.raises(ManifestError, match="give sha256:<64 hex digits>, @FILE, or unpinned"):
        read_manifest(tree)


def _same_stat_other_bytes(path: Path, data: bytes) -> None:
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_listed_weights_win_over_unlisted_files_beside_them(tree: Path) -> None:
    shutil.copy(tree / "onnx" / "boundary_regressor.onnx", tree / "boundary_regressor_pretrained.pth")
    assert find_weights(tree) == (tree / "regressor" / "boundary_regressor_pretrained.pth").resolve()
    (tree / "regressor" / "boundary_regressor_pretrained.pth").write_bytes(b"not the weights")
    with pytest.raises(ManifestError, match=r"regressor/boundary_regressor_pretrained\.pth"):
        find_weights(tree)


def test_non_finite_outputs_fail_the_gate_and_verify(tree: Path) -> None:
    from modelbake.producers.onnx_export import ParityError, compare

    ref = [np.ones((2, 4), np.float32)]
    with pytest.raises(ParityError, match="NaN or inf"):
        compare(ref, [np.full((2, 4), np.nan, np.float32)])
    manifest = read_manifest(tree)
    entry = next(f for m in manifest["models"] for f in m["files"] if f["path"] == "onnx/boundary_regressor.onnx")
    model = next(m for m in manifest["models"] if entry in m["files"])
    with np.load(tree / entry["golden"]) as data:
        golden = {k: data[k] for k in data.files}
    golden["output:deltas"] = np.full_like(golden["output:deltas"], np.nan)
    assert not run_golden(tree, model, entry, golden).ok  # max() skipped NaN and reported 0 before


def test_verify_reports_unreadable_files_as_failures_not_tracebacks(tree: Path) -> None:
    loop = tree / "onnx" / "loop"
    loop.symlink_to(loop)
    doc = json.loads((tree / MANIFEST_NAME).read_text())
    doc["models"][0]["files"][0]["path"] = "onnx/loop"
    (tree / MANIFEST_NAME).write_text(json.dumps(doc))
    failed = [c for c in verify(tree) if not c.ok]
    assert failed and "onnx/loop" in failed[0].detail


def test_verify_reports_a_file_it_may_not_read_as_a_failure(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a service user without read permission would see it (the tests run as root, who reads everything,
    so the operating system's refusal is injected at the one place files are read)."""
    real = manifest_module.sha256_file

    def refuse(path: Path) -> str:
        if path.name == "boundary_regressor.onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(manifest_module, "sha256_file", refuse)
    failed = [c for c in verify(tree) if not c.ok]
    assert [c.model for c in failed] == ["regressor:boundary_regressor"]
    assert failed[0].detail.startswith("PermissionError: [Errno 13] Permission denied")


def test_the_merge_touches_only_what_the_build_made(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tree / "notes" / "mine.txt"
    mine.parent.mkdir()
    mine.write_text("the user's own file")
    mine.chmod(0o600)
    os.utime(mine, (1_000_000_000, 1_000_000_000))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert (tree / FRAGMENTS_DIR).is_dir()  # download keeps the fragments: merge again
    finalize(tree)
    assert oct(mine.stat().st_mode & 0o777) == "0o600" and int(mine.stat().st_mtime) == 1_000_000_000
    assert int((tree / "onnx" / "boundary_regressor.onnx").stat().st_mtime) == 1_700_000_000


def test_files_a_model_refers_to_must_be_listed_files_of_that_model(tree: Path) -> None:
    """A graph's external-data location and a tokenizer path once could name any file: an unlisted
    weights.bin beside a graph loaded (and could be edited) without the file check noticing. Here the
    graph and its manifest entry are rewritten together, so every listed file still checks out."""
    import onnx

    from modelbake.manifest import sha256_file

    graph = tree / "onnx" / "clip_tiny-vit_text_encoder.onnx"
    shutil.copyfile(graph.with_name(graph.name + ".data"), graph.with_name("weights.bin"))
    model = onnx.load(graph, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "weights.bin"
    graph.write_bytes(model.SerializeToString())
    doc = json.loads((tree / MANIFEST_NAME).read_text())
    (clip,) = [m for m in doc["models"] if m["name"] == "tiny-vit"]
    (entry,) = [f for f in clip["files"] if f["path"] == "onnx/clip_tiny-vit_text_encoder.onnx"]
    entry.update(sha256=sha256_file(graph), bytes=graph.stat().st_size)
    (tree / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    with pytest.raises(ManifestError, match=r"clip_tiny-vit_text_encoder\.onnx names onnx/weights\.bin, which the"):
        open_models(tree)
    with pytest.raises(ManifestError, match=r"onnx/weights\.bin, which the manifest does not list"):
        ClipEncoder.from_folder(tree, "tiny-vit")
    assert not next(c for c in verify(tree) if c.model == "clip:tiny-vit" and c.what == "files").ok

    # the tokenizer: a path in preprocessing that is no file of the model
    shutil.copyfile(tree / clip["preprocessing"]["tokenizer"], tree / "clip" / "tiny-vit" / "other.json")
    doc = json.loads((tree / MANIFEST_NAME).read_text())
    doc["models"] = [m for m in doc["models"] if m["name"] != "tiny-vit"]  # the graph case aside
    (rn,) = [m for m in doc["models"] if m["name"] == "tiny-rn"]
    rn["preprocessing"]["tokenizer"] = "clip/tiny-vit/other.json"
    (tree / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    with pytest.raises(ManifestError, match=r"its preprocessing names clip/tiny-vit/other\.json, which the manifest"):
        open_models(tree)


def test_a_graph_edited_in_place_with_its_size_and_mtime_kept_is_refused_at_open(tree: Path) -> None:
    """A table of digests keyed by (path, mtime, size) once spared the hash of a file edited in place with
    its size kept and its mtime put back. No such table remains: what loads is hashed as it loads."""
    graph = tree / "onnx" / "boundary_regressor.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01
    _same_stat_other_bytes(graph, bytes(data))
    with pytest.raises(ManifestError, match=r"onnx/boundary_regressor\.onnx: sha256 .* does not match"):
        open_models(tree)


@pytest.mark.parametrize("swapped", ["clip_tiny-vit_text_encoder.onnx", "clip_tiny-vit_text_encoder.onnx.data"])
def test_a_file_swapped_between_its_check_and_its_load_is_not_what_loads(
    tree: Path, swapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaders once hashed a graph by its path and let onnxruntime open that path again (and its
    ``.onnx.data`` by itself): a graph or its weights swapped right after the check loaded under the pin.
    Here the swap happens at the last moment before onnxruntime builds the session; the session must still
    be the checked model's (the same embeddings as before the swap)."""
    from modelbake.runtime import sessions

    texts = ["a photo of a cat", "a diagram"]
    # fp32 named: `auto` may run the int8 twin, per the timings this machine recorded, and never read the file
    expected = open_models(tree, variant="fp32").clip["tiny-vit"].encode_text(texts)
    target = tree / "onnx" / swapped
    other = (tree / "onnx" / swapped.replace("tiny-vit", "tiny-rn")).read_bytes()
    real = sessions.session

    def swap_then_build(*args: object, **kwargs: object) -> object:
        if target.read_bytes() != other:
            target.write_bytes(other)  # what someone with write access to the tree could do at this moment
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions, "session", swap_then_build)
    encoder = open_models(tree, variant="fp32").clip["tiny-vit"]
    assert target.read_bytes() == other  # the swap happened before the session was built
    np.testing.assert_allclose(encoder.encode_text(texts), expected, atol=1e-6)
    with pytest.raises(ManifestError, match=f"onnx/{re.escape(swapped)}: (size|sha256)"):
        open_models(tree, variant="fp32")  # and the next open refuses the swapped file
