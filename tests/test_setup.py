"""The test set-up's supply chain (docker/setup-engine.sh): a hash-locked wheelhouse, a registry on loopback
only, and only the registry the script started. Each failed on the code before: the wheelhouse was
downloaded without hashes, MODELBAKE_REGISTRY could name any host, and whatever answered on 127.0.0.1:5055
was taken for the registry (a local user listening there first received every push and cache export)."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "docker" / "setup-engine.sh"
LOCK = ROOT / "build" / "wheelhouse-lock.txt"


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a requirements file (comments, -r lines aside)."""
    pins = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)", line.strip()):
            pins[re.sub(r"\[.*\]", "", match[1]).lower().replace("_", "-")] = match[2]
    return pins


def test_the_lock_pins_every_requirement_at_its_version_with_a_hash() -> None:
    """A pin changed without running docker/lock_wheelhouse.py fails here, not in a later offline build."""
    locked = _pins(LOCK)
    text = LOCK.read_text()
    assert len(locked) > 50 and text.count("--hash=sha256:") >= len(locked)
    for requirements in sorted((ROOT / "build").glob("requirements-*.txt")):
        for name, version in _pins(requirements).items():
            assert locked.get(name) == version, (
                f"{requirements.name}: {name}=={version}, the lock has {locked.get(name)}; "
                "run python3 docker/lock_wheelhouse.py"
            )


def test_the_arm64_lock_pins_the_run_time_set_as_the_main_lock_does() -> None:
    """The arm64 runtime installs the same versions as the amd64 one (its own wheels, its own digests)."""
    arm64, main = _pins(LOCK.with_name("wheelhouse-lock-arm64.txt")), _pins(LOCK)
    for name, version in _pins(ROOT / "build" / "requirements-runtime.txt").items():
        assert arm64.get(name) == version, f"{name}=={version}: run python3 docker/lock_wheelhouse.py"
    assert {n: v for n, v in arm64.items() if main.get(n) != v} == {}  # every dependency at the main set's version


def test_setup_refuses_a_registry_off_loopback_before_doing_anything(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("docker/setup-engine.sh runs as root only (CI runs as root)")
    cache = tmp_path / "cache"
    for address in ("10.1.2.3:5000", "registry.example:443", "0.0.0.0:5055", "127.0.0.1"):
        run = subprocess.run(
            ["bash", str(SETUP)],
            env={**os.environ, "MODELBAKE_REGISTRY": address, "MODELBAKE_CACHE": str(cache)},
            capture_output=True,
            text=True,
        )
        assert run.returncode == 1, address
        assert f"MODELBAKE_REGISTRY={address}: not a loopback host:port" in run.stderr
        assert run.stdout == "" and not any(cache.iterdir())


class _FakeRegistry(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # answers /v2/ as a registry would
        self.send_response(200)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_setup_refuses_a_port_another_process_listens_on(tmp_path: Path) -> None:
    """Someone else's server answering /v2/ on the registry's port is named and refused, never used."""
    if os.geteuid() != 0:
        pytest.skip("docker/setup-engine.sh runs as root only (CI runs as root)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _FakeRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = subprocess.run(
            ["bash", str(SETUP)],
            env={**os.environ, "MODELBAKE_REGISTRY": f"127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"127.0.0.1:{port}: port taken by pid {os.getpid()}" in run.stderr
    assert "not the registry this script started" in run.stderr
