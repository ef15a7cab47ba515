"""modelbake installed from its wheel into a fresh venv and run outside the checkout, as `pip install` users do.

The wheel is built from the checkout's files; its run-time dependencies come from the wheelhouse
(docker/setup-engine.sh's, $WHEELHOUSE), offline, through the wheel's own metadata. The venv starts without
torch: the CLI and `verify` must not need it. For a producing stage the venv then borrows this environment's
build set (torch, onnx) by a path line, which does not load this environment's editable modelbake.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

ALL_OK = re.compile(r"^verify: (\d+) of \1 checks ok$", re.MULTILINE)


def _run(venv: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv, a work folder outside the checkout)."""
    wheelhouse = os.environ.get("WHEELHOUSE", "")
    if not Path(wheelhouse or "/nonexistent").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("WHEELHOUSE is not set: run the suite through tests/run.sh (docker/setup-engine.sh makes it)")
        pytest.skip("no wheelhouse ($WHEELHOUSE): tests/run.sh sets it")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", work / "dist", src],
                   check=True)  # fmt: skip
    (wheel,) = (work / "dist").glob("modelbake-*.whl")
    subprocess.run([sys.executable, "-m", "venv", work / "venv"], check=True)
    venv = work / "venv"
    install = [venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    subprocess.run([*install, "--find-links", wheelhouse, wheel], check=True)
    (work / "elsewhere").mkdir()
    return venv, work / "elsewhere"


def test_the_installed_cli_and_verify_run_without_torch_or_the_checkout(
    installed: tuple[Path, Path], built_tree: Path
) -> None:
    venv, elsewhere = installed
    where = _run(venv, "python", "-c", "import modelbake, importlib.util as u; print(modelbake.__file__, "
                 "u.find_spec('torch'))", cwd=elsewhere).stdout  # fmt: skip
    assert where.startswith(str(venv)) and where.split()[1] == "None"
    assert "verify" in _run(venv, "modelbake", "--help", cwd=elsewhere).stdout
    out = _run(venv, "modelbake", "verify", str(built_tree), cwd=elsewhere).stdout
    assert ALL_OK.search(out), out


def test_the_installed_package_writes_its_build_files_and_bakes_from_them(installed: tuple[Path, Path]) -> None:
    """`modelbake context DIR` and `bake` outside a checkout use the build files the wheel carries: the same
    bytes as the checkout's; bake runs there, with a relative MODELS_OUT kept relative to the user."""
    venv, elsewhere = installed
    _run(venv, "modelbake", "context", "ctx", cwd=elsewhere)
    for name in ("Dockerfile.models", "docker-bake.hcl", "build/clip_export.py", "modelbake/manifest.py"):
        assert (elsewhere / "ctx" / name).read_bytes() == (REPO / name).read_bytes(), name
    assert not (elsewhere / "ctx" / "modelbake" / "context").exists()
    env = {"MODELBAKE_CACHE": str(elsewhere / "cache"), "MODELS_OUT": "out"}
    line = _run(venv, "modelbake", "bake", "models", "--dry-run", cwd=elsewhere, env=env).stdout
    (cached,) = (elsewhere / "cache").glob("context-*")
    assert line.startswith(f"cd {cached} && ") and (cached / "docker-bake.hcl").is_file()
    assert (cached / "Dockerfile.models").read_bytes() == (REPO / "Dockerfile.models").read_bytes()


def test_a_producing_stage_runs_from_the_installed_package(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, elsewhere = installed
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run(venv, "python", "-c", code, cwd=elsewhere).stdout.strip())
    (site / "borrowed-build-set.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run(venv, "python", "-c", "import modelbake.producers.regressor as r; print(r.__file__)", cwd=elsewhere)
    assert where.stdout.startswith(str(venv))
    out = tmp_path / "models"
    args = ("--regressor-only", "--regressor-feature-dim", "16", "--regressor-epochs", "2", "--out", str(out))
    _run(venv, "modelbake", "download", *args, cwd=elsewhere)
    assert ALL_OK.search(_run(venv, "modelbake", "verify", str(out), cwd=elsewhere).stdout)
