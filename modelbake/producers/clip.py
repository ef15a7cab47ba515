"""clip-export: OpenCLIP models -> separate text and image ONNX encoders, checked against PyTorch.

name -> config -> weights happens in one place (:func:`load_clip`), whatever the source: the hub
(``ViT-B-32:openai``), a checkpoint file (``ViT-B-32@file:PATH``) or an OpenCLIP local-dir
(``NAME@dir:PATH``). Every model then goes through the generic loop in ``onnx_export``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modelbake.manifest import file_entry, sha256_file, write_fragment
from modelbake.producers.common import ProducerError, log, staged_output, tool_versions
from modelbake.producers.onnx_export import DEFAULT_OPSET, OnnxExport, export_and_validate, quantize_and_validate
from modelbake.producers.progress import steps
from modelbake.spec import CLIP_DIR, GOLDEN_DIR, ONNX_DIR, ClipSpec, clip_onnx_name

STAGE = "clip-export"
TOOLS = ("torch", "open_clip_torch", "onnx", "onnxruntime", "onnxsim", "modelbake")

# Texts and images of very different shapes: the probe set of the parity gate.
PROBE_TEXTS = ["", "dog", "a person walking a dog along a beach at sunset " * 12, "café naïve 東京 🚀"]
EXAMPLE_TEXTS = ["a photo of a cat", "two people cooking in a small kitchen"]


class _TextTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids)


class _ImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(sorted(valid)[:12]) + ", ..."


def validate(spec: ClipSpec) -> None:
    """Fail before any download when the architecture or tag is unknown to OpenCLIP."""
    import open_clip

    if spec.local is not None and spec.local.kind == "dir":
        return  # the folder's own open_clip_config.json defines the architecture
    models = open_clip.list_models()
    if spec.arch not in models:
        raise ProducerError(
            f"{spec.text!r}: unknown OpenCLIP architecture {spec.arch!r}; close names: {_suggest(spec.arch, models)}"
        )
    if spec.local is None:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.tag not in tags:
            raise ProducerError(
                f"{spec.text!r}: {spec.arch} has no pretrained tag {spec.tag!r}; "
                f"valid tags: {', '.join(tags) or 'none'}"
            )


def embed_dim(spec: ClipSpec) -> int:
    """The embedding size of a CLIP spec, read from its config without building the model."""
    import json

    import open_clip

    validate(spec)
    if spec.local is not None and spec.local.kind == "dir":
        config_path = Path(spec.local.path) / "open_clip_config.json"
        if not config_path.is_file():
            raise ProducerError(f"{spec.text!r}: {config_path} does not exist; mount the model sources at that path")
        return int(json.loads(config_path.read_text())["model_cfg"]["embed_dim"])
    return int(open_clip.get_model_config(spec.arch)["embed_dim"])


def load_clip(spec: ClipSpec) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model, tokenizer, eval preprocess, source record) for any spec: the one place name -> config ->
    weights happens."""
    import open_clip

    validate(spec)
    source: dict[str, Any]
    if spec.local is None:
        name, pretrained = spec.arch, spec.tag
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag) or {}
        source = {"type": "hub", "id": f"{spec.arch}:{spec.tag}", "revision": None,
                  "hf_hub": cfg.get("hf_hub", ""), "url": cfg.get("url", "")}  # fmt: skip
    else:
        path = Path(spec.local.path)
        if not path.exists():
            raise ProducerError(f"{spec.text!r}: {path} does not exist; mount the model sources at that path")
        if spec.local.kind == "dir":
            name, pretrained = f"local-dir:{path}", None
            files = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
            source = {"type": "dir", "id": str(path), "files": files}
        else:
            name, pretrained = spec.arch, str(path)
            source = {"type": "file", "id": str(path), "sha256": sha256_file(path)}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device="cpu")
    except Exception as exc:  # open_clip reports a mismatch as RuntimeError, AssertionError, KeyError, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProducerError(
            f"{spec.text!r}: OpenCLIP could not load it ({first_line}); "
            "check that the checkpoint belongs to this architecture"
        ) from exc
    return model.eval(), open_clip.get_tokenizer(name), preprocess, source


def _probe_images(size: int) -> list[Image.Image]:
    """Deterministic images of several sizes and modes (RGB, greyscale, RGBA, a thin strip)."""
    rng = np.random.default_rng(1234)
    shapes = [
        ((size * 2, size * 3, 3), "RGB"),
        ((size, size), "L"),
        ((size // 2 + 7, size + 5, 4), "RGBA"),
        ((9, size * 4, 3), "RGB"),
    ]
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for shape, mode in shapes]


def preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", model.visual.image_size)
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    return {
        "image_size": size,
        "mean": list(cfg.get("mean", [])),
        "std": list(cfg.get("std", [])),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "context_length": int(model.context_length),
    }


@dataclass(frozen=True)
class ClipOptions:
    """Build args of the clip-export stage."""

    opset: int = DEFAULT_OPSET
    keep_pytorch: bool = False
    int8: bool = False
    atol: float = 1e-3
    min_cosine: float = 0.999
    int8_min_cosine: float = 0.99


def _torch_free_inputs(root: Path, key: str, tokenizer: Any, preprocess: Any, pre: dict[str, Any],
                       texts: list[str], images: list[Image.Image]) -> str | None:  # fmt: skip
    """Write the runtime tokenizer and prove it and the runtime preprocessing match open_clip's."""
    from open_clip.tokenizer import SimpleTokenizer

    from modelbake.producers.clip_tokenizer import tokenizer_json
    from modelbake.runtime.clip import ClipTokenizer, preprocess_image

    mismatch = max(float(np.abs(preprocess(im).numpy() - preprocess_image(im, pre)).max()) for im in images)
    if mismatch > 1e-5:
        raise ProducerError(f"CLIP {key}: run-time image preprocessing differs from open_clip's by {mismatch:.2e}")
    if not isinstance(tokenizer, SimpleTokenizer):
        log.warning("CLIP %s: tokenizer %s has no torch-free export yet", key, type(tokenizer).__name__)
        return None
    path = root / CLIP_DIR / key / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokenizer_json(tokenizer, pre["context_length"]))
    ours, theirs = ClipTokenizer(path, pre["context_length"])(texts), tokenizer(texts).numpy()
    if not np.array_equal(ours, theirs):
        bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not np.array_equal(a, b)]
        raise ProducerError(f"CLIP {key}: tokenizer.json differs from open_clip's tokenizer on {bad[:3]!r}")
    return path.relative_to(root).as_posix()


def export_one(spec: ClipSpec, root: Path, options: ClipOptions) -> dict[str, Any]:
    """Export one CLIP model into ``root`` (a staging folder); returns its manifest entry."""
    # load + tokenizer/preprocessing check, then per tower: export+gate (and int8+gate)
    with steps(f"CLIP {spec.key}", 1 + 2 * (2 if options.int8 else 1)) as done:
        return _export_one(spec, root, options, done)


def _export_one(spec: ClipSpec, root: Path, options: ClipOptions, done: Callable[[str], None]) -> dict[str, Any]:
    log.info("CLIP %s: loading", spec.text)
    model, tokenizer, preprocess, source = load_clip(spec)
    pre = preprocessing(model)
    images = _probe_images(max(pre["image_size"]))
    tokenizer_path = _torch_free_inputs(root, spec.key, tokenizer, preprocess, pre, PROBE_TEXTS + EXAMPLE_TEXTS, images)
    raw_images = {f"image:{i}": np.asarray(im) for i, im in enumerate(images[1:])}
    done("loaded, tokenizer + preprocessing checked")
    towers = {
        "text": OnnxExport(
            role="text_encoder",
            module=_TextTower(model),
            example={"input_ids": tokenizer(EXAMPLE_TEXTS)},
            probe={"input_ids": tokenizer(PROBE_TEXTS)},
            output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch"}, "text_embeds": {0: "batch"}},
            atol=options.atol,
            min_cosine=options.min_cosine,
            raw_golden={"text": np.asarray(PROBE_TEXTS)},
        ),
        "image": OnnxExport(
            role="image_encoder",
            module=_ImageTower(model),
            example={"pixel_values": torch.stack([preprocess(im) for im in images[:2]])},
            probe={"pixel_values": torch.stack([preprocess(im) for im in images[1:]])},
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            atol=options.atol,
            min_cosine=options.min_cosine,
            raw_golden=raw_images,
        ),
    }
    files, parity = [], {}
    if tokenizer_path:
        files.append(file_entry(root, root / tokenizer_path, role="tokenizer", fmt="json"))
    for tower, export in towers.items():
        onnx_path = root / ONNX_DIR / clip_onnx_name(spec.key, tower)
        golden_path = root / GOLDEN_DIR / f"{onnx_path.stem}.npz"
        entry, figures = export_and_validate(export, onnx_path, golden_path, root, options.opset)
        files += [entry, file_entry(root, golden_path, role=f"{tower}_golden", fmt="npz")]
        parity[tower] = figures
        done(f"{tower} exported, parity checked")
        if options.int8:
            int8_path = onnx_path.with_name(f"{onnx_path.stem}_int8.onnx")
            int8_golden = root / GOLDEN_DIR / f"{int8_path.stem}.npz"
            entry, figures = quantize_and_validate(
                export, onnx_path, int8_path, int8_golden, root, min_cosine=options.int8_min_cosine, opset=options.opset
            )
            entry["role"] = f"{export.role}_int8"
            files += [entry, file_entry(root, int8_golden, role=f"{tower}_int8_golden", fmt="npz")]
            parity[f"{tower}_int8"] = figures
            done(f"{tower} int8 checked")
    if options.keep_pytorch:
        from safetensors.torch import save_file

        weights = root / CLIP_DIR / spec.key / "open_clip_model.safetensors"
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        files.append(file_entry(root, weights, role="pytorch_weights", fmt="safetensors"))
    embed = next(f for f in files if f["role"] == "text_encoder")["outputs"][0]["shape"][-1]
    return {
        "name": spec.key,
        "kind": "clip",
        "stage": STAGE,
        "spec": spec.text,
        "source": source,
        "tools": tool_versions(*TOOLS),
        "files": files,
        "preprocessing": {
            **pre,
            "tokenizer": tokenizer_path,
            "text_cleaning": "ftfy.fix_text, html.unescape x2, strip",
        },
        "parity": parity,
        "details": {"embed_dim": int(embed), "normalized": False, "architecture": spec.arch},
    }


def run(specs: list[ClipSpec], out_root: Path, options: ClipOptions | None = None) -> list[dict[str, Any]]:
    """The clip-export stage: every selected model, all or nothing, plus the stage's manifest fragment."""
    options = options or ClipOptions()
    for spec in specs:
        validate(spec)  # all names are checked before the first (slow) export
    with staged_output(out_root) as staging:
        models = [export_one(spec, staging, options) for spec in specs]
        write_fragment(staging, STAGE, models)
    return models
