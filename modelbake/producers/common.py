"""What every producer shares: staged output (nothing half-written), the model record, an offline hub
switch, tool versions, logging."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

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


def model_record(
    stage: str,
    kind: str,
    name: str,
    *,
    spec: str,
    source: dict[str, Any],
    tools: tuple[str, ...],
    files: list[dict[str, Any]],
    **sections: Any,
) -> dict[str, Any]:
    """One manifest model entry, the same shape for every kind (``sections``: preprocessing, details, notes)."""
    record = {"name": name, "kind": kind, "stage": stage, "spec": spec, "source": source}
    return {**record, "tools": tool_versions(*tools, "modelbake"), "files": files, **sections}


@contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face libraries with no hub at all inside the block (proves a saved folder is complete)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
