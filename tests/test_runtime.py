"""The run-time side: torch-free, and verify catches what it must."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelbake.runtime.verify import verify

BUILD_TIME = ("torch", "open_clip", "transformers", "sentence_transformers", "onnxsim")


def test_runtime_imports_no_build_time_package() -> None:
    code = (
        "import sys, modelbake.runtime.verify, modelbake.runtime.__main__, modelbake.manifest, modelbake.spec;"
        "import modelbake.cli;"
        f"bad = [m for m in {BUILD_TIME!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"run-time modules pulled build-time packages: {proc.stdout}{proc.stderr}"


def test_verify_passes_on_a_fresh_tree(built_tree: Path) -> None:
    checks = verify(built_tree)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    inference = [c for c in checks if c.what.startswith("inference")]
    assert len(inference) == 10  # 2 CLIP x (text + image) x (fp32 + int8), reranker, regressor
    replays = [c for c in checks if c.what.startswith("inputs")]
    assert len(replays) == 8 and all("identical" in c.detail or "0.0e+00" in c.detail for c in replays)


@pytest.mark.parametrize(
    "victim",
    [
        "onnx/clip_tiny-vit_image_encoder.onnx",
        "golden/reranker_tiny-bert.npz",
        "regressor/boundary_regressor_pretrained.safetensors",
    ],
)
def test_verify_catches_a_flipped_byte(built_tree: Path, tmp_path: Path, victim: str) -> None:
    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    data = bytearray((root / victim).read_bytes())
    data[-10] ^= 0x01
    (root / victim).write_bytes(bytes(data))
    failed = [c for c in verify(root) if not c.ok]
    assert failed and victim in failed[0].detail and "sha256" in failed[0].detail
    # The quick health check only sees sizes; a truncation is caught there too.
    (root / victim).write_bytes(bytes(data[:-1]))
    assert any(not c.ok and victim in c.detail for c in verify(root, quick=True))


def test_verify_cli_exit_codes(built_tree: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "modelbake.runtime", "verify", str(built_tree)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "checks ok" in ok.stdout
    empty = subprocess.run(
        [sys.executable, "-m", "modelbake.runtime", "verify", str(tmp_path)], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "no manifest" in empty.stdout
