"""Air-gapped bundles: on a machine with internet, gather everything a build needs into one folder.

    bundle/
    ├── wheelhouse/          the pinned requirement sets of the stages (pip download)
    ├── sources/clip/<key>/  CLIP weights (local folders and files copied, hub weights downloaded)
    ├── sources/reranker/<key>/
    ├── selection.toml       the selection rewritten to point at /sources (the stages' mount)
    └── bundle_manifest.json every file with its sha256 and size

Build it with no network: ``WHEELHOUSE=bundle/wheelhouse MODEL_SOURCES=bundle/sources modelbake bake
--config bundle/selection.toml``. Run from a checkout (the requirement sets live in build/).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from modelbake import context
from modelbake.bake import BakeError, Selection
from modelbake.fs import publish, scratch_folder
from modelbake.hub import fetch_snapshot
from modelbake.manifest import build_time, sha256_file
from modelbake.params import SELECTION
from modelbake.spec import ORIGIN_FILE

MOUNT = "/sources"
MANIFEST = "bundle_manifest.json"


def check_selection(config: Path | None, variables: dict[str, str]) -> int | None:
    """A bundle's selection is checked against its ``bundle_manifest.json`` before a bake uses it: the number
    of files checked, or None for a selection that is no bundle's. A selection naming the bundle's mount
    (``@dir:/sources/...``) is a bundle's, so its manifest must be beside it: a deleted one once let the
    bundle build unchecked."""
    names_mount = any(f"@dir:{MOUNT}/" in value for value in variables.values())
    if config is None or not (names_mount or (config.parent / MANIFEST).is_file()):
        return None
    return verify_bundle(config.parent)


def verify_bundle(folder: Path) -> int:
    """Every file ``bundle_manifest.json`` lists, with its size and sha256: a file damaged in transit is
    refused by name before a build uses it (the parity gate cannot see bad weights: torch and ONNX share
    them). Returns the number of files checked."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BakeError(f"{folder / MANIFEST}: unreadable ({exc}); copy the bundle again") from exc
    for entry in doc["files"]:
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BakeError(
                f"{path}: missing or not the file the bundle lists (size/sha256 differ); "
                "it was damaged in transit: copy the bundle again"
            )
    return len(doc["files"])


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)


def _clip_sources(selection: Selection, sources: Path) -> list[str]:
    specs = []
    for spec in selection.clip:
        dest = sources / "clip" / spec.key
        if spec.local is not None:
            _copy(Path(spec.local.path), dest)
            name = Path(spec.local.path).name
            tag = f":{spec.tag}" if spec.tag else ""
            specs.append(
                f"{spec.key}@dir:{MOUNT}/clip/{spec.key}"
                if spec.local.kind == "dir"
                else f"{spec.arch}{tag}@file:{MOUNT}/clip/{spec.key}/{name}"
            )
            continue
        import open_clip  # build extra: downloads the weights exactly as the stage would

        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        if not cfg:
            raise BakeError(f"{spec.text!r}: OpenCLIP has no pretrained tag {spec.tag!r} for {spec.arch}")
        path = Path(open_clip.download_pretrained(cfg, cache_dir=str(sources / ".cache")))
        _copy(path, dest)
        # The tag stays in the spec: its file names, preprocessing and activation (QuickGELU) go with it.
        specs.append(f"{spec.arch}:{spec.tag}@file:{MOUNT}/clip/{spec.key}/{path.name}")
    shutil.rmtree(sources / ".cache", ignore_errors=True)
    return specs


def _reranker_sources(selection: Selection, sources: Path) -> list[str]:
    specs = []
    for spec in selection.reranker:
        dest = sources / "reranker" / spec.key
        if spec.local is not None:
            _copy(Path(spec.local.path), dest)
        else:
            # The commit the revision means now, recorded beside the files: the build names it as the origin.
            commit = fetch_snapshot(spec.repo, spec.revision, dest, name=repr(spec.text))
            origin = {"type": "hub", "id": spec.repo, "revision": commit}
            (dest / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
        specs.append(f"{spec.key}@dir:{MOUNT}/reranker/{spec.key}")
    return specs


def _wheels(dest: Path, pip_args: list[str]) -> None:
    requirements = context.root() / "build" / "requirements-build.txt"
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", str(dest), "-r", str(requirements)]
    if subprocess.run([*cmd, *pip_args]).returncode != 0:
        raise BakeError(f"`{' '.join(cmd + pip_args)}` failed (pip's message above)")


def bundle(
    out: Path, selection: Selection, *, pip_args: list[str] | None = None, wheels: bool = True
) -> dict[str, Any]:
    """Write the bundle to ``out`` (which must not exist yet); all or nothing."""
    if out.exists():
        raise BakeError(f"{out} exists; give a new folder (a bundle is written whole or not at all)")
    selection.variables()  # every spec checked before anything is fetched
    # Gathered in a scratch folder beside ``out`` (a kill leaves ``out`` absent; the next run clears it).
    with scratch_folder(out, "bundle") as scratch:
        if wheels:
            _wheels(scratch / "wheelhouse", pip_args or [])
        sources = scratch / "sources"
        sources.mkdir()
        clip, reranker = _clip_sources(selection, sources), _reranker_sources(selection, sources)
        rewritten = Selection(**{p.field: getattr(selection, p.field) for p in SELECTION})
        rewritten.clip, rewritten.reranker = clip, reranker
        (scratch / "selection.toml").write_text(rewritten.to_toml())
        files = [
            {"path": p.relative_to(scratch).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(scratch.rglob("*"))
            if p.is_file()
        ]
        doc = {"created": build_time(), "selection": {"clip": clip, "reranker": reranker}, "files": files}
        (scratch / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
        publish(scratch, [(scratch, out)])  # one rename: the whole bundle or nothing
    return doc
