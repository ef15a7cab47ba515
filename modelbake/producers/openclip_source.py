"""An OpenCLIP model from its spec, in one place: name -> config -> weights -> tokenizer, whatever the source
(the hub ``ViT-B-32:openai``, a checkpoint file ``ViT-B-32@file:PATH``, an OpenCLIP local-dir
``NAME@dir:PATH``), and the facts the export contract reads off the loaded model (its preprocessing, its
text cleaning, whether its text tower may be cut after end-of-text). As open_clip's own ``factory.py``
keeps them together; used by the clip-export stage, the regressor stage (the embedding size) and the
memory check. open_clip is imported inside each function: importing this module costs torch only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelbake.errors import first_line
from modelbake.manifest import sha256_file
from modelbake.producers.common import ProducerError, log
from modelbake.spec import ClipSpec, SpecError, check_clip_architecture


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
