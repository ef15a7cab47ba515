#!/usr/bin/env bash
# The test command (README "Quick start"; .ci/run calls it). As root on Debian 12:
#   1. docker/setup-engine.sh: Docker engine + buildx/compose, the local base image, the wheelhouse, a registry,
#      a second engine with the containerd image store, arm64 under emulation (base image, wheels);
#   2. a venv with the pinned build/requirements-dev.txt set, installed offline from that wheelhouse;
#   3. ruff, then pytest (the Docker end-to-end tests included). Extra arguments go to pytest.
# Idempotent and quick the second time: every step reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash docker/setup-engine.sh)"
export BASE_IMAGE WHEELHOUSE MODELBAKE_REGISTRY MODELBAKE_BUILDER2

venv=${MODELBAKE_VENV:-.venv}
want=$(cat build/requirements-*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "[tests] installing the dev set into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-index --find-links "$WHEELHOUSE" -r build/requirements-dev.txt
  "$venv/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
  echo "$want" >"$venv/.requirements.sha256"
fi

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/hadolint" Dockerfile.models examples/*/Dockerfile bench/naive.Dockerfile
# --durations: every run says where its time went (the suite should stay near 30 minutes)
exec "$venv/bin/python" -m pytest -ra --durations=30 "$@"
