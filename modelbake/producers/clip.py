"""clip-export: OpenCLIP models -> separate text and image ONNX encoders, checked against PyTorch.

A spec becomes a loaded model in :mod:`.openclip_source` (name -> config -> weights -> tokenizer); its
towers (:mod:`.clip_towers`) are described here for the generic export-and-gate loop in
:mod:`.onnx_export`, with the torch-free tokenizer proved id-exact and the cut-after-end-of-text gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modelbake.fs import staged_output
from modelbake.kinds import CLIP
from modelbake.manifest import Role, Variant, file_entry, write_fragment
from modelbake.producers import Values
from modelbake.producers.clip_towers import ImageTower, TextTower
from modelbake.producers.common import (
    ProducerError,
    check_memory,
    log,
    measured,
    model_record,
)
from modelbake.producers.onnx_export import (
    ExportSettings,
    ExtraGate,
    OnnxExport,
    ToleranceMiss,
    compare,
    export_variants,
)
from modelbake.producers.openclip_source import load_clip, preprocessing, text_clean, text_cut, tower_bytes, validate
from modelbake.producers.progress import steps
from modelbake.runtime.clip import cut_after_eot
from modelbake.spec import CLIP_DIR, ClipSpec, clip_onnx_name

STAGE = CLIP.stage
TOOLS = ("torch", "open_clip_torch", "onnx", "onnxruntime", "onnxsim")

# Texts and images of very different shapes: the probe set of the parity gate.
PROBE_TEXTS = ["", "dog", "a person walking a dog along a beach at sunset " * 12, "café naïve 東京 🚀"]
EXAMPLE_TEXTS = ["a photo of a cat", "two people cooking in a small kitchen"]
# What the torch-free tokenizer must tokenize id for id as open_clip does: case, punctuation, entities,
# underscores, typographic quotes and literal special tokens (SigLIP's cleaning drops some of them).
TOKENIZER_TEXTS = [
    *PROBE_TEXTS,
    *EXAMPLE_TEXTS,
    "A Photo Of A CAT!!! (test) #1 -- ok?",
    "fish &amp; chips",
    "snake_case_words",
    "\u201ccurly quotes\u201d \u2018x\u2019",
    "</s> <pad> <unk> <|endoftext|> literal specials",
    "  tabs\tand\nnewlines  ",
]
# Short texts of different lengths: the cut gate runs them on as few positions as the run time will.
CUT_PROBE_TEXTS = ["", "dog", "café naïve 東京 🚀", "a photo of a cat", "a person walks a dog on a beach at sunset"]


def _calibration_images(probe: list[Image.Image], count: int = 12) -> list[Image.Image]:
    """Smooth, photo-like images (gradients, blobs, flat areas) for static int8 calibration: the probe's
    noise alone would set activation ranges no real photo reaches."""
    rng = np.random.default_rng(4321)
    size = max(probe[1].size)  # the square probe image: the model's input size
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        channels = []
        for _ in range(3):
            a, b, c, f = rng.uniform(-1, 1, 4)
            wave = np.sin(2 * np.pi * f * 3 * (xx * a + yy * b) + c)
            channels.append(128 + 100 * wave * rng.uniform(0.2, 1.0))
        array = np.stack(channels, axis=-1) + rng.normal(0, 8, (size, size, 3))
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB"))
    return images


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


@dataclass(frozen=True)
class ClipOptions:
    """The clip-export stage's parameters, typed: how to export, and the towers' tolerances (user settings
    for CLIP, unlike the other kinds' fixed ones, because a large tower's float error grows with its size)."""

    export: ExportSettings
    atol: float
    min_cosine: float
    int8_min_cosine: float
    keep_pytorch: bool

    @classmethod
    def from_values(cls, values: Values) -> ClipOptions:
        return cls(
            export=ExportSettings.from_values(values, int8=values["CLIP_INT8"]),
            atol=values["CLIP_PARITY_ATOL"],
            min_cosine=values["CLIP_PARITY_MIN_COSINE"],
            int8_min_cosine=values["CLIP_INT8_MIN_COSINE"],
            keep_pytorch=values["CLIP_KEEP_PYTORCH"],
        )

    @property
    def tolerances(self) -> dict[str, Any]:
        """What each tower's export description carries."""
        return {"atol": self.atol, "min_cosine": self.min_cosine, "int8_gate": {"min_cosine": self.int8_min_cosine}}


def _torch_free_inputs(
    root: Path, key: str, tokenizer: Any, preprocess: Any, pre: dict[str, Any], images: list[Image.Image]
) -> str | None:
    """Write the runtime tokenizer and prove it and the runtime preprocessing match open_clip's."""
    from modelbake.producers.clip_tokenizer import hf_tokenizer_json, tokenizer_json
    from modelbake.runtime.clip import ClipTokenizer, preprocess_image

    mismatch = max(float(np.abs(preprocess(im).numpy() - preprocess_image(im, pre)).max()) for im in images)
    if mismatch > 1e-5:
        raise ProducerError(f"CLIP {key}: run-time image preprocessing differs from open_clip's by {mismatch:.2e}")
    clean = pre["text_clean"]
    if clean is None:
        log.warning("CLIP %s: tokenizer %s has no torch-free export yet", key, type(tokenizer).__name__)
        return None
    texts = TOKENIZER_TEXTS
    path = root / CLIP_DIR / key / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    make = tokenizer_json if clean == "clip" else hf_tokenizer_json
    path.write_text(make(tokenizer if clean == "clip" else tokenizer.tokenizer, pre["context_length"]))
    ours, theirs = ClipTokenizer(path, pre["context_length"], clean)(texts), tokenizer(texts).numpy()
    if not np.array_equal(ours, theirs):
        bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not np.array_equal(a, b)]
        raise ProducerError(f"CLIP {key}: tokenizer.json differs from open_clip's tokenizer on {bad[:3]!r}")
    return path.relative_to(root).as_posix()


def _towers(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    images: list[Image.Image],
    options: ClipOptions,
    cut: str | None,
) -> dict[str, OnnxExport]:
    """The two encoders, described for the generic export loop (example batch 2, probe batch 4 / 3);
    ``cut``: the text tower's :func:`.openclip_source.text_cut`."""
    gates = options.tolerances
    return {
        "text": OnnxExport(
            role=Role.TEXT_ENCODER,
            module=TextTower(model, cut is not None),
            example={"input_ids": tokenizer(EXAMPLE_TEXTS)},
            probe={"input_ids": tokenizer(PROBE_TEXTS)},
            output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch", **({1: "sequence"} if cut else {})}, "text_embeds": {0: "batch"}},
            raw_golden={"text": np.asarray(PROBE_TEXTS)},
            **gates,
        ),
        "image": OnnxExport(
            role=Role.IMAGE_ENCODER,
            module=ImageTower(model),
            example={"pixel_values": torch.stack([preprocess(im) for im in images[:2]])},
            probe={"pixel_values": torch.stack([preprocess(im) for im in images[1:]])},
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            raw_golden={f"image:{i}": np.asarray(im) for i, im in enumerate(images[1:])},
            calibration={"pixel_values": torch.stack([preprocess(im) for im in images + _calibration_images(images)])},
            **gates,
        ),
    }


def _cut_gate(model: torch.nn.Module, tokenizer: Any, export: OnnxExport) -> ExtraGate:
    """The text graph on short texts cut after their longest end-of-text token, against open_clip's own
    ``encode_text`` on all 77 positions: what the run time does must give what open_clip gives."""
    full = tokenizer(CUT_PROBE_TEXTS)
    with torch.no_grad():
        reference = [model.encode_text(full).numpy()]
    cut = cut_after_eot(full.numpy())

    def gate(run: Any, variant: str) -> dict[str, Any]:
        figures = compare(reference, run.run(["text_embeds"], {"input_ids": cut}))
        fp32 = variant == Variant.FP32
        atol, min_cosine = (export.atol, export.min_cosine) if fp32 else (inf, export.int8_min_cosine)
        if figures["max_abs_diff"] > atol or figures["min_cosine"] < min_cosine:
            raise ToleranceMiss(
                f"text_encoder {variant} cut after end-of-text ({cut.shape[1]} of {full.shape[1]} positions) differs "
                f"from open_clip's encode_text: {figures} (allowed {atol:g}, cosine {min_cosine})"
            )
        return {"cut_positions": int(cut.shape[1]), **{f"cut_{k}": v for k, v in figures.items()}}

    return gate


def export_one(spec: ClipSpec, root: Path, options: ClipOptions) -> dict[str, Any]:
    """Export one CLIP model into ``root`` (a staging folder); returns its manifest entry. A failure is one
    ProducerError line naming the model and the stage."""
    try:
        return _export_one(spec, root, options)
    except ProducerError as exc:
        if str(exc).startswith(repr(spec.text)):  # already names the model (loading, tokenizer)
            raise
        raise type(exc)(f"{spec.text!r} ({STAGE}): {exc}") from exc  # ParityError stays one


def _export_one(spec: ClipSpec, root: Path, options: ClipOptions) -> dict[str, Any]:
    # load + tokenizer/preprocessing check, then per tower: export+gate (and int8+gate)
    with measured() as build, steps(f"CLIP {spec.key}", 1 + 2 * (2 if options.export.int8 else 1)) as done:
        log.info("CLIP %s: loading", spec.text)
        model, tokenizer, preprocess, source = load_clip(spec)
        pre = preprocessing(model) | {"text_clean": text_clean(tokenizer)}
        images = _probe_images(max(pre["image_size"]))
        tokenizer_path = _torch_free_inputs(root, spec.key, tokenizer, preprocess, pre, images)
        done("loaded, tokenizer + preprocessing checked")
        files = [file_entry(root, root / tokenizer_path, role=Role.TOKENIZER, fmt="json")] if tokenizer_path else []
        cut = text_cut(model, tokenizer)
        for tower, export in _towers(model, tokenizer, preprocess, images, options, cut).items():
            files += export_variants(
                export,
                clip_onnx_name(spec.key, tower),
                root,
                options.export,
                extra_gate=_cut_gate(model, tokenizer, export) if tower == "text" and cut else None,
                done=done,
            )
        if options.keep_pytorch:
            files.append(_save_pytorch(model, root, spec.key))
    embed = next(f for f in files if f["role"] == Role.TEXT_ENCODER)["outputs"][0]["shape"][-1]
    return model_record(
        STAGE,
        CLIP.name,
        spec.key,
        spec=spec.text,
        source=source,
        tools=TOOLS,
        files=files,
        # text_clean: runtime.clip.clean_text's mode (ftfy, HTML entities, strip, then the tokenizer's own)
        preprocessing={
            **pre,
            "tokenizer": tokenizer_path,
            "text_cut": cut,  # "eot": the run time may drop positions after the longest end-of-text token
        },
        details={"embed_dim": int(embed), "normalized": False, "architecture": spec.arch},
        build=build,
    )


def _save_pytorch(model: torch.nn.Module, root: Path, key: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    weights = root / CLIP_DIR / key / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return file_entry(root, weights, role=Role.PYTORCH_WEIGHTS, fmt="safetensors")


def run(out_root: Path, values: Values) -> list[dict[str, Any]]:
    """The clip-export stage: every selected model, all or nothing, plus the stage's manifest fragment."""
    specs = values["CLIP_MODELS"]
    options = ClipOptions.from_values(values)
    for spec in specs:  # all names, and whether each fits in memory, before the first (slow) export
        validate(spec)
        if (towers := tower_bytes(spec)) is not None:
            check_memory(f"CLIP {spec.text!r}", towers, options.export.int8)
    with staged_output(out_root) as staging:
        models = [export_one(spec, staging, options) for spec in specs]
        write_fragment(staging, STAGE, models)
    return models
