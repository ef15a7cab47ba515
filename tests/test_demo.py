"""`modelbake demo`: the newcomer's first run, end to end in a real Docker engine, twice.

The Docker test runs the demo as users do (`python -m modelbake.demo`), which sets up the engine itself with
docker/setup-engine.sh (root, Debian 12). Outside CI it skips with the reason when that cannot work; under
CI=true that is a failure instead. The other tests need no engine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port

from modelbake import demo


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the Docker tests must run, run docker/setup-engine.sh first)")
    pytest.skip(f"{reason}; run `bash docker/setup-engine.sh` (root, Debian 12) to get one")


def _demo(*args: str, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m modelbake.demo ARGS` in a fresh interpreter, from outside the checkout; (result, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.demo", *args],
        capture_output=True,
        text=True,
        cwd=Path.home(),
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def _container_id() -> str:
    proc = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", demo.CONTAINER], capture_output=True, text=True)
    return proc.stdout.strip()


def test_importing_the_demo_does_not_import_torch() -> None:
    # `modelbake demo --help` and the CLI's start-up stay fast: torch is only for making the tiny models.
    code = "import sys, modelbake.demo; print(sorted(m for m in ('torch', 'open_clip', 'docker') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"


def test_configure_and_run_are_reusable_by_a_subcommand() -> None:
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args([])
    assert (args.port, args.stop, args.no_setup, args.workdir) == (8080, False, False, None)
    assert parser.parse_args(["--port", "9000", "--stop"]).port == 9000


def test_setup_engine_exports_are_parsed_as_bash_quotes_them() -> None:
    # printf %q output, as docker/setup-engine.sh prints it.
    text = "export BASE_IMAGE=modelbake/debian-base:bookworm\nexport WHEELHOUSE=/a/b\\ c/wheels\nnoise\n"
    assert demo.parse_exports(text) == {"BASE_IMAGE": "modelbake/debian-base:bookworm", "WHEELHOUSE": "/a/b c/wheels"}


def test_a_busy_port_fails_at_once_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc, _ = _demo("--port", str(port), "--workdir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"modelbake demo: error: port {port} on 127\.0\.0\.1 is in use; pick another with --port \d+", line
    )
    assert not any(tmp_path.iterdir())  # nothing set up or built before the check


@pytest.mark.docker
def test_demo_serves_every_route_and_is_quick_the_second_time(
    record_property: pytest.RecordProperty, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("docker") is None:
        _missing("no docker client on PATH")
    if os.geteuid() != 0 or not Path("/etc/debian_version").is_file():
        _missing("the demo sets its engine up with docker/setup-engine.sh, which needs root on Debian")
    port = free_port()
    times = []
    try:
        first_id = None
        for attempt in (1, 2):
            proc, seconds = _demo("--port", str(port))
            times.append(seconds)
            assert proc.returncode == 0, f"run {attempt}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            out = proc.stdout
            # The demo's own report: every route answered 200, with the tiny models' shapes.
            # The service lists its CLIP models in manifest order; the first is its default, whichever that is.
            models = re.search(r"^GET  /models +200  clip (.*); reranker True; regressor True$", out, re.M)
            assert models, out
            assert sorted(models[1].replace(", default", "").split(", ")) == ["tiny-rn (32-d)", "tiny-vit (32-d)"]
            assert re.search(r"^POST /embed/text +200  1 x 32 for ", out, re.M), out
            ranked = re.findall(r"^ +\d\. ([+-]\d\.\d{4})  '(.*)'$", out, re.M)
            assert len(ranked) == len(demo.PASSAGES), out
            # The trained tiny reranker (the same bytes on every CPU): the relevant passage first, no ties.
            assert ranked[0][1] == "a man is walking his dog in the park" and len({s for s, _ in ranked}) == 3, out
            assert re.search(r"^POST /boundaries +200  features of 32 values -> deltas \[start, end\] \[", out, re.M)
            assert f"stop       docker rm -f {demo.CONTAINER}" in out
            assert re.search(r"^total +\d+\.\d s$", out, re.M)
            # Still serving after the demo returned: the routes answer here too, on loopback.
            status, doc = demo.call(port, "GET", "/models")
            assert status == 200 and doc["clip"] == {"tiny-vit": 32, "tiny-rn": 32}, doc
            status, doc = demo.call(port, "POST", "/embed/text", {"texts": ["a dog", "a cat"]})
            assert status == 200 and [len(e) for e in doc["embeddings"]] == [32, 32]
            status, doc = demo.call(port, "POST", "/rank", {"query": "a dog", "passages": ["a dog runs", "a car"]})
            assert status == 200 and sorted(i for i, _ in doc["ranking"]) == [0, 1]
            status, doc = demo.call(port, "POST", "/boundaries", {"features": [[0.1] * 32]})
            assert status == 200 and len(doc["deltas"][0]) == 2
            if attempt == 1:
                first_id = _container_id()
        # The second run reused the tiny models and replaced the container rather than failing on its name.
        assert "reusing the tiny models" in proc.stderr
        assert _container_id() not in ("", first_id)
    finally:
        subprocess.run(["docker", "rm", "-f", demo.CONTAINER], capture_output=True)
        record_property("demo_wall_seconds", times)
        with capsys.disabled():
            print(f"\nmodelbake demo wall time: {', '.join(f'run {i} {t:.1f} s' for i, t in enumerate(times, 1))}")
