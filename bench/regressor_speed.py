#!/usr/bin/env python3
"""Boundary regressor: PyTorch eager vs onnxruntime, per call, at batch 1 and 256.

One process, same thread count for both, rounds interleaved (the order alternates each round), medians
of per-call times; prints the ratio (PyTorch time / ONNX time) and the parity of each batch size.

    python bench/regressor_speed.py [--models models/] [--threads 1] [--rounds 30] [--calls 200] [--json FILE]

Without --models it makes seed weights in a temporary folder first (needs the build extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from modelbake.params import defaults, for_stage
from modelbake.producers.regressor import run as make_seed
from modelbake.producers.regressor import synthetic_set
from modelbake.producers.regressor_model import load_weights
from modelbake.runtime.regressor import BoundaryRegressorONNX
from modelbake.spec import ONNX_DIR, REGRESSOR_DIR, REGRESSOR_ONNX, REGRESSOR_SAFETENSORS


def per_call(fn, x, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a model tree holding the regressor (default: fresh seed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the figures to this file too")
    args = parser.parse_args()

    folder = args.models
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="regressor-bench-") as tmp:
            make_seed(Path(tmp), defaults(for_stage("regressor-seed"), REGRESSOR_FEATURE_DIM=512))
            model = load_weights(Path(tmp) / REGRESSOR_DIR / REGRESSOR_SAFETENSORS)
            onnx_model = BoundaryRegressorONNX.from_file(Path(tmp) / ONNX_DIR / REGRESSOR_ONNX, threads=args.threads)
    else:
        model = load_weights(folder / REGRESSOR_DIR / REGRESSOR_SAFETENSORS)
        onnx_model = BoundaryRegressorONNX.from_file(folder / ONNX_DIR / REGRESSOR_ONNX, threads=args.threads)
    torch.set_num_threads(args.threads)

    def torch_call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s), "
        f"{args.rounds} rounds x {args.calls} calls, feature_dim {onnx_model.feature_dim}"
    )
    print(f"{'batch':>6} {'pytorch us/call':>16} {'onnx us/call':>13} {'speed-up':>9} {'max|diff|':>10}")
    rows = []
    for batch in (1, 256):
        x, _ = synthetic_set(batch, onnx_model.feature_dim, seed=batch)
        diff = float(np.max(np.abs(torch_call(x) - onnx_model.predict(x))))
        for fn in (torch_call, onnx_model.predict):  # warm-up
            per_call(fn, x, 20)
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        for r in range(args.rounds):
            order = [("torch", torch_call), ("onnx", onnx_model.predict)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(per_call(fn, x, args.calls))
        t_torch, t_onnx = statistics.median(times["torch"]), statistics.median(times["onnx"])
        print(f"{batch:>6} {t_torch * 1e6:>16.1f} {t_onnx * 1e6:>13.1f} {t_torch / t_onnx:>8.2f}x {diff:>10.1e}")
        rows.append({"batch": batch, "vs_pytorch": t_torch / t_onnx, "max_abs_diff": diff})
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
