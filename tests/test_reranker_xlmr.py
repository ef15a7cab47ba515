"""A reranker whose pad token is not id 0 and that has no token type ids: a tiny XLM-R cross-encoder (the
bge-reranker layout: <pad> = 1, type_vocab_size 1, a Unigram tokenizer) through the real stage and verify."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

QUERY = "who is walking the dog"
# Very different lengths in one batch: most pairs are mostly padding, one is truncated to max_length.
PASSAGES = ["a man is walking his dog", "", "dog " * 300, "café 東京 🚀", "people dance on the beach at night", "sun"]


@pytest.fixture(scope="module")
def xlmr_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_families import make_tiny_xlmr_cross_encoder

    return make_tiny_xlmr_cross_encoder(tmp_path_factory.mktemp("sources") / "tiny-xlmr")


@pytest.fixture(scope="module")
def xlmr_tree(tmp_path_factory: pytest.TempPathFactory, xlmr_source: Path) -> Path:
    """`modelbake reranker-cache` of the tiny XLM-R, then `merge-manifest`: a model tree as a build makes it.

    With the external-data threshold at 10 kB, the graph ships as a bge-reranker-large's (2.2 GB) would:
    NAME.onnx + NAME.onnx.data; every test below then loads and scores through the pair."""
    out = tmp_path_factory.mktemp("xlmr-models")
    run_cli(
        "reranker-cache", "--reranker", f"tiny-xlmr@dir:{xlmr_source}", "--onnx-external-data-bytes", "10000",
        "--out", str(out), check=True,
    )  # fmt: skip
    run_cli("merge-manifest", str(out), check=True)
    return out


@pytest.fixture(scope="module")
def cross_encoder(xlmr_tree: Path) -> Any:  # a sentence_transformers CrossEncoder
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(xlmr_tree / "reranker" / "tiny-xlmr"), device="cpu")


def _model(root: Path) -> dict:
    (model,) = json.loads((root / "model_manifest.json").read_text())["models"]
    return model


def test_the_pad_token_is_recorded_from_the_model_and_type_ids_are_zeros(xlmr_tree: Path) -> None:
    model = _model(xlmr_tree)
    graph = next(f for f in model["files"] if f["role"] == "reranker")
    assert graph["external_data"] == "onnx/reranker_tiny-xlmr.onnx.data"
    assert (xlmr_tree / graph["external_data"]).stat().st_size > graph["bytes"]  # the weights moved out
    pre = model["preprocessing"]
    assert (pre["pad_token"], pre["pad_id"], pre["padding_side"]) == ("<pad>", 1, "right")
    config = json.loads((xlmr_tree / "reranker" / "tiny-xlmr" / "config.json").read_text())
    assert (config["model_type"], config["type_vocab_size"], config["pad_token_id"]) == ("xlm-roberta", 1, 1)
    # The graph keeps token_type_ids as an input (XLM-R embeds them, with one row); the build fed zeros.
    golden = np.load(xlmr_tree / "golden" / "reranker_tiny-xlmr.npz")
    assert not golden["input:token_type_ids"].any()
    padded = golden["input:attention_mask"] == 0
    assert padded.any() and (golden["input:input_ids"][padded] == 1).all()


def test_runtime_scores_equal_cross_encoder_on_pairs_of_very_different_lengths(
    xlmr_tree: Path, cross_encoder: Any
) -> None:
    from modelbake.producers.reranker import _tokenize
    from modelbake.runtime.reranker import Reranker

    reranker = Reranker.from_folder(xlmr_tree)
    assert [i.name for i in reranker.session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    pairs = [(QUERY, p) for p in PASSAGES]
    feeds = reranker.encode(QUERY, PASSAGES)
    # The run-time encoding is the build's (the producer's own tokenisation), id for id, padding included.
    built = {k: v.numpy() for k, v in _tokenize(cross_encoder, pairs).items()}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(feeds[name], built[name], err_msg=name)
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 1).all() and not feeds["token_type_ids"].any()
    assert feeds["input_ids"].shape[1] == 128 and feeds["attention_mask"].sum(axis=1).min() < 10
    expected = cross_encoder.predict(pairs)
    assert np.ptp(expected) > 0.1  # scores that differ, so the comparison means something
    np.testing.assert_allclose(reranker.score(QUERY, PASSAGES), expected, atol=1e-5)
    assert [i for i, _ in reranker.rank(QUERY, PASSAGES)] == list(np.argsort(-expected, kind="stable"))


def test_verify_passes_and_catches_the_old_pad_or_zero_padding(
    xlmr_tree: Path, cross_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelbake.runtime import reranker as runtime
    from modelbake.runtime.verify import verify

    proc = run_cli("verify", str(xlmr_tree))
    assert proc.returncode == 0 and "pair encoding identical on 5 pairs" in proc.stdout, proc.stdout + proc.stderr

    # The old rule, `token_to_id("[PAD]") or 0`: <s> (id 0) where the build put <pad> (id 1).
    def old_padding(tokenizer: Any, contract: dict) -> dict:
        return {"pad_id": tokenizer.token_to_id("[PAD]") or 0}

    monkeypatch.setattr(runtime, "_padding", old_padding)
    failed = [c for c in verify(xlmr_tree) if not c.ok]
    assert [c.detail for c in failed] == ["pair encoding DIFFERS on 5 pairs"]
    old = runtime.Reranker.from_folder(xlmr_tree)
    feeds = old.encode(QUERY, PASSAGES)
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 0).all()
    # The encoder masks padded positions and RoBERTa counts positions past its own pad id only, so the
    # scores alone do not show the wrong pad id here: the replay of the build's inputs is what catches it.
    expected = cross_encoder.predict([(QUERY, p) for p in PASSAGES])
    np.testing.assert_allclose(old.score(QUERY, PASSAGES), expected, atol=1e-5)


def test_without_a_recorded_pad_token_the_tokenizer_json_decides_or_it_is_an_error(
    xlmr_tree: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from modelbake.manifest import ManifestError
    from modelbake.runtime.reranker import encode_pairs, pair_tokenizer

    contract = _model(xlmr_tree)["preprocessing"]
    legacy = {k: v for k, v in contract.items() if k not in ("pad_token", "pad_id", "padding_side")}
    with pytest.raises(ManifestError, match=re.escape("records no pad token and the tokenizer.json sets no padding")):
        pair_tokenizer((xlmr_tree / contract["tokenizer"]).read_bytes(), legacy)
    with pytest.raises(ManifestError, match=re.escape("pad token '<pad>' is id 1 there, not the recorded 0")):
        pair_tokenizer((xlmr_tree / contract["tokenizer"]).read_bytes(), {**contract, "pad_id": 0})
    # A tokenizer.json that pads by itself is followed (a manifest written before the pad token was recorded).
    own = Tokenizer.from_file(str(xlmr_tree / contract["tokenizer"]))
    own.enable_padding(pad_id=1, pad_token="<pad>")
    shutil.copytree(xlmr_tree / "reranker", tmp_path / "reranker")
    own.save(str(tmp_path / contract["tokenizer"]))
    own_json, recorded_json = ((tree / contract["tokenizer"]).read_bytes() for tree in (tmp_path, xlmr_tree))
    feeds = encode_pairs(pair_tokenizer(own_json, legacy), QUERY, PASSAGES)
    reference = encode_pairs(pair_tokenizer(recorded_json, contract), QUERY, PASSAGES)
    for name, value in reference.items():
        np.testing.assert_array_equal(feeds[name], value, err_msg=name)
