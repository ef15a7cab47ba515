"""The package's shape, kept: no function in modelbake/ over 50 lines (docstring included), so each one can
be read on one screen; a longer one is split where its steps are."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modelbake"
LIMIT = 50


def test_no_function_over_fifty_lines() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_the_runtime_images_copy_of_the_package_is_complete(tmp_path: Path) -> None:
    """The runtime image gets only the run-time part of the package (Dockerfile.models' COPY lines); a module
    the loaders import but that list forgets fails the image build's verify. Copy what the lines name and
    import every run-time module from that copy alone, in a fresh interpreter."""
    import re
    import subprocess
    import sys

    dockerfile = (PACKAGE.parent / "Dockerfile.models").read_text()
    copies = re.findall(r"^COPY ((?:modelbake/\S+\s+(?:\\\n\s+)?)+)/opt/modelbake/modelbake/", dockerfile, re.M)
    assert copies, "no COPY of the package into /opt/modelbake in Dockerfile.models"
    dest = tmp_path / "modelbake"
    for group in copies:
        for name in group.replace("\\", " ").split():
            source = PACKAGE.parent / name
            target = dest / source.relative_to(PACKAGE)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    modules = [
        f"modelbake.runtime.{p.stem}" for p in sorted((PACKAGE / "runtime").glob("*.py")) if p.stem != "__main__"
    ]
    # The copy comes first on the path (the checkout's editable install would fill any gap otherwise), and
    # every module must come from it.
    code = (
        "import importlib, sys; mods = [importlib.import_module(m) for m in sys.argv[2:]]; "
        "print([m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), *modules], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:] + run.stdout
