"""``python -m modelbake.runtime verify [FOLDER]``: the runtime image's verify and health check."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelbake.runtime.verify import print_table, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelbake.runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check hashes and run every model on its golden probe inputs")
    p.add_argument("folder", nargs="?", type=Path, default=Path(os.environ.get("MODELBAKE_MODELS", "models")))
    p.add_argument("--quick", action="store_true", help="sizes only: the cheap health check")
    args = parser.parse_args(argv)
    checks = verify(args.folder, quick=args.quick)
    print_table(checks)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
