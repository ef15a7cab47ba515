"""Entrypoint of the merge-manifest stage of Dockerfile.models: `python build/merge_manifest.py [ARGS]`.

Arguments and their build-arg defaults: `modelbake merge-manifest --help`.
"""

import sys

from modelbake.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge-manifest", *sys.argv[1:]]))
