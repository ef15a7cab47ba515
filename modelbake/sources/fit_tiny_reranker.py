"""Train the tiny test reranker once and write its weights beside this file (``tiny_bert_ranker.safetensors``).

    python -m modelbake.sources.fit_tiny_reranker

Training runs on torch's CPU kernels, which differ per instruction set, so the result is kept in the
repository instead of being trained on each machine that runs the tests: every CPU then gets the same model.
Run this only when the tiny reranker must change (its vocabulary, its layout, or the gate's probe passages),
then bump ``SOURCES_VERSION`` and the digests in tests/test_sources.py.

The model is fitted to score each probe query's passages in their listed order, a fixed logit step apart
(a margin loss between neighbours, not a regression to exact targets, which collapsed passages the tiny
model cannot tell apart into near-ties). Its smallest gap between neighbours is then far above dynamic
int8's error, so its int8 keeps the ranking by construction; the script prints both and refuses to write a
model whose gap is below ``MIN_GAP``.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARGIN = 1.0  # the logit step asked between neighbouring passages
MIN_GAP = 0.5  # what the written model must keep, at the least (int8 moved these logits by < 0.05)
STEPS = 1500


def ranking_logits(model, tokenizer) -> list:
    """Per probe query, the model's logits for its passages in listed order."""
    import torch

    from modelbake.producers.reranker import RANKING_PROBE

    with torch.no_grad():
        return [
            model(**tokenizer([q] * len(ps), ps, padding=True, truncation=True, return_tensors="pt")).logits[:, 0]
            for q, ps in RANKING_PROBE.items()
        ]


def fit(steps: int = STEPS, seed: int = 0):
    """The tiny BERT from numpy's draw, trained to rank every probe query's passages in listed order."""
    import torch

    from modelbake.producers.reranker import RANKING_PROBE
    from modelbake.sources.tiny import tiny_cross_encoder_parts

    torch.manual_seed(seed)
    model, tokenizer = tiny_cross_encoder_parts(seed)
    batches = [
        tokenizer([q] * len(ps), ps, padding=True, truncation=True, return_tensors="pt")
        for q, ps in RANKING_PROBE.items()
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # no dropout
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.zeros(())
        for features in batches:
            logits = model(**features).logits[:, 0]
            # every passage above the next one by MARGIN, and the scores centred (no drift to large values)
            loss = loss + torch.relu(MARGIN - (logits[:-1] - logits[1:])).pow(2).sum() + 1e-3 * logits.mean() ** 2
        loss.backward()
        optimizer.step()
    return model, tokenizer


def main() -> int:
    from safetensors.torch import save_file

    from modelbake.sources.tiny import RANKER_WEIGHTS

    model, tokenizer = fit()
    gaps = [float((s[:-1] - s[1:]).min()) for s in ranking_logits(model, tokenizer)]
    print("smallest gap between neighbouring logits per probe query:", [round(g, 3) for g in gaps])
    if min(gaps) < MIN_GAP:
        print(f"refused: a gap below {MIN_GAP}; train longer or with another seed", file=sys.stderr)
        return 1
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else RANKER_WEIGHTS
    save_file(state, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
