"""``modelbake demo``: the whole job once, offline, on tiny real models: a first run a newcomer can follow.

    python -m modelbake.demo [--port 8080]      (or: modelbake demo)

1. sets up a Docker engine with buildx, a local base image and a wheelhouse (docker/setup-engine.sh, as the
   tests do), so nothing has to be pulled from a registry or the Hugging Face hub;
2. makes the tiny models (an OpenCLIP ViT and ResNet local-dir, a tiny BERT cross-encoder), once;
3. bakes the runtime image with them through the bake driver (``modelbake.bake.bake``, in this process),
   under a demo image name;
4. builds the example search service FROM that image and starts it on 127.0.0.1 only;
5. calls each route of the service once and prints the answers, then how to stop it and what next.

Idempotent and quick the second time: the tiny models are kept in the work folder, BuildKit caches the bake,
and a previous demo container of the same name is replaced. Torch is imported (lazily) only to make the tiny
models the first time, and the Docker SDK only by the driver's inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

from modelbake import context
from modelbake.engine import check_engine, docker, last_line
from modelbake.errors import ModelbakeError
from modelbake.fs import scratch_folder
from modelbake.params import BAKE, BY_NAME, SELECTION, TABLE
from modelbake.sources.tiny import MOUNTED_CLIP_SPECS, MOUNTED_RERANKER_SPEC
from modelbake.spec import DEFAULT_CLIP_MODELS, DEFAULT_RERANKER_MODELS

# Names of their own, so the demo never overwrites a user's `modelbake:latest` or the tests' `modelbake:e2e`.
IMAGE = "modelbake-demo"
TAG = "tiny"
RUNTIME_IMAGE = f"{IMAGE}:{TAG}"
SERVICE_IMAGE = f"{IMAGE}-search:{TAG}"
CONTAINER = "modelbake-demo"
REGRESSOR_EPOCHS = "3"  # seconds of training instead of a minute: the demo shows the plumbing, not accuracy
STEPS = 6
# The tiny reranker knows only the int8 gate's probe queries (it was trained on them), so the demo asks one:
# its /rank answer then reads as a reranker's (relevant first, clear gaps), not as noise.
QUERY = "person walking a dog"
PASSAGES = [
    "a red car drives fast down the street at night",
    "a man is walking his dog in the park",
    "people dance to music on the beach",
]


class DemoError(ModelbakeError):
    """A step cannot go on; the message is one line naming the fix."""


def default_workdir() -> Path:
    """$MODELBAKE_CACHE/demo, the cache root docker/setup-engine.sh uses too (default ~/.cache/modelbake)."""
    return context.cache_root() / "demo"


def configure(parser: argparse.ArgumentParser) -> None:
    """The demo's options, on the `modelbake demo` subparser or on main()'s own parser."""
    parser.add_argument("--port", type=int, default=8080, help="host port on 127.0.0.1 for the service (default 8080)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the tiny models and logs are kept (default: $MODELBAKE_CACHE/demo, else ~/.cache/modelbake/demo)",
    )
    parser.add_argument(
        "--stop",
        action="store_true",
        help="remove the service container after the requests (default: leave it running)",
    )
    parser.add_argument(
        "--no-setup",
        action="store_true",
        help="skip docker/setup-engine.sh: use the running engine with BASE_IMAGE and WHEELHOUSE "
        "from the environment (hosts that are not Debian 12, or not root)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="write the build output to the work folder instead of the terminal"
    )
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds to wait for the service to answer (default 180)"
    )


class _Clock:
    """Step messages on stderr with the elapsed time, so a slow step is visible as it happens."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.step = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def next(self, text: str) -> None:
        self.step += 1
        self.say(f"{self.step}/{STEPS} {text}")

    def say(self, text: str) -> None:
        print(f"[demo {self.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)


def _docker(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = docker(*args, timeout=timeout)
    if check and proc.returncode != 0:
        raise DemoError(f"`docker {' '.join(args[:2])} ...` failed: {last_line(proc)}")
    return proc


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a server binds (docker-proxy does too): connections left in TIME_WAIT do not make it busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _a_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _held_by_demo(port: int, name: str) -> bool:
    """Whether the port is published by a previous demo container (which this run replaces anyway)."""
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(["docker", "port", name, "8080/tcp"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and f"127.0.0.1:{port}" in proc.stdout.split()


def check_port(port: int, name: str = CONTAINER) -> None:
    """Fail before any build when the port is taken by anything but a previous demo container."""
    if not 0 < port < 65536:
        raise DemoError(f"--port {port}: give a TCP port between 1 and 65535")
    if not _port_free(port) and not _held_by_demo(port, name):
        raise DemoError(f"port {port} on 127.0.0.1 is in use; pick another with --port {_a_free_port()}")


def parse_exports(text: str) -> dict[str, str]:
    """The `export NAME=VALUE` lines docker/setup-engine.sh prints (values quoted by bash's printf %q)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip())
        if match:
            words = shlex.split(match[2])
            found[match[1]] = words[0] if words else ""
    return found


def check_setup_host() -> None:
    """docker/setup-engine.sh's needs, checked before anything is written: Debian's apt, and root."""
    if not (Path("/etc/debian_version").is_file() and shutil.which("apt-get")):
        raise DemoError(
            "no Debian apt here: docker/setup-engine.sh needs Debian 12; elsewhere install Docker with buildx, "
            "set BASE_IMAGE and WHEELHOUSE (or leave WHEELHOUSE empty when online) and pass --no-setup"
        )
    if os.geteuid() != 0:
        raise DemoError(
            "docker/setup-engine.sh installs Debian packages and starts dockerd, so it needs root: run "
            f"`sudo {sys.executable} -m modelbake.demo`, or pass --no-setup when Docker with buildx, "
            "BASE_IMAGE and WHEELHOUSE are already set up"
        )


def setup_engine(clock: _Clock) -> dict[str, str]:
    """docker/setup-engine.sh: engine + buildx, the local base image, the wheelhouse; returns its exports."""
    # Its progress lines go straight to our stderr; only the exports are read from its stdout.
    script = context.root() / "docker" / "setup-engine.sh"
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DemoError("docker/setup-engine.sh failed (its error is above); fix that and run the demo again")
    exports = parse_exports(proc.stdout)
    missing = {"BASE_IMAGE", "WHEELHOUSE"} - set(exports)
    if missing:
        raise DemoError(f"docker/setup-engine.sh printed no {', '.join(sorted(missing))}; is the checkout complete?")
    clock.say(f"base image {exports['BASE_IMAGE']}, wheelhouse {exports['WHEELHOUSE']}")
    return exports


def use_running_engine(clock: _Clock) -> dict[str, str]:
    """--no-setup: the engine as it is, with the build inputs from the environment."""
    check_engine()  # an EngineError names what is missing
    base = BY_NAME["BASE_IMAGE"].from_env()
    wheelhouse = os.environ.get("WHEELHOUSE", "")
    if wheelhouse and not Path(wheelhouse).is_dir():
        raise DemoError(f"WHEELHOUSE={wheelhouse} is not a folder; point it at a wheel folder or unset it")
    clock.say(f"base image {base}, " + (f"wheelhouse {wheelhouse}" if wheelhouse else "no wheelhouse (pip online)"))
    return {"BASE_IMAGE": base, "WHEELHOUSE": wheelhouse}


def _tiny_complete(dest: Path) -> bool:
    from modelbake.sources.tiny import SOURCES_VERSION  # the module imports torch only inside its makers

    version = dest / "VERSION"
    return version.is_file() and version.read_text() == SOURCES_VERSION


def tiny_sources(workdir: Path, clock: _Clock) -> Path:
    """The tiny real models under workdir/tiny-sources, made once (written aside, then renamed into place)."""
    dest = workdir / "tiny-sources"
    if _tiny_complete(dest):
        clock.say(f"reusing the tiny models in {dest}")
        return dest
    missing = [m for m in ("torch", "open_clip", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(
            f"making the tiny models needs {', '.join(missing)} in this Python: pip install 'modelbake[build]' "
            "(in a checkout: pip install -e '.[build]', or the venv tests/run.sh makes)"
        )
    from modelbake.sources.tiny import make_tiny_sources  # its makers import torch: only now, only this once

    with scratch_folder(dest, "tiny-sources") as work:  # a killed run leaves its scratch, cleared by the next
        make_tiny_sources(work / dest.name)
        shutil.rmtree(dest, ignore_errors=True)  # another version's
        os.rename(work / dest.name, dest)
    clock.say(f"tiny models written to {dest}")
    return dest


def _bake_variables() -> set[str]:
    """Every variable docker-bake.hcl reads from the environment."""
    return {p.name for p in TABLE if BAKE in p.where}


def bake_runtime(inputs: dict[str, str], sources: Path, workdir: Path, quiet: bool) -> None:
    """The bake driver with the tiny selection, under the demo image name; BuildKit's progress to the log
    (``quiet``) or to stderr (stdout is for the service's answers)."""
    from modelbake.bake import BakeError, Selection, bake

    # A selection or digest left in the user's environment must not leak into the demo's build; where torch
    # wheels come from, and the reproducibility/provenance settings, may.
    keep = {"TORCH_INDEX_URL", "SOURCE_DATE_EPOCH", "GIT_REVISION", "SOURCE_URL"}
    env = {k: v for k, v in os.environ.items() if k in keep or k not in _bake_variables()}
    env.update(inputs)
    env.update({"MODEL_SOURCES": str(sources), "IMAGE": IMAGE, "TAG": TAG})
    fields = {p.field: p.default for p in SELECTION} | {
        "clip": MOUNTED_CLIP_SPECS,
        "reranker": MOUNTED_RERANKER_SPEC,
        "regressor_epochs": REGRESSOR_EPOCHS,
    }
    log = workdir / "bake.log"
    with log.open("w") if quiet else contextlib.nullcontext(sys.stderr) as sink:
        try:
            result = bake(Selection(**fields), ["runtime"], environ=env, progress=sink)
        except BakeError:
            sink.flush()
            _bake_failed(log if quiet else None)
        print(result.report(), file=sink)
    if result.verify_ok is False:
        raise DemoError(f"the baked image failed its verify run:\n{result.verify_output.strip()}")


def _bake_failed(log: Path | None) -> NoReturn:
    """The end of the log (BuildKit names the failed stage there), then the demo's one error line."""
    if log is not None:
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
    where = f" (full log: {log})" if log is not None else ""
    raise DemoError(
        f"the bake failed (BuildKit's output above names the stage){where}; fix that and run the demo again "
        "(finished stages come from the cache)"
    )


def build_service(workdir: Path, wheelhouse: str | None = None) -> None:
    """examples/search_service FROM the demo runtime image, its packages (uvicorn, Starlette, pydantic) from
    the wheelhouse offline when there is one, else from the package index.

    Without ``wheelhouse``: $WHEELHOUSE when set (empty: none, as --no-setup reads it), else the one
    docker/setup-engine.sh fills ($MODELBAKE_WHEELHOUSE, default $MODELBAKE_CACHE/wheelhouse) if it exists.
    """
    if wheelhouse is None:
        wheelhouse = os.environ.get("WHEELHOUSE")
    if wheelhouse is None:
        default = os.environ.get("MODELBAKE_WHEELHOUSE") or str(default_workdir().parent / "wheelhouse")
        wheelhouse = default if Path(default).is_dir() else ""
    offline = ["--build-context", f"wheelhouse={wheelhouse}", "--build-arg", "PIP_OFFLINE=1"] if wheelhouse else []
    proc = _docker(
        "build",
        "--progress=plain",
        "-t",
        SERVICE_IMAGE,
        "--build-arg",
        f"MODELBAKE_IMAGE={RUNTIME_IMAGE}",
        *offline,
        str(context.root() / "examples" / "search_service"),
        check=False,
    )
    log = workdir / "service-build.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print("\n".join(proc.stderr.splitlines()[-20:]), file=sys.stderr)
        raise DemoError(f"building {SERVICE_IMAGE} failed (the end of its log is above; all of it: {log})")


def start_service(port: int, name: str) -> str:
    """Replace a previous demo container and start the service on loopback only; returns the container id."""
    _docker("rm", "-f", name, check=False)
    proc = _docker(
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "io.modelbake.demo=1",
        "-p",
        f"127.0.0.1:{port}:8080",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        SERVICE_IMAGE,
        check=False,
    )
    if proc.returncode != 0:
        _docker("rm", "-f", name, check=False)  # docker leaves a created container behind on a bind failure
        if "address already in use" in proc.stderr or "port is already allocated" in proc.stderr:
            raise DemoError(f"port {port} on 127.0.0.1 is in use; pick another with --port {_a_free_port()}")
        raise DemoError(f"`docker run {SERVICE_IMAGE}` failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout.strip()


def call(port: int, method: str, path: str, body: object = None, timeout: float = 30) -> tuple[int, Any]:
    """One HTTP request to the service: (status, decoded JSON body, or the raw text if not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_until_answering(port: int, name: str, timeout: float) -> None:
    """Poll GET /models until it answers 200; a container that stops on the way fails at once, with its log."""
    end = time.monotonic() + timeout
    while True:
        try:
            if call(port, "GET", "/models", timeout=5)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass  # not listening yet: the models are checked and loaded first
        state = _docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
        if state != "true" or time.monotonic() > end:
            log = _docker("logs", "--tail", "20", name, check=False)
            print((log.stdout + log.stderr).rstrip(), file=sys.stderr)
            why = "stopped" if state != "true" else f"did not answer within {timeout:.0f} s (--timeout)"
            raise DemoError(f"the service container {name} {why}; its log is above (docker logs {name})")
        time.sleep(0.5)


def _feature_dim(name: str, models: Any) -> int:
    """The regressor's input size, from the manifest in the container, else the default CLIP's size."""
    proc = _docker("exec", name, "cat", "/models/model_manifest.json", check=False)
    try:
        for model in json.loads(proc.stdout)["models"]:
            if model["kind"] == "regressor":
                return int(model["details"]["feature_dim"])
    except (ValueError, KeyError, TypeError):
        pass
    return int(next(iter(models["clip"].values())))


def _fmt(values: list[float], n: int = 4) -> str:
    shown = ", ".join(f"{v:+.4f}" for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def exercise(port: int, name: str) -> list[str]:
    """One request to each documented route; returns the lines to print. Any route not answering 200 fails."""
    lines = []

    def ask(method: str, path: str, body: object = None) -> Any:
        status, doc = call(port, method, path, body)
        if status != 200:
            raise DemoError(f"{method} {path} answered {status}: {str(doc)[:200]}")
        return doc

    models = ask("GET", "/models")
    clip = models.get("clip", {})
    names = ", ".join(f"{n} ({d}-d{', default' if i == 0 else ''})" for i, (n, d) in enumerate(clip.items()))
    lines.append(
        f"GET  /models      200  clip {names}; reranker {models.get('reranker')}; regressor {models.get('regressor')}"
    )

    texts = [QUERY]
    embeddings = ask("POST", "/embed/text", {"texts": texts})["embeddings"]
    lines.append(
        f"POST /embed/text  200  {len(embeddings)} x {len(embeddings[0])} for {texts[0]!r}: {_fmt(embeddings[0])}"
    )

    ranking = ask("POST", "/rank", {"query": QUERY, "passages": PASSAGES})["ranking"]
    lines.append(f"POST /rank        200  query {QUERY!r}:")
    lines += [
        f"                       {place}. {score:+.4f}  {PASSAGES[index]!r}"
        for place, (index, score) in enumerate(ranking, 1)
    ]

    dim = _feature_dim(name, models)
    # The text embedding stands in for a clip's CLIP features when the sizes agree, as they do by default.
    features = embeddings[0] if len(embeddings[0]) == dim else [0.1] * dim
    deltas = ask("POST", "/boundaries", {"features": [features]})["deltas"]
    lines.append(f"POST /boundaries  200  features of {dim} values -> deltas [start, end] {_fmt(deltas[0])} s")
    return lines


def run(args: argparse.Namespace) -> int:
    """The demo with parsed options (`modelbake demo` calls this too); 0 on success, 1 with one error line."""
    clock = _Clock()
    name = CONTAINER
    workdir = (args.workdir or default_workdir()).expanduser().resolve()
    try:
        context.root()  # a ContextError names what is missing
        if importlib.util.find_spec("docker") is None:
            raise DemoError("the bake driver needs the Docker SDK for Python: pip install -e '.[bake]'")
        check_port(args.port, name)  # before minutes of building
        if not args.no_setup:
            check_setup_host()
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DemoError(
                f"cannot create the work folder {workdir} ({exc.strerror}); give another with --workdir"
            ) from exc

        clock.next("Docker engine, base image and wheelhouse")
        inputs = use_running_engine(clock) if args.no_setup else setup_engine(clock)

        clock.next("tiny models (OpenCLIP ViT + ResNet, BERT cross-encoder)")
        sources = tiny_sources(workdir, clock)

        clock.next(f"bake the runtime image {RUNTIME_IMAGE} (a few minutes cold, seconds when cached)")
        bake_runtime(inputs, sources, workdir, args.quiet)

        clock.next(f"build the example service {SERVICE_IMAGE}")
        build_service(workdir)

        clock.next(f"start container {name} on 127.0.0.1:{args.port}")
        start_service(args.port, name)
        wait_until_answering(args.port, name, args.timeout)

        clock.next("one request to each route")
        lines = exercise(args.port, name)
    except ModelbakeError as exc:  # DemoError, or an EngineError naming what is missing
        print(f"modelbake demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modelbake demo: interrupted", file=sys.stderr)
        return 130

    _report(args, lines, clock)
    return 0


def _report(args: argparse.Namespace, lines: list[str], clock: _Clock) -> None:
    """The answers, then how to reach, stop and go on from the service."""
    name = CONTAINER
    url = f"http://127.0.0.1:{args.port}"
    print(
        f"service    {url}  (container {name}, image {SERVICE_IMAGE}; tiny random weights: "
        "the scores mean nothing, the plumbing is real)"
    )
    print("\n".join(lines))
    if args.stop:
        _docker("rm", "-f", name, check=False)
        print(f"stopped    container {name} removed (--stop)")
    else:
        print(
            f'try        curl -s {url}/models; curl -s {url}/rank -d \'{{"query": "a dog", '
            f'"passages": ["a dog runs", "a car"]}}\''
        )
        print(f"stop       docker rm -f {name}")
    print(f"next       the real selection ({DEFAULT_CLIP_MODELS} + {DEFAULT_RERANKER_MODELS}): `modelbake bake`")
    print("           (needs the Hugging Face hub and PyTorch's wheel index; offline: docs/usage.md, air-gapped)")
    print(f"total      {clock.elapsed():.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelbake demo", description="Bake tiny real models into the runtime image, offline, and serve them."
    )
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
