"""``modelbake``: the host CLI. The Docker stages' entrypoints in build/ call the same subcommands.

Build-time subcommands import torch lazily, so ``modelbake verify`` works with the run-time extra alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from modelbake import __version__
from modelbake.bake import BakeError
from modelbake.manifest import ManifestError
from modelbake.producers.common import ProducerError  # stdlib only: keeps this CLI torch-free
from modelbake.spec import DEFAULT_CLIP_MODELS, DEFAULT_RERANKER_MODELS, SpecError, parse_clip_list, parse_reranker_list

if TYPE_CHECKING:  # the producers import torch: only for the type checker here
    from modelbake.bake import Selection
    from modelbake.producers.clip import ClipOptions

log = logging.getLogger("modelbake")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("models"), help="model tree root (default: models/)")


def _clip_options(args: argparse.Namespace) -> ClipOptions:
    from modelbake.producers.clip import ClipOptions

    return ClipOptions(
        opset=args.opset, keep_pytorch=args.keep_pytorch, int8=args.int8, atol=args.parity_atol,
        min_cosine=args.parity_min_cosine, int8_min_cosine=args.int8_min_cosine,
    )  # fmt: skip


def _add_clip_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-pytorch",
        action="store_true",
        default=_env("CLIP_KEEP_PYTORCH", "0") == "1",
        help="also keep the PyTorch weights in models/clip/ (not needed at run time)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        default=_env("CLIP_INT8", "0") == "1",
        help="also write dynamic-int8 variants (*_int8.onnx), each gated on its own parity (download: reranker too)",
    )
    p.add_argument(
        "--parity-atol",
        type=float,
        default=float(_env("CLIP_PARITY_ATOL", "1e-3")),
        help="max abs difference allowed between onnxruntime and PyTorch (default 1e-3)",
    )
    p.add_argument(
        "--parity-min-cosine",
        type=float,
        default=float(_env("CLIP_PARITY_MIN_COSINE", "0.999")),
        help="min cosine similarity between onnxruntime and PyTorch outputs (default 0.999)",
    )
    p.add_argument("--int8-min-cosine", type=float, default=float(_env("CLIP_INT8_MIN_COSINE", "0.99")),
                   help="min cosine of the int8 variants against PyTorch (default 0.99)")  # fmt: skip


def _cmd_clip(args: argparse.Namespace) -> int:
    from modelbake.producers import clip

    clip.run(parse_clip_list(args.models), args.out, _clip_options(args))
    return 0


def _cmd_reranker(args: argparse.Namespace) -> int:
    from modelbake.producers import reranker

    reranker.run(parse_reranker_list(args.models), args.out, opset=args.opset, int8=args.int8, int8_atol=args.int8_atol)
    return 0


def _run_regressor_seed(args: argparse.Namespace, clip_models: str, out: Path) -> None:
    from modelbake.producers import regressor

    dim, dim_from = regressor.resolve_feature_dim(args.feature_dim, clip_models)
    regressor.run(out, feature_dim=dim, feature_dim_from=dim_from, seed=args.seed, epochs=args.epochs, opset=args.opset)


def _cmd_regressor(args: argparse.Namespace) -> int:
    _run_regressor_seed(args, args.clip_models, args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from modelbake.producers.regressor import train

    metrics = train(
        args.data, args.out, epochs=args.epochs, val_fraction=args.val_fraction, patience=args.patience,
        seed=args.seed, lr=args.lr, batch_size=args.batch_size, feature_dim=args.feature_dim,
    )  # fmt: skip
    v = metrics["val_mae"]
    best = metrics["best_epoch"]
    print(f"validation MAE: start {v['start_delta']:.4f} s, end {v['end_delta']:.4f} s (best epoch {best})")
    return 0


def _cmd_validate_data(args: argparse.Namespace) -> int:
    from modelbake.producers.regressor_data import load_dataset

    dataset = load_dataset(args.data, args.feature_dim)
    print(f"{args.data}: {len(dataset.features)} records, {dataset.features.shape[1]} features each: valid")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import shutil

    from modelbake.manifest import merge_fragments
    from modelbake.producers.common import normalise_tree
    from modelbake.spec import FRAGMENTS_DIR

    manifest = merge_fragments(args.root)
    if args.drop_fragments:
        shutil.rmtree(args.root / FRAGMENTS_DIR)
    normalise_tree(args.root)
    print(f"merged {len(manifest['models'])} models into {args.root}/model_manifest.json")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    """The seed's download_models.py: every stage on the host, into one tree, then the manifest."""
    only = [name for name in ("clip", "reranker", "regressor") if getattr(args, f"{name}_only")]
    if len(only) > 1:
        raise SpecError("give at most one of --clip-only, --reranker-only, --regressor-only")
    wanted = only or ["clip", "reranker", "regressor"]
    clip_specs = parse_clip_list(args.clip) if "clip" in wanted else []
    reranker_specs = parse_reranker_list(args.reranker) if "reranker" in wanted else []
    seconds: dict[str, float] = {}

    def timed(stage: str, work: Callable[[], object]) -> None:
        start = time.perf_counter()
        work()
        seconds[stage] = time.perf_counter() - start

    if clip_specs:
        from modelbake.producers import clip

        timed("clip-export", lambda: clip.run(clip_specs, args.out, _clip_options(args)))
    if reranker_specs:
        from modelbake.producers import reranker

        timed("reranker-cache", lambda: reranker.run(reranker_specs, args.out, opset=args.opset, int8=args.int8))
    if "regressor" in wanted:
        seed_args = argparse.Namespace(
            feature_dim=args.regressor_feature_dim,
            seed=args.regressor_seed,
            epochs=args.regressor_epochs,
            opset=args.opset,
        )
        timed("regressor-seed", lambda: _run_regressor_seed(seed_args, args.clip, args.out))
    from modelbake.manifest import merge_fragments
    from modelbake.producers.common import normalise_tree

    manifest = merge_fragments(args.out)
    normalise_tree(args.out)  # as the image's merge step: readable by a non-root service (safetensors is 0600)
    print(summary_table(manifest, seconds))
    print(f"{len(manifest['models'])} models in {args.out}/model_manifest.json")
    return 0


def _worst_diff(parity: object) -> float | None:
    """The largest ``max_abs_diff`` anywhere in a model's parity record (every variant, every tower)."""
    if isinstance(parity, dict):
        found = [_worst_diff(v) for k, v in parity.items() if k != "max_abs_diff"]
        found.append(parity.get("max_abs_diff"))
        values = [v for v in found if isinstance(v, float | int)]
        return max(values) if values else None
    return None


def summary_table(manifest: dict, seconds: dict[str, float]) -> str:
    """One row per model: stage, kind, name, files, size, worst parity difference, the stage's time."""
    rows = [("stage", "kind", "name", "files", "MB", "max |onnx-torch|", "stage s")]
    for model in manifest["models"]:
        diff = _worst_diff(model.get("parity"))
        rows.append((
            model["stage"], model["kind"], model["name"], str(len(model["files"])),
            f"{sum(f['bytes'] for f in model['files']) / 1e6:.1f}",
            "-" if diff is None else f"{diff:.1e}",
            f"{seconds[model['stage']]:.1f}" if model["stage"] in seconds else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    from modelbake.runtime.__main__ import main as runtime_main

    return runtime_main(["verify", str(args.folder), *(["--quick"] if args.quick else [])])


def _selection(args: argparse.Namespace) -> Selection:
    """A selection from --config, then --clip/--reranker/--*-int8 on top (bake and bundle alike)."""
    from modelbake.bake import Selection

    selection = Selection.from_file(args.config) if args.config else Selection()
    if args.clip:
        selection.clip = args.clip.split(",")
    if args.reranker:
        selection.reranker = args.reranker.split(",")
    selection.clip_int8 = selection.clip_int8 or args.clip_int8
    selection.reranker_int8 = selection.reranker_int8 or args.reranker_int8
    for key in ("feature_dim", "seed", "epochs"):
        if getattr(args, f"regressor_{key}") is not None:
            setattr(selection, f"regressor_{key}", getattr(args, f"regressor_{key}"))
    return selection


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a TOML selection file (clip, reranker, clip_int8, [regressor])")
    p.add_argument("--clip", help="comma-separated CLIP specs (overrides the file)")
    p.add_argument("--reranker", help="comma-separated reranker fallback list (overrides the file)")
    p.add_argument("--clip-int8", action="store_true", help="also ship CLIP int8 variants")
    p.add_argument("--reranker-int8", action="store_true", help="also ship the reranker's int8 variant")
    p.add_argument("--regressor-feature-dim", help="seed weights' input size: an integer or 'auto' (first CLIP)")
    p.add_argument("--regressor-seed", type=int, help="seed of the regressor's synthetic set and init")
    p.add_argument("--regressor-epochs", type=int, help="training epochs of the seed weights")


def _cmd_bundle(args: argparse.Namespace) -> int:
    from modelbake.bundle import bundle

    doc = bundle(args.out, _selection(args), pip_args=args.pip_arg, wheels=not args.no_wheels)
    size = sum(f["bytes"] for f in doc["files"])
    print(f"{args.out}: {len(doc['files'])} files, {size / 1e6:.0f} MB")
    print(f"build it offline: WHEELHOUSE={args.out}/wheelhouse MODEL_SOURCES={args.out}/sources "
          f"modelbake bake --config {args.out}/selection.toml")  # fmt: skip
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    import shlex

    from modelbake.bake import bake, command

    selection = _selection(args)
    variables = selection.variables()  # every spec checked before anything runs
    targets = args.targets or ["runtime"]
    if args.dry_run or args.print:
        cmd = command(targets, args.set, print_only=args.print)
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items()) + " " + shlex.join(cmd)
        if args.dry_run:
            print(line)
            return 0
        return subprocess.run(cmd, env={**os.environ, **variables}).returncode
    result = bake(selection, targets, overrides=args.set, inspect=not args.no_inspect)
    if result.image:
        models = ", ".join(f"{m['kind']}:{m['name']}" for m in (result.manifest or {}).get("models", []))
        print(f"image      {result.image}  {result.image_size / 1e6:.0f} MB")
        print(f"models     {models}")
        for key in sorted(result.labels):
            print(f"label      {key}={result.labels[key]}")
        for stage, size in result.stage_sizes.items():
            print(f"size       {stage:<36} {size / 1e6:10.1f} MB")
        print(f"verify     {'passed' if result.verify_ok else 'FAILED'} in a container with no network")
        if not result.verify_ok:
            print(result.verify_output, file=sys.stderr)
            return 1
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from modelbake.sources.tiny import make_tiny_sources

    for kind, path in make_tiny_sources(args.dest).items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelbake", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"modelbake {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def opset(p: argparse.ArgumentParser) -> None:
        p.add_argument("--opset", type=int, default=int(_env("ONNX_OPSET", "17")), help="ONNX opset (default 17)")

    p = sub.add_parser("clip-export", help="the clip-export stage: CLIP models -> ONNX text/image encoders")
    p.add_argument("--models", default=_env("CLIP_MODELS", DEFAULT_CLIP_MODELS), help="comma-separated CLIP specs")
    _add_clip_options(p)
    _add_out(p)
    opset(p)
    p.set_defaults(func=_cmd_clip)

    p = sub.add_parser("reranker-cache", help="the reranker-cache stage: first loadable cross-encoder -> folder + ONNX")
    p.add_argument("--models", default=_env("RERANKER_MODELS", DEFAULT_RERANKER_MODELS), help="ordered fallback list")
    p.add_argument(
        "--int8",
        action="store_true",
        default=_env("RERANKER_INT8", "0") == "1",
        help="also write a dynamic-int8 variant, gated on its scores and ranking",
    )
    p.add_argument("--int8-atol", type=float, default=float(_env("RERANKER_INT8_ATOL", "0.02")),
                   help="max score difference of int8 against sentence-transformers (default 0.02)")  # fmt: skip
    _add_out(p)
    opset(p)
    p.set_defaults(func=_cmd_reranker)

    p = sub.add_parser("regressor-seed", help="the regressor-seed stage: deterministic seed weights")
    p.add_argument(
        "--feature-dim",
        default=_env("REGRESSOR_FEATURE_DIM", "auto"),
        help="input size, or 'auto': the embedding size of the first model of --clip-models (default auto)",
    )
    p.add_argument("--clip-models", default=_env("CLIP_MODELS", DEFAULT_CLIP_MODELS), help="for --feature-dim auto")
    p.add_argument("--seed", type=int, default=int(_env("REGRESSOR_SEED", "0")))
    p.add_argument("--epochs", type=int, default=int(_env("REGRESSOR_EPOCHS", "20")))
    _add_out(p)
    opset(p)
    p.set_defaults(func=_cmd_regressor)

    p = sub.add_parser("train-regressor", help="train the boundary regressor on your data (JSON or JSON Lines)")
    p.add_argument("data", type=Path, help="training records: see models/regressor/README.md")
    p.add_argument("out", type=Path, help="OUT.pth; OUT.safetensors and OUT.metrics.json are written beside it")
    p.add_argument("--epochs", type=int, default=200, help="at most this many epochs (default 200)")
    p.add_argument("--patience", type=int, default=20, help="stop after this many epochs without improvement")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out for validation (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="fixes the split, the init and the batches")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=None, help="expected feature length (default: the data's)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate-data", help="check regressor training data; names the first bad record")
    p.add_argument("data", type=Path)
    p.add_argument(
        "--feature-dim", type=int, default=None, help="expected feature length (default: the first record's)"
    )
    p.set_defaults(func=_cmd_validate_data)

    p = sub.add_parser("merge-manifest", help="merge the stages' fragments into model_manifest.json")
    p.add_argument("root", type=Path)
    p.add_argument("--drop-fragments", action="store_true", help="remove .manifest.d/ after merging")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("download", help="every stage on the host, without Docker (the seed's download_models.py)")
    p.add_argument("--clip", default=_env("CLIP_MODELS", DEFAULT_CLIP_MODELS), help="comma-separated CLIP specs")
    p.add_argument("--reranker", default=_env("RERANKER_MODELS", DEFAULT_RERANKER_MODELS), help="ordered fallback list")
    p.add_argument("--regressor-feature-dim", default="auto", help="integer, or auto (from the first --clip model)")
    p.add_argument("--regressor-seed", type=int, default=0)
    p.add_argument("--regressor-epochs", type=int, default=20)
    for name in ("clip", "reranker", "regressor"):
        p.add_argument(f"--{name}-only", action="store_true", help=f"only the {name} stage")
    _add_clip_options(p)
    _add_out(p)
    opset(p)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("bake", help="check a model selection, run docker buildx bake, inspect the image")
    p.add_argument("targets", nargs="*", help="bake targets or groups (default: runtime)")
    _add_selection(p)
    p.add_argument("--set", action="append", default=[], metavar="TARGET.KEY=VALUE", help="passed to bake --set")
    p.add_argument("--print", action="store_true", help="show the resolved plan (bake --print)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command and its variables, run nothing")
    p.add_argument("--no-inspect", action="store_true", help="skip the image inspection and verify run")
    p.set_defaults(func=_cmd_bake)

    p = sub.add_parser("bundle", help="gather wheels and model sources for an offline build into one folder")
    p.add_argument("out", type=Path, help="a new folder")
    _add_selection(p)
    p.add_argument("--no-wheels", action="store_true", help="model sources only")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="passed to pip download, e.g. --pip-arg=--platform=manylinux_2_28_x86_64")  # fmt: skip
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser("verify", help="re-hash a model tree and run every model on its golden inputs")
    p.add_argument("folder", nargs="?", type=Path, default=Path(_env("MODELBAKE_MODELS", "models")))
    p.add_argument("--quick", action="store_true", help="sizes only: the cheap health check")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("tiny-sources", help="write tiny real models (OpenCLIP local-dir, BERT cross-encoder) for tests")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=_cmd_tiny)
    return parser


def _bars_beside_logs() -> object:
    """Log lines printed above the progress bars instead of through them (tqdm is a build-time package)."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return nullcontext()
    return logging_redirect_tqdm()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Docker passes an unset build arg as an empty variable; libraries that honour SOURCE_DATE_EPOCH
    # then crash on int(""). Empty means unset.
    if os.environ.get("SOURCE_DATE_EPOCH") == "":
        del os.environ["SOURCE_DATE_EPOCH"]
    # Our progress at INFO; the libraries' (open_clip, onnxruntime) chatter only with --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with _bars_beside_logs():
            return args.func(args)
    except (SpecError, ManifestError, ProducerError, BakeError) as exc:
        # One line naming the problem and the fix; a traceback only with --verbose.
        log.debug("traceback", exc_info=True)
        print(f"modelbake {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SpecError) else 1


if __name__ == "__main__":
    sys.exit(main())
