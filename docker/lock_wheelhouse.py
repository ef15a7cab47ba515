#!/usr/bin/env python3
"""Write build/wheelhouse-lock.txt: every wheel of the pinned requirement sets, dependencies included, with
its sha256, for ``pip download --require-hashes`` in docker/setup-engine.sh (the offline wheelhouse that
image builds install from).

pip resolves ``build/requirements-dev.txt`` (which includes every other set) for this interpreter and
platform, as setup-engine.sh's download does, and reports each chosen file's digest as the package index
published it. Run it after changing a pin, from the repository root, and commit the lock:

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


def resolve(requirements: Path) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every wheel pip would download for ``requirements``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
             "--quiet", "--report", str(report), "-r", str(requirements)],
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


def main() -> int:
    rows = resolve(REQUIREMENTS)
    lines = [
        "# The wheelhouse, hash-locked: written by docker/lock_wheelhouse.py from build/requirements-dev.txt.",
        "# Do not edit; run that script after changing a pin. Read by docker/setup-engine.sh.",
        *(f"{name}=={version} \\\n    --hash=sha256:{digest}" for name, version, digest in rows),
    ]
    tmp = LOCK.with_name(f".{LOCK.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(LOCK)
    print(f"{LOCK.relative_to(ROOT)}: {len(rows)} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
