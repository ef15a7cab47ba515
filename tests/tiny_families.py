"""Tiny models of other families, for the tests alone: a SigLIP-style OpenCLIP folder (no causal mask, a
SentencePiece tokenizer) and an XLM-R-style cross-encoder (pad id 1, no token types). Built like the tiny
models of modelbake.sources.tiny (numpy-drawn weights, the same vocabulary); not part of the demo or the
smoke builds, so they live with the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelbake.sources.tiny import WORDS, drawn_by_numpy

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
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS] + [(c, -5.0) for c in letters]
    pieces += [(d, -6.0) for d in "0123456789"]
    tokenizer = T5Tokenizer(
        vocab=pieces, extra_ids=0, additional_special_tokens=[], eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.save_pretrained(str(dest))
    return len(tokenizer)


def make_tiny_siglip(dest: Path, seed: int = 0) -> Path:
    """An OpenCLIP ``local-dir`` folder of a SigLIP-style model: config, weights and the tokenizer's files."""
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_SIGLIP_CFG))
    cfg["text_cfg"]["vocab_size"] = make_tiny_siglip_tokenizer(dest)
    model = CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    save_file(drawn_by_numpy(model.state_dict(), seed), dest / "open_clip_model.safetensors")
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    (dest / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    return dest


def _tiny_unigram_tokenizer() -> Any:
    """XLM-R's layout in miniature: a SentencePiece-style Unigram model, Metaspace, <s> A </s> </s> B </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids: 0, 1 (the pad id is not 0), 2, 3
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [(s, 0.0) for s in specials] + [(f"\u2581{w}", -2.0) for w in WORDS]
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
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_unigram_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,  # 128 tokens after the padding id's offset, as 514 for 512
        type_vocab_size=1,
        initializer_range=0.5,  # scores spread over (0, 1), not all near 0.5 (0.77 apart on the tests' probe)
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
    )
    model = XLMRobertaForSequenceClassification(config)
    model.load_state_dict(drawn_by_numpy(model.state_dict(), seed, config.initializer_range))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
