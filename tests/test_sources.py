"""The tiny test models are the same bytes on every CPU, and the tiny reranker ranks with clear gaps.

torch's own random draws and training differ per instruction set (its ``normal_`` has a vectorised path per
ISA; oneDNN picks kernels per CPU), so a test model made by torch on the machine that runs the tests is
another model on each CPU class: on an AMX machine the trained tiny reranker came out near-tied and its int8
was refused. The sources are drawn by numpy and the reranker trained once (modelbake.sources.tiny); these
digests fail at once, naming the file, if anything CPU-dependent creeps back in.

After a deliberate change to a maker (or a pinned library that writes these files), bump SOURCES_VERSION and
take the new digests from the failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelbake.sources.tiny import RANKER_WEIGHTS, SOURCES_VERSION

PINNED = {
    "VERSION": "4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce",
    "clip/tiny-rn/open_clip_config.json": "10b04ab5e41af1b91d79120c6aca235b9f64f602e31379d53cdcf84c45fad8c6",
    "clip/tiny-rn/open_clip_model.safetensors": "e769adbaf580451f2c8172315707d3d5d33c2041bbe07070b4cf8cb303af6e7e",
    "clip/tiny-vit/open_clip_config.json": "fd8cedf49230dc327ed21ab0d2a10c351f6e4ba1c309acda8b750a44770db49c",
    "clip/tiny-vit/open_clip_model.safetensors": "c5ba99049f1220feaee177c8e7e5bedf7687e3b0a5dea0925d6354a694c163b6",
    "reranker/tiny-bert/config.json": "e8344396ae39e782b3e91cb48b2e20895776afb3fac7f7ff783c85533219dc14",
    "reranker/tiny-bert/model.safetensors": "01001b24a6a0d63adc6ce98941f0c66e37764839f3cd8029e79e21b0bfc9c677",
    "reranker/tiny-bert/tokenizer.json": "82b8bc40492e6e9c28858d03f3358cb9aae2379cb543fce3db50b7edb55ff7ac",
    "reranker/tiny-bert/tokenizer_config.json": "a0781f296480fcf315b73a3b95e8a057bda19705b53c49530675660cb34d8888",
}
PINNED_RANKER_WEIGHTS = "b3b758d5409802905c1d3a01f2e9c94943c1b1ced774f2125460327b3cfb1737"


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _differences(root: Path) -> list[str]:
    found = _digests(root)
    return [
        f"{name}: {found.get(name, 'missing')} (pinned {PINNED.get(name, 'none')})"
        for name in sorted(set(found) | set(PINNED))
        if found.get(name) != PINNED.get(name)
    ]


def test_the_tiny_sources_are_the_pinned_bytes(tiny_sources: Path) -> None:
    assert SOURCES_VERSION == "3"  # the digests below are of this version's makers
    assert _differences(tiny_sources) == []
    assert hashlib.sha256(RANKER_WEIGHTS.read_bytes()).hexdigest() == PINNED_RANKER_WEIGHTS


def test_torch_kernels_of_another_cpu_class_make_the_same_bytes(tmp_path: Path) -> None:
    """ATEN_CPU_CAPABILITY=default runs torch's plain kernels, as a CPU without AVX2 would: torch's own
    initialisation then draws other numbers from the same seed; the sources must not change."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    cmd = [sys.executable, "-m", "modelbake.cli", "tiny-sources", str(tmp_path)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert _differences(tmp_path) == []


def test_the_tiny_reranker_ranks_its_probe_with_gaps_far_above_int8_error(tiny_sources: Path) -> None:
    """Every probe query's passages in their listed order, neighbours at least 0.5 logit apart (the fit asks
    1.0; dynamic int8 moved these logits by about 0.03), so its int8 keeps the ranking by construction."""
    import torch
    from sentence_transformers import CrossEncoder

    from modelbake.producers.reranker import RANKING_PROBE

    tiny_bert = str(tiny_sources / "reranker" / "tiny-bert")
    ce = CrossEncoder(tiny_bert, device="cpu", activation_fn=torch.nn.Identity())  # logits
    for query, passages in RANKING_PROBE.items():
        logits = np.asarray(ce.predict([(query, p) for p in passages]))
        assert np.min(logits[:-1] - logits[1:]) > 0.5, (query, logits)


@pytest.mark.parametrize("int8_blind", [False, True])
def test_the_int8_blind_reranker_scores_as_the_trained_one_in_fp32(tmp_path: Path, int8_blind: bool) -> None:
    """The outlier channel changes nothing fp32 computes beyond dropping that channel from the pooler: the
    model still ranks the probe in order (its int8, tested in test_speed, ties everything)."""
    from sentence_transformers import CrossEncoder

    from modelbake.producers.reranker import RANKING_PROBE
    from modelbake.sources.tiny import make_tiny_cross_encoder

    ce = CrossEncoder(str(make_tiny_cross_encoder(tmp_path, int8_blind=int8_blind)), device="cpu")
    for query, passages in RANKING_PROBE.items():
        scores = np.asarray(ce.predict([(query, p) for p in passages]))
        assert list(np.argsort(-scores)) == list(range(len(passages))), (query, scores)
