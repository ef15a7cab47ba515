"""Shared fixtures: the tiny real models every test feeds through the users' code paths."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbake.runtime.sessions import ENGINES_ENV

REPO = Path(__file__).resolve().parents[1]
# Kept between runs (git-ignored) so BuildKit sees identical sources and reuses its cache.
CACHE = Path(os.environ.get("MODELBAKE_TEST_CACHE", REPO / ".cache"))
# The tiny graphs whose weights pass 1 MB (the text towers, tiny-rn's fp32 image tower) ship as NAME.onnx +
# NAME.onnx.data, the others as one file: every tree the tests build, on the host or in Docker, has both kinds.
EXTERNAL_DATA_BYTES = "1000000"
# OpenVINO is in the dev set, and `auto` would check it beside every int8 on every open: the tests of
# onnxruntime's variants, and the services the tests start (a session's subprocesses, started before any
# test's own fixtures), would then choose by a second engine's timings on this CPU. Process-wide, so every
# child inherits it; tests/test_engines.py lifts it per test.
os.environ[ENGINES_ENV] = "onnxruntime"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `first` tests run before the rest, in their own order (a stable sort). The second builder's bake needs
    # about 16 GB while it runs; after test_demo and the first engine's builds it ran out of disk in CI.
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


def _image_refs(host: str | None) -> set[str] | None:
    """Every image on an engine as "repo:tag@id" (dangling ones as "@id"); None when no engine answers."""
    env = {**os.environ, **({"DOCKER_HOST": host} if host else {})}
    try:
        proc = subprocess.run(
            ["docker", "images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}}@{{.ID}}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return {line.replace("<none>:<none>", "") for line in proc.stdout.split()}


@pytest.fixture(scope="session", autouse=True)
def remove_test_images(request: pytest.FixtureRequest) -> Iterator[None]:
    """The images this session made, removed when it ends (on both engines): each run left about 10 GB
    behind, and CI machines carry their disk from run to run. Images that were there before are kept, so
    a user's own images and setup-engine's base images are never touched; the build cache stays (gc caps it).
    Only a session that runs `docker` tests does this: one that does not (a few host-side tests run while
    the suite builds) must not take the other's images for its own."""
    if not any(item.get_closest_marker("docker") for item in request.session.items):
        yield
        return
    hosts = [None, os.environ.get("MODELBAKE_BUILDER2") or None]
    before = {host: _image_refs(host) for host in hosts}
    yield
    for host, had in before.items():
        now = _image_refs(host)
        if had is None or now is None:
            continue
        made = sorted(ref for ref in now - had)
        # By tag first (an id two tags share is removed with its last tag), then dangling ones by id.
        names = [ref.rsplit("@", 1)[0] for ref in made if not ref.startswith("@")]
        ids = [ref[1:] for ref in made if ref.startswith("@")]
        env = {**os.environ, **({"DOCKER_HOST": host} if host else {})}
        for args in (names, ids):
            if args:
                subprocess.run(["docker", "rmi", *args], capture_output=True, env=env, timeout=600)


@pytest.fixture(scope="session")
def tiny_sources() -> Path:
    from modelbake.sources.tiny import SOURCES_VERSION, make_tiny_sources

    dest = CACHE / "tiny-sources"
    version = dest / "VERSION"
    if not version.is_file() or version.read_text() != SOURCES_VERSION:
        shutil.rmtree(dest, ignore_errors=True)
        make_tiny_sources(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_specs(tiny_sources: Path) -> dict[str, str]:
    return {
        "clip": ",".join(f"{name}@dir:{tiny_sources / 'clip' / name}" for name in ("tiny-vit", "tiny-rn")),
        "reranker": f"tiny-bert@dir:{tiny_sources / 'reranker' / 'tiny-bert'}",
    }


@pytest.fixture(scope="session")
def download_run(tmp_path_factory: pytest.TempPathFactory, tiny_specs: dict[str, str]) -> tuple[Path, str, str]:
    """`modelbake download` of the tiny models with progress bars forced on: (tree, stdout, stderr)."""
    out = tmp_path_factory.mktemp("models")
    proc = run_cli(
        "download",
        "--clip",
        tiny_specs["clip"],
        "--reranker",
        tiny_specs["reranker"],
        "--int8",
        "--int8-ship",  # every gated int8 ships: the tests need every int8 file; test_speed covers the decision
        "gated",
        "--regressor-epochs",
        "3",
        "--onnx-external-data-bytes",
        EXTERNAL_DATA_BYTES,
        "--out",
        str(out),
        check=True,
        env={"MODELBAKE_PROGRESS": "1"},
    )
    return out, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def built_tree(download_run: tuple[Path, str, str]) -> Path:
    """A complete model tree made on the host by `modelbake download` with the tiny models."""
    return download_run[0]


def run_cli(
    *args: str,
    check: bool = False,
    cwd: Path | None = None,
    script: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `modelbake ARGS` (or a build/ entrypoint script) in a fresh interpreter, as users do."""
    cmd = [sys.executable, str(REPO / "build" / script)] if script else [sys.executable, "-m", "modelbake.cli"]
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd + list(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
