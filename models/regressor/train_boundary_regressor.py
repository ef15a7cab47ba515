#!/usr/bin/env python3
"""Train the boundary regressor, as in the original system:

    python train_boundary_regressor.py your_data.json your_model.pth

A thin entry to `modelbake train-regressor` (same options: --epochs, --patience, --val-fraction, --seed,
--lr, --batch-size, --feature-dim). Needs `pip install 'modelbake[build]'`.
"""

import sys

from modelbake.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-regressor", *sys.argv[1:]]))
