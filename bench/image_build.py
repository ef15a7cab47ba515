#!/usr/bin/env python3
"""Image size, rebuild cost, reproducibility and parallel stages, against the naive single-stage image.

Needs a Docker engine with buildx, the base image and the wheelhouse (``bash docker/setup-engine.sh``
prints the variables; ``eval`` them), and runs with the tiny models the tests make, so it finishes in
minutes on 2 cores. It works on a copy of the build files in a temporary folder (it edits a README line
there), with SOURCE_DATE_EPOCH fixed. In one run:

1. cold build (``--no-cache``) of the default target ``runtime`` (the ``models`` tree exported as an image
   alongside, to read its layer digest); then rebuilds after changing only the reranker selection, only
   the CLIP selection, only a regressor setting, only a README line: stages that ran (from BuildKit's
   rawjson progress) and wall time as a fraction of the cold build;
2. a second cold build with the inputs of the first: every artifact's sha256, the manifest and the
   models layer's digest compared;
3. the naive image (bench/naive.Dockerfile: one stage with torch and the models), cold and after the same
   reranker change; sizes side by side, with the torch part (torch, nvidia, triton, torchvision) apart;
4. the cold build's stage times: the three producing stages' sum against the longest (critical path).

    eval "$(bash docker/setup-engine.sh | grep ^export)"
    python bench/image_build.py [--keep-images] [--plot FILE.svg]

Disk: two no-cache builds and the naive image leave about 25 GB in BuildKit's cache and the image
store while it runs (its images are removed at the end; `docker builder prune` reclaims the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

from modelbake.bake import stage_sizes
from modelbake.sources.tiny import MOUNTED_CLIP_SPECS, MOUNTED_RERANKER_SPEC
from modelbake.testing.buildkit import parse_rawjson, ran, render, stage_seconds

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    "base-image",
    "clip-export",
    "reranker-cache",
    "regressor-seed",
    "manifest",
    "runtime-base",
    "runtime-verified",
)
PRODUCERS = ("clip-export", "reranker-cache", "regressor-seed")
TAG = f"bench-{uuid.uuid4().hex[:6]}"


def bake(ctx: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        ["docker", "buildx", "bake", "--progress=rawjson", *args], cwd=ctx, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"bake {' '.join(args)} failed:\n{render(proc.stderr)[-4000:]}")
    return time.perf_counter() - start, proc.stderr


def build_naive(ctx: Path, env: dict[str, str], image: str, *extra: str) -> tuple[float, str]:
    args = [
        "docker",
        "buildx",
        "build",
        "--progress=plain",
        "-f",
        "bench/naive.Dockerfile",
        "-t",
        image,
        "--build-context",
        f"wheelhouse={env['WHEELHOUSE']}",
        "--build-context",
        f"model-sources={env['MODEL_SOURCES']}",
        *extra,
    ]
    keys = ("BASE_IMAGE", "CLIP_MODELS", "RERANKER_MODELS", "CLIP_INT8", "INT8_SHIP", "REGRESSOR_EPOCHS")
    for key in (*keys, "SOURCE_DATE_EPOCH"):
        args += ["--build-arg", f"{key}={env[key]}"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*args, "--build-arg", "PIP_OFFLINE=1", "."], cwd=ctx, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"naive build failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.stderr


def untimed(manifest: dict) -> dict:
    """The manifest without the build's timings (``speed`` of each file entry)."""
    return {
        **manifest,
        "models": [
            {**m, "files": [{k: v for k, v in f.items() if k != "speed"} for f in m["files"]]}
            for m in manifest["models"]
        ],
    }


def manifest_of(client: docker.DockerClient, image: str) -> dict:
    raw = client.containers.run(image, ["/models/model_manifest.json"], entrypoint="cat", remove=True)
    return json.loads(raw)


def du(client: docker.DockerClient, image: str, *paths: str) -> int:
    out = client.containers.run(
        image, ["-c", f"du -sbc {' '.join(paths)} 2>/dev/null | tail -1"], entrypoint="sh", user="0", remove=True
    )
    return int(out.split()[0])


def layer_size(client: docker.DockerClient, image: str, marker: str) -> int:
    return sum(h["Size"] for h in client.images.get(image).history() if marker in h["CreatedBy"])


def layer_differences(client: docker.DockerClient, a: str, b: str) -> list[str]:
    """What differs between two single-layer images' tar entries: name, size, mode, owner, mtime."""
    import io
    import tarfile

    def entries(image: str) -> dict[str, tuple]:
        saved = io.BytesIO(b"".join(client.images.get(image).save()))
        with tarfile.open(fileobj=saved) as outer:
            (layer,) = json.load(outer.extractfile("manifest.json"))[0]["Layers"]
            with tarfile.open(fileobj=outer.extractfile(layer)) as inner:
                return {m.name: (m.size, m.mode, m.uid, m.gid, m.mtime) for m in inner.getmembers()}

    ea, eb = entries(a), entries(b)
    return [
        f"{name}: {ea.get(name)} vs {eb.get(name)}"
        for name in sorted(set(ea) | set(eb))
        if ea.get(name) != eb.get(name)
    ]


def bars_svg(panels: list[tuple[str, str, list[tuple[str, float]]]]) -> str:
    """Horizontal bar charts, one panel each (title, unit, rows), as a self-contained SVG."""
    width, label_w, bar_w, row_h = 760, 250, 400, 22
    parts, y = [], 10
    for title, unit, rows in panels:
        parts.append(f'<text x="10" y="{y + 14}" font-weight="bold">{title}</text>')
        y += 24
        top = max(v for _, v in rows) or 1.0
        for label, value in rows:
            w = max(1.0, bar_w * value / top)
            parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{label}</text>')
            parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="#4878a8"/>')
            parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:,.1f} {unit}</text>')
            y += row_h
        y += 12
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif" '
        f'font-size="13">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-images", action="store_true")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "image_build.svg")
    args = parser.parse_args()
    for var in ("BASE_IMAGE", "WHEELHOUSE"):
        if not os.environ.get(var):
            sys.exit(f'{var} is not set: eval "$(bash docker/setup-engine.sh | grep ^export)" first')
    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix="modelbake-bench-"))
    ctx = work / "ctx"
    ctx.mkdir()
    for name in ("Dockerfile.models", "docker-bake.hcl", ".dockerignore", "README.md"):
        shutil.copy(REPO / name, ctx / name)
    for folder in ("modelbake", "build", "bench"):
        shutil.copytree(REPO / folder, ctx / folder, ignore=shutil.ignore_patterns("__pycache__"))
    from modelbake.sources.tiny import make_tiny_sources

    make_tiny_sources(work / "sources")
    env = {
        **os.environ,
        "MODEL_SOURCES": str(work / "sources"),
        "CLIP_MODELS": MOUNTED_CLIP_SPECS,
        "RERANKER_MODELS": MOUNTED_RERANKER_SPEC,
        "CLIP_INT8": "1",
        "INT8_SHIP": "gated",  # the same files in every build, whatever each build's timings said
        "REGRESSOR_EPOCHS": "3",
        "SOURCE_DATE_EPOCH": "1700000000",
        "IMAGE": "modelbake-bench",
        "TAG": TAG,
    }
    runtime = f"modelbake-bench:{TAG}"
    images = [runtime]
    try:

        def cold(label: str) -> tuple[float, str, str]:
            models = f"modelbake-bench-models:{TAG}-{label}"
            images.append(models)
            seconds, log = bake(
                ctx,
                env,
                "runtime",
                "models",
                "--set",
                "*.no-cache=true",
                "--set",
                f"models.output=type=docker,name={models},rewrite-timestamp=true",
            )
            return seconds, log, models

        print("cold build 1 ...", file=sys.stderr)
        cold_s, cold_log, models_a = cold("a")
        manifest_a = manifest_of(client, runtime)
        cold_steps = parse_rawjson(cold_log)

        changes = {
            "reranker selection": {"RERANKER_MODELS": f"gone-{TAG}@dir:/sources/none,{env['RERANKER_MODELS']}"},
            "CLIP selection": {
                "CLIP_MODELS": f"vit-{TAG}@dir:/sources/clip/tiny-vit,tiny-rn@dir:/sources/clip/tiny-rn"
            },
            "regressor setting": {"REGRESSOR_SEED": str(int(uuid.uuid4().int % 10_000) + 1)},
            "README line": {},
        }
        rebuilds = {}
        for label, change in changes.items():
            print(f"rebuild after a {label} change ...", file=sys.stderr)
            if label == "README line":
                with (ctx / "README.md").open("a") as f:
                    f.write(f"\n<!-- {TAG} -->\n")
            seconds, log = bake(ctx, {**env, **change}, "runtime")
            steps = parse_rawjson(log)
            rebuilds[label] = (seconds, [s for s in STAGES if ran(steps, s)])

        print("cold build 2 (same inputs as 1) ...", file=sys.stderr)
        _, _, models_b = cold("b")
        manifest_b = manifest_of(client, runtime)

        print("naive image: cold, then after the reranker change ...", file=sys.stderr)
        naive = f"modelbake-bench-naive:{TAG}"
        images.append(naive)
        naive_cold_s, _ = build_naive(ctx, env, naive, "--no-cache")
        naive_size = int(client.images.get(naive).attrs["Size"])
        naive_models = layer_size(client, naive, "modelbake.cli download")
        site = "/opt/venv/lib/python3.11/site-packages"
        naive_torch = du(
            client, naive, *(f"{site}/{p}" for p in ("torch", "nvidia", "triton", "torchvision", "torch-*.dist-info"))
        )
        naive_rerank_s, _ = build_naive(ctx, {**env, **changes["reranker selection"]}, f"{naive}-rr")
        images.append(f"{naive}-rr")

        sizes = stage_sizes(client, runtime, manifest_a, env["BASE_IMAGE"])
        ours = sizes["runtime image"]
        ours_models = sizes["models layer"]
        files = sum(f["bytes"] for m in manifest_a["models"] for f in m["files"])
        manifest_bytes = len(json.dumps(manifest_a, indent=2, sort_keys=True)) + 1

        mb = 1e6
        print("\n## Image size (tiny model set; MB)")
        print(f"{'image':<44}{'total':>10}{'without models':>16}{'torch part':>12}")
        print(f"{'ours: runtime':<44}{ours / mb:>10.1f}{(ours - ours_models) / mb:>16.1f}{0:>12.1f}")
        print(
            f"{'naive: single stage':<44}{naive_size / mb:>10.1f}{(naive_size - naive_models) / mb:>16.1f}"
            f"{naive_torch / mb:>12.1f}"
        )
        print(
            f"{'naive without its torch part':<44}{(naive_size - naive_torch) / mb:>10.1f}"
            f"{(naive_size - naive_models - naive_torch) / mb:>16.1f}"
        )
        ratio = (ours - ours_models) / (naive_size - naive_models)
        ratio_fair = (ours - ours_models) / (naive_size - naive_models - naive_torch)
        print(f"ours/naive without models: {ratio:.3f} (target <= 0.25); against naive without torch: {ratio_fair:.3f}")
        print(
            f"models layer {ours_models / mb:.2f} MB; the files it holds {files / mb:.2f} MB + manifest "
            f"{manifest_bytes / 1e3:.1f} kB (ratio {ours_models / (files + manifest_bytes):.4f}); naive's models "
            f"layer {naive_models / mb:.2f} MB"
        )

        print("\n## Rebuild cost (wall time; fraction of the cold build)")
        print(f"cold build of runtime: {cold_s:.1f} s; naive image cold: {naive_cold_s:.1f} s")
        print(f"{'change only':<22}{'s':>8}{'of cold':>9}  stages that ran")
        for label, (seconds, stages) in rebuilds.items():
            print(f"{label:<22}{seconds:>8.1f}{seconds / cold_s:>9.1%}  {', '.join(stages) or '(none)'}")
        print(
            f"{'naive: reranker':<22}{naive_rerank_s:>8.1f}{naive_rerank_s / naive_cold_s:>9.1%}  "
            f"the one download step: every model again"
        )

        print("\n## Reproducibility (two cold builds, same inputs, SOURCE_DATE_EPOCH set)")
        digests = [
            {f["path"]: f["sha256"] for m in doc["models"] for f in m["files"]} for doc in (manifest_a, manifest_b)
        ]
        differ = sorted(p for p in digests[0] if digests[0][p] != digests[1].get(p))
        print(
            f"artifacts: {len(digests[0]) - len(differ)}/{len(digests[0])} identical sha256"
            + (f"; differ: {', '.join(differ)}" if differ else "")
        )
        print(f"manifest identical: {manifest_a == manifest_b}")
        # CLIP_INT8=1: each build times its int8 candidates, so the speed blocks always differ; the int8
        # method shipped (static or dynamic) may too, near a tie.
        print(f"manifest identical apart from the measured speed blocks: {untimed(manifest_a) == untimed(manifest_b)}")
        layers = [client.images.get(m).attrs["RootFS"]["Layers"] for m in (models_a, models_b)]
        print(
            f"models layer digest identical: {layers[0] == layers[1]} ({layers[0][0][:19]}... / {layers[1][0][:19]}...)"
        )
        if layers[0] != layers[1]:
            for line in layer_differences(client, models_a, models_b)[:10]:
                print(f"  differs: {line}")

        print("\n## Parallel stages (cold build, seconds of each stage's RUN steps)")
        for stage in STAGES:
            print(f"{stage:<16}{stage_seconds(cold_steps, stage):>8.1f}")
        producing = [stage_seconds(cold_steps, s) for s in PRODUCERS]
        print(
            f"producing stages: sum {sum(producing):.1f} s, longest {max(producing):.1f} s (the critical path); "
            f"all steps {sum(s.seconds or 0 for s in cold_steps if not s.cached):.1f} s in a {cold_s:.1f} s build"
        )

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        args.plot.write_text(
            bars_svg(
                [
                    (
                        "Image size (tiny models)",
                        "MB",
                        [
                            ("ours: runtime", ours / mb),
                            ("ours: without models", (ours - ours_models) / mb),
                            ("naive: single stage", naive_size / mb),
                            ("naive: without models", (naive_size - naive_models) / mb),
                            ("naive: without models or torch", (naive_size - naive_models - naive_torch) / mb),
                        ],
                    ),
                    (
                        "Rebuild after one change (% of the cold build)",
                        "%",
                        [
                            *((f"ours: {label}", 100 * secs / cold_s) for label, (secs, _) in rebuilds.items()),
                            ("naive: reranker selection", 100 * naive_rerank_s / naive_cold_s),
                        ],
                    ),
                ]
            )
        )
        print(f"\nplot: {args.plot}")

    finally:  # a failed build leaves no multi-GB images behind
        if not args.keep_images:
            for image in images:
                subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
