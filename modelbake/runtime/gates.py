"""The accuracy measures a variant is gated on, in one place: the build's gates (against PyTorch) and the run
time's check where a tree is opened (against the golden outputs the build recorded) use the same ones.

Torch-free: numpy only.
"""

from __future__ import annotations

import numpy as np


def rows(x: np.ndarray) -> np.ndarray:
    """An output as (batch, values) in float64: what cosine and differences are computed on."""
    return x.reshape(x.shape[0], -1).astype(np.float64) if x.ndim > 1 else x.reshape(-1, 1).astype(np.float64)


def min_row_cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    """The smallest per-row cosine similarity; 1.0 for single values (a cosine says nothing there)."""
    r, a = rows(reference), rows(actual)
    if r.shape[1] < 2:
        return 1.0
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(a, axis=1)
    return float(np.min(np.sum(r * a, axis=1) / np.maximum(denom, 1e-12)))


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score lists: (concordant - discordant pairs), over the pairs either list tells
    apart (a pair the model scores exactly alike has no order to keep). If one list ties everything: 1.0 when
    the other does too, else 0.0 (all order lost)."""
    i, j = np.triu_indices(len(a), 1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    norm = np.sqrt(np.count_nonzero(sa) * np.count_nonzero(sb))
    if not norm:
        return float(not sa.any() and not sb.any())
    return float(np.sum(sa * sb) / norm)


def top_k_kept(scores: np.ndarray, reference: np.ndarray, k: int) -> bool:
    """Whether ``scores`` put the same passages first, in the same order, as ``reference`` (the reference's
    own ties may come in either order)."""
    order, reference_order = np.argsort(-scores, kind="stable"), np.argsort(-reference, kind="stable")
    return bool(np.array_equal(reference[order[:k]], reference[reference_order[:k]]))
