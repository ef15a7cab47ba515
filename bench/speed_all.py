#!/usr/bin/env python3
"""Every speed figure, in one run on one machine: what the tables in bench/README.md come from.

Runs, one after another with the same thread count: bench/clip_speed.py for ViT-B/32, ViT-B/16 and a
real-size RN50 (random weights from a local checkpoint: fp32 against every int8 variant, static QDQ
included), bench/reranker_speed.py (MiniLM-L6, 32 pairs of mixed lengths) and bench/regressor_speed.py;
then prints their tables one after the other with this machine's CPU, ISA flags and onnxruntime version.

    python bench/speed_all.py [--threads 2] [--rounds 5] [--skip ViT-B-16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from modelbake.runtime.variants import machine

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", action="append", default=[], help="a part to leave out (repeatable)")
    args = parser.parse_args()
    common = ["--threads", str(args.threads), "--rounds", str(args.rounds)]
    parts = {
        "ViT-B-32": ["clip_speed.py", "--arch", "ViT-B-32", *common],
        "ViT-B-16": ["clip_speed.py", "--arch", "ViT-B-16", *common],
        "RN50": ["clip_speed.py", "--arch", "RN50", *common],
        "reranker": ["reranker_speed.py", *common],
        "regressor": ["regressor_speed.py", *common],
    }
    where = machine()
    print(f"# {where['cpu']} ({where['arch']}, {where['cores']} cores), ISA {' '.join(where['isa']) or 'unknown'}")
    print(f"# onnxruntime {where['onnxruntime']}, {args.threads} threads, {args.rounds} rounds")
    for name, cmd in parts.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], capture_output=True, text=True)
        print(f"\n## {name} ({time.perf_counter() - start:.0f} s)")
        print(proc.stdout.rstrip())
        if proc.returncode != 0:
            print(proc.stderr[-3000:].rstrip())
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode})")


if __name__ == "__main__":
    main()
