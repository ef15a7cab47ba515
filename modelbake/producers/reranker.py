"""reranker-cache: the first cross-encoder of an ordered list that loads, cached as a plain folder for
offline use and exported to ONNX with its score contract (activation, labels, max_length, pair order).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelbake.fs import staged_output
from modelbake.hub import HubError, fetch_snapshot
from modelbake.kinds import RERANKER
from modelbake.manifest import Role, Variant, file_entry, write_fragment
from modelbake.producers import Values
from modelbake.producers.common import ProducerError, hub_offline, log, measured, model_record
from modelbake.producers.onnx_export import ExportSettings, Int8Refused, OnnxExport, export_variants
from modelbake.producers.progress import steps
from modelbake.runtime.gates import kendall_tau, top_k_kept
from modelbake.spec import ORIGIN_FILE, RERANKER_DIR, RerankerSpec, reranker_onnx_name

STAGE = RERANKER.stage
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError)
TOOLS = ("torch", "transformers", "sentence-transformers", "huggingface-hub", "onnx", "onnxruntime")

PROBE_QUERY = "person walking a dog"
PROBE_PASSAGES = [
    "a man is walking his dog in the park",
    "a red car drives fast down the street at night",
    "",
    "dog " * 200,
    "people dance to music on the beach",
]
# The int8 gate's probe: per query, passages from clearly relevant to unrelated, so that a trained
# reranker's scores spread and a changed order is int8's doing, not a tie. An untrained head scores every
# pair alike, which this gate rightly refuses (the tiny test reranker is trained on these: sources/tiny.py).
RANKING_PROBE = {
    PROBE_QUERY: [
        "a man is walking his dog in the park",
        "a woman walks two dogs along the beach at sunset",
        "a dog sleeps on the porch",
        "a person jogging alone in the park",
        "people dance to music on the beach",
        "a red car drives fast down the street at night",
        "",
        "dog " * 200,
    ],
    "how to cook pasta": [
        "boil the pasta in salted water for ten minutes, then drain it",
        "a recipe for spaghetti with tomato sauce",
        "rice is cooked by simmering it in water",
        "the kitchen has a new oven",
        "the stock market fell sharply on monday",
        "football scores from the weekend",
    ],
    "what is the capital of france": [
        "paris is the capital and largest city of france",
        "france is a country in western europe",
        "berlin is the capital of germany",
        "the eiffel tower was built in 1889",
        "bananas are rich in potassium",
        "a recipe for spaghetti with tomato sauce",
    ],
}
EXAMPLE_PAIRS = [
    ("what is this", "a video clip of a cat"),
    ("find the scene", "the sun opens over the sea and the city"),
]


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def _fetch(spec: RerankerSpec, scratch: Path) -> tuple[Path, dict[str, Any]]:
    """A local folder holding the model files, and the source record."""
    if spec.local is not None:
        path = Path(spec.local.path)
        if not (path / "config.json").is_file():
            raise ProducerError(f"{spec.text!r}: {path} holds no config.json; point at a Hugging Face model folder")
        source: dict[str, Any] = {"type": "dir", "id": str(path)}
        if (path / ORIGIN_FILE).is_file():  # a bundled hub model: its repository and pinned commit
            source["origin"] = json.loads((path / ORIGIN_FILE).read_text())
        return path, source
    from modelbake.spec import DEFAULT_RERANKER_MODELS

    path = scratch / "download"
    try:
        commit = fetch_snapshot(spec.repo, spec.revision, path, name=repr(spec.text), example=DEFAULT_RERANKER_MODELS)
    except HubError as exc:
        raise ProducerError(str(exc)) from exc  # a candidate that failed: the stage may fall back to the next
    return path, {"type": "hub", "id": spec.repo, "revision": commit}


def _check_architecture(spec: RerankerSpec, path: Path) -> None:
    """Refuse, before loading, a model type that has no sequence-classification form in transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ProducerError(
            f"{spec.text!r}: model type {model_type!r} has no sequence-classification form, so it cannot score "
            f"pairs; give a cross-encoder or an encoder such as BERT (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2)"
        )


def _activation(ce: Any) -> str:
    name = type(ce.activation_fn).__name__.lower()
    if name not in ("sigmoid", "identity"):
        raise ProducerError(f"unsupported score activation {type(ce.activation_fn).__name__}; use Sigmoid or Identity")
    return name


def _tokenize(ce: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    enc = ce.tokenizer(
        [q for q, _ in pairs],
        [p for _, p in pairs],
        padding=True,
        truncation=True,
        max_length=ce.max_seq_length,
        return_tensors="pt",
    )
    if "token_type_ids" not in enc:
        enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _score_gate(
    run: Any, feeds: dict[str, np.ndarray], st_scores: np.ndarray, activation: str, atol: float
) -> dict[str, Any]:
    """The score contract: sentence-transformers' predict, reproduced from the ONNX logits.

    Scores must agree within ``atol``, and every two passages whose reference scores differ by more
    than ``2 * atol`` must keep their order (passages the model itself cannot tell apart may swap).
    """
    scores = _scores(run, feeds, activation, st_scores.shape)
    if not np.isfinite(scores).all():
        raise ProducerError("the ONNX scores hold NaN or inf on the probe pairs; nothing was written")
    gap = st_scores[:, None] - st_scores[None, :]
    flipped = (gap > 2 * atol) & (scores[:, None] - scores[None, :] <= 0)
    ranks = [np.argsort(np.argsort(-s, kind="stable")) for s in (scores, st_scores)]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if len(scores) > 1 else 1.0
    order, st_order = np.argsort(-scores, kind="stable"), np.argsort(-st_scores, kind="stable")
    figures = {
        "score_max_abs_diff": float(np.max(np.abs(scores - st_scores))),
        "top3_same": bool(np.array_equal(order[:3], st_order[:3])),
        "kendall_tau": kendall_tau(scores, st_scores),
        "same_ranking": bool(np.array_equal(order, st_order)),
        "rank_correlation": spearman,
        "order_violations": int(flipped.sum()),
    }
    if figures["score_max_abs_diff"] > atol or figures["order_violations"]:
        raise ProducerError(f"ONNX scores differ from sentence-transformers beyond {atol:g}: {figures}")
    return figures


def _scores(run: Any, feeds: dict[str, np.ndarray], activation: str, shape: tuple[int, ...]) -> np.ndarray:
    """CrossEncoder.predict's scores from the ONNX logits (its activation, its shape)."""
    logits = run.run(["logits"], feeds)[0]
    return (1 / (1 + np.exp(-logits)) if activation == "sigmoid" else logits).reshape(shape)


def _ranking_gate(
    run: Any, probe: list[tuple[dict[str, np.ndarray], np.ndarray]], activation: str, top_k: int, min_tau: float
) -> dict[str, Any]:
    """What a reranker is for, per probe query: its top ``top_k`` passages in sentence-transformers' order,
    and Kendall's tau over all its passages at least ``min_tau`` (below the top, near-ties may swap)."""
    taus, tops, diffs = [], [], []
    for feeds, reference in probe:
        scores = _scores(run, feeds, activation, reference.shape)
        if not np.isfinite(scores).all():
            raise ProducerError("the ONNX scores hold NaN or inf on the ranking probe; nothing was written")
        tops.append(top_k_kept(scores, reference, top_k))
        taus.append(round(kendall_tau(scores, reference), 4))
        diffs.append(float(np.max(np.abs(scores - reference))))
    figures = {
        "ranking_queries": len(probe),
        "top_k": top_k,
        "top_k_same": tops,
        "kendall_tau": taus,
        "min_kendall_tau": min(taus),
        "score_max_abs_diff": max(diffs),
    }
    if not all(tops) or min(taus) < min_tau:
        raise ProducerError(
            f"the ranking changed on the probe queries: top {top_k} kept per query {tops} (all required), "
            f"Kendall's tau {taus} (min {min_tau:g} required)"
        )
    return figures


def _load_saved(spec: RerankerSpec, path: Path, root: Path) -> tuple[Any, Path]:
    """The CrossEncoder saved as a plain folder under ``root`` and reloaded from it with no hub at all."""
    from sentence_transformers import CrossEncoder

    _check_architecture(spec, path)
    # A model without a classifier head gets one here, drawn from a fixed seed (the same head every
    # build), saved below with the model: loaders never draw a new one.
    torch.manual_seed(0)
    dest = root / RERANKER_DIR / spec.key
    try:
        CrossEncoder(str(path), device="cpu").save(str(dest))
        shutil.rmtree(root / "download", ignore_errors=True)
        with hub_offline():  # proves the saved folder is complete
            return CrossEncoder(str(dest), device="cpu"), dest
    except LOAD_ERRORS as exc:  # what transformers raises for missing, broken or mismatched files
        raise ProducerError(f"{spec.text!r}: could not be loaded ({type(exc).__name__}: {exc})") from exc


def _export(ce: Any, key: str, root: Path, values: Values, done: Callable[[str], None]) -> list[dict[str, Any]]:
    """The fp32 graph (and the int8 one), each gated on parity with PyTorch and on the score contract."""
    pairs = [(PROBE_QUERY, p) for p in PROBE_PASSAGES]
    export = OnnxExport(
        role=Role.RERANKER,
        module=_Logits(ce.model),
        example=_tokenize(ce, EXAMPLE_PAIRS),
        probe=_tokenize(ce, pairs),
        output_names=["logits"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "token_type_ids")}
        | {"logits": {0: "batch"}},
        atol=1e-4,
        min_cosine=0.999,
        # Logits are (n, 1): cosine says little there; the ranking gate (scores_gate) judges int8.
        int8_gate={"top_k": values["RERANKER_INT8_TOP_K"], "min_tau": values["RERANKER_INT8_MIN_TAU"]},
        raw_golden={"query": np.asarray([PROBE_QUERY]), "passages": np.asarray(PROBE_PASSAGES)},
    )
    feeds = {k: v.numpy() for k, v in export.probe.items()}
    st_scores, activation = np.asarray(ce.predict(pairs)), _activation(ce)
    ranking = [
        (
            {k: v.numpy() for k, v in _tokenize(ce, [(query, p) for p in passages]).items()},
            np.asarray(ce.predict([(query, p) for p in passages])),
        )
        for query, passages in RANKING_PROBE.items()
    ]

    def scores_gate(run: Any, variant: str) -> dict[str, Any]:
        # fp32 keeps the score contract; int8 (and bf16) are judged on what a reranker is for, its ranking.
        if variant == Variant.FP32:
            return _score_gate(run, feeds, st_scores, activation, export.atol)
        return _ranking_gate(run, ranking, activation, export.int8_gate["top_k"], export.int8_gate["min_tau"])

    settings = ExportSettings.from_values(values, int8=values["RERANKER_INT8"])
    return export_variants(export, reranker_onnx_name(key), root, settings, extra_gate=scores_gate, done=done)


def cache_one(spec: RerankerSpec, root: Path, values: Values) -> dict[str, Any]:
    """Fetch, save as a plain folder, reload offline, export and gate one candidate into ``root``."""
    with measured() as build, steps(f"reranker {spec.key}", 3 + int(values["RERANKER_INT8"])) as done:
        path, source = _fetch(spec, root)
        done("fetched")
        ce, dest = _load_saved(spec, path, root)
        done("saved, reloaded offline")
        onnx_files = _export(ce, spec.key, root, values, done)
    files = [
        file_entry(root, p, role=Role.HF_MODEL_FILE, fmt="json" if p.suffix == ".json" else "other")
        for p in sorted(dest.rglob("*"))
        if p.is_file()
    ]
    return model_record(
        STAGE,
        RERANKER.name,
        spec.key,
        spec=spec.text,
        source=source,
        tools=TOOLS,
        files=files + onnx_files,
        preprocessing={
            "tokenizer": f"{RERANKER_DIR}/{spec.key}/tokenizer.json",
            "max_length": int(ce.max_seq_length),
            "pair_order": ["query", "passage"],
            "truncation_side": ce.tokenizer.truncation_side,
            # The batch is padded with the model's own pad token (id 1 for RoBERTa and XLM-R), on its side.
            "pad_token": ce.tokenizer.pad_token,
            "pad_id": int(ce.tokenizer.pad_token_id),
            "padding_side": ce.tokenizer.padding_side,
        },
        details={"activation": _activation(ce), "num_labels": int(ce.num_labels)},
        build=build,
    )


def run(out_root: Path, values: Values) -> list[dict[str, Any]]:
    """The reranker-cache stage: the first candidate that works wins; the manifest says why others failed.

    Only the failures a fallback is for move on to the next candidate: not found, not loadable, not
    exportable, fp32 gate failed (all ProducerError). A refused int8 is not one (fp32 ships alone; with
    INT8_REQUIRED the stage fails). Anything else (a bug, out of memory) fails the stage, and with
    RERANKER_STRICT any fallback does.
    """
    failures: list[str] = []
    for spec in values["RERANKER_MODELS"]:
        if failures and values["RERANKER_STRICT"]:
            raise ProducerError(f"RERANKER_STRICT: the first candidate failed, no fallback taken: {failures[0]}")
        try:
            with staged_output(out_root) as staging:
                model = cache_one(spec, staging, values)
                if failures:
                    model["notes"] = [f"fallback: {f}" for f in failures]
                write_fragment(staging, STAGE, [model])
            log.info("reranker %s cached", spec.text)
            return [model]
        except Int8Refused:
            raise
        except ProducerError as exc:  # try the next candidate, keep the reason for the error/manifest
            reason = str(exc)
            log.warning("reranker %s failed: %s", spec.text, reason)
            log.debug("traceback", exc_info=True)
            failures.append(reason if reason.startswith(repr(spec.text)) else f"{spec.text}: {reason}")
    raise ProducerError("no reranker candidate could be cached:\n  " + "\n  ".join(failures))
