"""OpenCLIP families with their own tokenizers: SigLIP's Hugging Face SentencePiece tokenizer, torch-free.

A tiny SigLIP-style model (no causal mask, last-position pooling, a T5-style Unigram tokenizer that pads with
its end token, canonicalised texts) goes through the same `modelbake download` users run, with the hub off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE, run_cli

from modelbake.manifest import read_manifest
from modelbake.runtime.clip import ClipTokenizer
from modelbake.runtime.models import open_models
from modelbake.runtime.verify import verify

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEXTS = ["A Dog, on the BEACH!", "", "snake_case street", "the dog " * 30, "café 🚀 &amp; “quotes”"]


@pytest.fixture(scope="module")
def siglip_source() -> Path:
    from tiny_families import make_tiny_siglip

    dest = CACHE / "tiny-siglip"
    return dest if (dest / "open_clip_config.json").is_file() else make_tiny_siglip(dest)


@pytest.fixture(scope="module")
def siglip_tree(siglip_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("siglip") / "models"
    run_cli(
        "download", "--clip-only", "--clip", f"tiny-siglip@dir:{siglip_source}", "--out", str(out),
        check=True, env=OFFLINE,
    )  # fmt: skip
    return out


def test_siglip_ships_its_own_tokenizer_and_embeds_as_open_clip_does(siglip_tree: Path, siglip_source: Path) -> None:
    import open_clip
    import torch

    model = read_manifest(siglip_tree)["models"][0]
    pre = model["preprocessing"]
    # SigLIP's contract: its tokenizer's cleaning, all 16 positions (no end-of-text cut), padded with </s> (1).
    assert pre["text_clean"] == "canonicalize" and pre["text_cut"] is None and pre["context_length"] == 16
    text_graph = next(f for f in model["files"] if f["role"] == "text_encoder")
    assert text_graph["inputs"][0]["shape"] == ["batch", 16]
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{siglip_source}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{siglip_source}")
    ours = ClipTokenizer.of(siglip_tree, model)
    np.testing.assert_array_equal(ours(TEXTS), tokenizer(TEXTS).numpy())
    assert ours([""]).tolist() == [[1] * 16]
    with torch.no_grad():
        expected = reference.eval().encode_text(tokenizer(TEXTS), normalize=True).numpy()
    encoder = open_models(siglip_tree).clip["tiny-siglip"]
    np.testing.assert_allclose(encoder.encode_text(TEXTS), expected, atol=1e-5)
    checks = verify(siglip_tree)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert any("tokenizer ids identical" in c.detail for c in checks)


def test_a_missing_tokenizer_is_one_line_before_any_export(siglip_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "no-tokenizer"
    shutil.copytree(siglip_source, source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    out = tmp_path / "models"
    proc = run_cli("download", "--clip-only", "--clip", f"tiny-siglip@dir:{source}", "--out", str(out), env=OFFLINE)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "its tokenizer (local-dir) could not be loaded" in errors[0], proc.stderr[-2000:]
    assert "tokenizer.json, tokenizer_config.json" in errors[0] and "Traceback" not in proc.stderr
    assert "exported" not in proc.stderr and not out.exists()


def test_a_checkpoint_file_takes_its_tokenizer_from_the_folder_beside_it(siglip_source: Path, tmp_path: Path) -> None:
    """ViT-B-16-SigLIP's tokenizer is a hub repo; air-gapped, `tokenizer/` beside the checkpoint stands in."""
    from modelbake.producers.common import ProducerError
    from modelbake.producers.openclip_source import load_tokenizer
    from modelbake.spec import parse_clip_list

    checkpoint = tmp_path / "siglip.safetensors"
    checkpoint.write_bytes(b"")
    (spec,) = parse_clip_list(f"ViT-B-16-SigLIP@file:{checkpoint}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        with pytest.raises(ProducerError, match=r"timm/ViT-B-16-SigLIP\) could not be loaded .* a folder 'tokenizer'"):
            load_tokenizer(spec)
        shutil.copytree(siglip_source, tmp_path / "tokenizer", ignore=shutil.ignore_patterns("open_clip_*"))
        tokenizer = load_tokenizer(spec)
    # the architecture's own settings: 64 positions, canonicalised texts
    assert tokenizer.context_length == 64 and tokenizer(["A DOG!"]).shape == (1, 64)
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "</s>"
