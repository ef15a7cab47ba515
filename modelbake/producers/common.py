"""What every producer shares: staged output (nothing half-written), tool versions, logging."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

log = logging.getLogger("modelbake")


class ProducerError(Exception):
    """A producer could not make what was asked; the message names the model, the problem and the fix."""


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@contextmanager
def staged_output(out_root: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``out_root``; move its contents in only if the block succeeds.

    A failed export, parity gate or download therefore leaves ``out_root`` exactly as it was.
    """
    out_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_root))
    try:
        yield scratch
        for src in sorted(scratch.rglob("*")):
            if src.is_dir():
                continue
            dest = out_root / src.relative_to(scratch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def normalise_tree(root: Path) -> None:
    """World-readable files and folders (the runtime's non-root user reads a root-owned tree), and with
    SOURCE_DATE_EPOCH set, every mtime set to it: file times go into the image layer, so the models
    layer's digest is the same for the same inputs."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    for path in [p for p in [root, *root.rglob("*")] if not p.is_symlink()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        if epoch.isdigit():
            os.utime(path, (int(epoch), int(epoch)))
