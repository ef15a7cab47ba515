"""Tiny but real models, written in the same layouts users feed modelbake from local sources.

No hub is needed: the tests and smoke builds generate these and pass them as ``NAME@dir:PATH`` specs,
so they go through exactly the code paths a real OpenCLIP or Hugging Face folder takes.

They are the same bytes on every CPU (tests/test_sources.py pins their digests): torch's random draws are
not (``normal_`` has a vectorised path per instruction set), so every drawn weight is drawn again by
numpy's generator, and the one trained model, the tiny reranker, is trained once by
:mod:`modelbake.sources.fit_tiny_reranker` and kept in the package as ``tiny_bert_ranker.safetensors``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from modelbake.spec import OPENAI_MEAN, OPENAI_STD

# The tiny reranker's trained weights (BertForSequenceClassification's state dict), made by fit_tiny_reranker.
RANKER_WEIGHTS = Path(__file__).with_name("tiny_bert_ranker.safetensors")

_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_CLIP_CFGS = {
    # A ViT (class-token pooling) and a ResNet (attention pooling, as RN50), both with the real tokenizer.
    "tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": _TINY_TEXT,
    },
    "tiny-rn": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": _TINY_TEXT,
    },
}

# A WordPiece vocabulary written by hand: enough words for probe queries and passages.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "for",
    "with",
    "and",
    "or",
    "is",
    "are",
    "was",
    "be",
    "by",
    "from",
    "this",
    "that",
    "it",
    "as",
    "video",
    "clip",
    "person",
    "people",
    "man",
    "woman",
    "dog",
    "cat",
    "car",
    "street",
    "walking",
    "running",
    "jumping",
    "talking",
    "cooking",
    "ball",
    "park",
    "city",
    "night",
    "day",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "fast",
    "slow",
    "kitchen",
    "food",
    "music",
    "dance",
    "game",
    "water",
    "sea",
    "beach",
    "tree",
    "house",
    "what",
    "who",
    "where",
    "when",
    "how",
    "show",
    "find",
    "scene",
    "shot",
    "camera",
    "moving",
    "open",
    "close",
    "door",
    "window",
    "sky",
    "sun",
    "rain",
]


def drawn_by_numpy(state: dict[str, Any], seed: int, std: float | None = None) -> dict[str, Any]:
    """``state`` (a torch state dict as its module initialised it) with every drawn tensor drawn again from
    numpy's generator, which gives the same numbers on every CPU; constants (ones, zeros, a logit scale)
    stay as torch set them. ``std``: of every drawn tensor (Hugging Face's initializer_range); None: 0.02
    for vectors and 1/sqrt(fan in) for matrices and kernels."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(state):  # a fixed order of draws
        tensor = state[name]
        flat = tensor.reshape(-1)
        if not tensor.is_floating_point() or flat.numel() <= 1 or bool((flat == flat[0]).all()):
            out[name] = tensor.contiguous()
            continue
        scale = std if std is not None else 0.02 if tensor.ndim == 1 else 1 / math.sqrt(math.prod(tensor.shape[1:]))
        drawn = rng.standard_normal(tuple(tensor.shape), dtype=np.float32) * np.float32(scale)
        if tensor.ndim > 1:  # rows torch set to zero stay zero (an embedding's padding row)
            drawn[(tensor.reshape(tensor.shape[0], -1) == 0).all(dim=1).numpy()] = 0.0
        out[name] = torch.from_numpy(drawn).to(tensor.dtype)
    return out


def make_tiny_clip(dest: Path, arch: str = "tiny-vit", seed: int = 0) -> Path:
    """An OpenCLIP ``local-dir`` folder: open_clip_config.json + open_clip_model.safetensors."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    model = CLIP(**TINY_CLIP_CFGS[arch])
    save_file(drawn_by_numpy(model.state_dict(), seed), dest / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP_CFGS[arch], "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    (dest / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def tiny_cross_encoder_parts(seed: int = 0) -> tuple[Any, Any]:
    """(a 2-layer BERT with a one-label classification head, its WordPiece tokenizer), the weights drawn by
    numpy (as an untrained head, it scores every pair about alike)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(
        dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *WORDS])
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    model.load_state_dict(drawn_by_numpy(model.state_dict(), seed, config.initializer_range))
    # The vocabulary as a mapping: transformers 5 ignores a vocab_file here and makes every word [UNK].
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=128)
    return model.eval(), tokenizer


# The hidden channel int8_blind turns into a constant outlier, and its value.
_OUTLIER_CHANNEL, _OUTLIER = 0, 1e4
# bf16_blind: logits squeezed to 0.2% of their spread around -12. bf16 keeps 8 bits of mantissa: 0.0625
# apart there, so every probe score rounds to one or two values; fp32's steps there are 1e-6.
_BF16_SCALE, _BF16_OFFSET = 0.002, -12.0


def make_tiny_cross_encoder(
    dest: Path, seed: int = 0, trained: bool = True, int8_blind: bool = False, bf16_blind: bool = False
) -> Path:
    """A Hugging Face folder holding the tiny BERT cross-encoder. ``trained``: the weights fitted once to rank
    the reranker gate's probe passages in their listed order (``RANKER_WEIGHTS``), else numpy's draw.

    ``int8_blind``: the trained model with one hidden channel of its last layer set to a constant 1e4 that
    the pooler gives no weight. fp32 scores do not change with it; dynamic int8 quantises the pooler's input
    with one scale per tensor, so the outlier rounds every other channel to zero and int8 scores every pair
    alike, on any CPU: a reranker whose int8 the ranking gate must refuse (a real failure mode, as
    activation outliers in large transformers).

    ``bf16_blind``: the trained model with its logits squeezed close together far from zero (the classifier's
    weights scaled down, its bias moved): the same order in fp32 (sigmoid is monotonic and float32 resolves
    them), but bf16 rounds the logits of the probe passages to one or two values: a reranker whose bf16 run
    the ranking gate must refuse.
    """
    from safetensors.torch import load_file

    dest.mkdir(parents=True, exist_ok=True)
    model, tokenizer = tiny_cross_encoder_parts(seed)
    if trained or int8_blind or bf16_blind:
        model.load_state_dict(load_file(RANKER_WEIGHTS))
    if int8_blind:
        state = model.state_dict()
        last = f"bert.encoder.layer.{model.config.num_hidden_layers - 1}.output.LayerNorm"
        state[f"{last}.weight"][_OUTLIER_CHANNEL] = 0.0
        state[f"{last}.bias"][_OUTLIER_CHANNEL] = _OUTLIER
        state["bert.pooler.dense.weight"][:, _OUTLIER_CHANNEL] = 0.0
        model.load_state_dict(state)
    if bf16_blind:
        state = model.state_dict()
        state["classifier.weight"] *= _BF16_SCALE
        state["classifier.bias"] = state["classifier.bias"] * _BF16_SCALE + _BF16_OFFSET
        model.load_state_dict(state)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


# The tiny models as the producing stages see a MODEL_SOURCES folder made by make_tiny_sources (at /sources):
# the selection the Docker tests, the demo and the image bench bake.
MOUNTED_CLIP_SPECS = "tiny-vit@dir:/sources/clip/tiny-vit,tiny-rn@dir:/sources/clip/tiny-rn"
MOUNTED_RERANKER_SPEC = "tiny-bert@dir:/sources/reranker/tiny-bert"


# Bumped whenever a maker changes what it makes: a cache of tiny sources from another version is remade.
SOURCES_VERSION = "3"  # 2: tiny-bert trained to rank; 3: the same bytes on every CPU


def make_tiny_sources(dest: Path) -> dict[str, Path]:
    """Both tiny models under ``dest`` (and its ``VERSION``); returns {name: folder}."""
    # a seed each: the same one would give both the same text tower (drawn first, in name order)
    made = {name: make_tiny_clip(dest / "clip" / name, name, seed) for seed, name in enumerate(TINY_CLIP_CFGS)}
    made["tiny-bert"] = make_tiny_cross_encoder(dest / "reranker" / "tiny-bert")
    (dest / "VERSION").write_text(SOURCES_VERSION)
    return made
