"""regressor-seed: deterministic seed weights for the boundary regressor, trained on a documented
synthetic set (no download), shipped as safetensors, a weights-only .pth state dict, and ONNX.

The synthetic generator: features are unit-norm Gaussian vectors (like normalised CLIP features);
the true deltas are a fixed smooth function of them, ``MAX_DELTA * tanh(features @ W)``, with W drawn
from the same seed, plus Gaussian noise. Seed weights fit that function; random init does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelbake.manifest import file_entry, write_fragment
from modelbake.producers.common import log, staged_output, tool_versions
from modelbake.producers.onnx_export import DEFAULT_OPSET, OnnxExport, export_and_validate
from modelbake.producers.regressor_model import OUTPUT_NAMES, BoundaryRegressor
from modelbake.spec import GOLDEN_DIR, ONNX_DIR, REGRESSOR_DIR, REGRESSOR_ONNX, REGRESSOR_PTH, REGRESSOR_SAFETENSORS

STAGE = "regressor-seed"
TOOLS = ("torch", "safetensors", "onnx", "onnxruntime", "modelbake")
MAX_DELTA = 2.0
NOISE = 0.05


def synthetic_set(n: int, feature_dim: int, seed: int, function_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d) float32, deltas (n, 2) float32) from the documented generator.

    ``seed`` draws the examples; ``function_seed`` fixes W, the function all sets share.
    """
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(function_seed).normal(size=(feature_dim, 2))
    x = rng.normal(size=(n, feature_dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = MAX_DELTA * np.tanh(x @ w) + rng.normal(scale=NOISE, size=(n, 2))
    return x.astype(np.float32), y.astype(np.float32)


def mae(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> list[float]:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy()
    return [float(v) for v in np.mean(np.abs(pred - y), axis=0)]


def seed_weights(
    feature_dim: int, seed: int, epochs: int, n_train: int = 4096
) -> tuple[BoundaryRegressor, dict[str, Any]]:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = BoundaryRegressor(feature_dim)
    x, y = synthetic_set(n_train, feature_dim, seed)
    x_val, y_val = synthetic_set(1024, feature_dim, seed + 1)
    random_mae = mae(model, x_val, y_val)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(n_train, generator=generator).split(256):
            opt.zero_grad()
            loss = torch.nn.functional.l1_loss(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        log.debug("regressor seed epoch %d loss %.4f", epoch, loss.item())
    seed_mae = mae(model, x_val, y_val)
    metrics = {
        "heldout_mae_random_init": dict(zip(OUTPUT_NAMES, random_mae, strict=True)),
        "heldout_mae_seed": dict(zip(OUTPUT_NAMES, seed_mae, strict=True)),
        "train_examples": n_train,
        "heldout_examples": 1024,
        "epochs": epochs,
        "seed": seed,
        "generator": f"features unit-norm N(0,1); deltas = {MAX_DELTA}*tanh(features @ W) + N(0,{NOISE})",
    }
    return model.eval(), metrics


def run(
    out_root: Path, *, feature_dim: int = 512, seed: int = 0, epochs: int = 20, opset: int = DEFAULT_OPSET
) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    model, metrics = seed_weights(feature_dim, seed, epochs)
    log.info(
        "regressor seed: held-out MAE %s (random init %s)",
        metrics["heldout_mae_seed"],
        metrics["heldout_mae_random_init"],
    )
    with staged_output(out_root) as root:
        folder = root / REGRESSOR_DIR
        folder.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / REGRESSOR_SAFETENSORS, metadata={"feature_dim": str(feature_dim)})
        torch.save(state, folder / REGRESSOR_PTH)
        x_example, _ = synthetic_set(2, feature_dim, seed + 2)
        x_probe, _ = synthetic_set(5, feature_dim, seed + 3)
        export = OnnxExport(
            role="regressor",
            module=model,
            example={"features": torch.from_numpy(x_example)},
            probe={"features": torch.from_numpy(x_probe)},
            output_names=["deltas"],
            dynamic_axes={"features": {0: "batch"}, "deltas": {0: "batch"}},
            atol=1e-4,
        )
        onnx_path = root / ONNX_DIR / REGRESSOR_ONNX
        golden_path = root / GOLDEN_DIR / f"{onnx_path.stem}.npz"
        entry, parity = export_and_validate(export, onnx_path, golden_path, root, opset)
        files = [
            file_entry(root, folder / REGRESSOR_SAFETENSORS, role="weights", fmt="safetensors"),
            file_entry(root, folder / REGRESSOR_PTH, role="weights_state_dict", fmt="pth"),
            entry,
            file_entry(root, golden_path, role="regressor_golden", fmt="npz"),
        ]
        models = [
            {
                "name": "boundary_regressor",
                "kind": "regressor",
                "stage": STAGE,
                "spec": f"seed={seed},feature_dim={feature_dim},epochs={epochs}",
                "source": {"type": "generated", "id": "synthetic seed training"},
                "tools": tool_versions(*TOOLS),
                "files": files,
                "parity": parity,
                "details": {"feature_dim": feature_dim, "outputs": list(OUTPUT_NAMES), "metrics": metrics},
            }
        ]
        write_fragment(root, STAGE, models)
    return models
