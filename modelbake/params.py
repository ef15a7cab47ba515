"""The build parameters: one table, read by the CLI, the bake driver's Selection, and checked against
Dockerfile.models, docker-bake.hcl and compose.yaml by tests/test_params.py.

Each parameter has one upper-case name (build arg, bake variable and environment variable alike), at most one
CLI flag (the same in every subcommand that reads it), one default written as a build arg would be, a type,
and the stages that read it. Torch-free: the bake driver and the runtime image may import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from modelbake.kinds import CLIP, PRODUCING_STAGES, REGRESSOR, RERANKER
from modelbake.spec import (
    DEFAULT_CLIP_MODELS,
    DEFAULT_RERANKER_MODELS,
    ClipSpec,
    RerankerSpec,
    SpecError,
    parse_clip_list,
    parse_reranker_list,
)

# Where a parameter is declared: a Dockerfile ARG, a docker-bake.hcl variable, a compose build arg.
ARG, BAKE, COMPOSE = "arg", "bake", "compose"
EVERYWHERE = frozenset({ARG, BAKE, COMPOSE})
BAKE_ONLY = frozenset({BAKE})


def parse_bool(text: str | bool) -> bool:
    """``1``/``0`` as build args write them (``true``/``false``/``yes``/``no`` too)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SpecError(f"{text!r} is not a yes/no value; give 1 or 0")


AUTO = "auto"


def parse_feature_dim(text: str | int) -> int | str:
    """A positive integer, or ``auto`` (the embedding size of the first CLIP model, known to the stage)."""
    value = str(text).strip()
    if value == AUTO:
        return AUTO
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise SpecError(f"{text!r}: give a positive integer or 'auto' (the first CLIP model's)")


def _number(kind: type, minimum: float | None = None, maximum: float | None = None) -> Callable[[str], Any]:
    def parse(text: str | int | float) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from exc
        if minimum is not None and value < minimum:
            raise SpecError(f"{text!r} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise SpecError(f"{text!r} is above the maximum {maximum}")
        return value

    parse.__name__ = kind.__name__
    return parse


# INT8_SHIP: ship an int8 variant only where the build machine timed it faster than fp32, or whenever it
# passed its gate (other CPUs then decide for themselves, modelbake.runtime.variants).
INT8_SHIP_CHOICES = ("faster", "gated")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value not in allowed:
            raise SpecError(f"{text!r}: give one of {', '.join(allowed)}")
        return value

    parse.__name__ = "choice"
    return parse


Models = str | Sequence[str | ClipSpec | RerankerSpec]  # "A,B", or its items (as typed, or parsed)


def _models(value: Models) -> str:
    """A comma-separated list, as a build arg writes it (a list of texts or of parsed specs is joined)."""
    if isinstance(value, list | tuple):
        return ",".join(item if isinstance(item, str) else item.text for item in value)
    return str(value)


def _clip_models(value: Models) -> tuple[ClipSpec, ...]:
    """Parsed once, here (architectures and tags are checked by the driver and the stage)."""
    return tuple(parse_clip_list(_models(value)))


def _reranker_models(value: Models) -> tuple[RerankerSpec, ...]:
    return tuple(parse_reranker_list(_models(value)))


@dataclass(frozen=True)
class Param:
    name: str
    default: str  # as a build arg writes it
    help: str
    parse: Callable[[Any], Any] = str
    stages: tuple[str, ...] = ()
    flag: str | None = None  # the CLI flag; None: not a CLI option (infrastructure)
    where: frozenset[str] = EVERYWHERE
    bake_default: str | None = None  # docker-bake.hcl's default when it is an expression

    @property
    def field(self) -> str:
        """The attribute of :class:`modelbake.bake.Selection` and the key of a selection file."""
        return self.name.lower().removesuffix("_models")

    def value(self, text: Any) -> Any:
        try:
            return self.parse(text)
        except SpecError as exc:
            raise SpecError(f"{self.name} ({self.flag or 'build arg'}) {exc}") from exc

    @property
    def typed_default(self) -> Any:
        return self.value(self.default)

    def from_env(self) -> Any:
        """The environment's value when set (an empty build arg means unset), else the default."""
        return self.value(os.environ.get(self.name) or self.default)

    def as_arg(self, value: Any) -> str:
        """A typed value written back as a build arg: the default's own spelling when it is the default, so
        `modelbake bake` and a plain `docker buildx bake` pass the same string and share BuildKit's cache
        (1e-3 and 0.001 are one value but two cache keys; the rerun stage then re-times its variants)."""
        if value == self.typed_default:
            return self.default
        if isinstance(value, bool):
            return "1" if value else "0"
        return _models(value) if isinstance(value, list | tuple) else str(value)


_CLIP = (CLIP.stage,)
_RERANKER = (RERANKER.stage,)
_REGRESSOR = (REGRESSOR.stage,)
_BOOL = parse_bool

# One row a line reads best as a table; the formatter would spread each over five.
# fmt: off
TABLE: tuple[Param, ...] = (
    # --- model selection and stage settings: CLI flags, Selection fields, build args ---------------------
    Param("CLIP_MODELS", DEFAULT_CLIP_MODELS, "comma-separated CLIP specs (docs/reference.md: model specs)",
          _clip_models, (*_CLIP, *_REGRESSOR), "--clip"),
    Param("CLIP_INT8", "0", "also ship int8 variants (`*_int8.onnx`) where gated and faster than fp32 here",
          _BOOL, _CLIP, "--clip-int8"),
    Param("CLIP_KEEP_PYTORCH", "0", "also keep the PyTorch weights in models/clip/ (not needed at run time)",
          _BOOL, _CLIP, "--clip-keep-pytorch"),
    Param("CLIP_PARITY_ATOL", "1e-3", "max abs difference allowed between onnxruntime and PyTorch",
          _number(float, 0), _CLIP, "--clip-parity-atol"),
    Param("CLIP_PARITY_MIN_COSINE", "0.999", "min cosine similarity between onnxruntime and PyTorch outputs",
          _number(float, -1), _CLIP, "--clip-parity-min-cosine"),
    Param("CLIP_INT8_MIN_COSINE", "0.99", "min cosine of the int8 variants against PyTorch",
          _number(float, -1), _CLIP, "--clip-int8-min-cosine"),
    Param("RERANKER_MODELS", DEFAULT_RERANKER_MODELS, "ordered fallback list of cross-encoders",
          _reranker_models, _RERANKER, "--reranker"),
    Param("RERANKER_INT8", "0", "also ship an int8 variant, gated on its scores and ranking, if faster here",
          _BOOL, _RERANKER, "--reranker-int8"),
    Param("RERANKER_INT8_TOP_K", "3", "int8 gate: per probe query, the top K passages in sentence-transformers' order",
          _number(int, 0), _RERANKER, "--reranker-int8-top-k"),
    Param("RERANKER_INT8_MIN_TAU", "0.9", "int8 gate: per probe query, min Kendall's tau against sentence-transformers",
          _number(float, -1, 1), _RERANKER, "--reranker-int8-min-tau"),
    Param("RERANKER_STRICT", "0", "1 = the first candidate must work: any fallback fails the stage",
          _BOOL, _RERANKER, "--reranker-strict"),
    Param("REGRESSOR_FEATURE_DIM", "auto", "seed weights' input size: an integer, or auto (the first CLIP model's)",
          parse_feature_dim, _REGRESSOR, "--regressor-feature-dim"),
    Param("REGRESSOR_SEED", "0", "seed of the regressor's synthetic set and init",
          _number(int, 0), _REGRESSOR, "--regressor-seed"),
    Param("REGRESSOR_EPOCHS", "20", "training epochs of the seed weights",
          _number(int, 1), _REGRESSOR, "--regressor-epochs"),
    Param("INT8_SHIP", "faster", "which gated int8 variants ship: faster (than fp32 on the role's workload on "
          "the build machine) or gated (every one its gate passed; `auto` checks it where the tree is opened)",
          _choice(*INT8_SHIP_CHOICES), (*_CLIP, *_RERANKER), "--int8-ship"),
    Param("INT8_REQUIRED", "0", "1 = a graph whose int8 was refused by its gate or is slower fails the stage "
          "(default: it ships fp32 alone and says why)", _BOOL, (*_CLIP, *_RERANKER), "--int8-required"),
    Param("ONNX_EXTERNAL_DATA_BYTES", "2000000000", "graphs whose weights pass this many bytes ship as NAME.onnx "
          "+ NAME.onnx.data (protobuf caps one file at 2 GiB)", _number(int, 1), (*_CLIP, *_RERANKER),
          "--onnx-external-data-bytes"),
    Param("ONNX_OPSET", "17", "ONNX opset of every exported graph",
          _number(int, 7), PRODUCING_STAGES, "--opset"),
    # --- the image build: build args without a CLI flag ------------------------------------------------
    Param("BASE_IMAGE", "python:3.11-slim-bookworm", "build-time base image (Debian 12 with python3)",
          stages=("base-image",)),
    Param("RUNTIME_BASE_IMAGE", "${BASE_IMAGE}", "run-time base image", stages=("runtime-base",),
          bake_default="BASE_IMAGE"),
    Param("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu", "extra pip index for CPU torch",
          stages=("base-image",)),
    Param("PIP_OFFLINE", "0", "1 = install from the wheelhouse alone (on when WHEELHOUSE is given)", _BOOL,
          ("base-image", "runtime-base"), bake_default='notequal(WHEELHOUSE, "") ? "1" : "0"'),
    Param("RUNTIME_UID", "10001", "uid/gid of the non-root service user", _number(int, 1),
          ("runtime-base", "runtime-verified"), where=frozenset({ARG})),
    Param("SOURCE_DATE_EPOCH", "", "reproducible builds: every time in the tree and manifest (empty: now)",
          stages=(*PRODUCING_STAGES, "manifest")),
    Param("MODELS_MANIFEST_DIGEST", "", "sha256 of the runtime image's manifest; `modelbake bake` sets it",
          stages=("runtime-verified",), where=frozenset({ARG, BAKE})),
    Param("SIGN_MODELS", "0", "1 = sign the tree with the build secret model_signing_key (model.sig)", _BOOL,
          ("manifest",), where=frozenset({ARG, BAKE}), bake_default='notequal(SIGNING_KEY_FILE, "") ? "1" : "0"'),
    Param("SIGNING_KEY_ID", "", "public fingerprint of the signing key, for the cache; `modelbake bake` sets it",
          stages=("manifest",), where=frozenset({ARG, BAKE})),
    Param("MODEL_SIGNING", "0", "1 = the runtime image can verify signatures (adds model_signing, ~70 MB)", _BOOL,
          ("runtime-base",), where=frozenset({ARG, BAKE})),
    Param("RUNTIME_OPENVINO", "0", "1 = the runtime image also carries OpenVINO (its CPU plugin and ONNX reader, "
          "~100 MB): `auto` then checks it on each role, bf16 where the CPU computes it (AMX)", _BOOL,
          ("runtime-base",), where=frozenset({ARG, BAKE})),
    # --- bake only: inputs, names and labels ----------------------------------------------------------
    Param("WHEELHOUSE", "", "a wheel folder for offline pip (named context)", where=BAKE_ONLY),
    Param("MODEL_SOURCES", "", "a folder of local model sources, mounted at /sources", where=BAKE_ONLY),
    Param("PLATFORMS", "", "target platforms of the runtime and models images (linux/amd64,linux/arm64); empty: "
          "the builder's own. The models are exported once, on the build platform", where=BAKE_ONLY),
    Param("IMAGE", "modelbake", "image name", where=BAKE_ONLY),
    Param("TAG", "latest", "image tag", where=BAKE_ONLY),
    Param("MODELS_OUT", "models", "where the `models` target writes the tree on the host", where=BAKE_ONLY),
    Param("PUSH_TO", "", "REGISTRY/NAME the `push` group pushes the runtime and models images to", where=BAKE_ONLY),
    Param("SIGNING_KEY_FILE", "", "an EC private key (PEM) given to the build as the secret model_signing_key",
          where=BAKE_ONLY),
    Param("BUILD_CACHE", "", "REGISTRY/NAME:TAG of a registry build cache (every target imports, runtime exports)",
          where=BAKE_ONLY),
    Param("PROVENANCE", "0", "1 = pushed images carry a provenance attestation (mode=max)", _BOOL, where=BAKE_ONLY),
    Param("GIT_REVISION", "", "org.opencontainers.image.revision label", where=BAKE_ONLY),
    Param("SOURCE_URL", "", "org.opencontainers.image.source label", where=BAKE_ONLY),
)
# fmt: on
BY_NAME = {p.name: p for p in TABLE}


@dataclass(frozen=True)
class Training:
    """One run of the regressor's training loop (``modelbake.producers.regressor.fit``)."""

    epochs: int
    seed: int  # fixes the split, the init and the batches
    lr: float  # Adam
    batch_size: int
    patience: int | None  # stop after this many epochs without a better validation MAE; None: run them all


# `modelbake train-regressor` on the user's data. The seed stage uses the same optimiser settings with its own
# REGRESSOR_EPOCHS and REGRESSOR_SEED and no early stop (:func:`seed_training`): on its 4096 synthetic
# examples, 20 epochs at lr 1e-3 / batch 64 and at 3e-3 / 256 (the seed's settings before) reach the same
# held-out MAE (0.115 and 0.116 s), so one setting serves both.
TRAINING = Training(epochs=200, seed=0, lr=1e-3, batch_size=64, patience=20)
VAL_FRACTION = 0.2  # of the user's records, held out for validation


def seed_training(values: dict[str, Any]) -> Training:
    """The regressor-seed stage's run: :data:`TRAINING`'s optimiser, the stage's epochs and seed, every epoch."""
    return replace(TRAINING, epochs=values["REGRESSOR_EPOCHS"], seed=values["REGRESSOR_SEED"], patience=None)


SELECTION = tuple(p for p in TABLE if p.flag)  # what a model selection sets (bake driver, bundle, CLI)


def for_stage(stage: str) -> tuple[Param, ...]:
    """The CLI parameters ``stage`` reads, in table order."""
    return tuple(p for p in SELECTION if stage in p.stages)


def defaults(params: Iterable[Param] = SELECTION, **given: Any) -> dict[str, Any]:
    """Typed values: ``given`` (by name, parsed as a build arg is), else the environment, else the table."""
    return {p.name: p.value(given[p.name]) if p.name in given else p.from_env() for p in params}


def resolve(args: Any, params: Iterable[Param]) -> dict[str, Any]:
    """Typed values for ``params``: the flag when given, else the environment, else the table."""
    return {p.name: p.from_env() if getattr(args, p.name, None) is None else getattr(args, p.name) for p in params}


_BOOL_WORDS = ("0", "1", "true", "false", "yes", "no", "on", "off")


def bare_bool_flags(argv: list[str]) -> list[str]:
    """``--clip-int8`` not followed by a yes/no word becomes ``--clip-int8=1``, so a positional after it
    (``bake --clip-int8 runtime``) is not taken for the flag's value; ``--clip-int8 0`` keeps its value."""
    flags = {p.flag for p in SELECTION if p.parse is parse_bool}
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1].lower() if i + 1 < len(argv) else None
        out.append(f"{arg}=1" if arg in flags and following not in _BOOL_WORDS else arg)
    return out


def add_flags(parser: Any, params: Iterable[Param]) -> None:
    """One argparse option per parameter (dest = its name). An unset flag stays None: :func:`resolve` (or a
    selection file) fills it, so a bad environment value only matters to the commands that read it."""
    import argparse

    for p in params:

        def check(text: str, p: Param = p) -> Any:
            try:
                return p.value(text)
            except SpecError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc

        extra = {"nargs": "?", "const": True, "metavar": "0|1"} if p.parse is parse_bool else {}
        # A bare `--clip-int8` means 1; the Dockerfile's RUN lines pass the build arg's value (`--clip-int8 0`).
        parser.add_argument(
            p.flag, dest=p.name, type=check, help=f"{p.help} (env {p.name}, default {p.default})", **extra
        )


def markdown() -> str:
    """docs/parameters.md, generated from :data:`TABLE` (``python -m modelbake.params > docs/parameters.md``;
    tests/test_params.py checks the page is current)."""
    where_names = {ARG: "Dockerfile", BAKE: "bake", COMPOSE: "compose"}
    rows = [
        "# Build parameters",
        "",
        "Generated from `modelbake/params.py` (`python -m modelbake.params > docs/parameters.md`); do not edit.",
        "",
        "One table drives the Dockerfile ARGs, the bake variables, the compose build args and the CLI flags. Each",
        "parameter has one upper-case name (environment variable, build arg and bake variable alike) and at most",
        "one flag, the same in every subcommand that reads it. A flag's default is the environment variable's",
        "value if set, else the table's. Boolean flags take `0`/`1` or no value (`--clip-int8` is",
        "`--clip-int8 1`; `--clip-int8 0` overrides `CLIP_INT8=1` from the environment).",
        "",
        "| name | flag | default | meaning | read by | declared in |",
        "|---|---|---|---|---|---|",
    ]
    for p in TABLE:
        default = f"`{p.bake_default}` (bake)" if p.bake_default and p.default.startswith("$") else f"`{p.default}`"
        rows.append(
            f"| `{p.name}` | {f'`{p.flag}`' if p.flag else ''} | {default if p.default else 'empty'} | "
            f"{p.help.replace('|', '/')} | {', '.join(p.stages) or 'the bake file'} | "
            f"{', '.join(where_names[w] for w in (ARG, BAKE, COMPOSE) if w in p.where)} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
