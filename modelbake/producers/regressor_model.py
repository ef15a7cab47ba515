"""The boundary regressor's architecture and weight files: defined once, used by seeding, training,
export and the services that load the weights with torch.

CLIP features of a clip (``feature_dim``: the CLIP model's embedding size, 512 for ViT-B/32) in;
``start_delta`` and ``end_delta`` (seconds to move the clip's start and end) out::

    Linear(feature_dim, 256) -> ReLU -> Dropout(0.1) -> Linear(256, 64) -> ReLU -> Dropout(0.1) -> Linear(64, 2)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OUTPUT_NAMES = ("start_delta", "end_delta")
DEFAULT_FEATURE_DIM = 512
HIDDEN = (256, 64)
DROPOUT = 0.1


class BoundaryRegressor(nn.Module):
    def __init__(self, feature_dim: int = DEFAULT_FEATURE_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = feature_dim
        for h in HIDDEN:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(DROPOUT)]
            width = h
        layers.append(nn.Linear(width, len(OUTPUT_NAMES)))
        self.net = nn.Sequential(*layers)
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, feature_dim) float32 -> (n, 2): start_delta, end_delta in seconds."""
        return self.net(features)


def save_weights(model: BoundaryRegressor, pth_path: Path) -> tuple[Path, Path]:
    """``X.pth`` (a plain state dict) and its ``X.safetensors`` twin, written in place.

    Give paths in a scratch folder (:func:`modelbake.fs.scratch_folder`) and publish them from there: a file here may
    be half-written until this returns.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pth_path.parent.mkdir(parents=True, exist_ok=True)
    st_path = pth_path.with_suffix(".safetensors")
    save_file(state, str(st_path), metadata={"feature_dim": str(model.feature_dim)})
    torch.save(state, pth_path)
    for path in (st_path, pth_path):
        path.chmod(0o644)  # safetensors writes 0600; weights are meant to be read by a service user
    return pth_path, st_path


def load_weights(path: Path) -> BoundaryRegressor:
    """A model from ``.safetensors`` or a ``.pth`` state dict. Never unpickles objects (weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "net.0.weight" not in state:
        raise ValueError(f"{path}: not a boundary regressor state dict (no net.0.weight)")
    model = BoundaryRegressor(int(state["net.0.weight"].shape[1]))
    model.load_state_dict(state)
    return model.eval()
