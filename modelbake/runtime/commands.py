"""``verify`` as a command: its arguments and its run, one definition for ``modelbake verify`` and the
runtime image's ``python -m modelbake.runtime verify`` (its CMD and health check). Imports onnxruntime
only when a command runs, so a CLI's ``--help`` stays quick."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MODELS_ENV = "MODELBAKE_MODELS"


def default_folder() -> Path:
    """The tree ``verify`` checks when given none: $MODELBAKE_MODELS (``/models`` in the runtime image), else
    ``models``; an empty variable counts as unset."""
    return Path(os.environ.get(MODELS_ENV) or "models")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", type=Path, default=None, help=f"the model tree (default: ${MODELS_ENV})")
    parser.add_argument("--quick", action="store_true", help="sizes only: the cheap health check")


def run_verify(args: argparse.Namespace) -> int:
    """Verify, print the table; 0 when every check passed."""
    from modelbake.runtime.verify import print_table, verify

    checks = verify(args.folder or default_folder(), quick=args.quick)
    print_table(checks)
    return 0 if all(c.ok for c in checks) else 1
