"""Tiny but real models, written in the same layouts users feed modelbake from local sources.

No hub is needed: the tests and smoke builds generate these and pass them as ``NAME@dir:PATH`` specs,
so they go through exactly the code paths a real OpenCLIP or Hugging Face folder takes.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelbake.spec import OPENAI_MEAN, OPENAI_STD

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
_WORDS = [
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


def make_tiny_clip(dest: Path, arch: str = "tiny-vit", seed: int = 0) -> Path:
    """An OpenCLIP ``local-dir`` folder: open_clip_config.json + open_clip_model.safetensors."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CFGS[arch])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dest / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP_CFGS[arch], "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    (dest / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def make_tiny_cross_encoder(dest: Path, seed: int = 0) -> Path:
    """A Hugging Face folder holding a 2-layer BERT with a one-label classification head."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *_WORDS]
    vocab_file = dest / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(dest)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=128)
    tokenizer.save_pretrained(dest)
    return dest


def make_tiny_sources(dest: Path) -> dict[str, Path]:
    """Both tiny models under ``dest``; returns {name: folder}."""
    made = {name: make_tiny_clip(dest / "clip" / name, name) for name in TINY_CLIP_CFGS}
    made["tiny-bert"] = make_tiny_cross_encoder(dest / "reranker" / "tiny-bert")
    return made
