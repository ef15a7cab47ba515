"""Training data of the boundary regressor: the seed's JSON format (or JSON Lines), validated.

Validation stops at the first bad record and names it by index and field, so a user can fix the file;
nothing is trained or written from a file that does not validate. Schema:
``modelbake/schema/regressor_data.schema.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.producers.common import ProducerError

DELTA_FIELDS = ("start_delta", "end_delta")


class DataError(ProducerError):
    """The training data is unusable; the message names the record, the field and the fix."""


@dataclass
class Dataset:
    features: np.ndarray  # (n, feature_dim) float32
    deltas: np.ndarray  # (n, 2) float32: start_delta, end_delta


@lru_cache(maxsize=1)
def record_schema() -> dict[str, Any]:
    return json.loads(resources.files("modelbake.schema").joinpath("regressor_data.schema.json").read_text())


def _records(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSON or JSON Lines file of training records")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs at least one record (see sample_training_data.json)")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    else:  # JSON Lines: one record per non-empty line
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not a JSON record: {exc.msg}") from exc
    if not records:
        raise DataError(f"{path}: no records; it needs at least one (see sample_training_data.json)")
    return records


def _check(index: int, record: Any, feature_dim: int | None) -> int:
    import jsonschema

    where = f"record {index}"
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with features, start_delta, end_delta; got {type(record).__name__}"
        )
    for key in ("features", *DELTA_FIELDS):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(record_schema()).iter_errors(record))
    if error is not None:
        field = ".".join(str(p) for p in error.absolute_path) or "(record)"
        raise DataError(f"{where}: field {field}: {error.message}")
    for key in DELTA_FIELDS:
        if not math.isfinite(record[key]):
            raise DataError(f"{where}: field {key} is {record[key]}; deltas must be finite numbers of seconds")
    features = record["features"]
    bad = next((i for i, v in enumerate(features) if not math.isfinite(v)), None)
    if bad is not None:
        raise DataError(f"{where}: field features.{bad} is {features[bad]}; features must be finite numbers")
    if feature_dim is not None and len(features) != feature_dim:
        raise DataError(
            f"{where}: field features has {len(features)} values, expected {feature_dim} "
            "(the CLIP model's embedding size); extract features with the same model for every record"
        )
    return len(features)


def load_dataset(path: Path, feature_dim: int | None = None) -> Dataset:
    """Validated arrays from ``path``; ``feature_dim`` None takes it from the first record."""
    records = _records(path)
    for index, record in enumerate(records):
        dim = _check(index, record, feature_dim)
        feature_dim = feature_dim or dim
    return Dataset(
        features=np.asarray([r["features"] for r in records], dtype=np.float32),
        deltas=np.asarray([[r[k] for k in DELTA_FIELDS] for r in records], dtype=np.float32),
    )
