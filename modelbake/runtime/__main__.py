"""``python -m modelbake.runtime verify [FOLDER]``: the runtime image's verify and health check."""

from __future__ import annotations

import argparse
import sys

from modelbake.runtime.commands import add_verify_arguments, run_verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelbake.runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    add_verify_arguments(sub.add_parser("verify", help="check hashes and run every model on its golden probe inputs"))
    return run_verify(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
