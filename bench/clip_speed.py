#!/usr/bin/env python3
"""CLIP encoders: PyTorch eager vs onnxruntime and OpenVINO variants, measured side by side in one process.

For the image encoder (batch 1 and 16) and the text encoder (batch 1 and 32): equal thread counts,
each side as users run it (PyTorch: open_clip's encode_text on 77 positions; onnxruntime: the ids cut
after the batch's longest end-of-text token, as modelbake.runtime does when the manifest says so),
rounds interleaved (the order rotates each round), medians of per-call times. Prints, per variant, the
speed-up over PyTorch (PyTorch time / variant time) and its parity (min cosine, max abs difference).

Variants: fp32 as shipped (ORT_ENABLE_ALL), fp32 at ORT_ENABLE_BASIC, the int8 the build picked with
CLIP_INT8=1 (forced to ship, its method named), dynamic int8 per-channel, per-tensor, after onnxruntime's
quantisation pre-processing, and (image tower) static QDQ int8 calibrated as the build does; where OpenVINO
is installed, the fp32 file run by OpenVINO in f32 and in bf16 (bf16 only where the CPU computes it), and
what ``auto`` picks here (its own check, a fresh cache). Also prints what the build's own timing decided
(shipped or not, and why). The model is a full-size OpenCLIP
architecture with random weights (no hub needed); `--arch` picks it.

    python bench/clip_speed.py [--arch ViT-B-32] [--threads 2] [--rounds 7] [--json FILE]

``--json`` also writes the figures (and the build's decisions) to FILE, for bench/speed_all.py's goals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import open_clip
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from modelbake.manifest import merge_fragments, read_manifest
from modelbake.params import defaults, for_stage
from modelbake.producers.clip import run
from modelbake.producers.onnx_export import _quantize, _quantize_static
from modelbake.runtime import sessions as engines
from modelbake.runtime.clip import cut_after_eot
from modelbake.runtime.variant_check import QUIET_S
from modelbake.runtime.variants import AUTO, choose
from modelbake.spec import clip_onnx_name, parse_clip


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls, after a pause and one untimed call: the previous
    measurement's worker threads (PyTorch's, another session's) stop spinning before this one is timed."""
    time.sleep(QUIET_S)
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def variants(
    fp32: Path, work: Path, picked: str, calibration: dict[str, torch.Tensor] | None
) -> dict[str, tuple[Path, ort.GraphOptimizationLevel]]:
    all_opt, basic = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    out = {
        "fp32": (fp32, all_opt),
        "fp32 basic-opt": (fp32, basic),
        f"int8 built ({picked})": (fp32.with_name(f"{fp32.stem}_int8.onnx"), all_opt),
    }
    dynamic = work / f"{fp32.stem}_int8_dynamic.onnx"
    _quantize(fp32, dynamic)
    out["int8 dynamic"] = (dynamic, all_opt)
    if calibration is not None:
        static = work / f"{fp32.stem}_int8_static.onnx"
        _quantize_static(fp32, static, calibration)
        out["int8 static qdq"] = (static, all_opt)
    per_tensor = work / f"{fp32.stem}_int8_tensor.onnx"
    quantize_dynamic(str(fp32), str(per_tensor), weight_type=QuantType.QInt8, per_channel=False)
    out["int8 per-tensor"] = (per_tensor, all_opt)
    prepped, pre_int8 = work / f"{fp32.stem}_prep.onnx", work / f"{fp32.stem}_prep_int8.onnx"
    quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
    quantize_dynamic(str(prepped), str(pre_int8), weight_type=QuantType.QInt8, per_channel=True)
    out["int8 pre-processed"] = (pre_int8, all_opt)
    return out


def openvino_rows(fp32: Path, entry: dict[str, object], threads: int) -> dict[str, object]:
    """OpenVINO sessions of the fp32 file: f32, and bf16 where this CPU computes it (else named for what runs)."""
    facts = engines.openvino_facts()
    if facts is None:
        return {}
    # One session per precision OpenVINO grants here: asked for bf16 where the CPU has none, it runs f32 (and
    # two compiled models of one graph in one process were seen to slow each other: 1.25x at batch 1).
    precisions = ["f32", "bf16"] if "bf16" in facts["precisions"] else ["f32"]
    return {f"openvino {p}": engines.openvino_session(fp32, entry, threads, precision=p) for p in precisions}


def auto_picks(root: Path, threads: int) -> dict[str, str]:
    """What ``auto`` runs for each role of the exported model here: its own check and timing, a fresh cache."""
    (model,) = read_manifest(root)["models"]
    with tempfile.TemporaryDirectory(prefix="auto-cache-") as cache:
        os.environ["MODELBAKE_VARIANT_CACHE"] = cache
        picks = {}
        for role in ("image_encoder", "text_encoder"):
            choice = choose(model, role, AUTO, root=root, threads=threads)
            print(f"auto {role} runs {choice.why}")
            picks[role] = choice.variant
        return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures to this file too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as tmp:  # a real-size run writes gigabytes
        work = Path(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model(args.arch).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "ckpt.safetensors")
        spec = parse_clip(f"{args.arch}@file:{work / 'ckpt.safetensors'}")
        print(f"exporting {args.arch} (fp32 + int8) ...", flush=True)
        values = {"CLIP_MODELS": spec.text, "CLIP_INT8": True, "INT8_SHIP": "gated"}
        (record,) = run(work / "models", defaults(for_stage("clip-export"), **values))
        figures: dict[str, Any] = {"build": [], "rows": []}
        for entry in record["files"]:
            if "speed" in entry and entry["variant"] == "int8":
                speed, method = entry["speed"], entry["parity"]["method"]
                ratio = next(iter(speed["vs_fp32"].values()))  # on the role's workload, the check's own
                ships = ratio >= 1
                print(f"build timing: {entry['path']} ({method}): {ratio:.2f}x fp32 {speed['at']}: ", end="")
                print("ships" if ships else "would NOT ship unforced")
                figures["build"].append({"role": entry["role"], "method": method, "vs_fp32": ratio, "ships": ships})
            for dropped in entry.get("speed", {}).get("not_shipped", []):
                print(f"  build dropped {dropped['variant']} {dropped['method']}: {dropped['why']}")
        picked = {e["role"]: e["parity"].get("method", "") for e in record["files"] if e.get("variant") == "int8"}
        merge_fragments(work / "models")
        figures["auto"] = auto_picks(work / "models", args.threads)
        print(f"auto picks here: {figures['auto']}")
        text_cut = record["preprocessing"]["text_cut"] == "eot"
        tokenizer = open_clip.get_tokenizer(args.arch)
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        rng = np.random.default_rng(0)
        words = [
            "a",
            "person",
            "walks",
            "a",
            "small",
            "dog",
            "along",
            "the",
            "beach",
            "while",
            "the",
            "sun",
            "sets",
            "over",
            "the",
            "sea",
        ]

        cases = []
        for batch in (1, 16):
            pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
            cases.append(("image", batch, "pixel_values", pixels, model.encode_image))
        for batch in (1, 32):
            texts = [" ".join(rng.choice(words, rng.integers(3, 15))) for _ in range(batch)]
            cases.append(("text", batch, "input_ids", tokenizer(texts).numpy(), model.encode_text))

        print(
            f"text cut after end-of-text: {'yes' if text_cut else 'no'}; "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
            f"{args.rounds} interleaved rounds, medians"
        )
        header = f"{'encoder':<6} {'batch':>5} {'variant':<20} {'ms/call':>9} {'vs PyTorch':>11}"
        print(f"{header} {'min cos':>9} {'max|d|':>8}")
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.encode_image(torch.zeros(1, 3, size, size))
        figures["image_macs_batch1"] = counter.get_total_flops() / 2  # for speed_all's compute bound
        for tower, batch, input_name, x, torch_fn in cases:
            fp32 = work / "models" / "onnx" / clip_onnx_name(spec.key, tower)
            sessions = {}
            calibration = {"pixel_values": torch.from_numpy(rng.normal(size=(8, 3, size, size)).astype(np.float32))}
            role = "image_encoder" if tower == "image" else "text_encoder"
            found = variants(fp32, work, picked.get(role, "?"), calibration if tower == "image" else None)
            for name, (path, level) in found.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
                options.graph_optimization_level = level
                sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            (entry,) = [e for e in record["files"] if e.get("variant") == "fp32" and e["role"] == role]
            sessions |= openvino_rows(fp32, entry, args.threads)
            with torch.inference_mode():
                reference = torch_fn(torch.from_numpy(x)).numpy()
            calls: dict[str, Callable[[], object]] = {"pytorch": lambda f=torch_fn, x=x: f(torch.from_numpy(x))}
            feeds = {input_name: cut_after_eot(x) if tower == "text" and text_cut else x}
            for name, sess in sessions.items():
                calls[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
            n = max(1, int(0.5 / max(per_call(calls["pytorch"], 1), 1e-4)))  # about half a second per measurement
            times: dict[str, list[float]] = {k: [] for k in calls}
            names = list(calls)
            with torch.inference_mode():
                for r in range(args.rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        times[name].append(per_call(calls[name], n))
            base = statistics.median(times["pytorch"])
            print(f"{tower:<6} {batch:>5} {'pytorch eager':<20} {base * 1e3:>9.2f} {'1.00x':>11} {'':>9} {'':>8}")
            for name, sess in sessions.items():
                t = statistics.median(times[name])
                out = sess.run(None, feeds)[0]
                diff = float(np.max(np.abs(out - reference)))
                cos = cosine(out, reference)
                print(f"{'':<6} {'':>5} {name:<20} {t * 1e3:>9.2f} {base / t:>10.2f}x {cos:>9.5f} {diff:>8.1e}")
                row = {"tower": tower, "batch": batch, "variant": name, "ms": t * 1e3, "vs_pytorch": base / t}
                figures["rows"].append(row | {"min_cos": cos})
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
