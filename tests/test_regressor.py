"""Boundary regressor: data validation, deterministic seeds, training that learns, weight look-up."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from modelbake.manifest import ManifestError
from modelbake.producers.regressor import mae, synthetic_set
from modelbake.producers.regressor_model import load_weights
from modelbake.runtime.regressor import LOOKUP_ENV, BoundaryRegressorONNX, WeightsNotFound, find_weights
from modelbake.spec import REGRESSOR_LOOKUP

DIM = 8


def _record(**override: object) -> dict:
    record = {"video_id": "v", "query": "q", "features": [0.1] * DIM, "start_delta": -0.5, "end_delta": 1.2}
    record.update(override)
    return record


def _write(path: Path, records: list) -> Path:
    # allow_nan: the JSON token NaN/Infinity must reach validation, as from a careless exporter.
    path.write_text(json.dumps(records, allow_nan=True))
    return path


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([_record(), {"features": [0.1] * DIM, "end_delta": 1.0}], "record 1: missing key 'start_delta'"),
        ([_record(start_delta="1.5")], "record 0: field start_delta: '1.5' is not of type 'number'"),
        ([_record(), _record(end_delta=math.nan)], "record 1: field end_delta is nan"),
        ([_record(features=[0.1] * (DIM - 1) + [math.inf])], "record 0: field features.7 is inf"),
        ([_record(), _record(), _record(features=[0.1] * (DIM + 1))], f"record 2: field features has {DIM + 1} values"),
        ([_record(features=[0.1] * (DIM - 1) + ["x"])], "record 0: field features.7: 'x' is not of type 'number'"),
        (["not a record"], "record 0: expected an object"),
        ([], "no records"),
    ],
)
def test_validation_names_the_first_bad_record_and_writes_nothing(tmp_path: Path, records: list, message: str) -> None:
    data = _write(tmp_path / "data.json", records)
    out = tmp_path / "out" / "model.pth"
    proc = run_cli("validate-data", str(data), "--feature-dim", str(DIM))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    proc = run_cli("train-regressor", str(data), str(out), "--feature-dim", str(DIM), "--epochs", "1")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.parent.exists()


def test_empty_and_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("  \n")
    proc = run_cli("validate-data", str(tmp_path / "empty.json"))
    assert proc.returncode != 0 and "the file is empty" in proc.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps(_record()) + "\n{oops\n")
    proc = run_cli("validate-data", str(tmp_path / "bad.jsonl"))
    assert proc.returncode != 0 and "line 2 is not a JSON record" in proc.stderr
    proc = run_cli("validate-data", str(tmp_path / "absent.json"))
    assert proc.returncode != 0 and "no such file" in proc.stderr


def _line(video_id: str, start_delta: str = "-0.5", features: str = "0.1, 0.2", extra: bytes = b"") -> bytes:
    """One record as raw JSON bytes, so values json.dumps would never write (or bytes not UTF-8) can be given."""
    text = f'{{"video_id": "{video_id}", "features": [{features}], "start_delta": {start_delta}, "end_delta": 1'
    return text.encode() + extra + b"}"


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The CLI's error, which must be exactly one line, with no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("modelbake ")]
    assert line.startswith(f"modelbake {command}: error: "), line
    return line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" + _line("a") + b"," + _line("b", "1e39") + b"]", "record 1: field start_delta is 1e39, too large"),
        (_line("a") + b"\n" + _line("b", "-1e39"), "record 1: field start_delta is -1e39"),  # JSON Lines
        (b"[" + _line("a", features="0.1, 3.5e38") + b"]", "record 0: field features.1 is 3.5e38"),
        (b"[" + _line("a", "9" * 5000) + b"]", "record 0: field start_delta is 9999"),  # beyond json's int limit
        (b"[" + _line("a", "9" * 400) + b"]", "record 0: field start_delta is 9999"),  # beyond float64
        (
            b"[" + _line("a") + b"," + _line("b", extra=b', "query": "caf\xe9"') + b"]",
            "record 1: field query: not UTF-8",
        ),
        (b"[" + _line("a", extra=b', "end_delta": 2') + b"]", "record 0: field end_delta is given more than once"),
    ],
    ids=["1e39", "-1e39-jsonl", "feature-3.5e38", "5000-digits", "400-digits", "latin-1", "duplicate-key"],
)
def test_data_json_or_float32_cannot_hold_is_refused_by_record_and_field(
    tmp_path: Path, content: bytes, message: str
) -> None:
    data = tmp_path / "data.json"
    data.write_bytes(content)
    out = tmp_path / "out" / "model.pth"
    video_id = "a" if message.startswith("record 0") else "b"
    for command, args in (("validate-data", ()), ("train-regressor", (str(out), "--epochs", "1"))):
        line = _one_error_line(run_cli(command, str(data), *args), command)
        assert message in line and line.endswith(f"(video_id '{video_id}')"), line
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # nothing written, no scratch


def test_training_that_diverges_fails_and_saves_nothing(tmp_path: Path) -> None:
    """Values float32 holds but whose loss overflows: no NaN weights, no random init saved as "best epoch 0"."""
    records = [_record(video_id=f"v{i}", start_delta=3e38 * (-1) ** i) for i in range(20)]
    data = _write(tmp_path / "data.json", records)
    assert run_cli("validate-data", str(data)).returncode == 0  # each value fits in a 32-bit float
    out = tmp_path / "out" / "model.pth"
    line = _one_error_line(run_cli("train-regressor", str(data), str(out), "--epochs", "5"), "train-regressor")
    assert "training diverged in epoch 1: the training loss is inf; nothing was written" in line, line
    assert "record 0: field start_delta is 3e+38 (video_id 'v0')" in line, line
    line = _one_error_line(run_cli("train-regressor", str(data), str(out), "--epochs", "0"), "train-regressor")
    assert "--epochs 0: give at least 1" in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_the_sample_file_is_valid() -> None:
    proc = run_cli("validate-data", "models/regressor/sample_training_data.json", "--feature-dim", "512")
    assert proc.returncode == 0, proc.stderr
    assert "24 records, 512 features each" in proc.stdout


def _sha256s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".manifest.d" not in p.parts
    }


def test_seed_weights_are_deterministic_across_processes(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_cli(
            "regressor-seed", "--regressor-feature-dim", "64", "--regressor-epochs", "2", "--out", str(out), check=True
        )
        runs.append(_sha256s(out))
    assert set(runs[0]) == {
        "regressor/boundary_regressor_pretrained.safetensors",
        "regressor/boundary_regressor_pretrained.pth",
        "onnx/boundary_regressor.onnx",
        "golden/boundary_regressor.npz",
    }
    assert runs[0] == runs[1]


def test_seed_beats_random_init_and_records_both(built_tree: Path) -> None:
    manifest = json.loads((built_tree / "model_manifest.json").read_text())
    (model,) = [m for m in manifest["models"] if m["kind"] == "regressor"]
    metrics = model["details"]["metrics"]
    assert model["details"]["feature_dim"] == 32  # from the tiny CLIP model (auto)
    assert model["details"]["feature_dim_from"].startswith("CLIP tiny-vit")
    for delta in ("start_delta", "end_delta"):
        assert metrics["heldout_mae_seed"][delta] < 0.7 * metrics["heldout_mae_random_init"][delta]


def test_training_on_learnable_data_goes_well_below_the_seed(tmp_path: Path) -> None:
    # A function the seed never saw (function_seed=99): the seed is no better than chance on it.
    x, y = synthetic_set(1500, 64, seed=5, function_seed=99)
    data = tmp_path / "data.jsonl"
    rows = [
        {"features": f.tolist(), "start_delta": float(d[0]), "end_delta": float(d[1])}
        for f, d in zip(x, y, strict=True)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    seed_dir = tmp_path / "seed"
    run_cli(
        "regressor-seed",
        "--regressor-feature-dim",
        "64",
        "--regressor-epochs",
        "20",
        "--out",
        str(seed_dir),
        check=True,
    )
    seed_mae = mae(load_weights(seed_dir / "regressor" / "boundary_regressor_pretrained.safetensors"), x, y)
    out = tmp_path / "trained" / "mine.pth"
    proc = run_cli("train-regressor", str(data), str(out), "--epochs", "60", "--seed", "1", check=True)
    assert "epoch 1/60" in proc.stderr and "val MAE start" in proc.stderr  # progress per epoch
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    for delta in ("start_delta", "end_delta"):
        assert metrics["val_mae"][delta] < 0.5 * seed_mae[delta], (metrics["val_mae"], seed_mae)
        assert metrics["val_mae"][delta] < metrics["val_mae_predicting_zero"][delta]
    assert metrics["train_records"] + metrics["val_records"] == 1500
    # Both formats hold the same weights; nothing temporary is left behind.
    a, b = load_weights(out), load_weights(out.with_suffix(".safetensors"))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert sorted(p.name for p in out.parent.iterdir()) == ["mine.metrics.json", "mine.pth", "mine.safetensors"]


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled!",))


def test_weights_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "boundary_regressor.pth"
    with open(path, "wb") as fh:
        torch.save({"net.0.weight": torch.zeros(2, 2), "payload": _Evil()}, fh)
    with pytest.raises(pickle.UnpicklingError):
        load_weights(path)


def test_lookup_order_follows_the_seed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LOOKUP_ENV, raising=False)
    # Without a manifest nothing can be verified: the seed's look-up is an explicit opt-in.
    with pytest.raises(ManifestError, match="MODELBAKE_ALLOW_UNVERIFIED=1"):
        find_weights(tmp_path)
    monkeypatch.setenv("MODELBAKE_ALLOW_UNVERIFIED", "1")
    with pytest.raises(WeightsNotFound) as err:
        find_weights(tmp_path)
    for candidate in REGRESSOR_LOOKUP:
        assert str(tmp_path / candidate) in str(err.value)
    # Later candidates are used only when the earlier ones are missing.
    for candidate in reversed(REGRESSOR_LOOKUP):
        path = tmp_path / candidate
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"w")
        with caplog.at_level(logging.INFO, logger="modelbake"):
            assert find_weights(tmp_path) == path
        assert str(path) in caplog.text and "not verified" in caplog.text
    monkeypatch.setenv(LOOKUP_ENV, "custom/mine.pth, boundary_regressor.pth")
    assert find_weights(tmp_path) == tmp_path / "boundary_regressor.pth"


def test_onnx_predictor_matches_torch(built_tree: Path) -> None:
    onnx_model = BoundaryRegressorONNX.from_folder(built_tree)
    torch_model = load_weights(find_weights(built_tree))  # the listed state dict, checked
    x, _ = synthetic_set(7, onnx_model.feature_dim, seed=3)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = onnx_model.predict(x)
    assert got.shape == (7, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert onnx_model.predict(x[0]).shape == (1, 2)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        onnx_model.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        onnx_model.predict(np.full((1, 32), np.nan))
