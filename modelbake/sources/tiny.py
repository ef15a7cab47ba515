"""Tiny but real models, written in the same layouts users feed modelbake from local sources.

No hub is needed: the tests and smoke builds generate these and pass them as ``NAME@dir:PATH`` specs,
so they go through exactly the code paths a real OpenCLIP or Hugging Face folder takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# SigLIP's text side in miniature: no causal mask, pooled at the last position, a SentencePiece (Unigram)
# tokenizer of Hugging Face's that pads with its end token, texts canonicalised (lower case, no punctuation).
TINY_SIGLIP_CFG = {
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {
        "context_length": 16,
        "hf_tokenizer_name": "local-dir",  # for a local-dir open_clip reads the tokenizer from the folder itself
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}


def make_tiny_siglip_tokenizer(dest: Path) -> int:
    """A T5-style SentencePiece tokenizer (SigLIP's layout: <pad> 0, </s> 1 also the padding, <unk> 2, no
    start token) saved as Hugging Face files in ``dest``; returns its vocabulary size."""
    from transformers import T5Tokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in _WORDS] + [(c, -5.0) for c in letters]
    pieces += [(d, -6.0) for d in "0123456789"]
    tokenizer = T5Tokenizer(
        vocab=pieces, extra_ids=0, additional_special_tokens=[], eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.save_pretrained(str(dest))
    return len(tokenizer)


def make_tiny_siglip(dest: Path, seed: int = 0) -> Path:
    """An OpenCLIP ``local-dir`` folder of a SigLIP-style model: config, weights and the tokenizer's files."""
    import torch
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_SIGLIP_CFG))
    cfg["text_cfg"]["vocab_size"] = make_tiny_siglip_tokenizer(dest)
    torch.manual_seed(seed)
    model = CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dest / "open_clip_model.safetensors")
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    (dest / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    return dest


def make_tiny_cross_encoder(dest: Path, seed: int = 0, trained: bool = True) -> Path:
    """A Hugging Face folder holding a 2-layer BERT with a one-label classification head; ``trained``: fitted
    to rank the reranker gate's probe passages (else it scores every pair alike, as an untrained head does)."""
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
    model = BertForSequenceClassification(config)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=128)
    if trained:
        _fit_to_rank(model, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _fit_to_rank(model: Any, tokenizer: Any, steps: int = 200) -> None:
    """Train every weight (a few seconds) to score the reranker gate's probe passages in their listed order.

    An untrained head scores every pair alike, so int8's noise reorders them and the ranking gate rightly
    refuses it; a trained reranker's scores spread. This makes the tiny model rank like one.
    """
    import torch

    from modelbake.producers.reranker import RANKING_PROBE

    pairs = [(query, p, i / (len(ps) - 1)) for query, ps in RANKING_PROBE.items() for i, p in enumerate(ps)]
    features = tokenizer(
        [q for q, _, _ in pairs], [p for _, p, _ in pairs], padding=True, truncation=True, return_tensors="pt"
    )
    target = torch.tensor([3.0 - 6.0 * rank for _, _, rank in pairs])  # logits from 3 down to -3 per query
    model.eval()  # no dropout: the same steps make the same weights
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(**features).logits[:, 0], target).backward()
        optimizer.step()


def _tiny_unigram_tokenizer() -> Any:
    """XLM-R's layout in miniature: a SentencePiece-style Unigram model, Metaspace, <s> A </s> </s> B </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids: 0, 1 (the pad id is not 0), 2, 3
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [(s, 0.0) for s in specials] + [(f"\u2581{w}", -2.0) for w in _WORDS]
    pieces += [("\u2581", -3.0), *((c, -5.0) for c in letters), ("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    special = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "unk_token": "<unk>"}
    return XLMRobertaTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", mask_token="<mask>", model_max_length=128, **special
    )


def make_tiny_xlmr_cross_encoder(dest: Path, seed: int = 0) -> Path:
    """A Hugging Face folder holding a 2-layer XLM-RoBERTa with a one-label head (the bge-reranker layout):
    pad id 1, no token type ids (type_vocab_size 1), a Unigram tokenizer.json."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_unigram_tokenizer()
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,  # 128 tokens after the padding id's offset, as 514 for 512
        type_vocab_size=1,
        initializer_range=0.2,  # scores spread over (0, 1), not all near 0.5
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
    )
    XLMRobertaForSequenceClassification(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


# The tiny models as the producing stages see a MODEL_SOURCES folder made by make_tiny_sources (at /sources):
# the selection the Docker tests, the demo and the image bench bake.
MOUNTED_CLIP_SPECS = "tiny-vit@dir:/sources/clip/tiny-vit,tiny-rn@dir:/sources/clip/tiny-rn"
MOUNTED_RERANKER_SPEC = "tiny-bert@dir:/sources/reranker/tiny-bert"


# Bumped whenever a maker changes what it makes: a cache of tiny sources from another version is remade.
SOURCES_VERSION = "2"  # 2: tiny-bert trained to rank


def make_tiny_sources(dest: Path) -> dict[str, Path]:
    """Both tiny models under ``dest`` (and its ``VERSION``); returns {name: folder}."""
    made = {name: make_tiny_clip(dest / "clip" / name, name) for name in TINY_CLIP_CFGS}
    made["tiny-bert"] = make_tiny_cross_encoder(dest / "reranker" / "tiny-bert")
    (dest / "VERSION").write_text(SOURCES_VERSION)
    return made
