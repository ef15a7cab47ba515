"""One runtime image for linux/amd64 and linux/arm64 from one export (#26), built on the second engine (the
containerd image store holds multi-platform images) with arm64 under emulation (docker/setup-engine.sh).

Timings under emulation say nothing of arm64 speed; these tests check what is made, never how fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_docker_e2e import _docker, _missing, bake_env  # noqa: F401 (bake_env: a fixture used below)

from modelbake.runtime.gates import min_row_cosine
from modelbake.testing.buildkit import parse_rawjson

pytestmark = pytest.mark.docker
PLATFORMS = "linux/amd64,linux/arm64"
TAG = "multi"
# One embedding per platform, from the image's own run-time code, in fp32 (int8's error is the CPU's own).
EMBED = (
    "import json, numpy as np; from modelbake.runtime.models import open_models; "
    "m = open_models('/models', variant='fp32'); "
    "print(json.dumps(np.asarray(m.clip['tiny-vit'].encode_text(['a dog on a beach'])).tolist()))"
)


@pytest.fixture(scope="module")
def multi_env(bake_env: dict[str, str]) -> dict[str, str]:  # noqa: F811 (the imported fixture)
    """The tests' tiny selection (int8 variants shipped) for both platforms, on the second engine."""
    if os.environ.get("MODELBAKE_ARM64") != "ok":
        _missing(f"no arm64 emulation: {os.environ.get('MODELBAKE_ARM64') or 'MODELBAKE_ARM64 is not set'}")
    builder, base = os.environ.get("MODELBAKE_BUILDER2", ""), os.environ.get("MODELBAKE_MULTI_BASE", "")
    if not builder or not base:
        _missing("MODELBAKE_BUILDER2 / MODELBAKE_MULTI_BASE are not set (docker/setup-engine.sh makes them)")
    return bake_env | {"DOCKER_HOST": builder, "RUNTIME_BASE_IMAGE": base, "IMAGE": "modelbake-multi", "TAG": TAG}


@pytest.fixture(scope="module")
def built(multi_env: dict[str, str]) -> list:
    """`PLATFORMS=linux/amd64,linux/arm64 docker buildx bake runtime`, BuildKit's steps read back."""
    proc = _docker("buildx", "bake", "--progress=rawjson", "runtime", env=multi_env | {"PLATFORMS": PLATFORMS})
    return parse_rawjson(proc.stderr)


def test_each_model_is_exported_once_and_each_platform_gets_its_runtime(built: list) -> None:
    """The producing stages and the merge run for one platform (pinned to the build platform, each step once);
    the run-time layers and the image's own verify run once per platform."""
    runs = [s for s in built if s.instruction == "RUN"]

    def platforms(stage: str) -> list[str]:
        return sorted(re.match(r"^\[(\S+) ", s.name)[1] for s in runs if s.stage == stage)

    for stage in ("clip-export", "reranker-cache", "regressor-seed"):
        assert platforms(stage) == ["linux/amd64"], (stage, [s.name for s in runs])
    assert set(platforms("manifest")) == {"linux/amd64"}
    assert platforms("runtime-base") == ["linux/amd64", "linux/arm64"]
    verify = [s.name for s in runs if s.stage == "runtime-verified" and "modelbake.runtime verify" in s.name]
    assert len(verify) == 2 and all(s.error is None for s in built)


def test_both_platforms_verify_offline_and_embed_alike(built: list, multi_env: dict[str, str]) -> None:
    image, embeddings = f"modelbake-multi:{TAG}", {}
    for platform in PLATFORMS.split(","):
        run = ("run", "--rm", "--platform", platform, "--network", "none", "--read-only")
        arch = _docker(*run, "--entrypoint", "uname", image, "-m", env=multi_env).stdout.strip()
        assert arch == {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}[platform]
        verify = _docker(*run, image, env=multi_env).stdout
        assert re.search(r"^verify: (\d+) of \1 checks ok$", verify, re.M), verify
        if platform == "linux/arm64":  # the build machine's speed table is not this CPU's: checked here instead
            auto = [line for line in verify.splitlines() if " runs " in line]
            assert "aarch64" in verify and auto, verify
            assert all(" here" in line and "build machine" not in line for line in auto), verify
        out = _docker(*run, "--entrypoint", "python", image, "-c", EMBED, env=multi_env).stdout
        embeddings[platform] = np.asarray(json.loads(out))
    amd64, arm64 = embeddings.values()
    assert np.abs(amd64 - arm64).max() <= 1e-3 and min_row_cosine(amd64, arm64) >= 0.999  # CLIP_PARITY_*


def test_the_driver_pushes_one_index_per_image_and_kubernetes_names_it(
    built: list, multi_env: dict[str, str], tmp_path: Path
) -> None:
    registry = os.environ.get("MODELBAKE_REGISTRY", "127.0.0.1:5055")
    repository = f"{registry}/modelbake-multi"
    args = ["bake", "runtime", "--platform", PLATFORMS, "--push", repository, "--no-inspect"]
    args += ["--kubernetes", str(tmp_path), "--service-image", f"{registry}/search:{TAG}"]
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", *args], capture_output=True, text=True, cwd=REPO, env=multi_env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    pushed = dict(re.findall(r"^pushed +(\w+) +(\S+)$", proc.stdout, re.M))
    for what in ("runtime", "models"):
        raw = _docker("buildx", "imagetools", "inspect", "--raw", pushed[what], env=multi_env).stdout
        index = json.loads(raw)
        images = [m for m in index["manifests"] if "vnd.docker.reference.type" not in m.get("annotations", {})]
        platforms = sorted(f"{m['platform']['os']}/{m['platform']['architecture']}" for m in images)
        assert platforms == PLATFORMS.split(","), (what, index)
    manifests = "".join(p.read_text() for p in sorted(tmp_path.glob("*.yaml")))
    assert pushed["runtime"] in manifests and pushed["models"] in manifests


def test_the_driver_refuses_two_platforms_on_a_store_that_cannot_hold_them(bake_env: dict[str, str]) -> None:  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.cli", "bake", "runtime", "--platform", PLATFORMS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=bake_env,  # the first engine: the classic image store
    )
    assert proc.returncode == 1 and "image store holds one platform per image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
