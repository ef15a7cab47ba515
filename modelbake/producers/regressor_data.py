"""Training data of the boundary regressor: the seed's JSON format (or JSON Lines), validated.

Validation stops at the first bad record and names it by index (and video_id) and field, in one line, so
a user can fix the file; nothing is trained or written from a file that does not validate. Beyond the
schema (``modelbake/schema/regressor_data.schema.json``) it refuses what json would let through: numbers a
32-bit float cannot hold (training's type; an integer of thousands of digits included), bytes that are
not UTF-8 and a key given twice in a record.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.producers.common import ProducerError

DELTA_FIELDS = ("start_delta", "end_delta")
F32_MAX = float(np.finfo(np.float32).max)  # training runs in float32: a larger value would become inf


class DataError(ProducerError):
    """The training data is unusable; the message names the record, the field and the fix."""


@dataclass
class Dataset:
    features: np.ndarray  # (n, feature_dim) float32
    deltas: np.ndarray  # (n, 2) float32: start_delta, end_delta
    video_ids: list[Any] = field(default_factory=list)  # each record's video_id, None when absent


@lru_cache(maxsize=1)
def record_schema() -> dict[str, Any]:
    return json.loads(resources.files("modelbake.schema").joinpath("regressor_data.schema.json").read_text())


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:24]}...{text[-8:]} ({len(text)} characters)"


def record_message(index: int, video_id: Any, problem: str) -> str:
    """How every message names a record: ``record 3: PROBLEM (video_id 'abc')``."""
    suffix = f" (video_id {_short(repr(video_id))})" if isinstance(video_id, str) else ""
    return f"record {index}: {problem}{suffix}"


def _name(key: str) -> str:
    return key if key.isidentifier() else _short(repr(key))


class _Huge(float):
    """A JSON number beyond float32's range (maybe beyond float64's), kept with its text for the message."""

    text = ""

    def __repr__(self) -> str:
        return _short(self.text, 40)

    __str__ = __repr__


def _number(text: str) -> Any:
    """json's parse_int and parse_float: no int of thousands of digits, no overflow; huge ones flagged."""
    value = float(text)  # a literal too large becomes inf here, never an exception
    if abs(value) > F32_MAX:
        huge = _Huge(value)
        huge.text = text
        return huge
    return int(text) if text.lstrip("-").isdigit() else value


class _Object(dict):
    """A JSON object that remembers the keys it was given more than once (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        keys = [key for key, _ in pairs]
        obj.duplicates = tuple(dict.fromkeys(key for key in keys if keys.count(key) > 1))
    return obj


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_number, parse_float=_number, object_pairs_hook=_object)


def _text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSON or JSON Lines file of training records")
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: the file is UTF-16; save it as UTF-8")
    # Bytes that are not UTF-8 survive as lone surrogates, so the record and field holding them are named.
    return raw.decode("utf-8-sig", errors="surrogateescape")


def _records(path: Path) -> list[Any]:
    text = _text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs at least one record (see sample_training_data.json)")
    if text.lstrip().startswith("["):
        try:
            records = _loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    else:  # JSON Lines: one record per non-empty line
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(_loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not a JSON record: {exc.msg}") from exc
    if not records:
        raise DataError(f"{path}: no records; it needs at least one (see sample_training_data.json)")
    return records


def _not_utf8(record: dict[str, Any]) -> str | None:
    """The first field whose name or text holds bytes that are not UTF-8, with the first such byte."""
    for key, value in record.items():
        for text in (key, value):
            bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None) if isinstance(text, str) else None
            if bad is not None:
                return f"field {_name(key)}: not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x}); save the file as UTF-8"
    return None


def _number_problem(name: str, value: Any, what: str) -> str | None:
    """Why a number cannot be trained on (NaN, inf, beyond float32), or None; non-numbers are the schema's."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value) and not isinstance(value, _Huge):
        return f"field {name} is {value}; {what}"
    if abs(value) > F32_MAX:
        return f"field {name} is {value}, too large for the 32-bit floats of training (|x| <= 3.4e38); {what}"
    return None


def _numbers_problem(record: dict[str, Any]) -> str | None:
    for key in DELTA_FIELDS:
        problem = _number_problem(key, record[key], "deltas must be finite numbers of seconds")
        if problem:
            return problem
    features = record["features"] if isinstance(record["features"], list) else []
    for i, value in enumerate(features):
        problem = _number_problem(f"features.{i}", value, "features must be finite numbers")
        if problem:
            return problem
    return None


def _problem(record: Any, feature_dim: int | None) -> str | None:
    """What is wrong with one record, naming the field; None when it is fine."""
    import jsonschema

    if not isinstance(record, dict):
        return f"expected an object with features, start_delta, end_delta; got {type(record).__name__}"
    duplicates = getattr(record, "duplicates", ())
    if duplicates:
        return f"field {_name(duplicates[0])} is given more than once; keep one"
    missing = next((key for key in ("features", *DELTA_FIELDS) if key not in record), None)
    problem = _not_utf8(record) or (f"missing key {missing!r}" if missing else _numbers_problem(record))
    if problem:
        return problem
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(record_schema()).iter_errors(record))
    if error is not None:
        field_name = ".".join(str(p) for p in error.absolute_path) or "(record)"
        return f"field {field_name}: {_short(error.message, 200)}"
    if feature_dim is not None and len(record["features"]) != feature_dim:
        return (
            f"field features has {len(record['features'])} values, expected {feature_dim} "
            "(the CLIP model's embedding size); extract features with the same model for every record"
        )
    return None


def load_dataset(path: Path, feature_dim: int | None = None) -> Dataset:
    """Validated arrays from ``path``; ``feature_dim`` None takes it from the first record."""
    records = _records(path)
    for index, record in enumerate(records):
        problem = _problem(record, feature_dim)
        if problem:
            video_id = record.get("video_id") if isinstance(record, dict) else None
            raise DataError(record_message(index, video_id, problem))
        feature_dim = feature_dim or len(record["features"])
    return Dataset(
        features=np.asarray([r["features"] for r in records], dtype=np.float32),
        deltas=np.asarray([[r[k] for k in DELTA_FIELDS] for r in records], dtype=np.float32),
        video_ids=[r.get("video_id") for r in records],
    )
