"""Ships the build files inside the wheel, so an installed `modelbake` bakes without a checkout.

Everything else is declared in pyproject.toml. The files below stay where a checkout's `docker buildx bake`
expects them; a wheel gets a copy as ``modelbake/context/`` (what :mod:`modelbake.context` reads).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def context_files() -> tuple[str, ...]:
    """modelbake.context.CONTEXT_FILES, read without importing the package (its one definition)."""
    tree = ast.parse((HERE / "modelbake" / "context.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CONTEXT_FILES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError("modelbake/context.py defines no CONTEXT_FILES")


class BuildWithContext(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        dest = Path(self.build_lib) / "modelbake" / "context"
        for pattern in context_files():
            found = sorted(HERE.glob(pattern))
            if not found:
                raise FileNotFoundError(f"{pattern}: a build file the wheel must carry is missing")
            for src in found:
                (dest / src.relative_to(HERE)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / src.relative_to(HERE))


# setuptools' own scratch would land in build/, which holds the stage entrypoints.
setup(cmdclass={"build_py": BuildWithContext}, options={"build": {"build_base": ".cache/setuptools-build"}})
