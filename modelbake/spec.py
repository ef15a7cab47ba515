"""Model specs: the strings users type in build args and CLI flags, and the file names they map to.

Grammar (one entry of a comma-separated list)::

    NAME                 a hub model; for CLIP an OpenCLIP or OpenAI name (``ViT-B-32``, ``ViT-B/32``)
    NAME:TAG             CLIP only: an OpenCLIP pretrained tag (``ViT-B-32:laion2b_s34b_b79k``)
    NAME@REVISION        reranker only: a pinned hub revision (branch, tag or commit)
    NAME@dir:PATH        a local folder (OpenCLIP ``local-dir`` layout, or a Hugging Face model folder);
                         NAME is then only the label used in file names
    NAME@file:PATH       CLIP only: a local checkpoint for the OpenCLIP architecture NAME
    NAME:TAG@file:PATH   CLIP only: a local copy of the pretrained tag's weights (air-gapped bundles): the
                         tag's preprocessing and activation apply, and the file names are the tag's

This module is torch-free: the bake driver and the run-time loaders use it too.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath

from modelbake.errors import ModelbakeError

# OpenAI spellings that users of the original system type, and the OpenCLIP architecture each means.
OPENAI_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
_OPENCLIP_TO_OPENAI = {v: k for k, v in OPENAI_NAMES.items()}

DEFAULT_CLIP_MODELS = "ViT-B/32,ViT-B/16,RN50"
DEFAULT_RERANKER_MODELS = "cross-encoder/ms-marco-MiniLM-L-6-v2"
DEFAULT_CLIP_TAG = "openai"

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
LOCAL_KINDS = ("dir", "file")


class SpecError(ModelbakeError, ValueError):
    """A model spec that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class LocalSource:
    kind: str  # "dir" or "file"
    path: str


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP model to export. ``arch`` is the OpenCLIP name, or the label of a local folder."""

    text: str
    arch: str
    tag: str | None
    local: LocalSource | None

    @property
    def key(self) -> str:
        """The name used in file names and the manifest (``ViT-B/32`` -> ``ViT-B_32``)."""
        base = _OPENCLIP_TO_OPENAI.get(self.arch, self.arch)
        if self.tag not in (None, DEFAULT_CLIP_TAG):
            base = f"{base}-{self.tag}"
        return base.replace("/", "_").replace("@", "_")


@dataclass(frozen=True)
class RerankerSpec:
    text: str
    repo: str
    revision: str | None
    local: LocalSource | None

    @property
    def key(self) -> str:
        """Folder name under ``models/reranker/`` (``org/name`` -> ``org__name``)."""
        return self.repo.replace("/", "__")


def _split_list(value: str) -> list[str]:
    items = [item.strip() for item in value.replace("\n", ",").split(",")]
    return [item for item in items if item]


def _split_local(text: str) -> tuple[str, LocalSource | None, str | None]:
    """Split ``NAME@dir:PATH`` / ``NAME@file:PATH`` / ``NAME@REVISION``."""
    if "@" not in text:
        return text, None, None
    name, _, rest = text.partition("@")
    kind, sep, path = rest.partition(":")
    if sep and kind in LOCAL_KINDS:
        if not path:
            raise SpecError(f"{text!r}: empty path after '{kind}:'; write {name}@{kind}:/path/to/source")
        return name, LocalSource(kind, path), None
    return name, None, rest


def parse_clip(text: str) -> ClipSpec:
    text = text.strip()
    # ViT-L/14@336px is an OpenAI name, not NAME@REVISION.
    if text in OPENAI_NAMES:
        return ClipSpec(text, OPENAI_NAMES[text], DEFAULT_CLIP_TAG, None)
    name, local, revision = _split_local(text)
    if revision is not None:
        raise SpecError(
            f"{text!r}: CLIP specs take a pretrained tag after ':' (ViT-B-32:openai) "
            "or a local source after '@' (NAME@dir:PATH, NAME@file:PATH)"
        )
    name, _, tag = name.partition(":")
    if not name or not _LABEL.match(name):
        raise SpecError(f"{text!r}: a CLIP spec starts with a model name such as ViT-B-32 or ViT-B/32")
    arch = OPENAI_NAMES.get(name, name)
    if local is not None:
        if tag and local.kind == "dir":
            raise SpecError(f"{text!r}: a folder brings its own config; a pretrained tag goes with @file: only")
        return ClipSpec(text, arch, tag or None, local)
    return ClipSpec(text, arch, tag or DEFAULT_CLIP_TAG, None)


def parse_reranker(text: str) -> RerankerSpec:
    text = text.strip()
    name, local, revision = _split_local(text)
    if local is not None and local.kind != "dir":
        raise SpecError(f"{text!r}: a reranker source is a folder; write {name}@dir:PATH")
    if not name or not _LABEL.match(name) or PurePosixPath(name).is_absolute():
        raise SpecError(f"{text!r}: a reranker spec is a hub id such as cross-encoder/ms-marco-MiniLM-L-6-v2")
    return RerankerSpec(text, name, revision, local)


@lru_cache(maxsize=1)
def openclip_architectures() -> frozenset[str]:
    """OpenCLIP's architecture names: the pinned open_clip release's, recorded in
    ``modelbake/data/openclip_architectures.json`` so a name is checked where open_clip is not installed (the
    bake driver's set), plus those of an installed open_clip (its model_configs/, read without importing it)."""
    names = set(json.loads(resources.files("modelbake.data").joinpath("openclip_architectures.json").read_text()))
    found = importlib.util.find_spec("open_clip")
    if found is not None and found.origin:
        names |= {p.stem for p in (Path(found.origin).parent / "model_configs").glob("*.json")}
    return frozenset(names)


def suggest(name: str, valid: Iterable[str]) -> str:
    """Up to five close names (else the first dozen), for a "did you mean" line."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(valid[:12]) + ", ..."


def check_clip_architecture(spec: ClipSpec) -> None:
    """Refuse, before any download, an OpenCLIP architecture that does not exist (a local folder's own
    ``open_clip_config.json`` defines its architecture: not checked here)."""
    if spec.local is not None and spec.local.kind == "dir":
        return
    if spec.arch not in (known := openclip_architectures()):
        raise SpecError(
            f"{spec.text!r}: unknown OpenCLIP architecture {spec.arch!r}; close names: {suggest(spec.arch, known)}"
        )


def parse_clip_list(value: str) -> list[ClipSpec]:
    specs = [parse_clip(item) for item in _split_list(value)]
    if not specs:
        raise SpecError("no CLIP model selected; set CLIP_MODELS (e.g. ViT-B/32) or skip the stage")
    keys = [spec.key for spec in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise SpecError(f"CLIP selection names {', '.join(duplicates)} twice; list each model once")
    return specs


def parse_reranker_list(value: str) -> list[RerankerSpec]:
    specs = [parse_reranker(item) for item in _split_list(value)]
    if not specs:
        raise SpecError("no reranker selected; set RERANKER_MODELS (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2)")
    return specs


# --- file names (the seed's convention; services auto-detect these) ---------------------------

CLIP_TOWERS = ("text", "image")


def clip_onnx_name(key: str, tower: str) -> str:
    """``clip_ViT-B_32_text_encoder.onnx``: the names services of the original system look for."""
    if tower not in CLIP_TOWERS:
        raise ValueError(f"tower must be one of {CLIP_TOWERS}, not {tower!r}")
    return f"clip_{key}_{tower}_encoder.onnx"


def reranker_onnx_name(key: str) -> str:
    return f"reranker_{key}.onnx"


def variant_name(onnx_name: str, variant: str) -> str:
    """``x.onnx`` for fp32, ``x_int8.onnx`` for int8: variants sit beside their fp32 graph."""
    return onnx_name if variant == "fp32" else onnx_name.removesuffix(".onnx") + f"_{variant}.onnx"


def external_data_name(onnx_name: str) -> str:
    """``x.onnx.data``: the weights of a graph too large for one file, beside it (ONNX external data)."""
    return f"{onnx_name}.data"


def golden_path(onnx_name: str) -> str:
    """Where the golden probe file of an ONNX graph lives, relative to the models root."""
    return f"{GOLDEN_DIR}/{PurePosixPath(onnx_name).stem}.npz"


# OpenAI CLIP's image normalisation: what the original system's services assumed without a manifest.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_ONNX_PATTERN = re.compile(r"^clip_(?P<key>.+)_(?P<tower>text|image)_encoder\.onnx$")

# Folders of the model tree (relative to the models root) and the manifest's name.
MANIFEST_NAME = "model_manifest.json"
# Beside the manifest when the tree is signed (modelbake/signature.py): a Sigstore bundle over every file.
SIGNATURE_NAME = "model.sig"
ONNX_DIR = "onnx"
CLIP_DIR = "clip"
RERANKER_DIR = "reranker"
REGRESSOR_DIR = "regressor"
FRAGMENTS_DIR = ".manifest.d"
GOLDEN_DIR = "golden"
# In a bundled hub model's folder: where it came from ({"type": "hub", "id": ..., "revision": commit}).
ORIGIN_FILE = "modelbake_origin.json"

REGRESSOR_PTH = "boundary_regressor_pretrained.pth"
REGRESSOR_SAFETENSORS = "boundary_regressor_pretrained.safetensors"
REGRESSOR_ONNX = "boundary_regressor.onnx"
# The seed's look-up order for the regressor's weights, relative to the model folder.
REGRESSOR_LOOKUP = (
    REGRESSOR_PTH,
    "boundary_regressor.pth",
    f"{REGRESSOR_DIR}/{REGRESSOR_PTH}",
)
# The same order for services without torch: the ONNX export first, then ONNX twins of the seed's paths.
REGRESSOR_ONNX_LOOKUP = (
    f"{ONNX_DIR}/{REGRESSOR_ONNX}",
    REGRESSOR_ONNX,
    *(path.removesuffix(".pth") + ".onnx" for path in REGRESSOR_LOOKUP),
)
