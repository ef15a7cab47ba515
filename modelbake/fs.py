"""The file system, safely: atomic writes, scratch folders beside an output, and publishing into it.

Nothing a run writes is seen half-made: a file goes to a temporary name and is renamed over its place; a
stage's files are made in a scratch folder beside the output and renamed in, the list of moves journaled
first so a run killed mid-way is finished by the next; a whole tree is built beside the old one and
swapped in by one rename. Used by the producers, the CLI, bundles and the manifest alike; torch-free and
stdlib-only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from modelbake.errors import OutputError

log = logging.getLogger("modelbake")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    file or the new one, never half of it. The folder is made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


SCRATCH_DIR = ".modelbake-scratch"
_JOURNAL = "publish.json"


def _host_id() -> str:
    """This host and its process-id namespace (containers may share a hostname, not their process ids)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
    try:
        return f"{name}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


_HOST = _host_id()


def scratch_place(output: Path) -> Path:
    """Where scratch for the folder ``output`` goes: ``.modelbake-scratch`` beside it, never inside it.

    Publishing is a rename, atomic only within one filesystem: when ``output`` is a mount point (or the
    filesystem root) or its parent is not writable, the place is ``output/.modelbake-scratch`` instead.
    """
    output = output.resolve()
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    beside = parent != output and os.access(parent, os.W_OK | os.X_OK)
    if beside and output.is_dir():
        beside = output.stat().st_dev == parent.stat().st_dev
    return (parent if beside else output) / SCRATCH_DIR


def _process_start(pid: int) -> str | None:
    """The start time of the live process ``pid`` (clock ticks, from /proc; "0": unknown), or None."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    fields = line[line.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished its work


def _owner_alive(folder: Path) -> bool:
    """Whether the run named in a scratch folder's name (purpose.pid.start.host.token) may still use it."""
    parts = folder.name.split(".")
    if len(parts) != 5 or not parts[1].isdigit() or parts[3] != _HOST:
        return True  # not made here (this host, these process ids): not ours to judge
    started = _process_start(int(parts[1]))
    if started is None:
        return False
    return started == parts[2] or "0" in (started, parts[2])  # a live pid, and not reused since


def _move(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)


def _roll_forward(folder: Path) -> None:
    """Finish the publish a kill interrupted (its journal lists the moves): the outputs end all new."""
    try:
        moves = json.loads((folder / _JOURNAL).read_text())
    except (OSError, ValueError):
        return  # killed before publishing: nothing to finish
    for src, dest in moves:
        if os.path.lexists(folder / src):
            try:
                _move(folder / src, Path(dest))
            except OSError as exc:
                log.warning("could not finish moving %s to %s: %s", folder / src, dest, exc)
    log.warning("finished publishing %d file(s) of a run killed while publishing", len(moves))


def clear_stale_scratch(place: Path) -> None:
    """Remove the scratch folders in ``place`` whose run is gone (killed), after finishing their publish."""
    for folder in sorted(place.iterdir()) if place.is_dir() else []:
        if not _owner_alive(folder):
            _roll_forward(folder)
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, the scratch of a run that was killed", folder)


def _new_scratch(place: Path, purpose: str) -> Path:
    pid = os.getpid()
    name = f"{purpose}.{pid}.{_process_start(pid)}.{_HOST}.{secrets.token_hex(4)}"
    for _ in range(3):  # another run removes the place when it is empty: make it again
        place.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = place.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OutputError(f"{place}: not a folder of this user; remove it or write the output elsewhere")
        try:
            (place / name).mkdir(mode=0o700)
        except FileNotFoundError:
            continue
        (place / name / "work").mkdir()
        return place / name
    raise OutputError(f"{place}: could not make a scratch folder in it")


@contextmanager
def scratch_folder(output: Path, purpose: str) -> Iterator[Path]:
    """Yield an empty folder to write the files meant for ``output`` in, removed on leaving the block.

    It lives in :func:`scratch_place` (``.modelbake-scratch/PURPOSE.PID.START.HOST.TOKEN/work``), so a kill
    leaves ``output`` untouched; the next run that writes there removes the folders of runs that are gone.
    """
    place = scratch_place(output)
    folder = _new_scratch(place, purpose)
    clear_stale_scratch(place)
    try:
        yield folder / "work"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with suppress(OSError):
            place.rmdir()  # only when empty: other runs may be using it


def publish(work: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename files (or folders) from the scratch folder ``work`` to their places, in the order given.

    The list is journaled first: when a kill stops it half-way, the next run finishes it.
    """
    journal = [(str(src.relative_to(work.parent)), str(dest.absolute())) for src, dest in moves]
    atomic_write(work.parent / _JOURNAL, json.dumps(journal))
    for src, dest in moves:
        _move(src, dest)


@contextmanager
def staged_output(out_root: Path) -> Iterator[Path]:
    """Yield a scratch folder for files meant for ``out_root``; move them in only if the block succeeds.

    A failed or killed export, parity gate or download therefore leaves ``out_root`` as it was.
    """
    with scratch_folder(out_root, "stage") as scratch:
        yield scratch
        out_root.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in scratch.rglob("*") if not p.is_dir())
        publish(scratch, [(src, out_root / src.relative_to(scratch)) for src in files])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where that is not there."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _link_copy(src: Path, dest: Path) -> None:
    """``src``'s tree into ``dest`` as hard links (no bytes copied; copies where links cannot be made). The
    run then replaces files by rename only, so the linked originals never change."""

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(src, dest, symlinks=True, copy_function=link, dirs_exist_ok=True)


@contextmanager
def staged_tree(out: Path) -> Iterator[Path]:
    """Yield a whole tree for ``out``, built beside it and swapped in by one rename when the block succeeds.

    It starts as ``out``'s files (hard links), so a run that remakes part of a tree keeps the rest; until the
    swap, ``out`` stays the previous complete tree whatever stops the run (a kill, an error). The contract
    that makes the links safe: a file in the tree is replaced by a rename (what staged_output, the manifest
    and the signature do), never written into, which would change the linked original too. Where the
    scratch cannot lie beside ``out`` (a mount point), the tree is ``out`` itself and each stage publishes
    its own files, as :func:`staged_output` does.
    """
    if scratch_place(out).parent == out.resolve():
        yield out
        return
    with scratch_folder(out, "tree") as work:
        if out.is_dir():
            _link_copy(out, work)
        yield work
        if not out.exists():
            os.rename(work, out)
        elif not _exchange(work, out):
            # Two renames, journaled first: a kill between them leaves no `out`, and the next run's clean-up
            # finishes the move instead of removing the new tree with the scratch.
            previous = work.parent / "previous"
            atomic_write(work.parent / _JOURNAL, json.dumps([[work.name, str(out.absolute())]]))
            os.rename(out, previous)
            os.rename(work, out)
        # the previous tree is now at `work` (or `previous`), removed with the scratch folder
