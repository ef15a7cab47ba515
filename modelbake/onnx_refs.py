"""The files an ONNX graph makes onnxruntime read besides itself: its external-data locations.

onnxruntime opens every location a graph's tensors name, so a verified graph can still load bytes no
manifest entry covers. This reads the locations from the graph's protobuf directly (the wire format: no
``onnx`` package at run time), memory-mapped, skipping tensor data by its length, so a 2 GB graph costs
a pass over its structure only. Tensors are looked for where ONNX allows them: initializers, sparse
initializers, and node attributes (subgraphs included). Stdlib only.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(buf: mmap.mmap | bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, i = _varint(buf, i)
            yield field, wire, value, i
        elif wire == _LEN:
            length, i = _varint(buf, i)
            yield field, wire, i, i + length
            i += length
        elif wire in (_I64, _I32):
            i += 8 if wire == _I64 else 4
        else:
            raise ValueError(f"not an ONNX protobuf (wire type {wire} at byte {i})")


def _tensor(buf: mmap.mmap | bytes, start: int, end: int) -> set[str]:
    """TensorProto: its location when its data is external (fields 13 external_data, 14 data_location)."""
    location, external = None, False
    for field, wire, a, b in _fields(buf, start, end):
        if field == 13 and wire == _LEN:
            entry = {f: bytes(buf[x:y]).decode() for f, w, x, y in _fields(buf, a, b) if w == _LEN}
            if entry.get(1) == "location":
                location = entry.get(2, "")
        elif field == 14 and wire == _VARINT:
            external = a == _EXTERNAL
    return {location} if external and location is not None else set()


def _sparse(buf: mmap.mmap | bytes, start: int, end: int) -> set[str]:
    """SparseTensorProto: values (1) and indices (2) are tensors."""
    found: set[str] = set()
    for field, wire, a, b in _fields(buf, start, end):
        if field in (1, 2) and wire == _LEN:
            found |= _tensor(buf, a, b)
    return found


def _attribute(buf: mmap.mmap | bytes, start: int, end: int) -> set[str]:
    """AttributeProto: t (5), g (6), tensors (10), graphs (11), sparse_tensor (22), sparse_tensors (23)."""
    found: set[str] = set()
    for field, wire, a, b in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if field in (5, 10):
            found |= _tensor(buf, a, b)
        elif field in (6, 11):
            found |= _graph(buf, a, b)
        elif field in (22, 23):
            found |= _sparse(buf, a, b)
    return found


def _graph(buf: mmap.mmap | bytes, start: int, end: int) -> set[str]:
    """GraphProto: nodes (1, their attributes 5), initializers (5), sparse initializers (15)."""
    found: set[str] = set()
    for field, wire, a, b in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if field == 5:
            found |= _tensor(buf, a, b)
        elif field == 15:
            found |= _sparse(buf, a, b)
        elif field == 1:
            for f, w, x, y in _fields(buf, a, b):
                if f == 5 and w == _LEN:
                    found |= _attribute(buf, x, y)
    return found


def external_locations(graph: Path | bytes) -> set[str]:
    """Every external-data location an ONNX graph (a file, or its bytes) names, as written (relative to its
    folder)."""
    if isinstance(graph, bytes):
        return _locations(graph)
    with open(graph, "rb") as fh:
        if not fh.seek(0, 2):
            return set()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _locations(buf)


def _locations(buf: mmap.mmap | bytes) -> set[str]:
    found: set[str] = set()
    for field, wire, a, b in _fields(buf, 0, len(buf)):
        if field == 7 and wire == _LEN:  # ModelProto.graph
            found |= _graph(buf, a, b)
    return found
