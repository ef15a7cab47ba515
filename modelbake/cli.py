"""``modelbake``: the host CLI. The Docker stages' entrypoints in build/ call the same subcommands.

The stage subcommands and ``download`` are built from the stage registry (modelbake.producers) and the
parameter table (modelbake.params). Build-time subcommands import torch lazily, so ``modelbake verify``
works with the run-time extra alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from modelbake import __version__, context, demo
from modelbake.errors import ModelbakeError
from modelbake.fs import staged_tree
from modelbake.manifest import build_notes, finalize
from modelbake.params import SELECTION, TRAINING, VAL_FRACTION, Training, add_flags, bare_bool_flags, resolve
from modelbake.producers import STAGES, Stage
from modelbake.runtime.commands import add_verify_arguments, run_verify
from modelbake.spec import SpecError

if TYPE_CHECKING:
    from modelbake.bake import Selection

log = logging.getLogger("modelbake")


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("models"), help="model tree root (default: models/)")


def _cmd_stage(args: argparse.Namespace) -> int:
    stage: Stage = args.stage
    stage.run(args.out, resolve(args, stage.params))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    manifest = finalize(args.root, drop_fragments=args.drop_fragments)
    print(f"merged {len(manifest['models'])} models into {args.root}/model_manifest.json")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    """The seed's download_models.py: every stage on the host, into one tree, then the manifest."""
    only = [stage for stage in STAGES.values() if getattr(args, f"{stage.short}_only")]
    if len(only) > 1:
        raise SpecError("give at most one of " + ", ".join(f"--{s.short}-only" for s in STAGES.values()))
    values = resolve(args, SELECTION)
    if args.int8:
        values |= {"CLIP_INT8": True, "RERANKER_INT8": True}
    if args.sign_key is not None:
        from modelbake.signature import key_id

        key_id(args.sign_key, private=True)  # a bad key fails before hours of exporting, not after
    seconds: dict[str, float] = {}
    # Built beside args.out and swapped in whole at the end: until then args.out stays the previous tree.
    with staged_tree(args.out) as tree:
        for stage in only or STAGES.values():
            start = time.perf_counter()
            stage.run(tree, values)
            seconds[stage.name] = time.perf_counter() - start
        manifest = finalize(tree)  # as the image's merge step: readable by a non-root service
        _sign_or_drop_stale(tree, args.sign_key, args.out)
    print(summary_table(manifest, seconds))
    for note in build_notes(manifest):
        print(f"note: {note}")
    print(f"{len(manifest['models'])} models in {args.out}/model_manifest.json")
    return 0


def _sign_or_drop_stale(tree: Path, key: Path | None, shown: Path) -> None:
    """Sign the finished tree with ``key``; without one, a signature left by an earlier run no longer covers
    this tree, so it goes (a reader with a public key then says "unsigned", not "altered"). ``shown``: the
    folder the tree is published as, for the messages."""
    from modelbake.signature import key_id, sign_tree
    from modelbake.spec import SIGNATURE_NAME

    if key is not None:
        sign_tree(tree, key)
        print(f"signed: {shown / SIGNATURE_NAME} (key {key_id(key)})")
    elif (tree / SIGNATURE_NAME).exists():
        (tree / SIGNATURE_NAME).unlink()
        print(f"removed {shown / SIGNATURE_NAME}: it signed an earlier tree (give --sign-key to sign this one)")


def summary_table(manifest: dict, seconds: dict[str, float]) -> str:
    """One row per model: stage, kind, name, files, size, worst parity difference, peak memory while it was
    built, the stage's time."""
    rows = [("stage", "kind", "name", "files", "MB", "max |onnx-torch|", "peak GB", "stage s")]
    for model in manifest["models"]:
        diffs = [f["parity"]["max_abs_diff"] for f in model["files"] if "parity" in f]
        peak = model.get("build", {}).get("peak_rss_bytes")
        rows.append(
            (
                model["stage"],
                model["kind"],
                model["name"],
                str(len(model["files"])),
                f"{sum(f['bytes'] for f in model['files']) / 1e6:.1f}",
                f"{max(diffs):.1e}" if diffs else "-",
                f"{peak / 1e9:.1f}" if peak else "-",
                f"{seconds[model['stage']]:.1f}" if model["stage"] in seconds else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _cmd_train(args: argparse.Namespace) -> int:
    from modelbake.producers.regressor import train

    training = Training(args.epochs, args.seed, args.lr, args.batch_size, args.patience)
    metrics = train(args.data, args.out, training, val_fraction=args.val_fraction, feature_dim=args.feature_dim)
    v = metrics["val_mae"]
    best = metrics["best_epoch"]
    print(f"validation MAE: start {v['start_delta']:.4f} s, end {v['end_delta']:.4f} s (best epoch {best})")
    return 0


def _cmd_validate_data(args: argparse.Namespace) -> int:
    from modelbake.producers.regressor_data import load_dataset

    dataset = load_dataset(args.data, args.feature_dim)
    print(f"{args.data}: {len(dataset.features)} records, {dataset.features.shape[1]} features each: valid")
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    """A selection from --config, then the parameter flags on top (bake and bundle alike)."""
    from modelbake.bake import Selection

    selection = Selection.from_file(args.config) if args.config else Selection()
    for param in SELECTION:
        if getattr(args, param.name) is not None:
            setattr(selection, param.field, getattr(args, param.name))
    return selection


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a TOML selection file (clip, reranker, clip_int8, [regressor], ...)")
    add_flags(p, SELECTION)


def _cmd_bundle(args: argparse.Namespace) -> int:
    from modelbake.bundle import bundle

    doc = bundle(args.out, _selection(args), pip_args=args.pip_arg, wheels=not args.no_wheels)
    size = sum(f["bytes"] for f in doc["files"])
    print(f"{args.out}: {len(doc['files'])} files, {size / 1e6:.0f} MB")
    print(
        f"build it offline: WHEELHOUSE={args.out}/wheelhouse MODEL_SOURCES={args.out}/sources "
        f"modelbake bake --config {args.out}/selection.toml"
    )
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    import shlex

    from modelbake.bake import bake, bake_env, command

    selection = _selection(args)
    variables = selection.variables()  # every spec checked before anything runs
    from modelbake.bundle import check_selection

    if (checked := check_selection(args.config, variables)) is not None:
        print(f"bundle     {checked} files checked", file=sys.stderr)
    targets = args.targets or ["runtime"]
    variables |= {"PLATFORMS": args.platform} if args.platform else {}
    if args.dry_run or args.print:
        cmd, env, root = command(targets, args.set, print_only=args.print), bake_env(variables), context.root()
        line = " ".join(f"{k}={shlex.quote(env[k])}" for k in variables) + " " + shlex.join(cmd)
        if args.dry_run:
            print(line if root == Path.cwd().resolve() else f"cd {shlex.quote(str(root))} && {line}")
            return 0
        return subprocess.run(cmd, env=env, cwd=root).returncode
    result = bake(
        selection,
        targets,
        overrides=args.set,
        inspect=not args.no_inspect,
        push=args.push,
        kubernetes=args.kubernetes,
        service_image=args.service_image,
        sign_key=args.sign_key,
        cache=args.cache,
        platforms=args.platform,
    )
    if result.image:
        print(result.report())
    if result.verify_ok is False:
        print(result.verify_output, file=sys.stderr)
        return 1
    return 0


def _cmd_context(args: argparse.Namespace) -> int:
    print(context.write(args.dest))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from modelbake.sources.tiny import make_tiny_sources

    for kind, path in make_tiny_sources(args.dest).items():
        print(f"{kind}: {path}")
    return 0


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=f"the {stage.name} stage: {stage.help}")
        add_flags(p, stage.params)
        _add_out(p)
        p.set_defaults(func=_cmd_stage, stage=stage)

    p = sub.add_parser("merge-manifest", help="merge the stages' fragments into model_manifest.json")
    p.add_argument("root", type=Path)
    p.add_argument("--drop-fragments", action="store_true", help="remove .manifest.d/ after merging")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("download", help="every stage on the host, without Docker (the seed's download_models.py)")
    add_flags(p, SELECTION)
    for stage in STAGES.values():
        p.add_argument(f"--{stage.short}-only", action="store_true", help=f"only the {stage.name} stage")
    p.add_argument("--int8", action="store_true", help="shorthand for --clip-int8 --reranker-int8")
    p.add_argument("--sign-key", type=Path, metavar="KEY.pem", help="sign the finished tree (EC private key, PEM)")
    _add_out(p)
    p.set_defaults(func=_cmd_download)


def _add_regressor_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-regressor", help="train the boundary regressor on your data (JSON or JSON Lines)")
    p.add_argument("data", type=Path, help="training records: see models/regressor/README.md")
    p.add_argument("out", type=Path, help="OUT.pth; OUT.safetensors and OUT.metrics.json are written beside it")
    t = TRAINING  # the defaults' one home: modelbake.params
    for flag, kind, default, text in (
        ("--epochs", int, t.epochs, "at most this many epochs"),
        ("--patience", int, t.patience, "stop after this many epochs without improvement"),
        ("--val-fraction", float, VAL_FRACTION, "held out for validation"),
        ("--seed", int, t.seed, "fixes the split, the init and the batches"),
        ("--lr", float, t.lr, "Adam's learning rate"),
        ("--batch-size", int, t.batch_size, "records per optimiser step"),
    ):
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default:g})")
    p.add_argument("--feature-dim", type=int, default=None, help="expected feature length (default: the data's)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate-data", help="check regressor training data; names the first bad record")
    p.add_argument("data", type=Path)
    p.add_argument("--feature-dim", type=int, default=None, help="expected feature length (default: the first's)")
    p.set_defaults(func=_cmd_validate_data)


def _add_image_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bake", help="check a model selection, run docker buildx bake, inspect the image")
    p.add_argument("targets", nargs="*", help="bake targets or groups (default: runtime)")
    _add_selection(p)
    p.add_argument("--set", action="append", default=[], metavar="TARGET.KEY=VALUE", help="passed to bake --set")
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[,...]",
        help="the runtime image for each platform (linux/amd64,linux/arm64; sets PLATFORMS); the models are "
        "exported once, on the build platform",
    )
    p.add_argument("--print", action="store_true", help="show the resolved plan (bake --print)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command and its variables, run nothing")
    p.add_argument("--no-inspect", action="store_true", help="skip the image inspection and verify run")
    p.add_argument(
        "--push",
        metavar="REGISTRY/NAME",
        help="push the runtime image as REGISTRY/NAME:TAG and the models image as REGISTRY/NAME-models:TAG; "
        "the report gives each by digest",
    )
    p.add_argument(
        "--kubernetes",
        type=Path,
        metavar="DIR",
        help="with --push: write Kubernetes Deployments into DIR that mount the pushed models image by digest",
    )
    p.add_argument("--service-image", metavar="REF", help="with --kubernetes: the image the Deployments run")
    p.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY.pem",
        help="sign the model tree with this EC private key (a build secret, never an argument or a layer); "
        "with --kubernetes the Deployments verify it with the public key (and the runtime gets MODEL_SIGNING=1)",
    )
    p.add_argument(
        "--cache",
        metavar="REGISTRY/NAME[:TAG]",
        help="import and export a registry build cache shared by every builder (mode=max; containerd image store)",
    )
    p.set_defaults(func=_cmd_bake)

    p = sub.add_parser(
        "context", help="write the build files (Dockerfile.models, docker-bake.hcl, build/, the package) to a folder"
    )
    p.add_argument("dest", type=Path, help="a new folder: run `docker buildx bake` or `docker compose build` in it")
    p.set_defaults(func=_cmd_context)
    _add_tree_commands(sub)


def _add_tree_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="gather wheels and model sources for an offline build into one folder")
    p.add_argument("out", type=Path, help="a new folder")
    _add_selection(p)
    p.add_argument("--no-wheels", action="store_true", help="model sources only")
    p.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to pip download, e.g. --pip-arg=--platform=manylinux_2_28_x86_64",
    )
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser("verify", help="re-hash a model tree and run every model on its golden inputs")
    add_verify_arguments(p)
    p.set_defaults(func=run_verify)

    p = sub.add_parser("demo", help="offline first run: tiny models baked, the example service started and asked")
    demo.configure(p)
    p.set_defaults(func=demo.run)

    p = sub.add_parser("tiny-sources", help="write tiny real models (OpenCLIP local-dir, BERT cross-encoder) for tests")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=_cmd_tiny)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelbake", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"modelbake {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stage_commands(sub)
    _add_regressor_commands(sub)
    _add_image_commands(sub)
    return parser


def _bars_beside_logs() -> object:
    """Log lines printed above the progress bars instead of through them (tqdm is a build-time package)."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return nullcontext()
    return logging_redirect_tqdm()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(bare_bool_flags(sys.argv[1:] if argv is None else argv))
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
    except ModelbakeError as exc:  # every refusal of the project (modelbake.errors)
        # One line naming the problem and the fix; a traceback only with --verbose.
        log.debug("traceback", exc_info=True)
        print(f"modelbake {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SpecError) else 1


if __name__ == "__main__":
    sys.exit(main())
