"""One generic export-and-validate loop for every ONNX file modelbake ships.

Each architecture describes itself declaratively with an :class:`OnnxExport` (module, example and probe
inputs, names, dynamic axes, tolerance); :func:`export_and_validate` exports it, checks the graph,
simplifies it with onnxsim, compares onnxruntime with PyTorch on the probe inputs (the parity gate), and
writes the golden file the runtime verifies itself against.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from modelbake.manifest import file_entry
from modelbake.producers.common import ProducerError, log

DEFAULT_OPSET = 17
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ParityError(ProducerError):
    """onnxruntime and PyTorch disagree beyond the tolerance; nothing is written."""


@dataclass
class OnnxExport:
    """Declarative description of one ONNX file.

    ``example`` drives the export and must have batch >= 2 (an exporter given batch 1 may fix the
    batch dimension); ``probe`` must use another batch size, so a graph that silently fixed the batch
    fails parity instead of shipping.
    """

    role: str
    module: torch.nn.Module
    example: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    atol: float
    min_cosine: float = 0.999
    details: dict[str, Any] = field(default_factory=dict)
    # Raw inputs (texts, images) stored with the golden file, so the runtime can replay its own
    # tokenizer / preprocessing too: written as ``raw:<name>``.
    raw_golden: dict[str, np.ndarray] = field(default_factory=dict)


def _tensor_info(values: list[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    infos = []
    for value in values:
        ttype = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in ttype.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        infos.append({"name": value.name, "shape": shape, "dtype": dtype})
    return infos


def _assert_dynamic_batch(model: onnx.ModelProto, role: str) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_param:
            raise ProducerError(
                f"{role}: {value.name} has a fixed batch dimension {dims[0].dim_value} in the exported graph; "
                "the exporter ignored dynamic_axes, export with an example batch of 2 or more"
            )


def _simplify(model: onnx.ModelProto, role: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    nodes_before = len(model.graph.node)
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    except Exception as exc:  # onnxsim fails on some graphs; the unsimplified graph is still correct
        warnings.warn(f"{role}: onnxsim failed ({exc}); shipping the unsimplified graph", stacklevel=2)
        return model, {"simplified": False, "nodes": nodes_before, "simplify_error": str(exc)}
    return simplified, {"simplified": True, "nodes_before": nodes_before, "nodes": len(simplified.graph.node)}


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float64) if x.ndim > 1 else x.reshape(-1, 1).astype(np.float64)


def compare(reference: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, float]:
    """Max abs difference and the smallest per-row cosine similarity over all outputs."""
    max_abs, min_cos = 0.0, 1.0
    for ref, act in zip(reference, actual, strict=True):
        if ref.shape != act.shape:
            raise ParityError(f"output shape {act.shape} differs from PyTorch's {ref.shape}")
        max_abs = max(max_abs, float(np.max(np.abs(ref.astype(np.float64) - act))))
        r, a = _flat(ref), _flat(act)
        if r.shape[1] > 1:
            denom = np.linalg.norm(r, axis=1) * np.linalg.norm(a, axis=1)
            cos = np.sum(r * a, axis=1) / np.maximum(denom, 1e-12)
            min_cos = min(min_cos, float(np.min(cos)))
    return {"max_abs_diff": max_abs, "min_cosine": min_cos}


def session(path: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with fixed zip timestamps, so the same arrays always give the same sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def torch_outputs(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs.values())
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def export_and_validate(
    spec: OnnxExport, onnx_path: Path, golden_path: Path, root: Path, opset: int = DEFAULT_OPSET
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export ``spec`` to ``onnx_path`` and prove it; returns (manifest file entry, parity figures).

    Raises :class:`ParityError` (with the figures) when onnxruntime and PyTorch disagree.
    """
    module = spec.module.eval()
    input_names = list(spec.example)
    buf = io.BytesIO()
    # The legacy exporter: under torch.no_grad it fails on open_clip's image tower
    # (aten::_native_multi_head_attention), so export without no_grad.
    torch.onnx.export(
        module,
        tuple(spec.example.values()),
        buf,
        input_names=input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    _assert_dynamic_batch(model, spec.role)
    model, graph_info = _simplify(model, spec.role)
    _assert_dynamic_batch(model, spec.role)
    data = model.SerializeToString()

    reference = torch_outputs(module, spec.probe)
    figures = _gate(spec, data, reference, spec.atol, spec.min_cosine)
    log.info(
        "%s: parity max|d|=%.2e min cos=%.6f, %s", spec.role, figures["max_abs_diff"], figures["min_cosine"], graph_info
    )
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path.write_bytes(data)
    entry = _write_golden(spec, model, onnx_path, golden_path, root, reference, spec.atol, opset)
    return entry, {**figures, **graph_info, **spec.details}


def _gate(spec: OnnxExport, data: bytes, reference: list[np.ndarray], atol: float, min_cosine: float) -> dict[str, Any]:
    """The parity gate: onnxruntime on the probe inputs against PyTorch's outputs."""
    feeds = {name: t.detach().cpu().numpy() for name, t in spec.probe.items()}
    actual = session(data).run(spec.output_names, feeds)
    figures: dict[str, Any] = compare(reference, actual)
    figures["probe_batch"] = int(next(iter(spec.probe.values())).shape[0])
    if figures["max_abs_diff"] > atol or figures["min_cosine"] < min_cosine:
        raise ParityError(
            f"{spec.role}: onnxruntime differs from PyTorch: max abs diff {figures['max_abs_diff']:.3g} "
            f"(allowed {atol:g}), min cosine {figures['min_cosine']:.6f} (required {min_cosine}); "
            "nothing was written"
        )
    return figures


def _write_golden(
    spec: OnnxExport,
    model: onnx.ModelProto,
    onnx_path: Path,
    golden_path: Path,
    root: Path,
    reference: list[np.ndarray],
    atol: float,
    opset: int,
) -> dict[str, Any]:
    golden = {f"input:{k}": v.detach().cpu().numpy() for k, v in spec.probe.items()}
    golden.update({f"output:{n}": v for n, v in zip(spec.output_names, reference, strict=True)})
    golden.update({f"raw:{k}": v for k, v in spec.raw_golden.items()})
    write_npz(golden_path, golden)
    return file_entry(
        root,
        onnx_path,
        role=spec.role,
        fmt="onnx",
        opset=opset,
        inputs=_tensor_info(list(model.graph.input)),
        outputs=_tensor_info(list(model.graph.output)),
        golden=golden_path.relative_to(root).as_posix(),
        tolerance={"atol": atol},
    )


def quantize_and_validate(
    spec: OnnxExport,
    fp32_path: Path,
    int8_path: Path,
    golden_path: Path,
    root: Path,
    *,
    min_cosine: float = 0.99,
    per_channel: bool = True,
    opset: int = DEFAULT_OPSET,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dynamic-int8 variant of ``fp32_path`` (onnxruntime's quantize_dynamic), gated on cosine.

    Its golden tolerance is derived from its measured error, since int8 is not meant to match fp32 bit
    for bit; cosine against PyTorch is the gate.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = int8_path.with_name(f".{int8_path.name}.tmp")
    quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)
    data = tmp.read_bytes()
    tmp.unlink()
    reference = torch_outputs(spec.module.eval(), spec.probe)
    figures = _gate(spec, data, reference, float("inf"), min_cosine)
    figures.update({"weight_type": "int8", "per_channel": per_channel, "method": "quantize_dynamic"})
    log.info("%s int8: max|d|=%.2e min cos=%.6f", spec.role, figures["max_abs_diff"], figures["min_cosine"])
    int8_path.write_bytes(data)
    model = onnx.load_from_string(data)
    atol = float(f"{2 * figures['max_abs_diff'] + 1e-3:.3g}")
    entry = _write_golden(spec, model, int8_path, golden_path, root, reference, atol, opset)
    return entry, figures
