"""The cross-encoder reranker at run time: ``score(query, passages)`` and ``rank(...)`` with onnxruntime
and the model's own tokenizer.json, applying the score contract recorded in the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelbake.manifest import checked_model, resolve_inside

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Reranker:
    def __init__(self, folder: Path, model: dict[str, Any], *, int8: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.name = model["name"]
        self.contract = {**model["preprocessing"], **model["details"]}
        role = "reranker_int8" if int8 else "reranker"
        entry = next((f for f in model["files"] if f["role"] == role), None)
        if entry is None:
            raise FileNotFoundError(
                f"reranker {self.name}: no {role} file in the manifest (build with RERANKER_INT8=1)"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(resolve_inside(folder, entry["path"])), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(resolve_inside(folder, self.contract["tokenizer"])))
        # Truncation as the training tokenizer did it: both texts, longest first, to max_length.
        self.tokenizer.enable_truncation(
            self.contract["max_length"], direction=self.contract.get("truncation_side", "right")
        )
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> Reranker:
        return cls(folder, checked_model(folder, "reranker"), **kwargs)

    def encode(self, query: str, passages: list[str]) -> dict[str, np.ndarray]:
        if not isinstance(query, str) or isinstance(passages, str) or not all(isinstance(p, str) for p in passages):
            raise TypeError("score(query: str, passages: list[str])")
        encodings = self.tokenizer.encode_batch([(query, p) for p in passages])
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        """One relevance score per passage, after the recorded activation (sigmoid for one label)."""
        if not passages:
            return np.zeros((0,), dtype=np.float32)
        logits = self.session.run(None, self.encode(query, passages))[0]
        scores = 1.0 / (1.0 + np.exp(-logits)) if self.contract["activation"] == "sigmoid" else logits
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def rank(self, query: str, passages: list[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """(passage index, score), best first."""
        scores = self.score(query, passages)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in order]
