#!/usr/bin/env python3
"""What the open-time variant check adds to ``open_models``: a tree opened on a CPU the build did not measure.

The default set of bench/startup.py (a full-size ViT-B/32 with random weights, MiniLM-L6 as a one-label
cross-encoder, the seed regressor; fp32 and int8 side by side, built with ``--int8-ship gated``) is opened in
fresh interpreters three ways, rounds interleaved:

- ``table``: on this machine's own class, onnxruntime alone (the build's table decides, no check): the
  baseline;
- ``first``: as another CPU class (its signature faked in the child), with an empty variant cache, so every
  int8 role is checked on its golden probe and timed beside fp32;
- ``cached``: the same, with the cache the ``first`` run filled;
- where OpenVINO is installed (it is then one of the candidates checked above), ``ov-first`` and
  ``ov-cached``: every role asked to run on OpenVINO (``MODELBAKE_VARIANT=openvino/bf16``, f32 where the CPU
  has no bf16), with an empty cache (each graph compiled) and with OpenVINO's compiled models cached.

Medians of ``open_models``'s time, its difference to the baseline, and the time spent inside the check
itself (or its cache look-up) are printed side by side; the choices and their reasons of the last ``first``
run too.

    pip install -r bench/requirements.txt
    python bench/variant_check.py [--work DIR] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from startup import build_tree

CHILD = r"""
import json, sys, time
from modelbake.runtime import variant_check, variants
if sys.argv[2] != "table":  # another CPU class than the build machine's
    other = {**variants.machine(), "cpu": "another CPU class", "isa": ["another_class"]}
    variants.machine = lambda: other
spent = []  # seconds inside the check (or its cache look-up), per role
check = variant_check.check_here
def timed(*args, **kwargs):
    t = time.perf_counter()
    try:
        return check(*args, **kwargs)
    finally:
        spent.append(time.perf_counter() - t)
variant_check.check_here = timed
from modelbake.runtime.models import open_models
t = time.perf_counter()
models = open_models(sys.argv[1], threads=int(sys.argv[3]))
opened = time.perf_counter() - t
print(json.dumps({"open": opened, "check": sum(spent), "variants": models.variants(), "why": models.reasons()}))
"""


def open_once(tree: Path, mode: str, cache: Path, threads: int) -> dict:
    env = {**os.environ, "MODELBAKE_VARIANT_CACHE": str(cache)}
    env.pop("MODELBAKE_VARIANT", None)
    if mode.startswith("ov-"):
        env["MODELBAKE_VARIANT"] = "openvino/bf16"
    if mode == "table":  # the build's table decides only where no other engine is a candidate
        env["MODELBAKE_ENGINES"] = "onnxruntime"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), mode, str(threads)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-startup"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tree = build_tree(args.work)
    from modelbake.runtime.sessions import openvino_facts

    modes = ["table", "first", "cached", *(["ov-first", "ov-cached"] if openvino_facts() else [])]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    checks: dict[str, list[float]] = {mode: [] for mode in modes}
    last = {}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            cache = Path(scratch) / f"round-{r}"
            for mode in modes if r % 2 == 0 else [*modes[1:], modes[0]]:
                if mode == "ov-first":
                    cache = Path(scratch) / f"round-{r}-openvino"  # nothing compiled yet
                result = open_once(tree, mode, cache, args.threads)
                times[mode].append(result["open"])
                checks[mode].append(result["check"])
                if mode == "first":
                    last = result
    from modelbake.runtime.variants import machine

    here = machine()
    print(f"# open_models, ViT-B/32 + MiniLM-L6 + regressor, {args.threads} threads, {args.rounds} rounds")
    print(f"# machine: {here['cpu']} ({here['arch']}; {' '.join(here['isa'])})")
    base = statistics.median(times["table"])
    print("mode     open_models  - the table's  in the check  (open_models's runs)")
    for mode, ts in times.items():
        median, inside = statistics.median(ts), statistics.median(checks[mode])
        print(f"{mode:<7} {median:9.2f} s  {median - base:+10.2f} s  {inside:10.3f} s  {[round(t, 2) for t in ts]}")
    print("(open_models also differs by the variant each role then opens: an int8 session is made faster;")
    print(" ov-*: every role on OpenVINO, compiling each graph, or reading it from OpenVINO's cache)")
    print("\n# the choices of the last uncached check")
    for kind, models in last["why"].items():
        for name, roles in models.items():
            for role, why in roles.items():
                print(f"{kind}:{name:<12} {role:<14} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
