"""open_clip's tokenizers as ``tokenizers`` tokenizer.json files, so the run time needs no torch.

The equivalence holds when the text is first cleaned the way open_clip cleans it: ``ftfy.fix_text``,
``html.unescape`` twice, strip, and for Hugging Face tokenizers the model's own ``clean`` setting
(``modelbake.runtime.clip.clean_text`` with the manifest's ``text_clean``). Then the JSON does the rest:
for CLIP's BPE (:func:`tokenizer_json`) NFC, whitespace collapse, lowercase, CLIP's split regex, byte-level
BPE with ``</w>``, start/end tokens, truncation keeping the end token, zero padding; for a Hugging Face
tokenizer (:func:`hf_tokenizer_json`, SigLIP's SentencePiece) its own pipeline, truncated and padded to the
context length as open_clip's ``HFTokenizer`` asks of it.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SOT, EOT = "<start_of_text>", "<end_of_text>"


def tokenizer_json(simple_tokenizer: Any, context_length: int) -> str:
    """Serialise an ``open_clip.tokenizer.SimpleTokenizer`` (its vocab and merge ranks)."""
    vocab: dict[str, int] = dict(simple_tokenizer.encoder)
    merges = [pair for pair, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # open_clip's split regex matches its special tokens inside the text too (after lowercasing).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (SOT, EOT)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token=simple_tokenizer.decoder[0])
    return tok.to_str()


def hf_tokenizer_json(hf_tokenizer: Any, context_length: int) -> str:
    """A Hugging Face fast tokenizer (``open_clip.tokenizer.HFTokenizer.tokenizer``) with open_clip's call
    (``max_length=context_length, padding="max_length", truncation=True``) written into it."""
    # The backend as loaded, not the file on disk: transformers may rebuild it (T5's from its vocabulary).
    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    tok.enable_truncation(max_length=context_length, direction=hf_tokenizer.truncation_side)
    # SigLIP pads with its end token (id 1) and has no padding mask: the pad id changes the embeddings.
    tok.enable_padding(
        length=context_length,
        direction=hf_tokenizer.padding_side,
        pad_id=hf_tokenizer.pad_token_id,
        pad_token=hf_tokenizer.pad_token,
    )
    return tok.to_str()
