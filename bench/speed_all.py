#!/usr/bin/env python3
"""Every speed figure, in one run on one machine: what the tables in bench/README.md come from.

Runs, one after another with the same thread count: bench/clip_speed.py for ViT-B/32, ViT-B/16 and a
real-size RN50 (random weights from a local checkpoint: fp32 against every int8 variant, static QDQ
included), bench/reranker_speed.py (MiniLM-L6, 32 pairs of mixed lengths) and bench/regressor_speed.py;
then prints their tables one after the other with this machine's CPU, ISA flags and engine versions, and
last the speed goals, each met or not by this run's own figures: ViT-B/32 image and text at batch 1 at least
3x PyTorch with cosine >= 0.99 (image: 4x, the goal on AMX CPUs), the reranker at least 2x with the ranking
gate passing, the regressor at least 2x at batch 1, no int8 the build would ship slower than fp32 at batch 1
in this run's timing, and nothing ``auto`` picks slower than onnxruntime fp32 in this run's timing. The
engine columns (OpenVINO f32 and bf16) appear where OpenVINO is installed. One line puts ViT-B/32's image
tower at batch 1 against this machine's compute bound (cores x clock x multiply-adds per cycle of the best
unit for the precision it ran in: FMA, VNNI or AMX tiles).

    python bench/speed_all.py [--threads 2] [--rounds 5] [--skip ViT-B-16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from modelbake.runtime.sessions import openvino_facts
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
        openvino = openvino_facts()
        engines = f"onnxruntime {where['onnxruntime']}" + (
            f", OpenVINO {openvino['version']} (computes {' '.join(openvino['precisions'])})" if openvino else ""
        )
        print(f"# {engines}, {args.threads} threads, {args.rounds} rounds")
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
        if "ViT-B-32" in figures:
            print("\n## Against the compute bound")
            print(bound_line(figures["ViT-B-32"], where))


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
            shipped += [r for r in rows if r["variant"].startswith("openvino") and r["min_cos"] >= 0.99]
            best = max(shipped, key=lambda r: r["vs_pytorch"])
            for goal in (3, 4) if tower == "image" else (3,):
                text = f"ViT-B/32 {tower}, batch 1, >= {goal}x PyTorch with cosine >= 0.99: {best['variant']} "
                verdict(text + f"{best['vs_pytorch']:.2f}x (cosine {best['min_cos']:.5f})", best["vs_pytorch"] >= goal)
    if "reranker" in figures:
        part = figures["reranker"]
        names = {"fp32"} | ({"int8"} if part["int8_gate_passed"] else set())
        names |= {r["variant"] for r in part["rows"] if r["variant"].startswith("openvino") and r["gate"]}
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
    for part_name, picks in _auto_picks(figures):
        for role, (variant, ratio) in picks.items():
            where = "on the 32 pairs" if part_name == "reranker" else "at batch 1"
            text = f"{part_name} {role}: auto picks {variant}, {ratio:.2f}x onnxruntime fp32 {where} here"
            verdict(text, ratio >= 1)
    return lines


def _auto_picks(figures: dict[str, Any]) -> list[tuple[str, dict[str, tuple[str, float]]]]:
    """(part, {role: (what auto picked, its speed over onnxruntime fp32 in this run's timing)})."""
    found = []
    for arch in ("ViT-B-32", "ViT-B-16", "RN50"):
        if arch not in figures or "auto" not in figures[arch]:
            continue
        picks = {}
        for role, variant in figures[arch]["auto"].items():
            tower = role.removesuffix("_encoder")
            rows = {r["variant"]: r for r in figures[arch]["rows"] if r["tower"] == tower and r["batch"] == 1}
            name = _row_name(variant, rows)
            picks[role] = (variant, rows["fp32"]["ms"] / rows[name]["ms"])
        found.append((arch, picks))
    if "reranker" in figures and "auto" in figures["reranker"]:
        rows = {r["variant"]: r for r in figures["reranker"]["rows"]}
        variant = figures["reranker"]["auto"]
        found.append(("reranker", {"reranker": (variant, rows["fp32"]["ms"] / rows[variant]["ms"])}))
    return found


def _row_name(variant: str, rows: dict[str, Any]) -> str:
    """The bench row that times what ``auto`` picked: "openvino/bf16" -> "openvino bf16", "int8" -> the built one."""
    if variant.startswith("openvino/"):
        return next(n for n in rows if n.startswith(variant.replace("/", " ")))
    if variant == "int8":
        return next(n for n in rows if n.startswith("int8 built"))
    return variant


# Multiply-adds per cycle per core of the widest unit for each precision, assuming two full-width FMA ports
# (server cores; a double-pumped AVX-512 halves the fp32 figure): (flags any of which gives it, MACs, name).
_UNITS = {
    "bf16": [({"amx_bf16"}, 512, "AMX bf16 tiles"), ({"avx512_bf16"}, 64, "AVX-512 BF16")],
    "int8": [
        ({"amx_int8"}, 1024, "AMX int8 tiles"),
        ({"avx512_vnni"}, 128, "AVX-512 VNNI"),
        ({"avx_vnni"}, 64, "AVX-VNNI"),
        ({"avx2"}, 32, "AVX2 (no VNNI)"),
    ],
    "fp32": [({"avx512f"}, 32, "AVX-512 FMA"), ({"fma", "avx2"}, 16, "AVX2 FMA"), ({"asimd"}, 8, "NEON FMA")],
}


def _cpu_flags_and_ghz() -> tuple[set[str], float]:
    """Every ISA flag of this CPU (not only those onnxruntime dispatches on) and its top clock in GHz."""
    flags, mhz = set(), 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = set(value.split())
            elif key.strip() == "cpu MHz" and not mhz:
                mhz = float(value)
    with contextlib.suppress(OSError, ValueError):  # a VM often has no cpufreq: the clock /proc/cpuinfo reports
        mhz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    return flags, mhz / 1000


def bound_line(part: dict[str, Any], where: dict[str, Any]) -> str:
    """ViT-B/32's image tower at batch 1: the fastest variant here against the machine's compute bound."""
    rows = [r for r in part["rows"] if r["tower"] == "image" and r["batch"] == 1 and r["min_cos"] >= 0.99]
    best = min(rows, key=lambda r: r["ms"])
    name = best["variant"]
    running = name.removesuffix(")").rpartition("runs ")[2] if "runs " in name else name  # "openvino bf16 (runs f32)"
    precision = "bf16" if "bf16" in running else "int8" if "int8" in running else "fp32"
    flags, ghz = _cpu_flags_and_ghz()
    macs_per_cycle, unit = next(((m, n) for need, m, n in _UNITS[precision] if need & flags), (1, "scalar"))
    bound_ms = part["image_macs_batch1"] / (where["cores"] * ghz * 1e9 * macs_per_cycle) * 1e3
    return (
        f"ViT-B/32 image, batch 1: {best['variant']} {best['ms']:.1f} ms for {part['image_macs_batch1'] / 1e9:.2f} "
        f"GMAC; the {precision} bound here is {bound_ms:.2f} ms ({where['cores']} cores x {ghz:.2f} GHz x "
        f"{macs_per_cycle} MAC/cycle, {unit}): {best['ms'] / bound_ms:.1f}x the bound"
    )


if __name__ == "__main__":
    main()
