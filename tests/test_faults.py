"""Builds killed mid-way (SIGKILL: no clean-up code runs) leave the output folder as it was, and the next
run clears their scratch: real `modelbake` runs in a subprocess, killed once they are demonstrably
mid-work (a progress line on stderr, or a new entry beside or in the output folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from modelbake.fs import SCRATCH_DIR, clear_stale_scratch, scratch_folder, scratch_place
from modelbake.manifest import sha256_file

Listing = dict[str, tuple[bool, int, int]]


def _listing(folder: Path) -> Listing:
    """Every entry under ``folder`` (itself as "."): (is a folder, size, mtime in ns)."""
    entries = [folder, *folder.rglob("*")] if folder.exists() else []
    stats = {p.relative_to(folder).as_posix(): p.lstat() for p in entries}
    return {name: (stat.S_ISDIR(s.st_mode), s.st_size, s.st_mtime_ns) for name, s in stats.items()}


def _leftovers(root: Path) -> list[str]:
    """Hidden entries under ``root``: every kind of scratch (.modelbake-scratch, .staging-*, .x.tmp, .name-*)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if p.name != ".manifest.d")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "modelbake.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, "MODELBAKE_PROGRESS": "1"},
        )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fails if it ends first (a liveness timeout, not a speed limit)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"the run ended ({proc.wait()}) or took too long before {what}")
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run finished before it was killed {what}"


def _epochs_done(log: Path, total: int, wanted: int = 2) -> Callable[[], bool]:
    """True once the progress bar (or an epoch log line) on stderr shows ``wanted`` of ``total`` epochs done."""
    return lambda: (
        max(map(int, re.findall(rf"\b(\d+)/{total}\b", log.read_text(errors="replace"))), default=0) >= wanted
    )


def _first_write(root: Path) -> Callable[[], bool]:
    """True once a file appears anywhere under ``root`` (its scratch included): the run has begun writing."""
    before = {p for p in root.rglob("*") if p.is_file()}
    return lambda: any(p.is_file() and p not in before for p in root.rglob("*"))


def _killed_runs_scratch(place: Path, pid: int) -> list[Path]:
    return [p for p in place.glob("*") if p.name.split(".")[1:2] == [str(pid)]] if place.is_dir() else []


@pytest.mark.slow
def test_a_killed_regressor_seed_leaves_the_output_as_it_was(tmp_path: Path) -> None:
    """Killed while training (200 epochs), then while exporting; the rerun (2 epochs, to stay quick) succeeds."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    for name, text in {
        "regressor/boundary_regressor_pretrained.pth": "old",
        "onnx/x.onnx": "o",
        "mine.txt": "m",
    }.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _listing(out)
    seed = ["regressor-seed", "--regressor-feature-dim", "64", "--out", str(out)]

    proc = _start([*seed, "--regressor-epochs", "200"], logs / "train.txt")
    _kill_when(proc, _epochs_done(logs / "train.txt", 200), "after two epochs")
    assert _listing(out) == before

    proc = _start([*seed, "--regressor-epochs", "2"], logs / "export.txt")
    _kill_when(proc, _first_write(tmp_path), "while exporting")
    assert _listing(out) == before
    assert _killed_runs_scratch(tmp_path / SCRATCH_DIR, proc.pid), "the killed run's scratch is where it belongs"

    run_cli(*seed, "--regressor-epochs", "2", check=True)
    assert _leftovers(tmp_path) == []
    assert (out / "mine.txt").read_text() == "m"
    assert (out / "regressor" / "boundary_regressor_pretrained.safetensors").is_file()


def _training_data(path: Path, feature_dim: int, records: int = 4) -> Path:
    """Few records of many features: weights of 2 x 32 MB, so writing them takes a moment to catch."""
    rows = []
    for i in range(records):
        features = [((i * 7 + j) % 13 - 6) / 100 for j in range(feature_dim)]
        rows.append({"video_id": f"v{i}", "features": features, "start_delta": i / 10, "end_delta": 1 - i / 10})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_a_killed_training_leaves_the_previous_model(tmp_path: Path) -> None:
    """Killed while training (500 epochs), then while writing its weights; OUT.* stay the old ones, byte for
    byte, and the folder gains no scratch. The rerun publishes all three files, metrics naming both weights."""
    data, logs, folder = _training_data(tmp_path / "data.jsonl", 32768), tmp_path / "logs", tmp_path / "models"
    logs.mkdir()
    folder.mkdir()
    old = {"mine.pth": b"old pth", "mine.safetensors": b"old st", "mine.metrics.json": b"{}", "other.pth": b"x"}
    for name, content in old.items():
        (folder / name).write_bytes(content)
    before = _listing(folder)
    train = ["train-regressor", str(data), str(folder / "mine.pth")]

    proc = _start([*train, "--epochs", "500"], logs / "train.txt")
    _kill_when(proc, _epochs_done(logs / "train.txt", 500), "after two epochs")
    assert _listing(folder) == before

    proc = _start([*train, "--epochs", "2"], logs / "write.txt")
    _kill_when(proc, _first_write(tmp_path), "while writing its weights")
    assert _listing(folder) == before
    assert {name: (folder / name).read_bytes() for name in old} == old
    (scratch,) = _killed_runs_scratch(tmp_path / SCRATCH_DIR, proc.pid)
    assert not (scratch / "publish.json").exists()  # killed before publishing

    run_cli(*train, "--epochs", "2", check=True)
    assert _leftovers(tmp_path) == []
    metrics = json.loads((folder / "mine.metrics.json").read_text())
    assert metrics["best_epoch"] >= 1 and (folder / "other.pth").read_bytes() == b"x"
    assert metrics["files"] == {name: sha256_file(folder / name) for name in ("mine.safetensors", "mine.pth")}


def test_a_killed_bundle_leaves_no_bundle_and_the_rerun_clears_its_scratch(tmp_path: Path, tiny_sources: Path) -> None:
    dist, logs = tmp_path / "dist", tmp_path / "logs"
    dist.mkdir()
    logs.mkdir()
    (dist / "older-bundle.txt").write_text("kept")
    out = dist / "bundle"
    reranker = f"tiny-bert@dir:{tiny_sources / 'reranker' / 'tiny-bert'}"
    clip = ",".join(f"{name}@dir:{tiny_sources / 'clip' / name}" for name in ("tiny-vit", "tiny-rn"))
    args = ["bundle", str(out), "--no-wheels", "--reranker", reranker, "--clip", clip]
    before = _listing(dist)

    proc = _start(args, logs / "bundle.txt")
    _kill_when(proc, _first_write(tmp_path), "while copying the sources")
    assert not out.exists()
    assert _killed_runs_scratch(dist / SCRATCH_DIR, proc.pid)
    # Beside the bundle nothing changed but the clearly named scratch place (dist's own mtime with it).
    after = {k: v for k, v in _listing(dist).items() if k != "." and not k.startswith(SCRATCH_DIR)}
    assert after == {k: v for k, v in before.items() if k != "."}

    run_cli(*args, check=True)
    assert json.loads((out / "bundle_manifest.json").read_text())["files"]
    assert _leftovers(tmp_path) == []
    assert (dist / "older-bundle.txt").read_text() == "kept"


@pytest.mark.slow
def test_a_killed_download_leaves_the_previous_tree_whole(
    tmp_path: Path, built_tree: Path, tiny_specs: dict[str, str]
) -> None:
    """`modelbake download` once published each stage into the output as it finished: killed in a later
    stage, it left new CLIP files beside the old manifest (refused at load, and the previous tree gone). The
    tree is now built beside the output and swapped in whole, so the kill leaves the previous one as it was."""
    from modelbake.runtime.verify import verify

    out, logs = tmp_path / "models", tmp_path / "logs"
    shutil.copytree(built_tree, out)
    logs.mkdir()
    before = _listing(out)
    args = ["download", "--clip", tiny_specs["clip"], "--reranker", tiny_specs["reranker"], "--out", str(out)]
    proc = _start([*args, "--regressor-epochs", "500"], logs / "download.txt")
    _kill_when(proc, _epochs_done(logs / "download.txt", 500), "while the regressor trains, CLIP and reranker done")
    assert _listing(out) == before
    assert _killed_runs_scratch(tmp_path / SCRATCH_DIR, proc.pid), "the new tree was being built beside it"

    run_cli(*args, "--regressor-epochs", "2", check=True)
    assert _leftovers(tmp_path) == []
    assert all(check.ok for check in verify(out))


@pytest.mark.parametrize("exchange", [True, False])
def test_a_staged_tree_keeps_what_it_does_not_remake_and_swaps_in_whole(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With renameat2's exchange, and without it (two journaled renames): the new tree replaces the old in
    one step, the old tree's files are untouched while the new one is built, and no scratch is left."""
    from modelbake import fs

    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "kept.txt").write_text("kept")
    (out / "sub" / "old.txt").write_text("old")
    with fs.staged_tree(out) as tree:
        assert tree != out and (tree / "kept.txt").read_text() == "kept"
        (tree / "sub" / "old.txt").unlink()
        (tree / "new.txt").write_text("new")
        assert (out / "sub" / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["kept.txt", "new.txt", "sub"]
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), fs.staged_tree(out) as tree:  # a failed run swaps nothing
        (tree / "new.txt.tmp").write_text("half")
        os.replace(tree / "new.txt.tmp", tree / "new.txt")  # files are replaced by rename, never written into
        raise RuntimeError
    assert (out / "new.txt").read_text() == "new" and _leftovers(tmp_path) == []


_HALF_PUBLISH = """
import os, signal, sys
from pathlib import Path
from modelbake import fs

out = Path(sys.argv[1])
moved = []
real_move = fs._move

def move_then_die(src, dest):
    real_move(src, dest)
    moved.append(dest)
    if len(moved) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # between the first and the second rename

fs._move = move_then_die
with fs.staged_output(out) as work:
    for name in ("a.bin", "b.bin"):
        (work / name).write_text("new " + name)
"""


def test_a_publish_killed_half_way_is_finished_by_the_next_run(tmp_path: Path) -> None:
    """The one window a kill can leave a mix in (between two renames) is closed by the next run."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.bin", "b.bin"):
        (out / name).write_text("old " + name)
    proc = subprocess.run([sys.executable, "-c", _HALF_PUBLISH, str(out)], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert [(out / n).read_text() for n in ("a.bin", "b.bin")] == ["new a.bin", "old b.bin"]

    with scratch_folder(out, "stage") as work:  # any next run writing beside out
        assert work.parent.parent == tmp_path / SCRATCH_DIR
        assert [(out / n).read_text() for n in ("a.bin", "b.bin")] == ["new a.bin", "new b.bin"]
        assert [p.name for p in (tmp_path / SCRATCH_DIR).iterdir()] == [work.parent.name]
    assert _leftovers(tmp_path) == []


def test_the_scratch_of_a_live_run_is_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with scratch_folder(out, "stage") as mine:
        (mine / "partial.bin").write_text("x")
        clear_stale_scratch(scratch_place(out))  # as another run would
        assert (mine / "partial.bin").is_file()
        assert not out.exists()  # nothing made inside the output before publishing
    assert not (tmp_path / SCRATCH_DIR).exists()


def test_the_scratch_place_is_beside_the_output_on_its_filesystem(tmp_path: Path) -> None:
    assert scratch_place(tmp_path / "out") == tmp_path.resolve() / SCRATCH_DIR
    assert scratch_place(Path("/")) == Path("/") / SCRATCH_DIR
    mount = Path("/dev/shm")  # a mount point on most Linux hosts: renames out of its parent would fail
    if os.path.ismount(mount) and mount.stat().st_dev != mount.parent.stat().st_dev:
        assert scratch_place(mount) == mount / SCRATCH_DIR
