"""Where the build files are: a checkout, or the copy an installed wheel carries (setup.py puts it there).

``docker buildx bake`` needs a folder holding ``Dockerfile.models``, ``docker-bake.hcl``, ``build/`` and the
``modelbake/`` package itself. In a checkout (or an editable install) that folder is the checkout. Installed
from a wheel, the package holds those files under ``modelbake/context/``; :func:`root` then writes them and a
copy of the installed package to a folder named by their digest under the cache (written whole, then renamed
in), and every later call reuses it. ``modelbake context DIR`` writes the same folder where a user wants it.
Host side, stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from modelbake.errors import ModelbakeError
from modelbake.fs import scratch_folder

PACKAGE = Path(__file__).resolve().parent
SHIPPED = PACKAGE / "context"
MARKER = "Dockerfile.models"
# The build files beside the package (setup.py copies them into the wheel; keep .dockerignore in step): the
# build context, the compose file, and what `modelbake demo` runs (the engine set-up, the example service).
CONTEXT_FILES = (
    "Dockerfile.models",
    "docker-bake.hcl",
    ".dockerignore",
    "compose.yaml",
    "build/*.py",
    "build/requirements-*.txt",
    "build/wheelhouse-lock*.txt",
    "docker/setup-engine.sh",
    "examples/search_service/*",
)


class ContextError(ModelbakeError):
    """The build files cannot be found or written; the message names the fix."""


def checkout() -> Path | None:
    """The checkout this package runs from (an editable install or ``python -m`` in a clone), else None."""
    here = PACKAGE.parent
    return here if (here / MARKER).is_file() and (here / "docker-bake.hcl").is_file() else None


def _files() -> list[tuple[Path, str]]:
    """(source, path in the context) of every file a context holds: the build files, then the package."""
    here = checkout()
    if here is not None:
        found = [(p, p.relative_to(here).as_posix()) for pattern in CONTEXT_FILES for p in sorted(here.glob(pattern))]
    elif (SHIPPED / MARKER).is_file():
        found = [(p, p.relative_to(SHIPPED).as_posix()) for p in sorted(SHIPPED.rglob("*")) if p.is_file()]
    else:
        raise ContextError(
            f"this modelbake install has no build files ({SHIPPED} is missing): reinstall it from its wheel, "
            "or run it from a checkout (pip install -e .)"
        )
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and SHIPPED not in path.parents and "__pycache__" not in path.parts:
            found.append((path, f"modelbake/{path.relative_to(PACKAGE).as_posix()}"))
    return found


def write(dest: Path) -> Path:
    """The build context as a folder ``dest`` (made whole beside it, then renamed in; refused if it exists)."""
    if dest.exists():
        raise ContextError(f"{dest} exists: give a new folder, or remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(dest, "context") as work:
        tree = work / "context"
        for src, name in _files():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)
        os.rename(tree, dest)
    return dest


@lru_cache(maxsize=1)
def _digest() -> str:
    """The build files' and the package's digest: an install's context folder is named by it."""
    sha = hashlib.sha256()
    for src, name in _files():
        sha.update(name.encode() + b"\0" + hashlib.sha256(src.read_bytes()).digest())
    return sha.hexdigest()[:16]


def cache_root() -> Path:
    """$MODELBAKE_CACHE, else ~/.cache/modelbake: the cache docker/setup-engine.sh and the demo use too."""
    return Path(os.environ.get("MODELBAKE_CACHE") or Path.home() / ".cache" / "modelbake")


def root() -> Path:
    """The folder to run ``docker buildx bake`` in: the checkout, else this install's context in the cache."""
    found = checkout()
    if found is not None:
        return found
    dest = cache_root() / f"context-{_digest()}"  # _digest refuses an install without build files
    if not (dest / MARKER).is_file():
        try:
            write(dest)
        except (ContextError, OSError) as exc:
            if not (dest / MARKER).is_file():  # else another run's folder won the rename: the same files
                raise ContextError(f"cannot write the build files to {dest} ({exc}); set MODELBAKE_CACHE") from exc
    return dest
