"""One generic export-and-validate loop for every ONNX file modelbake ships.

Each architecture describes itself declaratively with an :class:`OnnxExport` (module, example and probe
inputs, names, dynamic axes, tolerance); :func:`export_variants` exports it, checks the graph, simplifies
it with onnxsim, compares onnxruntime with PyTorch on the probe inputs (the parity gate), optionally makes
and gates a dynamic-int8 twin, and writes for each variant the golden file the runtime verifies itself
against. Every ONNX manifest entry carries its gate's figures as ``parity``.

Graphs go through files in a scratch folder, never through one in-memory protobuf: protobuf caps a
serialised model at 2 GiB, which large towers (ViT-H-14's image tower, about 2.5 GB) exceed. A graph whose
weights pass ``external_data_bytes`` ships as ``NAME.onnx`` plus ``NAME.onnx.data`` (ONNX external data,
relative location), both listed in the manifest.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from modelbake.errors import first_line
from modelbake.manifest import Role, Variant, file_entry
from modelbake.params import BY_NAME
from modelbake.producers import Values
from modelbake.producers.common import ProducerError, log
from modelbake.producers.speed import Candidate, Timing, decide, measure, record
from modelbake.runtime import sessions
from modelbake.runtime.gates import min_row_cosine
from modelbake.runtime.sessions import OPENVINO, session
from modelbake.spec import ONNX_DIR, external_data_name, golden_path, variant_name

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ParityError(ProducerError):
    """onnxruntime and PyTorch disagree on the probe inputs; nothing is written. One of the three below."""


class ShapeMismatch(ParityError):
    """An output of the exported graph has another shape than PyTorch's."""


class NonFiniteOutput(ParityError):
    """An output holds NaN or inf on the probe inputs (a max or min over it would hide that)."""


class ToleranceMiss(ParityError):
    """The outputs differ beyond the recorded tolerance (max abs difference, or cosine)."""


class Int8Refused(ProducerError):
    """INT8_REQUIRED=1 and no int8 variant passed its gate faster than fp32: the stage fails (no fallback)."""


@dataclass(frozen=True)
class ExportSettings:
    """How a stage exports every graph: one object, from the parameter table (where each default lives)."""

    opset: int  # ONNX_OPSET
    external_data_bytes: int  # ONNX_EXTERNAL_DATA_BYTES
    int8: bool  # the stage's own *_INT8
    int8_ship: str  # INT8_SHIP
    int8_required: bool  # INT8_REQUIRED

    @classmethod
    def from_values(cls, values: Values, int8: bool = False) -> ExportSettings:
        """A stage's settings; a parameter the stage does not read (the regressor has no int8) is the table's."""

        def get(name: str) -> Any:
            return values[name] if name in values else BY_NAME[name].typed_default

        return cls(
            opset=get("ONNX_OPSET"),
            external_data_bytes=get("ONNX_EXTERNAL_DATA_BYTES"),
            int8=int8,
            int8_ship=get("INT8_SHIP"),
            int8_required=get("INT8_REQUIRED"),
        )


@dataclass
class OnnxExport:
    """Declarative description of one ONNX file, with its own tolerances (as optimum keeps them on each
    architecture's config): fp32 must match PyTorch within ``atol`` and ``min_cosine``; an int8 twin must pass
    ``int8_gate`` (its ``min_cosine`` against PyTorch, when it has one, and ``extra_gate``), which the manifest
    records so a CPU that opens the tree checks it again.

    ``example`` drives the export and must have batch >= 2 (an exporter given batch 1 may fix the
    batch dimension); ``probe`` must use another batch size, so a graph that silently fixed the batch
    fails parity instead of shipping.
    """

    role: Role
    module: torch.nn.Module
    example: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    atol: float
    min_cosine: float
    int8_gate: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # Raw inputs (texts, images) stored with the golden file, so the runtime can replay its own
    # tokenizer / preprocessing too: written as ``raw:<name>``.
    raw_golden: dict[str, np.ndarray] = field(default_factory=dict)
    # Inputs to calibrate static int8 on (convolutional graphs only): the probe plus generated ones.
    calibration: dict[str, torch.Tensor] | None = None

    @property
    def int8_min_cosine(self) -> float:
        """The int8 twin's cosine bound against PyTorch (-1: none, its ``extra_gate`` judges it)."""
        return self.int8_gate.get("min_cosine", -1.0)


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


def _simplify(raw: Path, role: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """onnxsim on the exported file (it reads external data by path); the unsimplified graph when it fails."""
    nodes_before = len(onnx.load(raw, load_external_data=False).graph.node)
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(str(raw))
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    except Exception as exc:  # onnxsim fails on some graphs; the unsimplified graph is still correct
        why = first_line(exc)
        warnings.warn(f"{role}: onnxsim failed ({why}); shipping the unsimplified graph", stacklevel=2)
        return onnx.load(raw), {"simplified": False, "nodes": nodes_before, "simplify_error": why}
    return simplified, {"simplified": True, "nodes_before": nodes_before, "nodes": len(simplified.graph.node)}


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of a loaded graph's initializers: what decides a single file or external data."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path, external_data_bytes: int) -> None:
    """Write ``model`` as ``path``, or, when its weights pass ``external_data_bytes``, as ``path`` plus
    ``path.data`` (one file, location relative to the graph, so the pair moves as a folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes(model) <= external_data_bytes:
        onnx.save_model(model, path)
        return
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=external_data_name(path.name),
        size_threshold=1024,  # small tensors (shapes, scales) stay in the graph
        convert_attribute=True,
    )


def has_external_data(path: Path) -> bool:
    return (path.parent / external_data_name(path.name)).is_file()


def compare(reference: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, float]:
    """Max abs difference and the smallest per-row cosine similarity over all outputs."""
    max_abs, min_cos = 0.0, 1.0
    for ref, act in zip(reference, actual, strict=True):
        if ref.shape != act.shape:
            raise ShapeMismatch(f"output shape {act.shape} differs from PyTorch's {ref.shape}")
        if not (np.isfinite(ref).all() and np.isfinite(act).all()):
            # max/min below would skip NaN and report a perfect match
            raise NonFiniteOutput("an output holds NaN or inf on the probe inputs; nothing was written")
        max_abs = max(max_abs, float(np.max(np.abs(ref.astype(np.float64) - act))))
        min_cos = min(min_cos, min_row_cosine(ref, act))
    return {"max_abs_diff": max_abs, "min_cosine": min_cos}


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


# A stage's own gate, raising ProducerError to refuse: (a session of the graph, the variant's name: "fp32",
# "int8", "openvino/bf16") -> figures.
# Anything but fp32 is judged on the reduced-precision thresholds (the export's ``int8_gate``).
ExtraGate = Callable[[Any, str], dict[str, Any]]


def export_variants(
    export: OnnxExport,
    onnx_name: str,
    root: Path,
    settings: ExportSettings,
    *,
    extra_gate: ExtraGate | None = None,
    done: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Export ``export`` as ``root/onnx/<onnx_name>`` and, with ``settings.int8``, its int8 twin.

    Each variant passes the parity gate against PyTorch (and ``extra_gate``, e.g. a reranker's score
    contract) before anything is written. int8 candidates: dynamic, and static QDQ for convolutional graphs
    given calibration inputs; the gated ones are timed beside fp32 on this machine and the fastest ships,
    unless it is slower than fp32 on the role's workload (:mod:`.speed`) and ``int8_ship`` is ``faster``. int8 is
    optional (:func:`_int8_that_ship`); each int8 entry records as ``gate`` the export's ``int8_gate``, which
    a CPU that opens the tree checks it against again. Weights over ``external_data_bytes`` ship in
    ``<name>.onnx.data``. Returns the manifest entries: per shipped variant
    its ONNX file (with ``parity``, and ``speed`` when there was a choice), its external data file if any,
    and its golden file. A :class:`ParityError` names the figures when fp32 fails its gate."""
    reference = torch_outputs(export.module.eval(), export.probe)
    # Scratch inside ``root`` (a stage's staging folder): same filesystem, so shipping a graph is a rename.
    with tempfile.TemporaryDirectory(prefix=".onnx-work-", dir=root) as tmp:
        work = Path(tmp)
        graph, graph_info = _export(export, settings, work, onnx_name)
        gated = _gate_all(export, Variant.FP32, graph, reference, extra_gate, (export.atol, export.min_cosine))
        fp32 = Candidate(Variant.FP32, graph, gated | graph_info | _engine_gates(export, graph, reference, extra_gate))
        done(f"{export.role} exported, parity checked")
        shipped, dropped = [fp32], []
        if settings.int8:
            candidates, dropped = _int8_candidates(export, graph, reference, extra_gate, work, settings)
            ships, slower, timing = _int8_that_ship(export, fp32, candidates, settings, dropped)
            shipped, dropped = [fp32, *ships], dropped + slower
            done(f"{export.role} int8 checked and timed")
        files: list[dict[str, Any]] = []
        for candidate in shipped:
            path = root / ONNX_DIR / variant_name(onnx_name, candidate.variant)
            speed = _speed(candidate, fp32, dropped, timing) if settings.int8 else None
            files += _write(export, candidate, path, root, reference, settings.opset, speed)
    return files


def _speed(candidate: Candidate, fp32: Candidate, dropped: list[dict[str, Any]], timing: Timing) -> dict[str, Any]:
    """A shipped variant's ``speed`` record; fp32's lists the variants not shipped and why."""
    speed = record(candidate, fp32, timing, None)
    if candidate is fp32 and dropped:
        speed["not_shipped"] = dropped
    return speed


def _int8_that_ship(
    export: OnnxExport,
    fp32: Candidate,
    candidates: list[Candidate],
    settings: ExportSettings,
    refused: list[dict[str, Any]],
) -> tuple[list[Candidate], list[dict[str, Any]], Timing]:
    """The gated int8 ``candidates`` timed beside ``fp32`` on the role's workload: (those that ship, those
    slower than fp32, what they were timed on).

    int8 is optional: when its gate refused every candidate (``refused``), or the one left is slower, fp32
    ships alone and its entry's ``speed.not_shipped`` says why, each logged; ``int8_required`` makes that an
    :class:`Int8Refused` error instead. An int8's error depends on the CPU: its gate is checked again where
    the tree is opened."""
    timing = measure([fp32, *candidates], _numpy(export.probe), export.role)
    ships, slower = decide(fp32, candidates, settings.int8_ship == "gated", timing)
    for d in refused + slower:
        log.warning("%s %s (%s) not shipped: %s", export.role, d["variant"], d["method"], d["why"])
    if settings.int8_required and not ships:
        raise Int8Refused(
            f"{export.role}: INT8_REQUIRED=1 and no int8 variant ships: "
            + "; ".join(f"{d['method']}: {d['why']}" for d in refused + slower)
        )
    return ships, slower, timing


def _numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in inputs.items()}


def _gate_all(
    export: OnnxExport,
    variant: Variant,
    graph: Path,
    reference: list[np.ndarray],
    extra_gate: ExtraGate | None,
    bounds: tuple[float, float],
) -> dict[str, Any]:
    """Every gate of one variant: parity with PyTorch within ``bounds`` (atol, min cosine), then ``extra_gate``."""
    try:
        run = session(graph)
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime's own error types: the graph cannot be loaded here
        raise ProducerError(f"{export.role}: onnxruntime could not load {graph.name} ({first_line(exc)})") from exc
    figures = _gate(export, run, "onnxruntime", reference, *bounds)
    if extra_gate is not None:
        figures.update(extra_gate(run, str(variant)))
    log.info(
        "%s %s: parity max|d|=%.2e min cos=%.6f", export.role, variant, figures["max_abs_diff"], figures["min_cosine"]
    )
    return figures


def _engine_gates(
    export: OnnxExport, graph: Path, reference: list[np.ndarray], extra_gate: ExtraGate | None
) -> dict[str, Any]:
    """Where the build has OpenVINO: it runs the fp32 graph at the best precision it computes on this CPU,
    under the same gates as int8 (the export's ``int8_gate``: cosine for towers, the ranking for rerankers).
    The figures go in the fp32 entry's ``parity.engines``, passed or refused; never a reason to fail the
    build: where the tree is opened, each engine is checked again on that CPU (bf16 exists only on some)."""
    facts = sessions.openvino_facts()
    if facts is None or not export.int8_gate:
        return {}
    name = f"{OPENVINO}/{'bf16' if 'bf16' in facts['precisions'] else 'f32'}"
    model = onnx.load(graph, load_external_data=False)
    described = {"path": graph.name, "inputs": _tensor_info(list(model.graph.input))}
    described["outputs"] = _tensor_info(list(model.graph.output))
    try:
        run = sessions.openvino_session(graph, described, precision=name.rpartition("/")[2])
        figures = _gate(export, run, name, reference, float("inf"), export.int8_min_cosine)
        if extra_gate is not None:
            figures.update(extra_gate(run, name))
        result = {"passed": True, **figures}
    except MemoryError:
        raise
    except Exception as exc:  # a gate's refusal, or OpenVINO unable to read or compile the graph: recorded
        result = {"passed": False, "why": first_line(exc, with_type=not isinstance(exc, ProducerError))}
    log.info(
        "%s %s (OpenVINO %s): %s", export.role, name, facts["version"], "passed" if result["passed"] else "refused"
    )
    return {"engines": {name: result}}


def _int8_candidates(
    export: OnnxExport,
    fp32: Path,
    reference: list[np.ndarray],
    extra_gate: ExtraGate | None,
    work: Path,
    settings: ExportSettings,
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """(every int8 graph that passes its gates, a ``not_shipped`` record of each one refused and why)."""
    makers: list[tuple[str, Callable[[Path, Path], dict[str, Any]]]] = [("quantize_dynamic", _quantize)]
    if export.calibration is not None and _convolutional(fp32):
        makers.append(("quantize_static_qdq", lambda src, dst: _quantize_static(src, dst, export.calibration)))
    passed, refused = [], []
    for method, make in makers:
        # Named as it ships: an external-data location inside the graph names the final file.
        graph = work / method / variant_name(fp32.name, Variant.INT8)
        with tempfile.TemporaryDirectory(prefix="quantized-", dir=work) as tmp:
            quantized = Path(tmp) / "int8.onnx"
            info = make(fp32, quantized)
            # usually far smaller than fp32: a single file again, unless it is still over the threshold
            save_graph(onnx.load(quantized), graph, settings.external_data_bytes)
        try:
            # int8 is not meant to match fp32 bit for bit: cosine against PyTorch is its gate
            bounds = (float("inf"), export.int8_min_cosine)
            figures = _gate_all(export, Variant.INT8, graph, reference, extra_gate, bounds)
        except ProducerError as exc:  # ParityError, or an extra gate's own (the reranker's score contract)
            refused.append({"variant": str(Variant.INT8), "method": method, "why": f"refused by its gate: {exc}"})
            continue
        passed.append(Candidate(Variant.INT8, graph, figures | info))
    return passed, refused


def _export(export: OnnxExport, settings: ExportSettings, work: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """The legacy exporter to a file, checked, with a symbolic batch, simplified, saved as ``work/fp32/<name>``
    (and its external data): (the graph's path, graph facts)."""
    raw = work / "exported" / "graph.onnx"
    raw.parent.mkdir(parents=True)
    try:
        # Under torch.no_grad the legacy exporter fails on open_clip's image tower
        # (aten::_native_multi_head_attention), so export without no_grad. To a path: over 2 GiB the
        # exporter writes the weights as external data beside it.
        torch.onnx.export(
            export.module.eval(),
            tuple(export.example.values()),
            str(raw),
            input_names=list(export.example),
            output_names=export.output_names,
            dynamic_axes=export.dynamic_axes,
            opset_version=settings.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    except MemoryError:
        raise
    except Exception as exc:  # the exporter raises many types; one line names the graph and the cause
        raise ProducerError(f"{export.role}: torch.onnx.export failed ({first_line(exc)})") from exc
    log.debug("%s: exported by torch.onnx", export.role)
    try:
        onnx.checker.check_model(str(raw))  # by path: the checker's way for graphs over 2 GiB
    except onnx.checker.ValidationError as exc:
        raise ProducerError(f"{export.role}: the exported graph fails onnx's checker ({first_line(exc)})") from exc
    _assert_dynamic_batch(onnx.load(raw, load_external_data=False), export.role)
    log.debug("%s: checked", export.role)
    model, graph_info = _simplify(raw, export.role)
    log.debug("%s: simplified", export.role)
    _assert_dynamic_batch(model, export.role)
    shutil.rmtree(raw.parent)  # before the simplified copy is written: one copy on disk at a time
    graph = work / "fp32" / name
    save_graph(model, graph, settings.external_data_bytes)
    log.debug("%s: saved", export.role)
    return graph, graph_info


def _quantize(fp32: Path, out: Path) -> dict[str, Any]:
    """onnxruntime's dynamic int8 (per channel, 7-bit weights) of an fp32 graph, written to ``out``.

    reduce_range: on CPUs without VNNI (AVX2 only) onnxruntime's u8 x s8 kernels saturate 16-bit sums with
    8-bit weights; measured on tiny-vit's text tower, per-channel cosine fell to 0.975 (0.9989 with 7 bits).
    The saturation happens on the CPU that runs the graph, not the one that built it, so always 7 bits.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        use_external_data_format=has_external_data(fp32),
    )
    return {"method": "quantize_dynamic", "weight_type": "int8", "per_channel": True, "reduce_range": True}


def _quantize_static(fp32: Path, out: Path, calibration: dict[str, torch.Tensor]) -> dict[str, Any]:
    """onnxruntime's static int8 in QDQ form, activations calibrated (min-max) on ``calibration``, weights
    per channel with 7 bits (see :func:`_quantize`): the form onnxruntime recommends for CNNs, whose
    convolutions then run as fused int8 kernels instead of dynamic int8's float glue around each one."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    inputs = _numpy(calibration)
    rows = len(next(iter(inputs.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(rows))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.rows, None)
            return None if i is None else {k: v[i : i + 1] for k, v in inputs.items()}

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        use_external_data_format=has_external_data(fp32),
    )
    info = {"method": "quantize_static_qdq", "weight_type": "int8", "per_channel": True, "reduce_range": True}
    return info | {"calibration_inputs": rows}


def _convolutional(graph: Path) -> bool:
    """More than one Conv: a CNN (a ViT has exactly one, its patch embedding)."""
    nodes = onnx.load(graph, load_external_data=False).graph.node
    return sum(node.op_type == "Conv" for node in nodes) > 1


def _write(
    export: OnnxExport,
    candidate: Candidate,
    onnx_path: Path,
    root: Path,
    reference: list[np.ndarray],
    opset: int,
    speed: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Move one gated variant into the tree and write its golden file: its manifest entries, with the export's
    ``int8_gate`` as ``gate``, which an int8 file, or another engine running the fp32 one (OpenVINO in bf16),
    is checked against where the tree is opened."""
    figures = dict(candidate.figures)
    if candidate.graph.name != onnx_path.name:  # an external-data location names the graph's final file
        raise AssertionError(f"{candidate.graph.name} would ship as {onnx_path.name}")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    data_entries = []
    if has_external_data(candidate.graph):
        data_name = external_data_name(onnx_path.name)
        os.replace(candidate.graph.parent / data_name, onnx_path.parent / data_name)
        data_entries = [file_entry(root, onnx_path.parent / data_name, role=Role.ONNX_DATA, fmt="onnx-data")]
    os.replace(candidate.graph, onnx_path)
    model = onnx.load(onnx_path, load_external_data=False)
    # fp32 must replay within the build's tolerance; int8 within twice its measured error.
    fp32 = candidate.variant == Variant.FP32
    replay_atol = export.atol if fp32 else float(f"{2 * figures['max_abs_diff'] + 1e-3:.3g}")
    golden = root / golden_path(onnx_path.name)
    arrays = {f"input:{k}": v for k, v in _numpy(export.probe).items()}
    arrays |= {f"output:{n}": v for n, v in zip(export.output_names, reference, strict=True)}
    arrays |= {f"raw:{k}": v for k, v in export.raw_golden.items()}
    write_npz(golden, arrays)
    entry = file_entry(
        root,
        onnx_path,
        role=export.role,
        fmt="onnx",
        variant=str(candidate.variant),
        opset=opset,
        inputs=_tensor_info(list(model.graph.input)),
        outputs=_tensor_info(list(model.graph.output)),
        golden=golden.relative_to(root).as_posix(),
        tolerance={"atol": replay_atol},
        parity={**figures, **export.details},
        **({"external_data": data_entries[0]["path"]} if data_entries else {}),
        **({"speed": speed} if speed else {}),
        # int8's own thresholds where the tree is opened; on fp32, those another engine running it must meet.
        **({"gate": dict(export.int8_gate)} if export.int8_gate else {}),
    )
    return [entry, *data_entries, file_entry(root, golden, role=Role.GOLDEN, fmt="npz")]


def _gate(
    spec: OnnxExport, run: Any, engine: str, reference: list[np.ndarray], atol: float, min_cosine: float
) -> dict[str, Any]:
    """The parity gate: a session (``engine`` names it) on the probe inputs against PyTorch's outputs."""
    feeds = {name: t.detach().cpu().numpy() for name, t in spec.probe.items()}
    try:
        actual = run.run(spec.output_names, feeds)
    except MemoryError:
        raise
    except Exception as exc:  # the engine's own error types: the graph cannot be run here
        raise ProducerError(f"{spec.role}: {engine} could not run the graph ({first_line(exc)})") from exc
    figures: dict[str, Any] = compare(reference, actual)
    figures["probe_batch"] = int(next(iter(spec.probe.values())).shape[0])
    if figures["max_abs_diff"] > atol or figures["min_cosine"] < min_cosine:
        raise ToleranceMiss(
            f"{spec.role}: {engine} differs from PyTorch: max abs diff {figures['max_abs_diff']:.3g} "
            f"(allowed {atol:g}), min cosine {figures['min_cosine']:.6f} (required {min_cosine}); "
            "nothing was written"
        )
    return figures
