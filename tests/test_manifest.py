"""The manifest merge and its checks, on real fragments written by the real producers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelbake.manifest import (
    SCHEMA_VERSION,
    ManifestError,
    check_files,
    merge_fragments,
    read_manifest,
    resolve_inside,
    write_fragment,
)
from modelbake.spec import FRAGMENTS_DIR, MANIFEST_NAME


def _tree(built_tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(built_tree, root)
    return root


def test_merged_manifest_lists_every_file_with_its_hash(built_tree: Path) -> None:
    manifest = read_manifest(built_tree)
    kinds = sorted(m["kind"] for m in manifest["models"])
    assert kinds == ["clip", "clip", "regressor", "reranker"]
    listed = {f["path"] for m in manifest["models"] for f in m["files"]}
    on_disk = {
        p.relative_to(built_tree).as_posix()
        for p in built_tree.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and FRAGMENTS_DIR not in p.parts
    }
    assert listed == on_disk
    check_files(built_tree, manifest["models"])


def test_merging_the_same_fragments_again_gives_the_same_bytes(
    built_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merged time is the latest stage's, not the merge's: when BuildKit reruns only the merge (its cache
    pruned), the tree must not differ from the one an image built earlier holds."""
    root = _tree(built_tree, tmp_path)
    before = (root / MANIFEST_NAME).read_bytes()
    stamps = [json.loads(p.read_text())["created"] for p in (root / FRAGMENTS_DIR).glob("*.json")]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "4102444800")  # 2100-01-01: a merge "now" would show it
    merge_fragments(root)
    assert (root / MANIFEST_NAME).read_bytes() == before
    assert json.loads(before)["created"] == max(stamps)


def test_merge_refuses_a_file_altered_after_its_stage(built_tree: Path, tmp_path: Path) -> None:
    root = _tree(built_tree, tmp_path)
    target = next((root / "onnx").glob("clip_*_text_encoder.onnx"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=r"sha256 .* does not match"):
        merge_fragments(root)
    assert not (root / MANIFEST_NAME).exists()


def test_merge_refuses_missing_and_truncated_files(built_tree: Path, tmp_path: Path) -> None:
    root = _tree(built_tree, tmp_path)
    (root / "onnx" / "boundary_regressor.onnx").write_bytes(b"")
    with pytest.raises(ManifestError, match="truncated or replaced"):
        merge_fragments(root)
    (root / "onnx" / "boundary_regressor.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        merge_fragments(root)


def test_merge_refuses_the_same_model_from_two_stages(built_tree: Path, tmp_path: Path) -> None:
    root = _tree(built_tree, tmp_path)
    fragment = json.loads((root / FRAGMENTS_DIR / "clip-export.json").read_text())
    write_fragment(root, "clip-export-copy", fragment["models"])
    with pytest.raises(ManifestError, match="comes from two stages"):
        merge_fragments(root)


def test_merge_without_fragments_and_with_a_broken_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest fragments"):
        merge_fragments(tmp_path)
    (tmp_path / FRAGMENTS_DIR).mkdir()
    (tmp_path / FRAGMENTS_DIR / "x.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        merge_fragments(tmp_path)
    (tmp_path / FRAGMENTS_DIR / "x.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "stage": "x", "created": "", "models": [{"name": "n"}]})
    )
    with pytest.raises(ManifestError, match="invalid at models/0"):
        merge_fragments(tmp_path)


def test_fragment_paths_must_stay_inside_the_tree(tmp_path: Path) -> None:
    model = {
        "name": "m",
        "kind": "clip",
        "stage": "s",
        "source": {"type": "dir", "id": "x"},
        "files": [{"path": "../etc/passwd", "sha256": "0" * 64, "bytes": 1, "format": "other", "role": "model"}],
    }
    with pytest.raises(ManifestError, match=r"invalid at models/0/files/0/path"):
        write_fragment(tmp_path, "s", [model])
    with pytest.raises(ManifestError, match="leaves the model folder"):
        resolve_inside(tmp_path, "../etc/passwd")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ManifestError, match="outside the model folder"):
        resolve_inside(tmp_path, "link/passwd")


def test_unknown_schema_version_is_a_clear_error(built_tree: Path, tmp_path: Path) -> None:
    root = _tree(built_tree, tmp_path)
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["schema_version"] = 99
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        read_manifest(root)


def test_roles_and_variants_are_one_list_in_code_and_schema() -> None:
    from modelbake.manifest import Role, Variant, schema

    file_properties = schema()["$defs"]["file"]["properties"]
    assert file_properties["role"]["enum"] == [role.value for role in Role]
    assert file_properties["variant"]["enum"] == [variant.value for variant in Variant]
