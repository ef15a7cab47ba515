#!/usr/bin/env python3
"""What a second platform costs: the runtime image for linux/amd64 alone, then for linux/amd64 and linux/arm64.

Runs on the second engine of docker/setup-engine.sh (the containerd image store holds multi-platform images)
with arm64 under emulation, the tiny models the tests make, and the set-up's two-platform base index. In one
run, each build timed side by side:

1. the builder's cache emptied, ``runtime`` for linux/amd64 (cold, one platform);
2. ``runtime`` for linux/amd64,linux/arm64 on that cache: what the second platform adds (BuildKit's rawjson
   steps say which ran; the producing stages must not);
3. the cache emptied again, ``runtime`` for both platforms cold;

then each platform's image size and its verify run (``docker run --platform P --network none``). Times under
emulation are no evidence of arm64 speed (QEMU runs Python several times slower): they say what the build
costs on an amd64 machine, nothing more.

    eval "$(bash docker/setup-engine.sh | grep ^export)"
    python bench/platforms.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from modelbake.sources.tiny import MOUNTED_CLIP_SPECS, MOUNTED_RERANKER_SPEC
from modelbake.testing.buildkit import parse_rawjson, render

REPO = Path(__file__).resolve().parents[1]
BOTH = "linux/amd64,linux/arm64"
IMAGE, TAG = "modelbake-platforms-bench", "bench"


def _env() -> dict[str, str]:
    need = ("MODELBAKE_BUILDER2", "MODELBAKE_MULTI_BASE", "WHEELHOUSE", "BASE_IMAGE")
    if missing := [n for n in need if not os.environ.get(n)]:
        sys.exit(f"{', '.join(missing)} not set: eval the exports of docker/setup-engine.sh")
    if (arm64 := os.environ.get("MODELBAKE_ARM64")) != "ok":
        sys.exit(f"no arm64 emulation: {arm64 or 'MODELBAKE_ARM64 is not set'}")
    sources = REPO / ".cache" / "tiny-sources"
    if not (sources / "VERSION").is_file():
        subprocess.run([sys.executable, "-m", "modelbake.cli", "tiny", str(sources)], check=True)
    return os.environ | {
        "DOCKER_HOST": os.environ["MODELBAKE_BUILDER2"],
        "RUNTIME_BASE_IMAGE": os.environ["MODELBAKE_MULTI_BASE"],
        "MODEL_SOURCES": str(sources),
        "CLIP_MODELS": MOUNTED_CLIP_SPECS,
        "RERANKER_MODELS": MOUNTED_RERANKER_SPEC,
        "REGRESSOR_EPOCHS": "3",
        "SOURCE_DATE_EPOCH": "1700000000",
        "IMAGE": IMAGE,
        "TAG": TAG,
    }


def _bake(env: dict[str, str], platforms: str) -> tuple[float, list]:
    start = time.perf_counter()
    proc = subprocess.run(
        ["docker", "buildx", "bake", "--progress=rawjson", "runtime"],
        cwd=REPO,
        env=env | {"PLATFORMS": platforms},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"bake for {platforms} failed:\n{render(proc.stderr)[-4000:]}")
    return time.perf_counter() - start, parse_rawjson(proc.stderr)


def _prune(env: dict[str, str]) -> None:
    subprocess.run(["docker", "builder", "prune", "-af"], env=env, check=True, capture_output=True)


def _ran_stages(steps: list) -> str:
    stages: dict[str, float] = {}
    for step in steps:
        if step.stage and step.instruction == "RUN" and step.done and not step.cached:
            where = step.name.split()[0].lstrip("[")  # the platform BuildKit prefixes
            key = f"{step.stage} ({where})"
            stages[key] = stages.get(key, 0.0) + (step.seconds or 0.0)
    return ", ".join(f"{k} {v:.0f} s" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))


def _per_platform(env: dict[str, str]) -> None:
    for platform in BOTH.split(","):
        run = ["docker", "run", "--rm", "--platform", platform, "--network", "none", "--read-only", f"{IMAGE}:{TAG}"]
        start = time.perf_counter()
        proc = subprocess.run(run, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
        # The files of that platform's image (docker 26 cannot inspect one platform of an index).
        du = ["docker", "run", "--rm", "--platform", platform, "--network", "none", "--entrypoint", "du"]
        size = subprocess.run([*du, f"{IMAGE}:{TAG}", "-sxb", "/"], env=env, capture_output=True, text=True).stdout
        shown = f"{int(size.split()[0]) / 1e6:.0f} MB of files" if size.strip() else "size unknown"
        print(f"{platform:12}  image {shown:>18}  verify {seconds:5.1f} s: {last}")


def main() -> int:
    env = _env()
    _prune(env)
    one, _ = _bake(env, "linux/amd64")
    print(f"1. cold, linux/amd64:                    {one:6.0f} s")
    two_warm, steps2 = _bake(env, BOTH)
    print(f"2. + linux/arm64 on that cache:          {two_warm:6.0f} s  ({two_warm / one:.2f}x the cold build)")
    print(f"   steps that ran: {_ran_stages(steps2)}")
    _prune(env)
    two_cold, steps3 = _bake(env, BOTH)
    print(f"3. cold, linux/amd64 + linux/arm64:      {two_cold:6.0f} s  ({two_cold / one:.2f}x the one-platform build)")
    exports = [s for s in steps3 if s.instruction == "RUN" and s.stage in ("clip-export", "reranker-cache")]
    print(f"   export steps in the two-platform build: {len(exports)} (one per producing stage)")
    _per_platform(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
