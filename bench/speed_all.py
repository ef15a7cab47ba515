#!/usr/bin/env python3
"""Every speed figure, in one run on one machine: what the tables in bench/README.md come from.

Runs, one after another with the same thread count: bench/clip_speed.py for ViT-B/32, ViT-B/16 and a
real-size RN50 (random weights from a local checkpoint: fp32 against every int8 variant, static QDQ
included), bench/reranker_speed.py (MiniLM-L6, 32 pairs of mixed lengths) and bench/regressor_speed.py;
then prints their tables one after the other with this machine's CPU, ISA flags and onnxruntime version,
and last the speed goals, each met or not by this run's own figures: ViT-B/32 image and text at batch 1 at
least 3x PyTorch with cosine >= 0.99, the reranker at least 2x with the ranking gate passing, the regressor
at least 2x at batch 1, and no int8 the build would ship slower than fp32 at batch 1 in this run's timing.

    python bench/speed_all.py [--threads 2] [--rounds 5] [--skip ViT-B-16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    with tempfile.TemporaryDirectory(prefix="speed-all-") as tmp:
        out = Path(tmp)
        where = machine()
        print(f"# {where['cpu']} ({where['arch']}, {where['cores']} cores), ISA {' '.join(where['isa']) or 'unknown'}")
        print(f"# onnxruntime {where['onnxruntime']}, {args.threads} threads, {args.rounds} rounds")
        for name, cmd in parts.items():
            if name in args.skip:
                continue
            start = time.perf_counter()
            cmd = [*cmd, "--json", str(out / f"{name}.json")]
            proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], capture_output=True, text=True)
            print(f"\n## {name} ({time.perf_counter() - start:.0f} s)")
            print(proc.stdout.rstrip())
            if proc.returncode != 0:
                print(proc.stderr[-3000:].rstrip())
                raise SystemExit(f"{cmd[0]} failed ({proc.returncode})")
        figures = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
        print("\n## Goals")
        for line in goals(figures):
            print(line)


def goals(figures: dict[str, Any]) -> list[str]:
    """One line per speed goal, met or not, from the parts' --json figures (parts left out: no line)."""
    lines = []

    def verdict(text: str, met: bool) -> None:
        lines.append(f"{text}: {'met' if met else 'NOT MET'}")

    def ships_int8(part: dict[str, Any], tower: str) -> bool:
        return any(b["role"] == f"{tower}_encoder" and b["ships"] for b in part["build"])

    if "ViT-B-32" in figures:
        part = figures["ViT-B-32"]
        for tower in ("image", "text"):
            rows = [r for r in part["rows"] if r["tower"] == tower and r["batch"] == 1]
            shipped = [
                r
                for r in rows
                if r["min_cos"] >= 0.99
                and (r["variant"] == "fp32" or (r["variant"].startswith("int8 built") and ships_int8(part, tower)))
            ]
            best = max(shipped, key=lambda r: r["vs_pytorch"])
            text = f"ViT-B/32 {tower}, batch 1, >= 3x PyTorch with cosine >= 0.99: {best['variant']} "
            verdict(text + f"{best['vs_pytorch']:.2f}x (cosine {best['min_cos']:.5f})", best["vs_pytorch"] >= 3)
    if "reranker" in figures:
        part = figures["reranker"]
        names = {"fp32"} | ({"int8"} if part["int8_gate_passed"] else set())
        best = max((r for r in part["rows"] if r["variant"] in names), key=lambda r: r["vs_pytorch"])
        gate = "int8 passed the ranking gate" if part["int8_gate_passed"] else "int8 refused by the ranking gate"
        text = f"reranker >= 2x CrossEncoder.predict with the ranking gate passing ({gate}): {best['variant']} "
        verdict(text + f"{best['vs_pytorch']:.2f}x, tau {best['tau']:.3f}", best["vs_pytorch"] >= 2)
    if "regressor" in figures:
        (row,) = [r for r in figures["regressor"]["rows"] if r["batch"] == 1]
        verdict(f"regressor >= 2x PyTorch at batch 1: {row['vs_pytorch']:.2f}x", row["vs_pytorch"] >= 2)
    for arch in ("ViT-B-32", "ViT-B-16", "RN50"):
        if arch not in figures:
            continue
        part = figures[arch]
        for tower in ("image", "text"):
            if not ships_int8(part, tower):
                continue
            rows = {r["variant"]: r for r in part["rows"] if r["tower"] == tower and r["batch"] == 1}
            (built,) = [r for name, r in rows.items() if name.startswith("int8 built")]
            ratio = rows["fp32"]["ms"] / built["ms"]
            verdict(f"{arch} {tower}: the int8 the build ships, against fp32 at batch 1 here: {ratio:.2f}x", ratio >= 1)
    return lines


if __name__ == "__main__":
    main()
