#!/usr/bin/env python3
"""One real export of an OpenCLIP model whose tower is over protobuf's 2 GiB: wall time, peak memory, files.

Saves a random-init checkpoint of ``--arch`` (default ViT-H-14: a 2.5 GB image tower) unless ``--checkpoint``
names one, then runs `modelbake download --clip-only` on it as a user would, in a fresh process, and prints:
the predicted and the measured peak memory (the manifest's ``build`` block), the wall time, each ONNX file
(external data or not), then the load + verify of the tree and one embedding per tower. With ``--int8`` the
int8 variants are made from the external-data graph too (and timed beside fp32, as every build does).

    python bench/large_export.py [--arch ViT-H-14] [--checkpoint PATH] [--int8] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-H-14")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint of --arch (default: random weights, saved)")
    parser.add_argument("--int8", action="store_true", help="also make, gate and time the int8 variants")
    parser.add_argument("--work", type=Path, help="where the checkpoint and the tree go (default: a temp folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from modelbake.producers.common import available_memory, predicted_memory
    from modelbake.producers.openclip_source import tower_bytes
    from modelbake.spec import parse_clip

    work = args.work or Path(tempfile.mkdtemp(prefix="large-export-"))
    try:
        checkpoint = args.checkpoint or work / f"{args.arch}.safetensors"
        if not checkpoint.is_file():
            import open_clip
            import torch
            from safetensors.torch import save_file

            torch.manual_seed(0)
            model = open_clip.create_model(args.arch, pretrained=None)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
            del model
        spec = f"{args.arch}@file:{checkpoint}"
        towers = tower_bytes(parse_clip(spec)) or [0]
        predicted = predicted_memory(towers, args.int8)
        print(
            f"{args.arch}: {sum(towers) / 4e6:.0f} M parameters, {sum(towers) / 1e9:.2f} GB in fp32 (towers: "
            f"{', '.join(f'{t / 1e9:.2f}' for t in towers)} GB)"
        )
        print(f"memory: predicted peak {predicted / 1e9:.1f} GB, available {(available_memory() or 0) / 1e9:.1f} GB")
        out = work / "models"
        cmd = [sys.executable, "-m", "modelbake.cli", "download", "--clip-only", "--clip", spec, "--out", str(out)]
        cmd += ["--clip-int8"] if args.int8 else []
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"export failed after {wall:.0f} s:\n{proc.stderr[-3000:]}")
        model = json.loads((out / "model_manifest.json").read_text())["models"][0]
        build = model["build"]
        print(f"export: {wall:.0f} s wall, peak {build['peak_rss_bytes'] / 1e9:.1f} GB (measured, this model)")
        for f in model["files"]:
            if f["format"] in ("onnx", "onnx-data"):
                extra = f" + {Path(f['external_data']).name}" if "external_data" in f else ""
                parity = f.get("parity", {})
                gate = f"  cos {parity['min_cosine']:.6f}" if "min_cosine" in parity else ""
                print(f"  {f['path']:<52} {f['bytes'] / 1e9:6.3f} GB{extra}{gate}")
        from modelbake.runtime.models import open_models
        from modelbake.runtime.verify import verify

        start = time.perf_counter()
        encoder = open_models(out, variant="fp32").default_clip
        opened = time.perf_counter() - start
        text = encoder.encode_text(["a photo of a dog"])
        image = encoder.encode_image([__import__("numpy").zeros((224, 224, 3), "uint8")])
        print(f"run time: opened (files hashed) in {opened:.0f} s, text {text.shape}, image {image.shape}")
        start = time.perf_counter()
        checks = verify(out)
        failed = [c for c in checks if not c.ok]
        print(f"verify: {len(checks)} checks, {len(failed)} failed, {time.perf_counter() - start:.0f} s")
        if failed:
            raise SystemExit(str(failed))
    finally:  # nothing left behind: a real-size run writes gigabytes here
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
