"""CLIP at run time without torch or open_clip: tokenizer, image preprocessing, ONNX encoders.

The tokenizer and the preprocessing reproduce open_clip's exactly (checked at build time against
open_clip on a probe set, and by ``verify`` against the golden inputs).
"""

from __future__ import annotations

import html
import io
import string
import struct
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from modelbake.kinds import CLIP
from modelbake.manifest import Role, Variant, read_listed, require_manifest, resolve_inside
from modelbake.runtime.registry import Loader, register_loader
from modelbake.runtime.sessions import session

ImageInput = Image.Image | str | Path | np.ndarray
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# open_clip's text cleaning by name (the manifest's ``preprocessing.text_clean``): "clip" for its own BPE
# tokenizer, the others are HFTokenizer's ``clean`` settings (SigLIP: canonicalize).
TEXT_CLEAN = ("clip", "whitespace", "lower", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_text(text: str, mode: str = "clip") -> str:
    """open_clip's cleaning: ftfy, HTML entities (twice), strip; then per ``mode`` whitespace collapsed,
    lower case, or (canonicalize, big_vision's) underscores as spaces, ASCII punctuation removed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    if mode != "clip":
        text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


def cut_after_eot(ids: np.ndarray) -> np.ndarray:
    """Token ids without the columns after the batch's longest end-of-text token (the largest id of each
    row, where open_clip pools): a causal text tower gives the same embeddings on fewer positions."""
    return ids[:, : int(ids.argmax(axis=1).max()) + 1] if len(ids) else ids


class ClipTokenizer:
    """``tokenizer(texts) -> (n, context_length) int64``, id-exact with open_clip's tokenizer."""

    def __init__(self, tokenizer_json: Path | bytes, context_length: int, clean: str = "clip") -> None:
        """``tokenizer_json``: the file, or its contents."""
        from tokenizers import Tokenizer

        if clean not in TEXT_CLEAN:
            raise ValueError(f"text_clean {clean!r} is not one of {', '.join(TEXT_CLEAN)}; rebuild with this modelbake")
        if isinstance(tokenizer_json, bytes):
            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode())
        else:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.context_length, self.clean = context_length, clean
        self.pad_id = int((self.tokenizer.padding or {}).get("pad_id", 0))

    @classmethod
    def of(cls, root: Path, model: dict[str, Any], *, checked: bool = True) -> ClipTokenizer | None:
        """The tokenizer a CLIP ``model``'s preprocessing names (read once and hashed, :func:`read_listed`;
        ``checked=False`` only for files found by name without a manifest), or None when none shipped."""
        pre = model["preprocessing"]
        if not (path := pre.get("tokenizer")):
            return None
        data = read_listed(root, model, path, by="its preprocessing") if checked else resolve_inside(root, path)
        return cls(data, pre["context_length"], pre.get("text_clean", "clip"))

    def __call__(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        encodings = self.tokenizer.encode_batch([clean_text(t, self.clean) for t in texts])
        ids = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids[: self.context_length]
        return ids


# Limits on an image before it is decoded or resized, like PIL's Image.MAX_IMAGE_PIXELS: module-wide defaults
# a service may change at start-up, or per call through preprocess_image's arguments. 64 M pixels holds a
# 50-megapixel photo; a bomb (a tiny file that decodes to gigabytes) is refused from its header. The aspect
# ratio bounds what resizing the short side makes of the long one (a 100000x1 strip would become about
# 22.4M x 224 pixels); 256:1 keeps the build's own probe strip (9 x 4*size pixels, 228:1 at size 512).
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 256.0
# A progressive JPEG decodes each of its scans over the whole image, and a scan can cost 31 bytes: 6,000 of
# them in 280 KB held a worker for minutes, past any request timeout (a decode cannot be interrupted).
# Encoders write about 10; libjpeg-turbo's own tools suggest a limit of this order.
MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # start of scan: 0xFF then 0xDA never occurs inside entropy-coded data (0xFF is stuffed)


def check_image_size(
    width: int, height: int, max_pixels: int | None = None, max_aspect_ratio: float | None = None
) -> None:
    """Refuse an image of ``width`` x ``height`` that is empty, over ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`) or longer than ``max_aspect_ratio``:1 (default :data:`MAX_ASPECT_RATIO`)."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_aspect_ratio = MAX_ASPECT_RATIO if max_aspect_ratio is None else max_aspect_ratio
    if width < 1 or height < 1:
        raise ValueError(f"an image must have at least one pixel; got {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(
            f"an image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels "
            "(max_pixels, modelbake.runtime.clip.MAX_IMAGE_PIXELS)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ValueError(
            f"an image of {width}x{height} has an aspect ratio of {ratio:.0f}:1, over the limit of "
            f"{max_aspect_ratio:g}:1 (max_aspect_ratio, modelbake.runtime.clip.MAX_ASPECT_RATIO)"
        )


def _decode(source: Any, max_pixels: int | None, max_aspect_ratio: float | None) -> Image.Image:
    """Open a path or encoded bytes, check the size from the header, then decode."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours: name ours
        raise ValueError(f"an image over the limit of {max_pixels or MAX_IMAGE_PIXELS} pixels ({exc})") from exc
    with img:
        check_image_size(*img.size, max_pixels, max_aspect_ratio)
        if img.format == "JPEG":
            _check_jpeg_scans(source)
        img.load()
        return img


def _check_jpeg_scans(source: Any) -> None:
    """Refuse a JPEG with more than MAX_JPEG_SCANS scans, before it is decoded (an embedded thumbnail's
    scans count too: a few at most)."""
    if isinstance(source, io.BytesIO):
        scans = source.getvalue().count(_SOS)
    else:
        with open(source, "rb") as fh:
            scans = fh.read().count(_SOS)
    if scans > MAX_JPEG_SCANS:
        raise ValueError(
            f"a JPEG of {scans} scans is over the limit of {MAX_JPEG_SCANS} (modelbake.runtime.clip.MAX_JPEG_SCANS): "
            "each scan decodes the whole image again; re-encode it (baseline, or progressive with a standard script)"
        )


def _open(image: ImageInput, max_pixels: int | None = None, max_aspect_ratio: float | None = None) -> Image.Image:
    if isinstance(image, Image.Image):
        check_image_size(*image.size, max_pixels, max_aspect_ratio)
        return image
    if isinstance(image, (str, Path)):
        return _decode(image, max_pixels, max_aspect_ratio)
    if isinstance(image, (bytes, bytearray, memoryview)):  # an encoded file (PNG, JPEG, ...) in memory
        try:
            return _decode(io.BytesIO(image), max_pixels, max_aspect_ratio)
        except (OSError, SyntaxError, EOFError, struct.error, zlib.error) as exc:  # PIL's errors on corrupt data
            raise ValueError(f"cannot decode the image: {exc}") from exc
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        check_image_size(image.shape[1], image.shape[0], max_pixels, max_aspect_ratio)
        return Image.fromarray(image)
    raise TypeError(f"an image must be a PIL image, a path, encoded bytes or a uint8 array, not {type(image).__name__}")


def preprocess_image(
    image: ImageInput, cfg: dict[str, Any], *, max_pixels: int | None = None, max_aspect_ratio: float | None = None
) -> np.ndarray:
    """One image -> (3, H, W) float32, as open_clip's eval transform (resize, center crop, RGB, normalise).

    An image over ``max_pixels`` or ``max_aspect_ratio`` (defaults: :data:`MAX_IMAGE_PIXELS`,
    :data:`MAX_ASPECT_RATIO`) is refused with a ValueError before it is decoded or resized.
    """
    img = _open(image, max_pixels, max_aspect_ratio)
    height, width = cfg["image_size"]
    resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
    mode = cfg.get("resize_mode", "shortest")
    w, h = img.size
    if mode == "squash":
        img = img.resize((width, height), resample)
    elif mode == "shortest" and height == width:
        # torchvision's Resize(int): the short side to `size`, the long side scaled and truncated.
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = height, int(height * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        img = _center_crop(img, height, width)
    else:
        raise ValueError(f"resize_mode {mode!r} with size {cfg['image_size']} is not supported at run time yet")
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg["mean"], dtype=np.float32)) / np.asarray(cfg["std"], dtype=np.float32)
    return arr.transpose(2, 0, 1).astype(np.float32)


def _center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    w, h = img.size
    if w < width or h < height:  # torchvision pads with zeros first
        padded = Image.new(img.mode, (max(w, width), max(h, height)))
        padded.paste(img, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
        img, (w, h) = padded, padded.size
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)  # as torchvision: round half to even
    return img.crop((left, top, left + width, top + height))


@register_loader
class ClipEncoder(Loader):
    """A CLIP model of a model tree: ``encode_text(texts)`` and ``encode_image(images)`` -> (n, embed_dim).

    Embeddings are L2-normalised unless ``normalize=False`` (the ONNX graphs return raw projections).
    """

    kind = CLIP.name
    variants = (Variant.FP32, Variant.INT8)
    ROLES: ClassVar[dict[str, Role]] = {"text": Role.TEXT_ENCODER, "image": Role.IMAGE_ENCODER}

    def __init__(self, folder: Path, model: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(folder, model, **kwargs)
        self.preprocessing = model["preprocessing"]
        self.sessions = {tower: self.onnx_session(model, role) for tower, role in self.ROLES.items()}
        self.tokenizer = ClipTokenizer.of(folder, model, checked=not self.unverified)

    @classmethod
    def from_folder(
        cls, folder: Path | str, name: str | None = None, *, allow_unverified: bool = False, **kwargs: Any
    ) -> ClipEncoder:
        """The CLIP model ``name`` (default: the first listed) of the tree at ``folder``, files checked.

        A folder without a manifest is refused, unless ``allow_unverified`` (or $MODELBAKE_ALLOW_UNVERIFIED=1):
        then it is searched as the original services did (see :func:`detect`), nothing verified.
        """
        folder = Path(folder)
        if not require_manifest(folder, allow_unverified, expected_sha256=kwargs.get("manifest_sha256")):
            return cls(folder, detect(folder, name), unverified=True, **kwargs)
        return super().from_folder(folder, name, **kwargs)

    @classmethod
    def replay(
        cls, root: Path, model: dict[str, Any], entry: dict[str, Any], golden: dict[str, np.ndarray]
    ) -> tuple[bool, str] | None:
        """The tokenizer on the probe texts, or the preprocessing on the probe images, against the golden inputs."""
        pre = model.get("preprocessing", {})
        if "raw:text" in golden and pre.get("tokenizer"):
            ids = ClipTokenizer.of(root, model)(list(golden["raw:text"]))
            same = np.array_equal(ids, golden["input:input_ids"])
            return same, f"tokenizer ids {'identical' if same else 'DIFFER'} on {len(ids)} probe texts"
        images = [golden[k] for k in sorted(golden) if k.startswith("raw:image:")]
        if not images:
            return None
        pixels = np.stack([preprocess_image(im, pre) for im in images])
        worst = float(np.max(np.abs(pixels - golden["input:pixel_values"])))
        return worst <= 1e-5, f"preprocessing of {len(images)} probe images, max|diff| {worst:.1e}"

    @property
    def embed_dim(self) -> int:
        """The embedding size (the text graph's output width)."""
        return int(self.sessions["text"].get_outputs()[0].shape[-1])

    @staticmethod
    def _normalise(x: np.ndarray, normalize: bool) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if normalize else x

    def encode_text(self, texts: list[str], *, normalize: bool = True, batch_size: int = 64) -> np.ndarray:
        if self.tokenizer is None:
            raise RuntimeError(f"CLIP {self.name}: the build shipped no tokenizer; pass token ids to the ONNX model")
        ids = self.tokenizer(texts)
        cut = cut_after_eot if self.preprocessing.get("text_cut") == "eot" else (lambda batch: batch)
        out = [
            self.sessions["text"].run(None, {"input_ids": cut(ids[i : i + batch_size])})[0]
            for i in range(0, len(ids), batch_size)
        ]
        return self._normalise(np.concatenate(out) if out else np.zeros((0, 0), np.float32), normalize)

    def encode_image(self, images: list[ImageInput], *, normalize: bool = True, batch_size: int = 16) -> np.ndarray:
        if not isinstance(images, (list, tuple)):
            raise TypeError("images must be a list of PIL images, paths or uint8 arrays")
        out = []
        for i in range(0, len(images), batch_size):
            pixels = np.stack([preprocess_image(im, self.preprocessing) for im in images[i : i + batch_size]])
            out.append(self.sessions["image"].run(None, {"pixel_values": pixels})[0])
        return self._normalise(np.concatenate(out) if out else np.zeros((0, 0), np.float32), normalize)


def detected_pairs(folder: Path) -> dict[str, dict[str, Path]]:
    """``{model: {"text": path, "image": path}}`` for every complete pair named by the seed's convention."""
    from modelbake.spec import CLIP_ONNX_PATTERN, ONNX_DIR

    found: dict[str, dict[str, Path]] = {}
    for directory in (folder / ONNX_DIR, folder):
        for path in sorted(directory.glob("clip_*_encoder.onnx")):
            match = CLIP_ONNX_PATTERN.match(path.name)
            if match:
                found.setdefault(match["key"], {}).setdefault(match["tower"], path)
    return {key: towers for key, towers in sorted(found.items()) if set(towers) == {"text", "image"}}


def detect(folder: Path, name: str | None = None) -> dict[str, Any]:
    """A model entry for ONNX files found by the original naming convention, without a manifest.

    ``clip_<model>_{text,image}_encoder.onnx`` in ``folder/onnx/`` or ``folder``; the image size and
    context length come from the graphs' input shapes, mean/std are OpenAI's, the tokenizer is
    ``clip/<model>/tokenizer.json`` when present. Nothing is verified: there are no digests to check.
    """
    import logging

    from modelbake.spec import CLIP_DIR, OPENAI_MEAN, OPENAI_STD

    pairs = detected_pairs(folder)
    if name is not None:
        pairs = {key: towers for key, towers in pairs.items() if key == name}
    if not pairs:
        raise LookupError(
            f"no manifest in {folder} and no clip_<model>_text_encoder.onnx + clip_<model>_image_encoder.onnx pair"
            + (f" for {name!r}" if name else "")
            + "; build the models with modelbake or point at the folder holding them"
        )
    key, towers = next(iter(sorted(pairs.items())))
    sessions = {t: session(p) for t, p in towers.items()}
    height, width = sessions["image"].get_inputs()[0].shape[2:]
    tokenizer = folder / CLIP_DIR / key / "tokenizer.json"
    logging.getLogger("modelbake").warning("CLIP %s: no manifest in %s, files are not verified", key, folder)
    return {
        "name": key,
        "kind": ClipEncoder.kind,
        "files": [
            {"role": ClipEncoder.ROLES[t], "variant": Variant.FP32, "path": p.relative_to(folder).as_posix()}
            for t, p in towers.items()
        ],
        "preprocessing": {
            "image_size": [int(height), int(width)],
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            # A graph with a dynamic sequence axis names it instead of a length: CLIP's 77 then.
            "context_length": n if isinstance(n := sessions["text"].get_inputs()[0].shape[1], int) else 77,
            "tokenizer": tokenizer.relative_to(folder).as_posix() if tokenizer.is_file() else None,
        },
    }
