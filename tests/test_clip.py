"""CLIP export: torch-free tokenizer and preprocessing, the runtime encoder, the parity gate, bad input."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import run_cli
from PIL import Image

from modelbake.manifest import ManifestError
from modelbake.producers.clip_tokenizer import tokenizer_json
from modelbake.runtime.clip import ClipEncoder, ClipTokenizer, preprocess_image

UNICODE = "éàüñçøß東京日本語한국어😀🚀ﬁ–—“”‘’"


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n" + UNICODE
    fixed = [
        "",
        " ",
        "dog",
        "A Photo of a CAT!!",
        "don't it's we've",
        "café naïve 東京 🚀",
        "&amp;lt;b&amp;gt; x",
        "word " * 100,
        "x" * 400,
        "ＦＵＬＬＷＩＤＴＨ",
        "a <END_OF_TEXT> b",
    ]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 150))) for _ in range(n)]


def test_tokenizer_json_is_id_exact_with_open_clip(tmp_path: Path) -> None:
    reference = open_clip.get_tokenizer("ViT-B-32")
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json(reference, 77))
    texts = _texts(600)
    ours, theirs = ClipTokenizer(path, 77)(texts), reference(texts).numpy()
    mismatched = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not np.array_equal(a, b)]
    assert mismatched == []
    assert ours.dtype == np.int64 and ours.shape == (len(texts), 77)
    with pytest.raises(TypeError):
        ClipTokenizer(path, 77)("not a list")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_preprocessing_is_exact(tiny_sources: Path, name: str) -> None:
    from modelbake.producers.openclip_source import preprocessing

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_sources / 'clip' / name}")
    cfg = preprocessing(model)
    rng = np.random.default_rng(0)
    shapes = [
        ((200, 300, 3), "RGB"),
        ((50, 50), "L"),
        ((33, 71, 4), "RGBA"),
        ((7, 200, 3), "RGB"),
        ((65, 64, 3), "RGB"),
    ]
    for shape, mode in shapes:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        np.testing.assert_array_equal(preprocess_image(image, cfg), transform(image).numpy())


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_text_cut_after_end_of_text_equals_open_clips_77_positions(
    built_tree: Path, tiny_sources: Path, name: str
) -> None:
    """The run time feeds only the positions up to the batch's longest end-of-text token; open_clip's
    encode_text sees all 77. Short queries in one batch, and one over the context length."""
    from modelbake.runtime.clip import cut_after_eot

    model = open_clip.create_model(f"local-dir:{tiny_sources / 'clip' / name}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_sources / 'clip' / name}")
    encoder = ClipEncoder.from_folder(built_tree, name, variant="fp32")
    assert encoder.preprocessing["text_cut"] == "eot"
    for texts in (["a dog", "two people cooking in a small kitchen", ""], ["dog " * 100, "cat"]):
        with torch.no_grad():
            expected = model.encode_text(tokenizer(texts)).numpy()
        np.testing.assert_allclose(encoder.encode_text(texts, normalize=False), expected, atol=1e-5)
    assert cut_after_eot(encoder.tokenizer(["a dog", ""])).shape == (2, 4)  # start, a, dog, end
    assert cut_after_eot(encoder.tokenizer(["dog " * 100])).shape == (1, 77)


def test_runtime_encoder_matches_open_clip(built_tree: Path, tiny_sources: Path, tmp_path: Path) -> None:
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_sources / 'clip' / 'tiny-rn'}")
    model.eval()  # the ResNet tower has BatchNorm
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_sources / 'clip' / 'tiny-rn'}")
    encoder = ClipEncoder.from_folder(built_tree, "tiny-rn", variant="fp32")
    for batch in (3, 8):  # batch sizes the export never saw, texts of very different lengths
        texts = _texts(batch, seed=batch)[-batch:]
        with torch.no_grad():
            expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
        np.testing.assert_allclose(encoder.encode_text(texts), expected, atol=1e-4)
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (40 + 9 * i, 90 - 7 * i, 3), dtype=np.uint8) for i in range(5)]
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    inputs = [tmp_path / "a.png", Image.fromarray(arrays[1]), *arrays[2:]]
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in arrays])).numpy()
    np.testing.assert_allclose(encoder.encode_image(inputs, normalize=False), expected, atol=1e-4)
    int8 = ClipEncoder.from_folder(built_tree, "tiny-rn", int8=True).encode_image(inputs)
    cos = np.sum(int8 * encoder.encode_image(inputs), axis=1)
    assert cos.min() > 0.99
    with pytest.raises(LookupError, match=r"it has: tiny-(rn|vit), tiny-(rn|vit)"):
        ClipEncoder.from_folder(built_tree, "ViT-B_32")
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_image([np.zeros((4, 4, 3), dtype=np.float32)])


def test_manifest_records_what_a_loader_needs(built_tree: Path) -> None:
    manifest = json.loads((built_tree / "model_manifest.json").read_text())
    (vit,) = [m for m in manifest["models"] if m["name"] == "tiny-vit"]
    files = {(f["role"], f.get("variant")): f for f in vit["files"]}
    towers = [(role, variant) for role in ("text_encoder", "image_encoder") for variant in ("fp32", "int8")]
    assert {("tokenizer", None), *towers} <= set(files)
    assert sum(f["role"] == "golden" for f in vit["files"]) == 4  # one per graph
    for key in towers:
        assert files[key]["inputs"][0]["shape"][0] == "batch"  # symbolic batch in the written graph
        assert files[key]["opset"] == 17
        assert files[key]["golden"] == f"golden/{Path(files[key]['path']).stem}.npz"
    text, image = files["text_encoder", "fp32"], files["image_encoder", "fp32"]
    # The text tower takes any number of positions: the run time cuts after the longest end-of-text token.
    assert text["inputs"][0] == {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}
    assert vit["preprocessing"]["text_cut"] == "eot" and vit["preprocessing"]["context_length"] == 77
    assert text["parity"]["cut_positions"] < 77 and text["parity"]["cut_max_abs_diff"] < 1e-3
    assert image["outputs"][0] == {"name": "image_embeds", "shape": ["batch", 32], "dtype": "float32"}
    assert files["image_encoder", "int8"]["path"] == "onnx/clip_tiny-vit_image_encoder_int8.onnx"
    pre = vit["preprocessing"]
    assert pre["image_size"] == [32, 32] and pre["context_length"] == 77 and pre["interpolation"] == "bicubic"
    assert vit["details"] == {"embed_dim": 32, "normalized": False, "architecture": "tiny-vit"}
    assert text["parity"]["min_cosine"] > 0.999 and image["parity"]["simplified"] is True
    assert files["image_encoder", "int8"]["parity"]["min_cosine"] > 0.99
    assert set(vit["source"]["files"]) == {"open_clip_config.json", "open_clip_model.safetensors"}
    assert {"torch", "open_clip_torch", "onnx", "onnxruntime", "onnxsim"} <= set(vit["tools"])


def test_parity_gate_fails_the_stage_with_figures_and_writes_nothing(
    tiny_specs: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = tiny_specs["clip"].split(",")[0]
    proc = run_cli("--clip", spec, "--clip-parity-atol", "1e-12", "--out", str(out), script="clip_export.py")
    assert proc.returncode == 1
    assert "onnxruntime differs from PyTorch: max abs diff" in proc.stderr and "allowed 1e-12" in proc.stderr
    assert list(out.rglob("*")) == []


def test_checkpoint_of_another_architecture_is_refused(tiny_sources: Path, tmp_path: Path) -> None:
    ckpt = tiny_sources / "clip" / "tiny-vit" / "open_clip_model.safetensors"
    proc = run_cli("--clip", f"ViT-B-32@file:{ckpt}", "--out", str(tmp_path / "out"), script="clip_export.py")
    assert proc.returncode == 1
    assert "OpenCLIP could not load it" in proc.stderr and "belongs to this architecture" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


@pytest.mark.slow
def test_real_size_vit_b_32_exports_and_verifies(tmp_path: Path) -> None:
    """ViT-B/32 at full size (random weights: no hub here) through the file-checkpoint path."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    ckpt = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    out = tmp_path / "models"
    run_cli("download", "--clip-only", "--clip", f"ViT-B/32@file:{ckpt}", "--out", str(out), check=True)
    manifest = json.loads((out / "model_manifest.json").read_text())
    (entry,) = manifest["models"]
    assert entry["name"] == "ViT-B_32" and (out / "onnx" / "clip_ViT-B_32_image_encoder.onnx").is_file()
    (image,) = [f for f in entry["files"] if f["role"] == "image_encoder"]
    assert image["parity"]["nodes"] < image["parity"]["nodes_before"]
    assert entry["source"]["sha256"]
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout


def test_pytorch_weights_are_kept_only_when_asked(tiny_specs: dict[str, str], tmp_path: Path) -> None:
    spec = tiny_specs["clip"].split(",")[0]
    run_cli("--clip", spec, "--out", str(tmp_path / "plain"), script="clip_export.py", check=True)
    assert not (tmp_path / "plain" / "clip" / "tiny-vit" / "open_clip_model.safetensors").exists()
    run_cli("--clip", spec, "--clip-keep-pytorch", "--out", str(tmp_path / "kept"), script="clip_export.py", check=True)
    weights = tmp_path / "kept" / "clip" / "tiny-vit" / "open_clip_model.safetensors"
    fragment = json.loads((tmp_path / "kept" / ".manifest.d" / "clip-export.json").read_text())
    assert weights.is_file() and "clip/tiny-vit/open_clip_model.safetensors" in {
        f["path"] for f in fragment["models"][0]["files"]
    }


def test_folder_without_manifest_is_detected_by_file_names(built_tree: Path, tmp_path: Path) -> None:
    import shutil

    (tmp_path / "onnx").mkdir()
    for tower in ("text", "image"):
        for graph in (built_tree / "onnx").glob(f"clip_tiny-vit_{tower}_encoder.onnx*"):  # + external data
            shutil.copy(graph, tmp_path / "onnx")
    (tmp_path / "clip" / "tiny-vit").mkdir(parents=True)
    shutil.copy(built_tree / "clip" / "tiny-vit" / "tokenizer.json", tmp_path / "clip" / "tiny-vit")
    with pytest.raises(ManifestError, match="nothing there can be verified"):
        ClipEncoder.from_folder(tmp_path)
    detected = ClipEncoder.from_folder(tmp_path, allow_unverified=True)
    listed = ClipEncoder.from_folder(built_tree, "tiny-vit", variant="fp32")  # the files copied above
    assert detected.name == "tiny-vit"
    texts, images = ["a dog", "", "café"], [np.full((20, 30, 3), 7, np.uint8), np.zeros((64, 48), np.uint8)]
    np.testing.assert_array_equal(detected.encode_text(texts), listed.encode_text(texts))
    np.testing.assert_array_equal(detected.encode_image(images), listed.encode_image(images))
    with pytest.raises(LookupError, match=r"no manifest .* and no clip_<model>_text_encoder\.onnx"):
        ClipEncoder.from_folder(tmp_path, "ViT-B_32", allow_unverified=True)
