"""Verify a model tree: the manifest's schema, every file's size and sha256, and each ONNX model's
outputs on its stored probe inputs against the golden outputs recorded at build time."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from modelbake.manifest import ManifestError, check_files, read_manifest
from modelbake.runtime import sessions, variants
from modelbake.runtime.golden import feeds_and_outputs, read_golden
from modelbake.runtime.registry import loader_for
from modelbake.runtime.sessions import checked_session
from modelbake.runtime.variants import choose, requested
from modelbake.signature import public_key_from_env, verify_tree


@dataclass
class Check:
    model: str
    what: str
    ok: bool
    detail: str


def replay_inputs(
    root: Path, model: dict[str, Any], entry: dict[str, Any], golden: dict[str, np.ndarray]
) -> Check | None:
    """The kind's own run-time input pipeline on the raw probe inputs must give the golden model inputs."""
    found = loader_for(model["kind"]).replay(root, model, entry, golden)
    if found is None:
        return None
    same, detail = found
    return Check("", f"inputs {Path(entry['path']).name}", same, detail)


def run_golden(root: Path, model: dict[str, Any], entry: dict[str, Any], golden: dict[str, np.ndarray]) -> Check:
    feeds, expected = feeds_and_outputs(golden)
    names = list(expected)
    outputs = checked_session(root, model, entry).run(names, feeds)
    atol = entry["tolerance"]["atol"]
    # NaN compares false both ways: a non-finite difference is a failure, never a pass.
    diffs = [np.abs(out - expected[n]) for n, out in zip(names, outputs, strict=True)]
    worst = max(float(np.max(d)) if np.isfinite(d).all() else float("inf") for d in diffs)
    batch = next(iter(feeds.values())).shape[0]
    return Check(
        "",
        f"inference {Path(entry['path']).name}",
        worst <= atol,
        f"batch {batch}, max|diff| {worst:.2e} (atol {atol:g})",
    )


def verify(root: Path, *, quick: bool = False) -> list[Check]:
    """All checks for ``root``; ``quick`` (the health check) skips hashing and inference. Problems are FAIL
    rows, never a traceback: a file that cannot be read is as bad as one that differs."""
    try:
        manifest = read_manifest(root)
    except (ManifestError, OSError) as exc:
        return [cpu_row(), Check("-", "manifest", False, _reason(exc))]
    models = len(manifest["models"])
    checks = [cpu_row(), Check("-", "manifest", True, f"schema {manifest['schema_version']}, {models} models")]
    # $MODELBAKE_SIGNING_PUBLIC_KEY: a signed tree is required. Not in the quick health check, which hashes
    # nothing: the signature hashes every file, and the service already checked it when it opened the tree.
    if not quick and (key := public_key_from_env()) is not None:
        try:
            checks.append(Check("-", "signature", True, verify_tree(root, key)))
        except ManifestError as exc:
            checks.append(Check("-", "signature", False, str(exc)))
    for model in manifest["models"]:
        name = f"{model['kind']}:{model['name']}"
        try:
            check_files(root, [model], quick=quick)
            checks.append(Check(name, "files", True, f"{len(model['files'])} files" + ("" if quick else ", sha256 ok")))
        except (ManifestError, OSError) as exc:
            checks.append(Check(name, "files", False, _reason(exc)))
            continue
        if not quick:
            checks += [replace(check, model=name) for check in _inference(root, model) + _auto(root, model)]
    return checks


def cpu_row() -> Check:
    """The CPU this ran on: its model, architecture and the ISA flags the variants' kernels dispatch on, so a
    log says which class of machine passed."""
    here = variants.machine()
    flags = " ".join(here["isa"]) or "none known"
    engines = f"onnxruntime {here['onnxruntime']}"
    if (openvino := sessions.openvino_facts()) is not None:
        engines += f", OpenVINO {openvino['version']} ({' '.join(openvino['precisions'])})"
    return Check("-", "cpu", True, f"{here['cpu']} ({here['arch']}; {flags}; {engines})")


def _auto(root: Path, model: dict[str, Any]) -> list[Check]:
    """What ``variant="auto"`` runs here for each role with more than one candidate (another file, another
    engine), and why (an information row; where the build's table does not decide, the check here runs,
    :mod:`.variant_check`)."""
    checks = []
    roles = [
        e["role"]
        for e in model["files"]
        if e.get("variant") not in (None, "fp32") or (e.get("variant") == "fp32" and variants.engine_variants(e))
    ]
    for role in dict.fromkeys(roles):
        choice = choose(model, role, requested(None), root=root)
        checks.append(Check("", f"auto {role}", True, f"runs {choice.why}"))
    return checks


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__}: {exc}"


def _inference(root: Path, model: dict[str, Any]) -> list[Check]:
    """Each ONNX file on its golden inputs, and the kind's own input pipeline on the raw probes."""
    checks: list[Check] = []
    for entry in model["files"]:
        if "golden" not in entry:
            continue
        try:
            golden = read_golden(root, model, entry)
            found = [run_golden(root, model, entry, golden), replay_inputs(root, model, entry, golden)]
        except Exception as exc:  # a corrupt model must show up in the table, not as a traceback
            found = [Check("", f"inference {Path(entry['path']).name}", False, f"{type(exc).__name__}: {exc}")]
        checks += filter(None, found)
    return checks


def print_table(checks: list[Check], out: TextIO = sys.stdout) -> None:
    widths = [max(len(getattr(c, f)) for c in checks) for f in ("model", "what")]
    for c in checks:
        out.write(f"{'ok  ' if c.ok else 'FAIL'}  {c.model:<{widths[0]}}  {c.what:<{widths[1]}}  {c.detail}\n")
    failed = sum(not c.ok for c in checks)
    out.write(
        f"verify: {len(checks) - failed} of {len(checks)} checks ok" + (f", {failed} FAILED\n" if failed else "\n")
    )
