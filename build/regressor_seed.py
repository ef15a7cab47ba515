"""Entrypoint of the regressor-seed stage of Dockerfile.models: `python build/regressor_seed.py [ARGS]`.

Arguments and their build-arg defaults: `modelbake regressor-seed --help`.
"""

import sys

from modelbake.cli import main

if __name__ == "__main__":
    sys.exit(main(["regressor-seed", *sys.argv[1:]]))
