"""clip-export: OpenCLIP models -> separate text and image ONNX encoders, checked against PyTorch.

name -> config -> weights happens in one place (:func:`load_clip`), whatever the source: the hub
(``ViT-B-32:openai``), a checkpoint file (``ViT-B-32@file:PATH``) or an OpenCLIP local-dir
(``NAME@dir:PATH``). Every model then goes through the generic loop in ``onnx_export``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modelbake.errors import first_line
from modelbake.fs import staged_output
from modelbake.manifest import Role, Variant, file_entry, sha256_file, write_fragment
from modelbake.producers import Values
from modelbake.producers.common import (
    ProducerError,
    check_memory,
    log,
    measured,
    model_record,
)
from modelbake.producers.onnx_export import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_BYTES,
    ExtraGate,
    OnnxExport,
    ToleranceMiss,
    compare,
    export_variants,
)
from modelbake.producers.progress import steps
from modelbake.runtime.clip import cut_after_eot
from modelbake.runtime.sessions import session
from modelbake.spec import CLIP_DIR, ClipSpec, SpecError, check_clip_architecture, clip_onnx_name, parse_clip_list

STAGE = "clip-export"
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


class _TextTower(torch.nn.Module):
    """``encode_text``; with ``cut``, the same computation on as many positions as ``input_ids`` has.

    CLIP's text tower is causal and pools at the end-of-text token, so the positions after the longest
    end-of-text token of a batch change nothing: the run time drops them and the graph takes a dynamic
    sequence axis. nn.MultiheadAttention's export bakes the length 77 into a Reshape, so attention is
    written out here with the same weights. The gate proves the outputs equal open_clip's 77-position
    ``encode_text`` (ViT-B/32, an 11-token query: 9.9 ms instead of 73 ms).
    """

    def __init__(self, clip: torch.nn.Module, cut: bool) -> None:
        super().__init__()
        self.clip, self.cut = clip, cut

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.cut:
            return self.clip.encode_text(input_ids)
        from open_clip.transformer import text_global_pool

        clip, n = self.clip, input_ids.shape[1]
        x = clip.token_embedding(input_ids) + clip.positional_embedding[:n]
        mask = clip.attn_mask[:n, :n]
        for block in clip.transformer.resblocks:
            x = x + block.ls_1(_attention(block.attn, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = text_global_pool(clip.ln_final(x), input_ids, clip.text_pool_type)
        if isinstance(clip.text_projection, torch.nn.Linear):
            return clip.text_projection(x)
        return x if clip.text_projection is None else x @ clip.text_projection


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's self-attention (batch first, additive mask), with every size traced."""
    b, n, d = x.shape
    heads = attn.num_heads
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5 + mask
    return attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def text_cut(model: torch.nn.Module, tokenizer: Any) -> str | None:
    """``"eot"`` when the text tower may be cut after the longest end-of-text token: open_clip's CLIP text
    tower (causal mask, argmax pooling, plain residual attention blocks) with its CLIP tokenizer, whose
    end-of-text id is the largest. Other families (SigLIP pads to its length, no causal mask) keep 77."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    transformer = getattr(model, "transformer", None)
    plain = type(transformer) is Transformer and getattr(transformer, "batch_first", False)
    blocks = plain and all(
        type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in transformer.resblocks
    )
    clip_style = type(model) is open_clip.CLIP and getattr(model, "text_pool_type", None) == "argmax"
    causal = getattr(model, "attn_mask", None) is not None
    return "eot" if blocks and clip_style and causal and isinstance(tokenizer, SimpleTokenizer) else None


class _ImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)


def validate(spec: ClipSpec) -> None:
    """Fail before any download when the architecture or tag is unknown to OpenCLIP."""
    try:
        check_clip_architecture(spec)
    except SpecError as exc:
        raise ProducerError(str(exc)) from exc
    if spec.tag is not None and (spec.local is None or spec.local.kind != "dir"):
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.tag not in tags:
            raise ProducerError(
                f"{spec.text!r}: {spec.arch} has no pretrained tag {spec.tag!r}; "
                f"valid tags: {', '.join(tags) or 'none'}"
            )


def model_cfg(spec: ClipSpec) -> dict[str, Any]:
    """OpenCLIP's model config of a spec (a local-dir's open_clip_config.json, else the architecture's), a
    fresh copy the caller may change."""
    import json

    import open_clip

    if spec.local is not None and spec.local.kind == "dir":
        config_path = Path(spec.local.path) / "open_clip_config.json"
        if not config_path.is_file():
            raise ProducerError(f"{spec.text!r}: {config_path} does not exist; mount the model sources at that path")
        return json.loads(config_path.read_text())["model_cfg"]
    return open_clip.get_model_config(spec.arch) or {}


def embed_dim(spec: ClipSpec) -> int:
    """The embedding size of a CLIP spec, read from its config without building the model."""
    validate(spec)
    return int(model_cfg(spec)["embed_dim"])


def load_clip(spec: ClipSpec) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model, tokenizer, eval preprocess, source record) for any spec: the one place name -> config ->
    weights happens."""
    import open_clip

    validate(spec)
    source: dict[str, Any]
    if spec.local is None:
        name, pretrained = spec.arch, spec.tag
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag) or {}
        source = {
            "type": "hub",
            "id": f"{spec.arch}:{spec.tag}",
            "revision": None,
            "hf_hub": cfg.get("hf_hub", ""),
            "url": cfg.get("url", ""),
        }
    else:
        path = Path(spec.local.path)
        if not path.exists():
            raise ProducerError(f"{spec.text!r}: {path} does not exist; mount the model sources at that path")
        if spec.local.kind == "dir":
            name, pretrained = _open_clip_name(spec), None
            files = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
            source = {"type": "dir", "id": str(path), "files": files}
        else:
            name, pretrained = spec.arch, str(path)
            source = {"type": "file", "id": str(path), "sha256": sha256_file(path)}
            source |= {"tag": f"{spec.arch}:{spec.tag}"} if spec.tag else {}
    tokenizer = load_tokenizer(spec)  # before the weights: a missing tokenizer fails in a second, not minutes
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device="cpu", **tag_settings(spec)
        )
    except Exception as exc:  # open_clip reports a mismatch as RuntimeError, AssertionError, KeyError, ...
        raise ProducerError(
            f"{spec.text!r}: OpenCLIP could not load it ({first_line(exc)}); "
            "check that the checkpoint belongs to this architecture"
        ) from exc
    return model.eval(), tokenizer, preprocess, source


def _open_clip_name(spec: ClipSpec) -> str:
    return f"local-dir:{spec.local.path}" if spec.local is not None and spec.local.kind == "dir" else spec.arch


def tokenizer_folder(spec: ClipSpec) -> Path | None:
    """A local copy of a Hugging Face tokenizer for a checkpoint file: the folder ``tokenizer`` beside it."""
    if spec.local is None or spec.local.kind != "file":
        return None
    folder = Path(spec.local.path).parent / "tokenizer"
    return folder if folder.is_dir() else None


def load_tokenizer(spec: ClipSpec) -> Any:
    """open_clip's tokenizer for ``spec``; a Hugging Face one (SigLIP's) from a local folder when there is one
    (a local-dir's own files, or ``tokenizer/`` beside a checkpoint file), else from the hub. One line naming
    what to provide when it cannot be had."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text_cfg = model_cfg(spec).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name", "")
    try:
        folder = tokenizer_folder(spec) if hub_name else None
        if folder is not None:  # what open_clip.get_tokenizer builds, from the local folder instead of the hub
            return HFTokenizer(
                str(folder),
                context_length=text_cfg.get("context_length", 77),
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **text_cfg.get("tokenizer_kwargs", {}),
            )
        return open_clip.get_tokenizer(_open_clip_name(spec))
    except Exception as exc:  # transformers / huggingface_hub raise many types for a missing tokenizer
        where = (
            f"its folder {spec.local.path} (beside open_clip_config.json)"
            if spec.local is not None and spec.local.kind == "dir"
            else f"a folder 'tokenizer' beside {spec.local.path}"
            if spec.local is not None
            else "a folder 'tokenizer' beside a local checkpoint (ARCH@file:PATH)"
        )
        raise ProducerError(
            f"{spec.text!r}: its tokenizer ({hub_name or 'open_clip'}) could not be loaded ({first_line(exc)}); "
            "build with access to the hub once, or put the tokenizer's files (tokenizer.json, "
            f"tokenizer_config.json, ...) in {where}"
        ) from exc


def tower_bytes(spec: ClipSpec) -> list[int] | None:
    """The fp32 bytes of the image tower and of the rest (the text tower's graph), counted on PyTorch's meta
    device (the config only: no weights, no memory); None when the model cannot be built that way (a
    Hugging Face text tower needs its hub config)."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    try:
        with torch.device("meta"):
            if spec.local is not None and spec.local.kind == "dir":
                cfg = model_cfg(spec)
                model = (CustomTextCLIP if cfg.pop("custom_text", False) else CLIP)(**cfg)
            else:
                model = open_clip.create_model(spec.arch, device="meta")
        visual = sum(p.numel() for p in model.visual.parameters())
    except Exception as exc:  # a prediction only: the export itself still reports what went wrong
        log.debug("CLIP %s: parameters not counted (%s)", spec.text, exc)
        return None
    return [4 * visual, 4 * (sum(p.numel() for p in model.parameters()) - visual)]


def tag_settings(spec: ClipSpec) -> dict[str, Any]:
    """What a pretrained tag sets beyond its weights, for a local copy of them (``ARCH:TAG@file:PATH``):
    QuickGELU (the OpenAI weights) and the image preprocessing. Loading by tag from the hub applies them
    itself; a bare checkpoint file would silently get the architecture's defaults instead."""
    import open_clip

    if spec.local is None or spec.tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag) or {}
    settings = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if cfg.get(key) is not None:
            settings[f"image_{key}"] = cfg[key]
    return settings


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
    """The clip-export stage's parameters (modelbake.params), typed."""

    opset: int = DEFAULT_OPSET
    keep_pytorch: bool = False
    int8: bool = False
    atol: float = 1e-3
    min_cosine: float = 0.999
    int8_min_cosine: float = 0.99
    int8_ship: str = "faster"
    int8_required: bool = False
    external_data_bytes: int = EXTERNAL_DATA_BYTES

    @classmethod
    def from_values(cls, values: Values) -> ClipOptions:
        return cls(
            opset=values["ONNX_OPSET"],
            keep_pytorch=values["CLIP_KEEP_PYTORCH"],
            int8=values["CLIP_INT8"],
            atol=values["CLIP_PARITY_ATOL"],
            min_cosine=values["CLIP_PARITY_MIN_COSINE"],
            int8_min_cosine=values["CLIP_INT8_MIN_COSINE"],
            int8_ship=values["INT8_SHIP"],
            int8_required=values["INT8_REQUIRED"],
            external_data_bytes=values["ONNX_EXTERNAL_DATA_BYTES"],
        )


def text_clean(tokenizer: Any) -> str | None:
    """The run time's name of ``tokenizer``'s text cleaning (runtime.clip.TEXT_CLEAN), or None when the
    tokenizer has no torch-free twin yet."""
    from open_clip import tokenizer as oc

    if isinstance(tokenizer, oc.SimpleTokenizer):
        return "clip"
    if isinstance(tokenizer, oc.HFTokenizer) and not tokenizer.tokenizer_mode and not tokenizer.strip_sep_token:
        names = {oc._clean_canonicalize: "canonicalize", oc._clean_lower: "lower", oc._clean_whitespace: "whitespace"}
        return names.get(tokenizer.clean_fn)
    return None


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
    model: torch.nn.Module, tokenizer: Any, preprocess: Any, images: list[Image.Image], options: ClipOptions
) -> dict[str, OnnxExport]:
    """The two encoders, described for the generic export loop (example batch 2, probe batch 4 / 3)."""
    gates = {"atol": options.atol, "min_cosine": options.min_cosine}
    cut = text_cut(model, tokenizer)
    return {
        "text": OnnxExport(
            role=Role.TEXT_ENCODER,
            module=_TextTower(model, cut is not None),
            example={"input_ids": tokenizer(EXAMPLE_TEXTS)},
            probe={"input_ids": tokenizer(PROBE_TEXTS)},
            output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch", **({1: "sequence"} if cut else {})}, "text_embeds": {0: "batch"}},
            raw_golden={"text": np.asarray(PROBE_TEXTS)},
            **gates,
        ),
        "image": OnnxExport(
            role=Role.IMAGE_ENCODER,
            module=_ImageTower(model),
            example={"pixel_values": torch.stack([preprocess(im) for im in images[:2]])},
            probe={"pixel_values": torch.stack([preprocess(im) for im in images[1:]])},
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            raw_golden={f"image:{i}": np.asarray(im) for i, im in enumerate(images[1:])},
            calibration={"pixel_values": torch.stack([preprocess(im) for im in images + _calibration_images(images)])},
            **gates,
        ),
    }


def _cut_gate(model: torch.nn.Module, tokenizer: Any, options: ClipOptions) -> ExtraGate:
    """The text graph on short texts cut after their longest end-of-text token, against open_clip's own
    ``encode_text`` on all 77 positions: what the run time does must give what open_clip gives."""
    full = tokenizer(CUT_PROBE_TEXTS)
    with torch.no_grad():
        reference = [model.encode_text(full).numpy()]
    cut = cut_after_eot(full.numpy())

    def gate(graph: Path, variant: Variant) -> dict[str, Any]:
        figures = compare(reference, session(graph).run(["text_embeds"], {"input_ids": cut}))
        fp32 = variant == Variant.FP32
        atol, min_cosine = (options.atol, options.min_cosine) if fp32 else (inf, options.int8_min_cosine)
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
    with measured() as build, steps(f"CLIP {spec.key}", 1 + 2 * (2 if options.int8 else 1)) as done:
        log.info("CLIP %s: loading", spec.text)
        model, tokenizer, preprocess, source = load_clip(spec)
        pre = preprocessing(model) | {"text_clean": text_clean(tokenizer)}
        images = _probe_images(max(pre["image_size"]))
        tokenizer_path = _torch_free_inputs(root, spec.key, tokenizer, preprocess, pre, images)
        done("loaded, tokenizer + preprocessing checked")
        files = [file_entry(root, root / tokenizer_path, role=Role.TOKENIZER, fmt="json")] if tokenizer_path else []
        cut = text_cut(model, tokenizer)
        for tower, export in _towers(model, tokenizer, preprocess, images, options).items():
            files += export_variants(
                export,
                clip_onnx_name(spec.key, tower),
                root,
                opset=options.opset,
                int8=options.int8,
                int8_min_cosine=options.int8_min_cosine,
                int8_ship=options.int8_ship,
                int8_required=options.int8_required,
                external_data_bytes=options.external_data_bytes,
                extra_gate=_cut_gate(model, tokenizer, options) if tower == "text" and cut else None,
                done=done,
            )
        if options.keep_pytorch:
            files.append(_save_pytorch(model, root, spec.key))
    embed = next(f for f in files if f["role"] == Role.TEXT_ENCODER)["outputs"][0]["shape"][-1]
    return model_record(
        STAGE,
        "clip",
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
    specs = parse_clip_list(values["CLIP_MODELS"])
    options = ClipOptions.from_values(values)
    for spec in specs:  # all names, and whether each fits in memory, before the first (slow) export
        validate(spec)
        if (towers := tower_bytes(spec)) is not None:
            check_memory(f"CLIP {spec.text!r}", towers, options.int8)
    with staged_output(out_root) as staging:
        models = [export_one(spec, staging, options) for spec in specs]
        write_fragment(staging, STAGE, models)
    return models
