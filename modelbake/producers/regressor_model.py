"""The boundary regressor's architecture: defined once, used by seeding, training and export.

CLIP features of a clip (``feature_dim``, 512 for ViT-B/32) in; ``start_delta`` and ``end_delta``
(seconds to move the clip's start and end) out.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_NAMES = ("start_delta", "end_delta")
DEFAULT_FEATURE_DIM = 512
HIDDEN = (256, 64)


class BoundaryRegressor(nn.Module):
    def __init__(
        self, feature_dim: int = DEFAULT_FEATURE_DIM, hidden: tuple[int, ...] = HIDDEN, dropout: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = feature_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, len(OUTPUT_NAMES)))
        self.net = nn.Sequential(*layers)
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, feature_dim) float32 -> (n, 2): start_delta, end_delta in seconds."""
        return self.net(features)
