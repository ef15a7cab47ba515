"""The cross-encoder reranker at run time: ``score(query, passages)`` and ``rank(...)`` with onnxruntime
and the model's own tokenizer.json, applying the score contract recorded in the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from modelbake.kinds import RERANKER
from modelbake.manifest import ManifestError, Role, Variant, read_listed
from modelbake.runtime.registry import Loader, register_loader


def pair_tokenizer(tokenizer_json: bytes, contract: dict[str, Any]) -> Tokenizer:
    """The model's tokenizer.json (its contents) with the recorded truncation (both texts, longest first, to
    max_length) and padding (to the longest pair, with the model's own pad token: id 1 for RoBERTa and XLM-R,
    not 0)."""
    tokenizer = Tokenizer.from_str(tokenizer_json.decode())
    tokenizer.enable_truncation(contract["max_length"], direction=contract.get("truncation_side", "right"))
    tokenizer.enable_padding(**_padding(tokenizer, contract))
    return tokenizer


def _padding(tokenizer: Tokenizer, contract: dict[str, Any]) -> dict[str, Any]:
    """The pad token, id and side the build recorded from the model's tokenizer, else the tokenizer.json's own."""
    own = tokenizer.padding
    if "pad_id" in contract:
        pad = {"pad_id": contract["pad_id"], "pad_token": contract["pad_token"]}
        pad["direction"] = contract.get("padding_side", "right")
    elif own is not None:
        pad = {"pad_id": own["pad_id"], "pad_token": own["pad_token"], "direction": own["direction"]}
    else:
        raise ManifestError(
            f"{contract['tokenizer']}: the manifest records no pad token and the tokenizer.json sets no padding, "
            f"so the reranker cannot pad a batch as its build did; rebuild the model tree with this modelbake"
        )
    if tokenizer.token_to_id(pad["pad_token"]) != pad["pad_id"]:
        raise ManifestError(
            f"{contract['tokenizer']}: pad token {pad['pad_token']!r} is id {tokenizer.token_to_id(pad['pad_token'])} "
            f"there, not the recorded {pad['pad_id']}; the tokenizer and the manifest disagree"
        )
    return pad


def encode_pairs(tokenizer: Tokenizer, query: str, passages: list[str]) -> dict[str, np.ndarray]:
    if not isinstance(query, str) or isinstance(passages, str) or not all(isinstance(p, str) for p in passages):
        raise TypeError("score(query: str, passages: list[str])")
    encodings = tokenizer.encode_batch([(query, p) for p in passages])
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
    }


@register_loader
class Reranker(Loader):
    kind = RERANKER.name
    variants = (Variant.FP32, Variant.INT8)

    def __init__(self, folder: Path, model: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(folder, model, **kwargs)
        self.contract = {**model["preprocessing"], **model["details"]}
        self.session = self.onnx_session(model, Role.RERANKER)
        self.tokenizer = pair_tokenizer(read_listed(folder, model, self.contract["tokenizer"]), self.contract)
        self._pad_right = self.tokenizer.padding["direction"] == "right"
        self._labels = int(self.contract.get("num_labels", 1))

    @classmethod
    def replay(
        cls, root: Path, model: dict[str, Any], entry: dict[str, Any], golden: dict[str, np.ndarray]
    ) -> tuple[bool, str] | None:
        """The pair encoding of the probe query and passages against the golden inputs."""
        if "raw:passages" not in golden:
            return None
        contract = {**model["preprocessing"], **model["details"]}
        tokenizer = pair_tokenizer(read_listed(root, model, contract["tokenizer"]), contract)
        feeds = encode_pairs(tokenizer, str(golden["raw:query"][0]), list(golden["raw:passages"]))
        same = all(np.array_equal(feeds[k], golden[f"input:{k}"]) for k in feeds)
        return same, f"pair encoding {'identical' if same else 'DIFFERS'} on {len(feeds['input_ids'])} pairs"

    def encode(self, query: str, passages: list[str]) -> dict[str, np.ndarray]:
        return encode_pairs(self.tokenizer, query, passages)

    def score(self, query: str, passages: list[str], *, batch_size: int = 32) -> np.ndarray:
        """One relevance score per passage, after the recorded activation (sigmoid for one label).

        Pairs are tokenized once, sorted by length and run in batches of similar length (at most
        ``batch_size``, the longest at most 1.25x the shortest), each padded to its own longest pair:
        padding is work thrown away, and real passages vary in length. Memory grows with the batch, not
        with the number of passages (one batch of 1000 pairs of 512 tokens needs more than 12 GB).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        if not passages:
            return np.zeros((0,), dtype=np.float32)
        feeds = self.encode(query, passages)
        lengths = feeds["attention_mask"].sum(axis=1)
        logits = np.empty((len(passages), self._labels), dtype=np.float32)
        for rows in length_batches(lengths, batch_size):
            width = int(lengths[rows].max())
            # Padding is on one side (the contract's): keep that side's columns beyond the batch's longest out.
            cols = slice(None, width) if self._pad_right else slice(-width, None)
            logits[rows] = self.session.run(None, {k: v[rows, cols] for k, v in feeds.items()})[0]
        scores = 1.0 / (1.0 + np.exp(-logits)) if self.contract["activation"] == "sigmoid" else logits
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def rank(self, query: str, passages: list[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """(passage index, score), best first."""
        scores = self.score(query, passages)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in order]


def length_batches(lengths: np.ndarray, batch_size: int, spread: float = 1.25) -> list[np.ndarray]:
    """Row indices in batches of similar length: sorted by length, a new batch when ``batch_size`` is
    reached or the next row is more than ``spread`` times the batch's shortest."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start == batch_size or lengths[order[i]] > spread * lengths[order[start]]:
            batches.append(order[start:i])
            start = i
    return batches
