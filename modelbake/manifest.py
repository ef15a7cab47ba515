"""The manifest: one schema, the hashing, fragment writing, merging and checking.

Writers (the stages) and readers (the run-time loaders, verify) both go through this module, so the
rules live in one place. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from modelbake import __version__
from modelbake.errors import ModelbakeError
from modelbake.fs import atomic_write
from modelbake.onnx_refs import external_locations
from modelbake.spec import FRAGMENTS_DIR, MANIFEST_NAME

SCHEMA_VERSION = 2


class Role(StrEnum):
    """What a listed file is for: written by the producers, read by the loaders (the schema's enum)."""

    TEXT_ENCODER = "text_encoder"
    IMAGE_ENCODER = "image_encoder"
    RERANKER = "reranker"
    REGRESSOR = "regressor"
    MODEL = "model"  # the one graph of a kind that has a single ONNX file
    ONNX_DATA = "onnx_data"  # the weights of a graph too large for one file; its entry's ``external_data``
    GOLDEN = "golden"  # probe inputs and outputs an ONNX entry's ``golden`` names
    TOKENIZER = "tokenizer"
    WEIGHTS = "weights"
    WEIGHTS_STATE_DICT = "weights_state_dict"
    PYTORCH_WEIGHTS = "pytorch_weights"
    HF_MODEL_FILE = "hf_model_file"


class Variant(StrEnum):
    """Variants of one ONNX role; each passed its own gate at build time."""

    FP32 = "fp32"
    INT8 = "int8"


class ManifestError(ModelbakeError):
    """The manifest or a file it lists is wrong; the message names the file and what to do."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files("modelbake.schema").joinpath("manifest.schema.json").read_text())


def _validate(doc: Any, ref: str | None, what: str) -> None:
    import jsonschema

    full = schema()
    target = full if ref is None else {"$ref": f"#/$defs/{ref}", "$defs": full["$defs"]}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(target).iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{what}: invalid at {where}: {error.message}")


UNVERIFIED_ENV = "MODELBAKE_ALLOW_UNVERIFIED"
MANIFEST_PIN_ENV = "MODELBAKE_MANIFEST_SHA256"
PUBLIC_KEY_ENV = "MODELBAKE_SIGNING_PUBLIC_KEY"  # read by modelbake.signature; here for require_manifest
UNPINNED = "unpinned"


def manifest_pin(expected: str | None = None) -> str | None:
    """The manifest sha256 a reader must find: ``expected``, else $MODELBAKE_MANIFEST_SHA256 (a digest, or
    ``@FILE`` holding one, as the runtime image sets it); None when unset or ``unpinned``."""
    value = (os.environ.get(MANIFEST_PIN_ENV, "") if expected is None else expected).strip()
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text().split()[0]
        except (OSError, IndexError) as exc:
            raise ManifestError(f"{MANIFEST_PIN_ENV}={value}: cannot read a digest from that file ({exc})") from exc
    if value in ("", UNPINNED):
        return None
    digest = value.removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"{MANIFEST_PIN_ENV}={value!r}: give sha256:<64 hex digits>, @FILE, or {UNPINNED}")
    return digest


def unverified_allowed(explicit: bool = False) -> bool:
    """Loading files by the seed's names, without a manifest, is an explicit opt-in (argument or env)."""
    return explicit or os.environ.get(UNVERIFIED_ENV, "") == "1"


def require_manifest(
    root: Path, allow_unverified: bool = False, *, expected_sha256: str | None = None, public_key: object = None
) -> bool:
    """True when ``root`` has a manifest; False when it has none and unverified loading is allowed;
    otherwise one ManifestError naming both ways out. A configured pin (``expected_sha256`` or
    $MODELBAKE_MANIFEST_SHA256) or public key (``public_key`` or $MODELBAKE_SIGNING_PUBLIC_KEY) says the
    reader expects a verified tree: then a missing manifest is refused whatever the opt-in says."""
    if (root / MANIFEST_NAME).is_file():
        return True
    pinned = manifest_pin(expected_sha256) is not None
    keyed = bool(str(public_key or os.environ.get(PUBLIC_KEY_ENV, "")).strip())
    if pinned or keyed:
        what = f"the manifest is pinned ({MANIFEST_PIN_ENV})" if pinned else f"a public key is set ({PUBLIC_KEY_ENV})"
        raise ManifestError(
            f"{root}: no {MANIFEST_NAME}, and {what}, so unverified loading is refused even with "
            f"{UNVERIFIED_ENV}=1; point at the tree that was built, or unset the pin and the key"
        )
    if unverified_allowed(allow_unverified):
        return False
    raise ManifestError(
        f"{root}: no {MANIFEST_NAME}, so nothing there can be verified; point at a tree built by modelbake, or "
        f"opt in to loading files by the original names unverified (allow_unverified=True or {UNVERIFIED_ENV}=1)"
    )


def resolve_inside(root: Path, relpath: str) -> Path:
    """The file ``relpath`` names under ``root``; refuses paths and symlinks that leave ``root``."""
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or ".." in pure.parts:
        raise ManifestError(f"{relpath}: manifest path leaves the model folder; paths must be relative to it")
    try:
        root_real = root.resolve()
        path = (root / pure).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13
        raise ManifestError(f"{relpath}: cannot be resolved inside the model folder ({exc})") from exc
    if path != root_real and root_real not in path.parents:
        raise ManifestError(f"{relpath}: resolves to {path}, outside the model folder {root_real} (symlink?)")
    return path


def file_entry(root: Path, path: Path, *, role: str, fmt: str, **extra: Any) -> dict[str, Any]:
    """A manifest entry for a file a stage just wrote under ``root``."""
    rel = path.relative_to(root).as_posix()
    return {
        "path": rel,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "format": fmt,
        "role": role,
        **extra,
    }


def build_time() -> str:
    """UTC build time; SOURCE_DATE_EPOCH wins so that rebuilds of the same inputs are identical."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _dump(doc: dict[str, Any], path: Path) -> None:
    """Atomic write: a reader never sees half a manifest."""
    atomic_write(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_fragment(root: Path, stage: str, models: list[dict[str, Any]]) -> Path:
    fragment = {"schema_version": SCHEMA_VERSION, "stage": stage, "created": build_time(), "models": models}
    _validate(fragment, "fragment", f"fragment of stage {stage}")
    path = root / FRAGMENTS_DIR / f"{stage}.json"
    _dump(fragment, path)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(root: Path, models: Iterable[dict[str, Any]], *, quick: bool = False) -> None:
    """Every listed file exists inside ``root`` with the recorded size and sha256, and every file a model's
    graphs or preprocessing name is one of its listed files.

    ``quick``: no sha256. What opening a tree does: the loaders then hash the very bytes they load
    (:func:`read_listed`), so a file swapped after a check made by path cannot be what loads.
    """
    for model in models:
        for entry in model["files"]:
            path = resolve_inside(root, entry["path"])
            if not path.is_file():
                raise ManifestError(f"{entry['path']}: listed for model {model['name']} but missing; rebuild it")
            _check_entry(entry, path.stat().st_size, None if quick else partial(sha256_file, path))
        _check_references(root, model)


def _check_entry(entry: dict[str, Any], size: int, digest: Callable[[], str] | None) -> None:
    """``entry``'s recorded size, then its sha256 (``digest()``: computed only when the size matched)."""
    if size != entry["bytes"]:
        raise ManifestError(
            f"{entry['path']}: size {size} bytes, manifest says {entry['bytes']}; "
            "the file is truncated or replaced, rebuild or restore it"
        )
    if digest is not None and (actual := digest()) != entry["sha256"]:
        raise ManifestError(
            f"{entry['path']}: sha256 {actual} does not match the manifest's {entry['sha256']}; "
            "the file was altered, rebuild or restore it"
        )


def read_listed(root: Path, model: dict[str, Any], relpath: str, *, by: str = "the loader") -> bytes:
    """The bytes of ``relpath``, a file the manifest lists for ``model``, read once and checked (size and
    sha256 of the buffer). A loader hands on these bytes, never the path: a file swapped on disk after this
    check cannot be what loads. ``by`` names who asked for the file, for the refusal of an unlisted one."""
    entry = _listed(model, relpath, by)
    path = resolve_inside(root, relpath)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{relpath}: listed for model {model['name']} but missing; rebuild it") from exc
    _check_entry(entry, len(data), lambda: hashlib.sha256(data).hexdigest())
    return data


def read_graph(root: Path, model: dict[str, Any], entry: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
    """An ONNX entry's graph and the external-data files it names ({location as written: bytes}), each read
    once and checked (:func:`read_listed`); every location must be a listed file of the same model."""
    graph = read_listed(root, model, entry["path"])
    external = {
        location: read_listed(root, model, beside(entry["path"], location), by=entry["path"])
        for location in sorted(external_locations(graph))
    }
    return graph, external


def beside(graph: str, location: str) -> str:
    """The tree path of an external-data ``location`` as the graph at tree path ``graph`` writes it."""
    return posixpath.normpath((PurePosixPath(graph).parent / location).as_posix())


def _listed(model: dict[str, Any], relpath: str, by: str) -> dict[str, Any]:
    """The entry of ``model`` listing ``relpath``; refuses a file the model does not list."""
    for entry in model["files"]:
        if entry["path"] == relpath:
            return entry
    raise ManifestError(
        f"{by} names {relpath}, which the manifest does not list for model {model['name']}; "
        "every file a model reads (a graph's weights beside it, its tokenizer) must be listed: rebuild the tree"
    )


def _check_references(root: Path, model: dict[str, Any]) -> None:
    """Every file a model's graphs or preprocessing make a loader read is one of its listed files: a graph's
    external-data locations (onnxruntime opens them itself) and the tokenizer. Otherwise a verified graph or
    manifest could still load bytes no digest covers."""
    if tokenizer := model.get("preprocessing", {}).get("tokenizer"):
        _listed(model, tokenizer, "its preprocessing")
    for entry in model["files"]:
        if entry.get("format") != "onnx":
            continue
        for location in external_locations(resolve_inside(root, entry["path"])):
            _listed(model, beside(entry["path"], location), entry["path"])


def merge_fragments(root: Path) -> dict[str, Any]:
    """Merge ``root/.manifest.d/*.json`` into ``root/model_manifest.json`` after checking every file."""
    fragment_dir = root / FRAGMENTS_DIR
    paths = sorted(fragment_dir.glob("*.json")) if fragment_dir.is_dir() else []
    if not paths:
        raise ManifestError(f"no manifest fragments in {fragment_dir}; did any producing stage run?")
    models: list[dict[str, Any]] = []
    times: list[str] = []
    for path in paths:
        try:
            fragment = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path.name}: not valid JSON ({exc}); rerun the stage that wrote it") from exc
        _validate(fragment, "fragment", path.name)
        models.extend(fragment["models"])
        times.append(fragment["created"])
    seen_names: dict[tuple[str, str], str] = {}
    seen_paths: dict[str, str] = {}
    for model in models:
        ident = (model["kind"], model["name"])
        if ident in seen_names:
            raise ManifestError(f"{model['kind']} model {model['name']} comes from two stages; select it once")
        seen_names[ident] = model["stage"]
        for entry in model["files"]:
            if entry["path"] in seen_paths:
                raise ManifestError(
                    f"{entry['path']}: written by {seen_paths[entry['path']]} and {model['name']}; names must be unique"
                )
            seen_paths[entry["path"]] = model["name"]
    check_files(root, models)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "modelbake_version": __version__,
        # Not "now": merging the same fragments again must give the same bytes, or a build whose merge step
        # reran (BuildKit's cache pruned) would disagree with an image that kept the older merge.
        "created": max(times),
        # Stage by stage (fragments sorted by name), each in selection order: the first CLIP model
        # selected is the services' default, as CLIP_MODELS documents.
        "models": models,
    }
    _validate(manifest, None, MANIFEST_NAME)
    _dump(manifest, root / MANIFEST_NAME)
    return manifest


def finalize(root: Path, *, drop_fragments: bool = False) -> dict[str, Any]:
    """The manifest stage: merge the fragments, optionally drop them, and normalise what the build made."""
    manifest = merge_fragments(root)
    if drop_fragments:
        shutil.rmtree(root / FRAGMENTS_DIR)
    normalise(root, manifest)
    return manifest


def normalise(root: Path, manifest: dict[str, Any]) -> None:
    """World-readable listed files and their folders (the runtime's non-root user reads a root-owned tree),
    and with SOURCE_DATE_EPOCH every such mtime set to it (file times go into the image layer). Files the
    manifest does not list, such as a user's own beside the tree, are left as they are."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    files = [root / MANIFEST_NAME, *(root / e["path"] for m in manifest["models"] for e in m["files"])]
    folders = {parent for f in files for parent in f.relative_to(root).parents}
    # Deepest first, so a folder's time is set after everything inside it.
    for path in [*files, *sorted((root / f for f in folders), key=lambda p: -len(p.parts))]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)
        if epoch.isdigit():
            os.utime(path, (int(epoch), int(epoch)))


def onnx_entry(model: dict[str, Any], role: str, variant: str = Variant.FP32) -> dict[str, Any]:
    """The ONNX file of ``model`` with ``role`` and ``variant``; LookupError names what there is."""
    for entry in model["files"]:
        if entry["role"] == role and entry.get("variant", Variant.FP32) == variant:
            return entry
    have = sorted({f"{e['role']}/{e['variant']}" for e in model["files"] if "variant" in e})
    raise LookupError(
        f"{model['kind']} {model['name']}: no {role} ({variant}) in the manifest; it has {', '.join(have) or 'none'}"
        + (" (build with the stage's int8 setting)" if variant == Variant.INT8 else "")
    )


def build_notes(manifest: dict[str, Any]) -> list[str]:
    """What a build chose not to do, one line each: a reranker fallback taken, a variant not shipped and why
    (refused by its gate, or slower than fp32 on the build machine). Printed after a download and a bake."""
    lines = []
    for model in manifest.get("models", []):
        name = f"{model['kind']}:{model['name']}"
        lines += [f"{name}: {note}" for note in model.get("notes", [])]
        for entry in model["files"]:
            lines += [
                f"{name}: {entry['role']} {d['variant']} ({d['method']}) not shipped: {d['why']}"
                for d in entry.get("speed", {}).get("not_shipped", [])
            ]
    return lines


def checked_model(
    root: Path, kind: str, name: str | None = None, *, manifest_sha256: str | None = None
) -> dict[str, Any]:
    """The first ``kind`` model (named ``name``, if given) of ``root``'s manifest, its files present with
    their sizes (the loader hashes what it reads, :func:`read_listed`); LookupError names what there is.
    """
    models = [m for m in read_manifest(root, expected_sha256=manifest_sha256)["models"] if m["kind"] == kind]
    chosen = [m for m in models if name in (None, m["name"])]
    if not chosen:
        names = ", ".join(m["name"] for m in models) or "none"
        wanted = f"{kind} model {name!r}" if name else f"{kind} model"
        raise LookupError(f"no {wanted} in {root}; it has: {names}. Build it with modelbake (see README)")
    check_files(root, chosen[:1], quick=True)
    return chosen[0]


def read_manifest(root: Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read and schema-check ``root/model_manifest.json`` (files are checked by :func:`check_files`).

    With a pin (``expected_sha256``, else $MODELBAKE_MANIFEST_SHA256) the manifest's own sha256 must match.
    """
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; point at a folder built by modelbake (models/)")
    data = path.read_bytes()
    pin = manifest_pin(expected_sha256)
    if pin is not None and (actual := hashlib.sha256(data).hexdigest()) != pin:
        raise ManifestError(
            f"{path}: sha256 {actual} is not the pinned {pin} ({MANIFEST_PIN_ENV}); the manifest was swapped or "
            f"edited: restore it, or for another tree give its own digest (or {MANIFEST_PIN_ENV}={UNPINNED})"
        )
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); rebuild the model tree") from exc
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {version!r} is not supported by modelbake {__version__} "
            f"(reads {SCHEMA_VERSION}); use the modelbake release that built it or rebuild the models"
        )
    _validate(doc, None, str(path))
    return doc
