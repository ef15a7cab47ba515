"""The Docker engine from Python: one way to run the docker CLI and one probe of the engine, for the bake
driver, the demo and the tests alike. Torch-free; the Docker SDK is imported only for :func:`sdk_client`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from modelbake.errors import ModelbakeError


class EngineError(ModelbakeError):
    """No docker client, no buildx plugin, or no engine answering; the message says which and the fix."""


# An intermittent BuildKit scheduler bug when targets share steps (moby/buildkit#2303): the build fails
# with this message and a retry resumes from the cache. BuildKit prints it as plain text after the
# progress in every progress mode, and in the failed vertex's "error".
TRANSIENT_ERROR = "inconsistent graph state"


def docker(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """``docker ARGS``, output captured as text; run once more when BuildKit fails with its intermittent
    graph-state error (moby/buildkit#2303), which a retry resumes from the cache. The caller checks the
    return code and words the failure for its own users."""
    run = {"capture_output": True, "text": True, "env": env, "cwd": cwd, "timeout": timeout}
    proc = subprocess.run(["docker", *args], **run)  # type: ignore[call-overload]
    if proc.returncode != 0 and TRANSIENT_ERROR in proc.stderr:
        proc = subprocess.run(["docker", *args], **run)  # type: ignore[call-overload]
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The line a failed docker command ends with (its error), for a one-line message."""
    return ((proc.stderr or "").strip() or (proc.stdout or "").strip() or "no output").splitlines()[-1]


def check_engine(timeout: float = 30) -> None:
    """An EngineError naming what is missing, unless a docker client with buildx and an engine answer."""
    if shutil.which("docker") is None:
        raise EngineError("no docker client on PATH; install Docker (docker/setup-engine.sh sets one up on Debian 12)")
    try:
        if subprocess.run(["docker", "buildx", "version"], capture_output=True, timeout=timeout).returncode != 0:
            raise EngineError("the buildx plugin is missing; install docker-buildx (or run docker/setup-engine.sh)")
        answers = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        answers = False
    if not answers:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise EngineError(f"no Docker engine answers at {where}; start dockerd")


def sdk_client() -> Any:
    """A Docker SDK client of the engine :func:`check_engine` found (for inspecting images)."""
    check_engine()
    import docker as sdk

    try:
        client = sdk.from_env()
        client.ping()
    except Exception as exc:  # the SDK's own error types
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise EngineError(f"no Docker engine answers at {where} ({type(exc).__name__}); start dockerd") from exc
    return client
