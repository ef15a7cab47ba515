#!/usr/bin/env python3
"""Write build/wheelhouse-lock.txt and build/wheelhouse-lock-arm64.txt: every wheel of the pinned requirement
sets, dependencies included, with its sha256, for ``pip download --require-hashes`` in docker/setup-engine.sh
(the offline wheelhouse that image builds install from).

pip resolves ``build/requirements-dev.txt`` (which includes every other set) for this interpreter and
platform, as setup-engine.sh's download does, and ``build/requirements-runtime.txt`` with
``build/requirements-openvino.txt`` for CPython 3.11 on linux/arm64 (Debian 12's python3; the arm64 runtime
image's sets: the models are exported on the build platform, so no build set is needed there), and reports
each chosen file's digest as the package index published it. Run it after changing a pin, from the
repository root, and commit both locks:

    python3 docker/lock_wheelhouse.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "build" / "requirements-dev.txt"
LOCK = ROOT / "build" / "wheelhouse-lock.txt"
# The arm64 runtime image's sets: the run-time one and the optional second engine (RUNTIME_OPENVINO=1).
ARM64_REQUIREMENTS = [ROOT / "build" / "requirements-runtime.txt", ROOT / "build" / "requirements-openvino.txt"]
ARM64_LOCK = ROOT / "build" / "wheelhouse-lock-arm64.txt"
# pip's target for the arm64 set; docker/setup-engine.sh downloads with the same flags.
# OpenVINO's arm64 wheel is manylinux_2_35 (Debian 12's glibc is 2.36).
ARM64_TARGET = [
    "--platform", "manylinux_2_35_aarch64", "--platform", "manylinux_2_28_aarch64", "--platform",
    "manylinux_2_17_aarch64", "--python-version", "3.11",
    "--implementation", "cp", "--abi", "cp311",
]  # fmt: skip


def resolve(
    requirements: list[Path], target: list[str] | None = None, pinned: list[tuple[str, str, str]] = ()
) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every wheel pip would download for ``requirements`` (for ``target``'s
    platform, else this one), each package at its ``pinned`` version if it has one."""
    with tempfile.TemporaryDirectory() as tmp:
        report, constraints = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version, _ in pinned))
        where = [*target, "--target", str(Path(tmp) / "t")] if target else []
        where += ["-c", str(constraints)]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
             *where, "--quiet", "--report", str(report), *(a for r in requirements for a in ("-r", str(r)))],
            check=True,
        )  # fmt: skip
        items = json.loads(report.read_text())["install"]
    found = []
    for item in items:
        meta, archive = item["metadata"], item["download_info"].get("archive_info", {})
        digest = archive.get("hashes", {}).get("sha256")
        if not digest:
            raise SystemExit(f"{meta['name']}: the index gave no sha256 for {item['download_info']['url']}")
        found.append((meta["name"].lower().replace("_", "-"), meta["version"], digest))
    return sorted(found)


def write(lock: Path, rows: list[tuple[str, str, str]], source: str) -> None:
    lines = [
        f"# The wheelhouse, hash-locked: written by docker/lock_wheelhouse.py from {source}.",
        "# Do not edit; run that script after changing a pin. Read by docker/setup-engine.sh.",
        *(f"{name}=={version} \\\n    --hash=sha256:{digest}" for name, version, digest in rows),
    ]
    tmp = lock.with_name(f".{lock.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(lock)
    print(f"{lock.relative_to(ROOT)}: {len(rows)} wheels")


def main() -> int:
    main = resolve([REQUIREMENTS])
    write(LOCK, main, "build/requirements-dev.txt")
    # The same versions as the main set (pip would take the highest in the wheelhouse for either platform).
    arm64 = resolve(ARM64_REQUIREMENTS, ARM64_TARGET, main)
    write(ARM64_LOCK, arm64, "build/requirements-runtime.txt and -openvino.txt for linux/arm64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
