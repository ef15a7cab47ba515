"""End to end in a real Docker engine: `docker buildx bake` with the tiny models, then the image.

Needs the engine, the local base image and the wheelhouse that docker/setup-engine.sh provides. Outside
CI these tests skip with the reason when no engine answers; under CI=true that is a failure instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXTERNAL_DATA_BYTES, REPO, free_port, run_cli

from modelbake.engine import docker
from modelbake.manifest import check_files, read_manifest
from modelbake.sources.tiny import MOUNTED_CLIP_SPECS, MOUNTED_RERANKER_SPEC
from modelbake.testing.buildkit import Step, parse_rawjson, ran, render, stage_outcomes, stage_runs

pytestmark = pytest.mark.docker
TAG = "e2e"
IMAGE = f"modelbake:{TAG}"
UID = "10001"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the Docker tests must run, run docker/setup-engine.sh first)")
    pytest.skip(f"{reason}; run `bash docker/setup-engine.sh` (root, Debian 12) to get one")


def _docker(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: int = 1800
) -> subprocess.CompletedProcess:
    proc = docker(*args, env=env, cwd=REPO, timeout=timeout)  # once more on BuildKit's transient error
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def bake_env(tiny_sources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("docker") is None:
        _missing("no docker client on PATH")
    for probe in (["info"], ["buildx", "version"]):
        if subprocess.run(["docker", *probe], capture_output=True, timeout=30).returncode != 0:
            _missing(f"`docker {' '.join(probe)}` does not answer")
    wheelhouse = os.environ.get("WHEELHOUSE", "")
    if not wheelhouse or not Path(wheelhouse).is_dir():
        _missing("WHEELHOUSE is not set to a wheel folder (images build offline here)")
    base = os.environ.get("BASE_IMAGE", "modelbake/debian-base:bookworm")
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
        _missing(f"base image {base} is not in the engine")
    return {
        **os.environ,
        "BASE_IMAGE": base,
        "WHEELHOUSE": wheelhouse,
        "MODEL_SOURCES": str(tiny_sources),
        "CLIP_MODELS": MOUNTED_CLIP_SPECS,
        "CLIP_INT8": "1",
        "RERANKER_INT8": "1",
        "INT8_SHIP": "gated",  # tiny graphs: int8 may time slower; the tests need every int8 file
        "ONNX_EXTERNAL_DATA_BYTES": EXTERNAL_DATA_BYTES,  # the image carries graph + data pairs too
        "RERANKER_MODELS": MOUNTED_RERANKER_SPEC,
        "REGRESSOR_EPOCHS": "3",
        "TAG": TAG,
        "MODELS_OUT": str(tmp_path_factory.mktemp("models-out")),
    }


@pytest.fixture(scope="session")
def baked(bake_env: dict[str, str]) -> dict[str, str]:
    """`docker buildx bake runtime models`: the runtime image, and the model tree exported to the host."""
    _docker("buildx", "bake", "--progress=plain", "runtime", "models", env=bake_env)
    return bake_env


def _run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return _docker("run", "--rm", "--network", "none", *args, check=check, timeout=300)


@pytest.fixture
def scratch_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry of the set-up's kind on a free loopback port, its storage deleted after: the 3.4 GB build
    cache does not stay on the disk for the rest of the suite."""
    root = tmp_path_factory.mktemp("registry")
    if shutil.which("docker-registry") is None:
        _missing("no docker-registry on PATH (docker/setup-engine.sh installs it)")
    address = f"127.0.0.1:{free_port()}"
    config = root / "registry.yml"
    settings = {"version": 0.1, "log": {"level": "warn"}, "http": {"addr": address},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}}}  # fmt: skip
    config.write_text(json.dumps(settings))  # YAML reads JSON
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(60):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://{address}/v2/", timeout=2).close()
                break
            assert proc.poll() is None, (root / "registry.log").read_text()
            time.sleep(0.5)
        else:
            raise AssertionError(f"the scratch registry at {address} did not answer in 30 s")
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(root / "data", ignore_errors=True)


# First of all tests (the `first` marker): the second builder's bake needs about 16 GB of disk while it runs
# (wiped after); after the first engine's builds it ran out of disk in CI.
@pytest.mark.first
def test_another_builder_reuses_the_registry_cache_and_pushes_provenance(
    bake_env: dict[str, str], scratch_registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second engine of the set-up (containerd image store: it can export a cache) bakes the runtime image
    with BUILD_CACHE, exporting a registry cache (mode=max, zstd layers). Its build cache and images are then
    wiped, as a fresh CI runner has neither, and the same bake imports the cache: clip-export, reranker-cache
    and regressor-seed come out CACHED. Then the push group with PROVENANCE=1: the pushed runtime image carries
    a provenance attestation that `docker buildx imagetools inspect` reads."""
    builder = os.environ.get("MODELBAKE_BUILDER2", "")
    if not builder:
        _missing("MODELBAKE_BUILDER2 is not set (docker/setup-engine.sh starts the second engine)")
    registry = scratch_registry
    run = uuid.uuid4().hex[:8]
    env = {**bake_env, "DOCKER_HOST": builder, "TAG": f"cache-{run}"}
    env["BUILD_CACHE"] = f"{registry}/modelbake-cache:{run}"
    image = f"modelbake:cache-{run}"

    def wipe() -> None:  # a fresh runner: no build cache, no image of ours (the base image stays)
        _docker("image", "rm", "--force", image, env=env, check=False)
        _docker("buildx", "prune", "--all", "--force", env=env)

    def bake(*targets: str, extra: dict[str, str] | None = None) -> tuple[float, list]:
        start = time.perf_counter()
        proc = _docker("buildx", "bake", "--progress=rawjson", *targets, env={**env, **(extra or {})}, check=False,
                       timeout=3600)  # fmt: skip
        assert proc.returncode == 0, render(proc.stderr)[-6000:]
        return time.perf_counter() - start, parse_rawjson(proc.stderr)

    wipe()
    try:
        cold, _ = bake("runtime")
        # zstd, not gzip: the export took 67 s instead of 207 s here, and the cache is 7% smaller. Layers the
        # build reuses as they come keep their own compression (here 3.13 GB zstd, the base image's 176 MB
        # uncompressed and 110 MB gzip), so the assertion is on the largest, the venv's.
        raw = json.loads(_docker("buildx", "imagetools", "inspect", "--raw", env["BUILD_CACHE"], env=env).stdout)
        entries = raw.get("manifests", []) + raw.get("layers", [])  # an index, or (BuildKit 0.21+) an image
        by_type: Counter[str] = Counter()
        for entry in (layers := [e for e in entries if ".layer." in e["mediaType"]]):
            by_type[entry["mediaType"]] += entry["size"]
        largest = max(layers, key=lambda e: e["size"])
        assert largest["mediaType"].endswith("+zstd"), dict(by_type)
        wipe()
        warm, steps = bake("runtime")
        stages = ("clip-export", "reranker-cache", "regressor-seed")
        runs = {stage: stage_runs(steps, stage) for stage in stages}
        seen = stage_outcomes(steps, stages)
        assert all(runs.values()) and not any(ran(steps, stage) for stage in stages), seen
        assert all(step.cached for stage in stages for step in runs[stage]), seen
        with capsys.disabled():
            print(f"\nregistry build cache: cold bake {cold:.0f} s, another builder with the cache {warm:.0f} s")
        metadata = tmp_path / "push.json"
        push = {"PUSH_TO": f"{registry}/modelbake-prov", "PROVENANCE": "1"}
        _, steps = bake("push", "--metadata-file", str(metadata), extra=push)
        assert not any(ran(steps, stage) for stage in stages)
        digest = json.loads(metadata.read_text())["runtime-push"]["containerimage.digest"]
        ref = f"{registry}/modelbake-prov@{digest}"
        provenance = _docker("buildx", "imagetools", "inspect", ref, "--format", "{{json .Provenance}}", env=env)
        slsa = json.loads(provenance.stdout)["SLSA"]
        assert slsa["buildType"].startswith("https://mobyproject.org/buildkit@"), slsa.get("buildType")
        assert slsa["invocation"]["configSource"]["entryPoint"] == "Dockerfile.models"
    finally:
        wipe()


def test_bake_print_resolves_every_stage(bake_env: dict[str, str]) -> None:
    plan = json.loads(
        _docker("buildx", "bake", "--print", "runtime", "models", "base-image", "stages", env=bake_env).stdout
    )
    targets = plan["target"]
    assert set(targets) >= {"runtime", "models", "base-image", "clip-export", "reranker-cache", "regressor-seed"}
    assert targets["runtime"]["args"]["CLIP_MODELS"] == bake_env["CLIP_MODELS"]
    assert targets["runtime"]["args"]["CLIP_INT8"] == "1"
    assert targets["runtime"]["args"]["PIP_OFFLINE"] == "1"
    assert targets["models"]["output"] == [f"type=local,dest={bake_env['MODELS_OUT']}"]
    assert set(targets["runtime"]["contexts"]) == {"wheelhouse", "model-sources"}


def test_runtime_verifies_with_no_network(baked: dict[str, str]) -> None:
    proc = _run("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", IMAGE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    for onnx in (
        "clip_tiny-vit_text_encoder.onnx",
        "clip_tiny-vit_image_encoder.onnx",
        "clip_tiny-rn_image_encoder.onnx",
        "clip_tiny-rn_image_encoder_int8.onnx",
        "reranker_tiny-bert_int8.onnx",
        "reranker_tiny-bert.onnx",
        "boundary_regressor.onnx",
    ):
        assert f"inference {onnx}" in proc.stdout


def test_runtime_has_no_torch(baked: dict[str, str]) -> None:
    for module in ("torch", "open_clip", "transformers", "sentence_transformers"):
        proc = _run("--entrypoint", "python", IMAGE, "-c", f"import {module}")
        assert proc.returncode != 0 and "No module named" in proc.stderr, module
    proc = _run("--entrypoint", "python", IMAGE, "-c", "import onnxruntime, numpy, tokenizers, PIL; print('ok')")
    assert proc.stdout.strip() == "ok", proc.stderr
    # No build tools or package caches either.
    proc = _run("--entrypoint", "sh", IMAGE, "-c", "command -v pip gcc cc; ls /root/.cache 2>/dev/null; true")
    assert proc.stdout.strip() == "", proc.stdout


def test_the_runtime_with_openvino_checks_and_runs_it_and_the_default_one_has_none(baked: dict[str, str]) -> None:
    """RUNTIME_OPENVINO=1: OpenVINO from the wheelhouse, pruned to its CPU plugin and ONNX reader; the image
    verifies, `auto` checks OpenVINO on each role, and it runs where asked. The default image has none."""
    image = f"modelbake:{TAG}-openvino"
    _docker(
        "buildx",
        "bake",
        "--progress=plain",
        "runtime",
        env={**baked, "TAG": f"{TAG}-openvino", "RUNTIME_OPENVINO": "1"},
    )
    absent = _run("--entrypoint", "python", IMAGE, "-c", "import openvino")
    assert absent.returncode != 0 and "No module named 'openvino'" in absent.stderr
    listing = (
        "import openvino as ov, os; print(ov.Core().available_devices, sorted(os.listdir(ov.__path__[0] + '/libs')))"
    )
    proc = _run("--entrypoint", "python", image, "-c", listing, check=True)
    assert proc.stdout.startswith("['CPU'] ") and "libopenvino_intel_cpu_plugin.so" in proc.stdout, proc.stdout
    assert "libopenvino_onnx_frontend" in proc.stdout and not re.search(
        r"gpu|npu|tensorflow|pytorch|paddle", proc.stdout
    )
    locked = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
    # OpenVINO reads a graph with external data (the tiny text towers) from files: a tmpfs gives it a place
    verified = _run(*locked, "--tmpfs", "/tmp", image)
    assert verified.returncode == 0 and "FAIL" not in verified.stdout, verified.stdout + verified.stderr
    assert re.search(r"cpu .*OpenVINO \d{4}\.\d+\.\d+ \((bf16 )?f32\)", verified.stdout), verified.stdout
    # whichever wins on this CPU, OpenVINO was checked and timed (or refused with its figures) on each role
    for role in ("text_encoder", "image_encoder", "reranker"):
        assert re.search(rf"auto {role} +runs .*openvino/(bf16|f32)", verified.stdout), (role, verified.stdout)
    # without one, that graph is no candidate for OpenVINO, said as such; the rest is checked as before
    bare = _run(*locked, image)
    assert bare.returncode == 0 and "FAIL" not in bare.stdout, bare.stdout + bare.stderr
    refused = r"auto text_encoder +runs .*openvino/(bf16|f32) could not be opened here: .*--tmpfs /tmp"
    assert re.search(refused, bare.stdout), bare.stdout
    forced = _run("--tmpfs", "/tmp", "-e", "MODELBAKE_VARIANT=openvino/f32", image)
    assert forced.returncode == 0 and "runs openvino/f32: asked for (MODELBAKE_VARIANT)" in forced.stdout
    sizes = [json.loads(_docker("image", "inspect", name).stdout)[0]["Size"] for name in (IMAGE, image)]
    added = (sizes[1] - sizes[0]) / 1e6
    print(f"RUNTIME_OPENVINO=1 adds {added:.0f} MB ({sizes[0] / 1e6:.0f} MB -> {sizes[1] / 1e6:.0f} MB)")
    assert 50 < added < 150, added  # pruned: the wheel installs 180 MB
    _docker("image", "rm", image)


def test_runtime_is_non_root_and_models_are_read_only(baked: dict[str, str]) -> None:
    proc = _run("--entrypoint", "id", IMAGE, "-u")
    assert proc.stdout.strip() == UID
    proc = _run("--entrypoint", "sh", IMAGE, "-c", "touch /models/x || echo refused")
    assert "refused" in proc.stdout
    config = json.loads(_docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert {"HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "MODELBAKE_MODELS=/models"} <= set(config["Env"])
    assert config["Healthcheck"]["Test"][-2:] == ["--quick", "/models"]


def test_exported_model_tree_matches_its_manifest(baked: dict[str, str]) -> None:
    root = Path(baked["MODELS_OUT"])
    manifest = read_manifest(root)
    check_files(root, manifest["models"])
    assert sorted(m["kind"] for m in manifest["models"]) == ["clip", "clip", "regressor", "reranker"]
    assert not (root / ".manifest.d").exists()
    # The same manifest is what the runtime image carries.
    in_image = _run("--entrypoint", "cat", IMAGE, "/models/model_manifest.json", check=True).stdout
    assert json.loads(in_image) == manifest


@pytest.mark.parametrize("command", [["docker", "compose"], ["docker-compose"]])
def test_compose_builds_the_runtime_image(baked: dict[str, str], command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        _missing(f"{command[0]} is not installed")
    env = {**baked, "PIP_OFFLINE": "1", "TAG": f"compose-{command[-1]}"}
    proc = subprocess.run([*command, "build"], capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    image = f"modelbake:compose-{command[-1]}"
    proc = _run(image)
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout + proc.stderr


def _rebake_with_a_new_reranker(baked: dict[str, str], out: Path) -> tuple[str, list[Step]]:
    """The baseline bake, then one with a new fallback reranker candidate in front (unique, so BuildKit cannot
    have seen it) into out/changed: that candidate and the steps of the second bake."""
    missing = f"gone-{uuid.uuid4().hex[:8]}@dir:/sources/none"
    _docker("buildx", "bake", "--progress=plain", "models", env={**baked, "MODELS_OUT": str(out / "base")})
    env = {**baked, "MODELS_OUT": str(out / "changed"), "RERANKER_MODELS": f"{missing},{baked['RERANKER_MODELS']}"}
    # BuildKit's structured progress says which steps ran; people get it rendered when the build fails.
    proc = _docker("buildx", "bake", "--progress=rawjson", "models", env=env, check=False)
    assert proc.returncode == 0, render(proc.stderr)[-6000:]
    return missing, parse_rawjson(proc.stderr)


def test_a_reranker_change_reruns_only_its_stage(baked: dict[str, str], tmp_path: Path) -> None:
    # Only reranker-cache and the stages after it may run again. The baseline is baked first because
    # BuildKit's collector may have dropped records since the fixture built them; and as it trims a full
    # cache by use count as much as by age, it has dropped a record just used, between the two bakes (CI,
    # twice). So a miss gets one more pair of bakes: a key the change touched misses every time.
    out = tmp_path / "first"
    missing, steps = _rebake_with_a_new_reranker(baked, out)
    if ran(steps, "clip-export") or ran(steps, "regressor-seed"):
        out = tmp_path / "again"
        missing, steps = _rebake_with_a_new_reranker(baked, out)
    stages = ("clip-export", "reranker-cache", "regressor-seed")
    runs, seen = {stage: stage_runs(steps, stage) for stage in stages}, stage_outcomes(steps, stages)
    assert all(runs.values()), seen  # each stage's RUN step is in the log
    assert not ran(steps, "clip-export") and not ran(steps, "regressor-seed"), seen
    assert all(step.cached for step in runs["clip-export"] + runs["regressor-seed"]), seen
    assert ran(steps, "reranker-cache") and not any(step.cached for step in runs["reranker-cache"]), seen
    (reranker,) = [m for m in read_manifest(out / "changed")["models"] if m["kind"] == "reranker"]
    assert any(missing in note for note in reranker["notes"])


def test_container_structure(baked: dict[str, str]) -> None:
    binary = shutil.which("container-structure-test") or str(Path(sys.executable).parent / "container-structure-test")
    if not Path(binary).exists():
        _missing("container-structure-test is not installed (build/requirements-dev.txt)")
    proc = subprocess.run(
        [binary, "test", "--image", IMAGE, "--config", str(REPO / "docker" / "structure-test.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout


def test_bake_driver_builds_inspects_and_verifies(baked: dict[str, str]) -> None:
    env = {k: v for k, v in baked.items() if k not in ("CLIP_MODELS", "RERANKER_MODELS")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelbake.cli",
            "bake",
            "runtime",
            "--clip",
            baked["CLIP_MODELS"],
            "--reranker",
            baked["RERANKER_MODELS"],
            "--clip-int8",
            "--reranker-int8",
            "--int8-ship",
            "gated",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"image      {IMAGE}" in proc.stdout
    assert "models     clip:tiny-vit, clip:tiny-rn, regressor:boundary_regressor, reranker:tiny-bert" in proc.stdout
    assert "label      org.opencontainers.image.title=modelbake" in proc.stdout
    assert "verify     passed in a container with no network" in proc.stdout
    # The manifest-digest label is the sha256 of the manifest the image holds.
    in_image = _run("--entrypoint", "cat", IMAGE, "/models/model_manifest.json", check=True).stdout
    digest = "sha256:" + hashlib.sha256(in_image.encode()).hexdigest()
    assert f"label      io.modelbake.manifest-digest={digest}" in proc.stdout
    assert (
        json.loads(_docker("image", "inspect", IMAGE).stdout)[0]["Config"]["Labels"]["io.modelbake.manifest-digest"]
        == digest
    )
    for stage in (
        "runtime base image",
        "runtime-base",
        "clip-export",
        "reranker-cache",
        "regressor-seed",
        "models layer",
        "runtime image",
    ):
        assert f"size       {stage}" in proc.stdout, stage


def test_push_by_digest_then_pull_and_verify_with_no_network(baked: dict[str, str], tmp_path: Path) -> None:
    """`modelbake bake --push` to the loopback registry: the runtime and models images by digest; pulled by
    digest with the local tags gone, the runtime verifies itself offline and the models image holds the
    manifest the runtime image's label names."""
    registry = os.environ.get("MODELBAKE_REGISTRY", "")
    if not registry:
        _missing("MODELBAKE_REGISTRY is not set (docker/setup-engine.sh starts a registry on loopback)")
    repository = f"{registry}/modelbake-e2e"
    env = {k: v for k, v in baked.items() if k not in ("CLIP_MODELS", "RERANKER_MODELS")}
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", "bake", "runtime", "--clip", baked["CLIP_MODELS"], "--reranker",
         baked["RERANKER_MODELS"], "--clip-int8", "--reranker-int8", "--int8-ship", "gated", "--push", repository,
         "--kubernetes", str(tmp_path / "k8s"), "--service-image", IMAGE],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pushed = dict(line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("pushed "))
    assert set(pushed) == {"runtime", "models"}, proc.stdout
    assert re.fullmatch(rf"{re.escape(repository)}@sha256:[0-9a-f]{{64}}", pushed["runtime"])
    assert re.fullmatch(rf"{re.escape(repository)}-models@sha256:[0-9a-f]{{64}}", pushed["models"])
    _docker("image", "rm", f"{repository}:{TAG}", f"{repository}-models:{TAG}")
    for ref in pushed.values():
        _docker("pull", "--quiet", ref)
    verified = _run(pushed["runtime"], check=True)
    assert "FAILED" not in verified.stdout + verified.stderr
    label = json.loads(_docker("image", "inspect", pushed["runtime"]).stdout)[0]["Config"]["Labels"]
    container = _docker("create", pushed["models"], "none").stdout.strip()  # FROM scratch: never started
    try:
        _docker("cp", f"{container}:/model_manifest.json", str(tmp_path / "manifest.json"))
    finally:
        _docker("rm", container)
    digest = "sha256:" + hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert label["io.modelbake.manifest-digest"] == digest
    # The Kubernetes manifests carry what was pushed: the models image and the tree's digest, pinned.
    from test_kubernetes import validate

    image_volume, init_copy = (validate(tmp_path / "k8s" / n)[0] for n in ("image-volume.yaml", "init-copy.yaml"))
    pod = image_volume["spec"]["template"]["spec"]
    assert pod["volumes"][0]["image"]["reference"] == pushed["models"]
    assert {"name": "MODELBAKE_MANIFEST_SHA256", "value": digest} in pod["containers"][0]["env"]
    assert init_copy["spec"]["template"]["spec"]["initContainers"][0]["image"] == pushed["runtime"]


def test_plain_bake_pushes_both_images_and_writes_their_digests(baked: dict[str, str], tmp_path: Path) -> None:
    """`PUSH_TO=R/N docker buildx bake push --metadata-file F`: the same two images, digests in F."""
    registry = os.environ.get("MODELBAKE_REGISTRY", "")
    if not registry:
        _missing("MODELBAKE_REGISTRY is not set (docker/setup-engine.sh starts a registry on loopback)")
    repository = f"{registry}/modelbake-plain"
    metadata = tmp_path / "push.json"
    env = {**baked, "PUSH_TO": repository}
    _docker("buildx", "bake", "--progress=plain", "push", "--metadata-file", str(metadata), env=env)
    digests = {target: meta["containerimage.digest"] for target, meta in json.loads(metadata.read_text()).items()}
    assert set(digests) == {"runtime-push", "models-push"}
    runtime, models = f"{repository}@{digests['runtime-push']}", f"{repository}-models@{digests['models-push']}"
    for ref in (runtime, models):
        _docker("pull", "--quiet", ref)
    _run(runtime, check=True)  # verify, offline, from the image pulled by digest


def test_a_signed_tree_is_verified_at_start_by_an_image_built_with_model_signing(
    baked: dict[str, str], tmp_path: Path
) -> None:
    """`modelbake bake --sign-key --push --kubernetes`: the key reaches the build as a secret only (not in the
    image's history or labels), the tree ships model.sig, the runtime gets MODEL_SIGNING=1 from the driver
    (not asked for here) and verifies the tree at start with the public key mounted, refusing another key;
    the Kubernetes manifests carry that public key."""
    from test_kubernetes import validate
    from test_signature import _key_pair

    from modelbake.signature import PUBLIC_KEY_ENV, key_id

    registry = os.environ.get("MODELBAKE_REGISTRY", "")
    if not registry:
        _missing("MODELBAKE_REGISTRY is not set (docker/setup-engine.sh starts a registry on loopback)")
    private, public = _key_pair(tmp_path, "ours")
    _, other = _key_pair(tmp_path, "other")
    tag = f"{TAG}-signed"
    env = {k: v for k, v in baked.items() if k not in ("CLIP_MODELS", "RERANKER_MODELS", "MODEL_SIGNING")}
    env["TAG"] = tag
    repository = f"{registry}/modelbake-signed"
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", "bake", "runtime", "--clip", baked["CLIP_MODELS"], "--reranker",
         baked["RERANKER_MODELS"], "--clip-int8", "--reranker-int8", "--int8-ship", "gated", "--no-inspect",
         "--sign-key", str(private), "--push", repository, "--kubernetes", str(tmp_path / "k8s"),
         "--service-image", IMAGE],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    image = f"modelbake:{tag}"
    assert f"signed     /models/model.sig, key {key_id(public)}" in proc.stdout
    history = _docker("history", "--no-trunc", image).stdout + _docker("image", "inspect", image).stdout
    body = private.read_text().splitlines()[1]
    assert body not in history and str(private) not in history  # a secret, never an argument or a layer
    for key in (public, other):  # the files alone: the service user cannot search pytest's 0700 folder
        key.chmod(0o644)
    env_key = ["-e", f"{PUBLIC_KEY_ENV}=/keys/pub.pem"]
    ok = _run("-v", f"{public}:/keys/pub.pem:ro", *env_key, image, check=True)
    assert f"model.sig verified with key {key_id(public)}" in ok.stdout, ok.stdout
    refused = _run("-v", f"{other}:/keys/pub.pem:ro", *env_key, image)
    assert refused.returncode != 0 and "signature check failed (Key mismatch" in refused.stdout + refused.stderr
    unreadable = _run("-v", f"{tmp_path}:/keys:ro", "-e", f"{PUBLIC_KEY_ENV}=/keys/ours.pub.pem", image)
    assert unreadable.returncode != 0 and "cannot read it (Permission denied)" in unreadable.stdout
    assert "Traceback" not in unreadable.stdout + unreadable.stderr
    # The pods verify with the same public key (the ConfigMap) where the variable points.
    for name in ("image-volume.yaml", "init-copy.yaml"):
        config_map, deployment, _ = validate(tmp_path / "k8s" / name)
        assert list(config_map["data"].values()) == [public.read_text()]
        env_vars = {
            e["name"]: e.get("value", e.get("valueFrom"))
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env_vars[PUBLIC_KEY_ENV].endswith("/" + next(iter(config_map["data"])))
    _docker("image", "rm", image, f"{repository}:{tag}", f"{repository}-models:{tag}")


def test_sign_models_without_the_key_fails_naming_how_to_give_it(baked: dict[str, str]) -> None:
    """SIGN_MODELS=1 with no secret: the signing step fails with the three ways to pass the key, no image."""
    env = {**baked, "SIGN_MODELS": "1", "SIGNING_KEY_FILE": "", "TAG": f"{TAG}-nokey"}
    proc = _docker("buildx", "bake", "--progress=plain", "runtime", env=env, check=False)
    assert proc.returncode != 0
    assert "SIGN_MODELS=1 needs the build secret model_signing_key: SIGNING_KEY_FILE=KEY.pem" in proc.stderr
    assert _docker("image", "inspect", f"modelbake:{TAG}-nokey", check=False).returncode != 0


def test_the_driver_refuses_a_cache_the_engine_cannot_export_before_building(bake_env: dict[str, str]) -> None:
    """The first engine keeps the classic image store: --cache is refused in one line, before any build."""
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", "bake", "runtime", "--cache", "127.0.0.1:5055/modelbake-cache"],
        capture_output=True, text=True, env={**bake_env, "DOCKER_HOST": ""}, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "this engine's image store cannot export a build cache" in proc.stderr
    assert "#1 [internal]" not in proc.stderr  # nothing was built
    builder = os.environ.get("MODELBAKE_BUILDER2", "")
    if builder:  # the second engine can: the reference gets its default tag
        import docker

        from modelbake.bake import check_cache

        client = docker.DockerClient(base_url=builder)
        assert check_cache(client, "127.0.0.1:5055/modelbake-cache") == "127.0.0.1:5055/modelbake-cache:buildcache"
        assert check_cache(client, "127.0.0.1:5055/c:v2") == "127.0.0.1:5055/c:v2"


def test_python_api_bakes_and_reports_sizes(baked: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from modelbake.bake import Selection, bake

    for key, value in baked.items():
        monkeypatch.setenv(key, value)
    selection = Selection(
        clip=baked["CLIP_MODELS"].split(","),
        reranker=[baked["RERANKER_MODELS"]],
        clip_int8=True,
        reranker_int8=True,
        int8_ship="gated",
        regressor_epochs=3,
    )
    result = bake(selection, ["runtime"])
    assert result.image == IMAGE and result.verify_ok, result.verify_output
    assert result.labels["io.modelbake.manifest-digest"] == result.manifest_digest
    sizes = result.stage_sizes
    produced = sum(sizes[s] for s in ("clip-export", "reranker-cache", "regressor-seed"))
    manifest_bytes = len(json.dumps(result.manifest, indent=2, sort_keys=True).encode())
    # The models layer holds the stages' files and the manifest, nothing else.
    assert produced < sizes["models layer"] <= produced + 2 * manifest_bytes, sizes
    assert sizes["runtime image"] == result.image_size
    assert sum(sizes[s] for s in ("runtime base image", "runtime-base (python, onnxruntime)", "models layer")) <= (
        result.image_size
    )


def test_a_stale_manifest_digest_fails_the_build(baked: dict[str, str]) -> None:
    env = {**baked, "MODELS_MANIFEST_DIGEST": "sha256:" + "0" * 64, "TAG": "stale"}
    proc = _docker("buildx", "bake", "--progress=plain", "runtime", env=env, check=False)
    assert proc.returncode != 0
    assert "/models/model_manifest.json: FAILED" in proc.stderr


def test_host_cli_makes_the_same_tree_as_the_image_build(
    baked: dict[str, str], tiny_sources: Path, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    clip = ",".join(f"{n}@dir:{tiny_sources / 'clip' / n}" for n in ("tiny-vit", "tiny-rn"))
    run_cli(
        "download",
        "--clip",
        clip,
        "--reranker",
        f"tiny-bert@dir:{tiny_sources / 'reranker' / 'tiny-bert'}",
        "--int8",
        "--int8-ship",
        "gated",
        "--onnx-external-data-bytes",
        EXTERNAL_DATA_BYTES,
        "--regressor-epochs",
        baked["REGRESSOR_EPOCHS"],
        "--out",
        str(host),
        check=True,
    )

    def digests(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")
            if p.is_file() and ".manifest.d" not in p.parts
        }

    def timed_choices(root: Path) -> dict[str, str]:
        """int8 files whose quantisation method the build's timings picked (static or dynamic)."""
        doc = json.loads((root / "model_manifest.json").read_text())
        int8 = [f for m in doc["models"] for f in m["files"] if f.get("variant") == "int8"]
        return {f["path"]: f["parity"]["method"] for f in int8}

    image_root = Path(baked["MODELS_OUT"])
    image_tree, host_tree = digests(image_root), digests(host)
    assert set(image_tree) == set(host_tree)
    # Every artifact is byte-identical; the manifest differs in source paths, times and timings, and
    # sentence-transformers' model card records the Python version (3.11.2 in the image here). An int8
    # graph may differ only where the two builds' timings picked different quantisation methods.
    image_methods, host_methods = timed_choices(image_root), timed_choices(host)
    picked_apart = {p for p in image_methods if image_methods[p] != host_methods.get(p)}
    differ = {k for k in image_tree if image_tree[k] != host_tree[k]} - picked_apart
    assert differ <= {"model_manifest.json", "reranker/tiny-bert/README.md"}, differ

    def files(root: Path) -> dict[str, tuple[str, int]]:
        doc = json.loads((root / "model_manifest.json").read_text())
        return {
            f["path"]: (f["sha256"], f["bytes"])
            for m in doc["models"]
            for f in m["files"]
            if f["path"] != "reranker/tiny-bert/README.md" and f["path"] not in picked_apart
        }

    assert files(host) == files(image_root)


def test_air_gapped_bundle_builds_with_no_index(
    baked: dict[str, str], tiny_specs: dict[str, str], tmp_path: Path
) -> None:
    """`modelbake bundle` gathers wheels + sources; the build then uses nothing else (PIP_OFFLINE=1)."""
    out = tmp_path / "bundle"
    # pip is pointed at the test wheelhouse; on a connected machine it downloads from the index.
    run_cli(
        "bundle",
        str(out),
        "--clip",
        tiny_specs["clip"],
        "--reranker",
        tiny_specs["reranker"],
        f"--pip-arg=--find-links={baked['WHEELHOUSE']}",
        "--pip-arg=--no-index",
        check=True,
    )
    selection = (out / "selection.toml").read_text()
    assert 'clip = "tiny-vit@dir:/sources/clip/tiny-vit,tiny-rn@dir:/sources/clip/tiny-rn"' in selection
    assert "reranker_int8 = false" in selection and "regressor_epochs = 20" in selection  # every field, explicit
    doc = json.loads((out / "bundle_manifest.json").read_text())
    listed = {f["path"]: f["sha256"] for f in doc["files"]}
    assert "sources/reranker/tiny-bert/model.safetensors" in listed
    assert any(p.startswith("wheelhouse/torch-") for p in listed)
    assert all(
        hashlib.sha256((out / p).read_bytes()).hexdigest() == d for p, d in listed.items() if "wheelhouse" not in p
    )
    env = {k: v for k, v in baked.items() if k not in ("CLIP_MODELS", "RERANKER_MODELS", "CLIP_INT8", "RERANKER_INT8")}
    env.update({"WHEELHOUSE": str(out / "wheelhouse"), "MODEL_SOURCES": str(out / "sources"), "TAG": "bundle"})
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", "bake", "--config", str(out / "selection.toml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify     passed in a container with no network" in proc.stdout
    # BuildKit prints each RUN with its args: the base stage installed from the bundle alone.
    assert 'if [ "1" = 1 ]; then set -- --no-index' in proc.stderr
    # Refuses to write over an existing folder.
    again = run_cli(
        "bundle", str(out), "--no-wheels", "--clip", tiny_specs["clip"], "--reranker", tiny_specs["reranker"]
    )
    assert again.returncode == 1 and "exists; give a new folder" in again.stderr
    shutil.rmtree(out)  # 3 GB of wheels: not worth keeping in pytest's temp folders


def _wait_healthy(container: str, deadline_s: float = 180) -> str:
    """Poll the engine's health status; a liveness timeout, not a speed threshold."""
    import time

    end = time.monotonic() + deadline_s
    while True:
        state = json.loads(_docker("inspect", container).stdout)[0]["State"]
        status = state.get("Health", {}).get("Status", "none")
        if status in ("healthy", "unhealthy") or not state["Running"] or time.monotonic() > end:
            return status
        time.sleep(0.5)


def _exec_json(container: str, method: str, path: str, body: object = None) -> tuple[int, dict]:
    """An HTTP request from inside the container (it has no network but its loopback)."""
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        "data = None if sys.argv[3] == 'null' else sys.argv[3].encode()\n"
        "req = urllib.request.Request('http://127.0.0.1:8080' + sys.argv[2], data=data, method=sys.argv[1])\n"
        "try:\n    r = urllib.request.urlopen(req, timeout=60)\n"
        "except urllib.error.HTTPError as e:\n    r = e\n"
        "print(r.status, r.read().decode())\n"
    )
    out = _docker("exec", container, "python", "-c", script, method, path, json.dumps(body)).stdout
    status, _, doc = out.partition(" ")
    return int(status), json.loads(doc)


def test_runtime_image_becomes_healthy_under_its_own_healthcheck(baked: dict[str, str]) -> None:
    name = f"modelbake-health-{uuid.uuid4().hex[:8]}"
    _docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--health-interval",
        "1s",
        "--entrypoint",
        "sleep",
        IMAGE,
        "infinity",
    )
    try:
        assert _wait_healthy(name) == "healthy"
        log = json.loads(_docker("inspect", name).stdout)[0]["State"]["Health"]["Log"][-1]
        assert log["ExitCode"] == 0 and "checks ok" in log["Output"]
    finally:
        _docker("rm", "-f", name, check=False)


@pytest.mark.parametrize("models", ["baked-in", "mounted"])
def test_example_service_from_compose_becomes_healthy_and_serves(baked: dict[str, str], models: str) -> None:
    """compose.yaml's example service, FROM the runtime image, its packages from the wheelhouse offline (pip
    run from its wheel: the runtime image has none); models baked in or mounted read-only."""
    import base64
    import io

    from PIL import Image

    env = {**baked, "PIP_OFFLINE": "1"}
    build = ["docker", "compose", "--profile", "example", "build", "search"]
    proc = subprocess.run(build, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    image = f"modelbake-search:{TAG}"
    probe = "import importlib.util as u; print([m for m in ('pip', 'torch') if u.find_spec(m)])"
    assert _run("--entrypoint", "python", image, "-c", probe, check=True).stdout.strip() == "[]"
    mount = []
    if models == "mounted":  # the service user (uid 10001) must be able to read the tree; pytest made it 0700
        Path(baked["MODELS_OUT"]).chmod(0o755)
        # A mounted tree states its own digest (README): it need not be the tree the image was built with,
        # and after the other tests' bakes the image may hold another build of it (timings differ).
        digest = hashlib.sha256((Path(baked["MODELS_OUT"]) / "model_manifest.json").read_bytes()).hexdigest()
        mount = ["-v", f"{baked['MODELS_OUT']}:/models:ro", "-e", f"MODELBAKE_MANIFEST_SHA256=sha256:{digest}"]
    name = f"modelbake-search-{uuid.uuid4().hex[:8]}"
    isolated = ["--network", "none", "--read-only", "--cap-drop", "ALL", "--health-interval", "1s"]
    _docker("run", "-d", "--name", name, *isolated, "--cpus", "1", *mount, image)
    try:
        assert _wait_healthy(name) == "healthy", _docker("logs", name, check=False).stderr[-3000:]
        # The quota, read from the container's cgroup: its 2 model workers share 1 CPU (1 thread each), not the
        # machine's cores (onnxruntime counts those).
        started = _docker("logs", name).stderr
        assert "model calls at once: 2; engine threads per call: 1; CPUs granted: 1" in started, started[-2000:]
        status, doc = _exec_json(name, "GET", "/models")
        assert status == 200 and set(doc.pop("variants")) == {"clip", "reranker", "regressor"}
        assert doc.pop("engines")["reranker"]["tiny-bert"]["reranker"].startswith("onnxruntime/")  # none other here
        assert doc.pop("why")["regressor"] == {"boundary_regressor": {"regressor": "fp32: the only variant built"}}
        assert doc == {"clip": {"tiny-vit": 32, "tiny-rn": 32}, "reranker": True, "regressor": True}
        status, doc = _exec_json(name, "POST", "/rank", {"query": "a dog", "passages": ["a dog runs", "a car"]})
        assert status == 200 and sorted(i for i, _ in doc["ranking"]) == [0, 1]
        status, doc = _exec_json(name, "POST", "/embed/text", {"texts": ["a dog on a beach"]})
        assert status == 200 and len(doc["embeddings"][0]) == 32
        png = io.BytesIO()
        Image.new("RGB", (50, 40), "red").save(png, "PNG")
        status, doc = _exec_json(name, "POST", "/embed/image", {"images": [base64.b64encode(png.getvalue()).decode()]})
        assert status == 200 and len(doc["embeddings"][0]) == 32
        status, doc = _exec_json(name, "POST", "/boundaries", {"features": [[0.1] * 32]})
        assert status == 200 and len(doc["deltas"][0]) == 2
        status, doc = _exec_json(name, "POST", "/boundaries", {"features": [[0.1] * 5]})
        assert status == 422 and "features must have shape (n, 32)" in doc["error"]
        status, doc = _exec_json(name, "POST", "/rank", {"query": "q", "passages": ["a"] * 257})
        assert status == 422 and "at most 256 items" in doc["error"]
    finally:
        _docker("rm", "-f", name, check=False)


def test_base_image_builds_with_plain_docker_build_for_debugging(baked: dict[str, str]) -> None:
    """`docker build --target base-image` works without bake (offline here: wheelhouse as a context)."""
    tag = f"modelbake-base:{TAG}-debug"
    _docker(
        "build",
        "-f",
        "Dockerfile.models",
        "--target",
        "base-image",
        "-t",
        tag,
        "--build-context",
        f"wheelhouse={baked['WHEELHOUSE']}",
        "--build-arg",
        "PIP_OFFLINE=1",
        "--build-arg",
        f"BASE_IMAGE={baked['BASE_IMAGE']}",
        ".",
        env=baked,
    )
    try:
        imports = "import torch, open_clip, onnx, onnxsim, sentence_transformers; print(torch.__version__)"
        proc = _run("--entrypoint", "python", tag, "-c", imports)
        assert proc.returncode == 0 and proc.stdout.strip().startswith("2."), proc.stderr[-2000:]
    finally:  # 6.5 GB in the image store; BuildKit's cache keeps the layers for the next run
        _docker("image", "rm", tag, check=False)


def test_no_pip_survives_from_a_python_slim_style_base(baked: dict[str, str], tmp_path: Path) -> None:
    """The default base (python:3.11-slim-bookworm, not pullable here) keeps pip in /usr/local; a base with
    that layout gives a runtime-base without any pip."""
    base = "modelbake/slim-layout:test"
    (tmp_path / "Dockerfile").write_text(
        f"FROM {baked['BASE_IMAGE']}\n"
        "RUN mkdir -p /usr/local/bin /usr/local/lib/python3.11/site-packages/pip \\\n"
        " && for p in pip pip3 pip3.11; do printf '#!/bin/sh\\necho pip\\n' >/usr/local/bin/$p; done \\\n"
        " && chmod 0755 /usr/local/bin/pip* && touch /usr/local/lib/python3.11/site-packages/pip/__init__.py\n"
    )
    _docker("build", "-q", "-t", base, str(tmp_path))
    try:
        env = {**baked, "RUNTIME_BASE_IMAGE": base, "TAG": "slim-layout"}
        _docker(
            "buildx", "bake", "--progress=plain", "runtime-base", "--set", "runtime-base.output=type=docker", env=env
        )
        probe = "ls /usr/local/bin/pip* /usr/local/lib/python3.11/site-packages/pip /opt/venv/bin/pip 2>&1; true"
        proc = _run("--entrypoint", "sh", "modelbake-runtime-base:slim-layout", "-c", probe, check=True)
        assert proc.stdout.count("No such file") == 3, proc.stdout
    finally:
        _docker("rmi", "-f", base, "modelbake-runtime-base:slim-layout", check=False)
