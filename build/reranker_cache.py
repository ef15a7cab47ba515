"""Entrypoint of the reranker-cache stage of Dockerfile.models: `python build/reranker_cache.py [ARGS]`.

Arguments and their build-arg defaults: `modelbake reranker-cache --help`.
"""

import sys

from modelbake.cli import main

if __name__ == "__main__":
    sys.exit(main(["reranker-cache", *sys.argv[1:]]))
