"""File digests, and a table of digests already checked, so a restarted service need not hash again.

The table maps (manifest sha256, path, mtime, size) to a file's sha256 when it matched that manifest. It is
only a shortcut, never a verdict: a row is used only when its digest is the very one the manifest expects;
any other case hashes the file now, and a digest computed now always wins over a row read from disk.
With $MODELBAKE_HASH_CACHE naming a JSON file the table lives on disk too; the runtime image writes it at
build time as root, read-only to the service (which then only reads it). ``verify`` always re-hashes.

A row read from disk speaks only for files as protected as the table itself: on its filesystem, owned by
its owner, writable by no group or other user. A tree mounted from elsewhere (a bind mount: another
device) or writable by others is hashed at every start, since whoever can write it can keep a file's size
and put its mtime back.
Torch-free and stdlib-only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HASH_CACHE_ENV = "MODELBAKE_HASH_CACHE"
_CHUNK = 1 << 20
_VERSION = 2
Key = tuple[str, str, int, int]  # manifest sha256, path, mtime_ns, size
_TABLE: dict[Key, str] = {}
_FROM_DISK: set[Key] = set()  # rows read from a table file, not hashed by this process
_LOADED: set[str] = set()
_unsaved = False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key(manifest_sha256: str, path: Path) -> Key:
    stat = path.stat()
    return manifest_sha256, str(path), stat.st_mtime_ns, stat.st_size


def _table_file() -> Path | None:
    """The on-disk table, its rows added to the in-process one once (never over a row computed here)."""
    name = os.environ.get(HASH_CACHE_ENV)
    if not name:
        return None
    if name not in _LOADED:
        _LOADED.add(name)
        try:
            doc = json.loads(Path(name).read_text())
            rows = doc["files"] if doc.get("version") == _VERSION else []
            for manifest, path, mtime, size, digest in rows:
                key = (str(manifest), str(path), int(mtime), int(size))
                if key not in _TABLE:
                    _TABLE[key] = str(digest)
                    _FROM_DISK.add(key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # missing, unreadable or another version: hash as if there were none
    return Path(name)


def checked_digest(path: Path, expected: str, manifest_sha256: str, *, cached: bool = True) -> str:
    """``path``'s sha256: the table's row if it says ``expected`` for this manifest (and ``cached``), else
    hashed now. A digest equal to ``expected`` is remembered; the caller compares and decides."""
    global _unsaved
    key = _key(manifest_sha256, path)
    if cached:
        table = _table_file()
        if _TABLE.get(key) == expected and (key not in _FROM_DISK or _as_protected(path, table)):
            return expected
    actual = sha256_file(path)
    _FROM_DISK.discard(key)
    if actual == expected and _TABLE.get(key) != actual:
        _TABLE[key] = actual
        _unsaved = True
    return actual


def _as_protected(path: Path, table: Path | None) -> bool:
    """Whether ``path`` is as hard to change as the table file: same filesystem, same owner, and no write
    permission for group or others."""
    try:
        st, tst = path.stat(), (table.stat() if table is not None else None)
    except OSError:
        return False
    if tst is None or st.st_dev != tst.st_dev or st.st_uid != tst.st_uid:
        return False
    return not st.st_mode & 0o022


def save() -> None:
    """Write the table next to itself and rename (never half-written); an unwritable place is fine."""
    global _unsaved
    table = _table_file()
    if table is None or not _unsaved:
        return
    rows = [[*key, digest] for key, digest in sorted(_TABLE.items())]
    try:
        table.parent.mkdir(parents=True, exist_ok=True)
        tmp = table.with_name(f".{table.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _VERSION, "files": rows}))
        os.replace(tmp, table)
        _unsaved = False
    except OSError:
        pass  # the service's read-only view of the build's table
