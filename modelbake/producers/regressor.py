"""The boundary regressor at build time: one training loop (:func:`fit`) used by both the
``regressor-seed`` stage (synthetic data, no download) and user training (:func:`train`).

The synthetic generator (documented in models/regressor/README.md): features are unit-norm Gaussian
vectors (like normalised CLIP features); the deltas are a fixed smooth function of them,
``MAX_DELTA * tanh(features @ W)`` with ``W ~ N(0, 1)`` drawn from ``function_seed``, plus
``N(0, NOISE)`` noise. Seed weights fit that function; random init does not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelbake.fs import publish, scratch_folder, staged_output
from modelbake.kinds import REGRESSOR
from modelbake.manifest import Role, file_entry, sha256_file, write_fragment
from modelbake.params import TRAINING, VAL_FRACTION, Training, seed_training
from modelbake.producers import Values
from modelbake.producers.common import ProducerError, log, model_record
from modelbake.producers.onnx_export import ExportSettings, OnnxExport, export_variants
from modelbake.producers.progress import steps
from modelbake.producers.regressor_data import DELTA_FIELDS, DataError, load_dataset, record_message
from modelbake.producers.regressor_model import OUTPUT_NAMES, BoundaryRegressor, save_weights
from modelbake.spec import REGRESSOR_DIR, REGRESSOR_ONNX, REGRESSOR_PTH, ClipSpec

STAGE = REGRESSOR.stage
TOOLS = ("torch", "safetensors", "onnx", "onnxruntime")
MAX_DELTA = 2.0
NOISE = 0.05
SEED_TRAIN, SEED_HELDOUT = 4096, 1024


def synthetic_set(n: int, feature_dim: int, seed: int, function_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d) float32, deltas (n, 2) float32) from the documented generator.

    ``seed`` draws the examples; ``function_seed`` fixes W, the function all sets share.
    """
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(function_seed).normal(size=(feature_dim, 2))
    x = rng.normal(size=(n, feature_dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = MAX_DELTA * np.tanh(x @ w) + rng.normal(scale=NOISE, size=(n, 2))
    return x.astype(np.float32), y.astype(np.float32)


def mae(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean absolute error of each delta, in seconds."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy()
    return dict(zip(OUTPUT_NAMES, (float(v) for v in np.mean(np.abs(pred - y), axis=0)), strict=True))


def _epoch(
    model: BoundaryRegressor,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    order: tuple[torch.Tensor, ...],
) -> float:
    """One pass over the training set in ``order`` batches; the mean L1 loss. Refuses a non-finite loss."""
    model.train()
    total = 0.0
    for idx in order:
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(model(data[0][idx]), data[1][idx])
        if not math.isfinite(loss.item()):
            raise ProducerError(f"the training loss is {loss.item()}")
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(data[0])


def fit(
    model: BoundaryRegressor,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    training: Training,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """L1 training with a fixed seed; keeps the epoch with the best validation MAE (early stopping).

    A non-finite loss or validation MAE raises ProducerError (naming the epoch): never a silent model.
    """
    torch.use_deterministic_algorithms(True)
    epochs, patience = training.epochs, training.patience
    generator = torch.Generator().manual_seed(training.seed)
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    xt, yt = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    history = []
    for epoch in range(1, epochs + 1):
        try:
            batches = torch.randperm(len(xt), generator=generator).split(training.batch_size)
            train_l1 = _epoch(model, opt, (xt, yt), batches)
        except ProducerError as exc:
            raise ProducerError(f"training diverged in epoch {epoch}: {exc}") from None
        val_mae = mae(model, *val)
        score = sum(val_mae.values()) / len(val_mae)
        if not math.isfinite(score):
            raise ProducerError(f"training diverged in epoch {epoch}: the validation MAE is {score}")
        row = {"epoch": epoch, "train_l1": train_l1, "val_mae": val_mae}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if score < best[0]:
            best = (score, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif patience is not None and epoch - best[1] >= patience:
            break
    if best[1] == 0:
        raise ProducerError(f"no epoch was trained (epochs={epochs}): the model would be its random init")
    model.load_state_dict(best[2])
    model.eval()
    return {"epochs_run": len(history), "best_epoch": best[1], "history": history}


def _log_epoch(total: int) -> Callable[[dict[str, Any]], None]:
    def report(row: dict[str, Any]) -> None:
        v = row["val_mae"]
        log.info(
            "epoch %d/%d  train L1 %.4f  val MAE start %.4f s, end %.4f s",
            row["epoch"],
            total,
            row["train_l1"],
            v["start_delta"],
            v["end_delta"],
        )

    return report


def _progress(done: Callable[[str], None], total: int | None = None) -> Callable[[dict[str, Any]], None]:
    """Advance a progress bar per epoch; with ``total``, also log the epoch (training runs)."""
    log_row = _log_epoch(total) if total else None

    def report(row: dict[str, Any]) -> None:
        done(f"val MAE {sum(row['val_mae'].values()) / len(row['val_mae']):.4f} s")
        if log_row:
            log_row(row)

    return report


def seed_weights(feature_dim: int, training: Training) -> tuple[BoundaryRegressor, dict[str, Any]]:
    """Seed weights and their figures: held-out MAE of random init and of the seed, same held-out set."""
    seed, epochs = training.seed, training.epochs
    torch.manual_seed(seed)
    model = BoundaryRegressor(feature_dim)
    train = synthetic_set(SEED_TRAIN, feature_dim, seed)
    heldout = synthetic_set(SEED_HELDOUT, feature_dim, seed + 1)
    random_mae = mae(model, *heldout)
    with steps("regressor seed", epochs) as done:
        result = fit(model, train, heldout, training, on_epoch=_progress(done))
    return model, {
        "heldout_mae_random_init": random_mae,
        "heldout_mae_seed": mae(model, *heldout),
        "train_examples": SEED_TRAIN,
        "heldout_examples": SEED_HELDOUT,
        "epochs": epochs,
        "best_epoch": result["best_epoch"],
        "seed": seed,
        "generator": f"features unit-norm N(0,1); deltas = {MAX_DELTA}*tanh(features @ W) + N(0,{NOISE}), W~N(0,1)",
    }


def resolve_feature_dim(value: int | str, clip_models: Sequence[ClipSpec]) -> tuple[int, str]:
    """``512`` -> 512; ``auto`` -> the embedding size of the first (default) CLIP model of the selection."""
    if isinstance(value, int):
        return value, "REGRESSOR_FEATURE_DIM"
    from modelbake.producers.openclip_source import embed_dim

    return embed_dim(clip_models[0]), f"CLIP {clip_models[0].text}"


def run(out_root: Path, values: Values) -> list[dict[str, Any]]:
    """The regressor-seed stage: seed weights in three formats, checked, plus the stage's fragment."""
    feature_dim, feature_dim_from = resolve_feature_dim(values["REGRESSOR_FEATURE_DIM"], values["CLIP_MODELS"])
    training = seed_training(values)
    seed, epochs = training.seed, training.epochs
    model, metrics = seed_weights(feature_dim, training)
    log.info("seed held-out MAE %s (random init %s)", metrics["heldout_mae_seed"], metrics["heldout_mae_random_init"])
    with staged_output(out_root) as root:
        pth, safetensors = save_weights(model, root / REGRESSOR_DIR / REGRESSOR_PTH)
        export = OnnxExport(
            role=Role.REGRESSOR,
            module=model,
            example={"features": torch.from_numpy(synthetic_set(2, feature_dim, seed + 2)[0])},
            probe={"features": torch.from_numpy(synthetic_set(5, feature_dim, seed + 3)[0])},
            output_names=["deltas"],
            dynamic_axes={"features": {0: "batch"}, "deltas": {0: "batch"}},
            atol=1e-4,
            min_cosine=0.999,
        )
        files = [
            file_entry(root, safetensors, role=Role.WEIGHTS, fmt="safetensors"),
            file_entry(root, pth, role=Role.WEIGHTS_STATE_DICT, fmt="pth"),
            *export_variants(export, REGRESSOR_ONNX, root, ExportSettings.from_values(values)),
        ]
        details = {
            "feature_dim": feature_dim,
            "feature_dim_from": feature_dim_from,
            "outputs": list(OUTPUT_NAMES),
            "metrics": metrics,
        }
        models = [
            model_record(
                STAGE,
                REGRESSOR.name,
                "boundary_regressor",
                spec=f"seed={seed},feature_dim={feature_dim},epochs={epochs}",
                source={"type": "generated", "id": "synthetic seed training"},
                tools=TOOLS,
                files=files,
                details=details,
            )
        ]
        write_fragment(root, STAGE, models)
    return models


Split = tuple[np.ndarray, np.ndarray]


def _split(dataset: Any, val_fraction: float, seed: int, data: Path) -> tuple[Split, Split]:
    """(train, validation) sets, a seeded permutation of the records."""
    n = len(dataset.features)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"{data}: {n} record(s) cannot be split into training and validation; give at least 2")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (dataset.features[train_idx], dataset.deltas[train_idx]), (
        dataset.features[val_idx],
        dataset.deltas[val_idx],
    )


def _metrics(model: torch.nn.Module, train_set: Split, val_set: Split) -> dict[str, Any]:
    """MAE on both sets, and on validation the MAE of always predicting zero (the bar to beat)."""
    zero = {k: float(v) for k, v in zip(OUTPUT_NAMES, np.mean(np.abs(val_set[1]), axis=0), strict=True)}
    return {
        "val_mae": mae(model, *val_set),
        "train_mae": mae(model, *train_set),
        "val_mae_predicting_zero": zero,
        "train_records": len(train_set[0]),
        "val_records": len(val_set[0]),
        "feature_dim": int(train_set[0].shape[1]),
    }


def _largest_value(dataset: Any) -> str:
    """Where the data's largest magnitude is (the usual cause of a diverging loss): record, field, value."""
    index, column = divmod(int(np.argmax(np.abs(dataset.deltas))), 2)
    where, value = f"field {DELTA_FIELDS[column]}", dataset.deltas[index, column]
    f_index, f_column = divmod(int(np.argmax(np.abs(dataset.features))), dataset.features.shape[1])
    if abs(dataset.features[f_index, f_column]) > abs(value):
        index, where, value = f_index, f"field features.{f_column}", dataset.features[f_index, f_column]
    return record_message(index, dataset.video_ids[index], f"{where} is {float(value):.6g}")


def _publish(model: BoundaryRegressor, metrics: dict[str, Any], out_pth: Path) -> None:
    """OUT.safetensors, OUT.pth, then OUT.metrics.json: written whole in a scratch folder, then renamed in.

    metrics.json comes last and lists both weights files' sha256, so a reader can tell the three belong together.
    """
    out_st, out_metrics = out_pth.with_suffix(".safetensors"), out_pth.with_suffix(".metrics.json")
    with scratch_folder(out_pth.parent, "train") as work:
        pth, st = save_weights(model, work / out_pth.name)
        metrics["files"] = {out_st.name: sha256_file(st), out_pth.name: sha256_file(pth)}
        metrics_path = work / out_metrics.name
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        publish(work, [(st, out_st), (pth, out_pth), (metrics_path, out_metrics)])


def train(
    data: Path,
    out_pth: Path,
    training: Training = TRAINING,
    *,
    val_fraction: float = VAL_FRACTION,
    feature_dim: int | None = None,
) -> dict[str, Any]:
    """Train on user data; publishes OUT.pth, OUT.safetensors and OUT.metrics.json together (:func:`_publish`).

    Nothing is written unless training succeeds: bad data or a diverging loss raise DataError.
    """
    if out_pth.suffix != ".pth":
        raise DataError(f"{out_pth}: the output must end in .pth (its .safetensors twin is written beside it)")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: give a fraction between 0 and 1")
    if training.epochs < 1:
        raise DataError(f"--epochs {training.epochs}: give at least 1 (an untrained model is never saved)")
    dataset = load_dataset(data, feature_dim)
    train_set, val_set = _split(dataset, val_fraction, training.seed, data)
    torch.manual_seed(training.seed)
    model = BoundaryRegressor(dataset.features.shape[1])
    log.info("training on %d records, validating on %d (%s)", len(train_set[0]), len(val_set[0]), data)
    try:
        with steps("training", training.epochs) as done:  # may stop early (patience)
            result = fit(model, train_set, val_set, training, on_epoch=_progress(done, training.epochs))
    except ProducerError as exc:
        largest = _largest_value(dataset)
        raise DataError(f"{data}: {exc}; nothing was written. Largest value: {largest}; scale the data") from None
    metrics = {**_metrics(model, train_set, val_set), "seed": training.seed, "data": str(data), **result}
    metrics["data_sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    _publish(model, metrics, out_pth)
    log.info("wrote %s, %s and %s", out_pth, out_pth.with_suffix(".safetensors"), out_pth.with_suffix(".metrics.json"))
    return metrics
