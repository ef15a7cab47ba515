"""Entrypoint of the clip-export stage of Dockerfile.models: `python build/clip_export.py [ARGS]`.

Arguments and their build-arg defaults: `modelbake clip-export --help`.
"""

import sys

from modelbake.cli import main

if __name__ == "__main__":
    sys.exit(main(["clip-export", *sys.argv[1:]]))
