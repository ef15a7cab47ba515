"""The bake driver: a model selection -> checked bake variables -> ``docker buildx bake`` -> inspection.

Host side and torch-free. CLIP names are checked against OpenCLIP's model configs when open_clip is
installed (its files are read, the package is not imported), so a typo fails before any build.

Python API::

    from modelbake.bake import Selection, bake
    result = bake(Selection(clip=["ViT-B/32", "RN50"]), targets=["runtime"])
    print(result.image_size, result.stage_sizes, result.manifest_digest, result.verify_ok)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from modelbake import context
from modelbake.engine import TRANSIENT_ERROR, docker, sdk_client
from modelbake.errors import ModelbakeError
from modelbake.manifest import build_notes
from modelbake.params import BY_NAME, SELECTION
from modelbake.spec import SIGNATURE_NAME, SpecError, check_clip_architecture

# The same key docker-bake.hcl labels when MODELS_MANIFEST_DIGEST is given.
DIGEST_LABEL = "io.modelbake.manifest-digest"


class BakeError(ModelbakeError):
    """The build cannot start or did not succeed; the message names the fix."""


class Selection:
    """What to bake: a value per parameter of :data:`modelbake.params.SELECTION`, set by field name
    (``Selection(clip=["ViT-B/32"], clip_int8=True)``); unset ones come from the environment, else the table."""

    def __init__(self, **fields: Any) -> None:
        object.__setattr__(self, "values", {})
        for key, value in fields.items():
            setattr(self, key, value)

    def __getattr__(self, key: str) -> Any:
        param = _FIELDS.get(key)
        if param is None:
            raise AttributeError(key)
        return self.values[param.name] if param.name in self.values else param.from_env()

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in _FIELDS:
            raise SpecError(f"unknown selection field {key!r}; known: {', '.join(_FIELDS)}")
        self.values[_FIELDS[key].name] = _FIELDS[key].value(value)

    @classmethod
    def from_file(cls, path: Path) -> Selection:
        """A TOML file of fields (``clip = ["ViT-B/32"]``, ``clip_int8 = true``); ``[regressor]`` holds the
        ``regressor_*`` fields without their prefix (``epochs = 5``)."""
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SpecError(f"{path}: cannot read the selection ({exc})") from exc
        fields = {f"regressor_{k}": v for k, v in doc.pop("regressor", {}).items()} | doc
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise SpecError(f"{path}: unknown keys {unknown}; known: {sorted(_FIELDS)}")
        return cls(**fields)

    def to_toml(self) -> str:
        """Every field, as :meth:`from_file` reads it back."""
        lines = []
        for p in SELECTION:
            value = getattr(self, p.field)
            value = p.as_arg(value) if isinstance(value, tuple) else value  # specs: "A,B", as a build arg
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{p.field} = {text}")
        return "\n".join(lines) + "\n"

    def variables(self) -> dict[str, str]:
        """The bake variables, after checking every spec (raises SpecError with suggestions)."""
        for spec in self.clip:  # tags are checked by the stage, before downloads
            check_clip_architecture(spec)
        return {p.name: p.as_arg(getattr(self, p.field)) for p in SELECTION}


_FIELDS = {p.field: p for p in SELECTION}


def command(targets: list[str], overrides: list[str], *, print_only: bool = False, progress: str = "auto") -> list[str]:
    cmd = ["docker", "buildx", "bake", f"--progress={progress}", *targets]
    for item in overrides:
        cmd += ["--set", item]
    return [*cmd, "--print"] if print_only else cmd


@dataclass
class BakeResult:
    command: list[str]
    image: str | None = None
    image_size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    manifest_digest: str | None = None
    stage_sizes: dict[str, int] = field(default_factory=dict)
    verify_output: str = ""
    verify_ok: bool | None = None
    pushed: dict[str, str] = field(default_factory=dict)  # "runtime" / "models" -> REPOSITORY@sha256:...
    kubernetes: list[Path] = field(default_factory=list)  # manifests written with the pushed digests
    signed: str | None = None  # the signing key's id, once model.sig was found in the built image

    def report(self) -> str:
        """What the driver prints after a build: image, models, labels, size per stage, verify."""
        models = ", ".join(f"{m['kind']}:{m['name']}" for m in (self.manifest or {}).get("models", []))
        size = f"  {self.image_size / 1e6:.0f} MB" if self.image_size is not None else ""
        lines = [f"image      {self.image}{size}", f"models     {models}"]
        lines += [f"note       {note}" for note in build_notes(self.manifest or {})]
        lines += [f"label      {key}={self.labels[key]}" for key in sorted(self.labels)]
        lines += [f"size       {stage:<36} {n / 1e6:10.1f} MB" for stage, n in self.stage_sizes.items()]
        if self.verify_ok is not None:
            lines.append(f"verify     {'passed' if self.verify_ok else 'FAILED'} in a container with no network")
        if self.signed:
            lines.append(f"signed     /models/{SIGNATURE_NAME}, key {self.signed}")
        lines += [f"pushed     {what:<8} {ref}" for what, ref in self.pushed.items()]
        lines += [f"kubernetes {path}" for path in self.kubernetes]
        return "\n".join(lines)


# Bake variables that name a host path: relative to where the user runs modelbake, also when bake itself
# runs in an installed package's build files (modelbake.context).
PATH_VARIABLES = ("MODELS_OUT", "WHEELHOUSE", "MODEL_SOURCES", "SIGNING_KEY_FILE")


def bake_env(variables: dict[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment bake runs with: ``environ`` and ``variables``, a relative path variable made absolute
    when bake runs in another folder than this one (an installed modelbake's build files)."""
    env = {**environ, **variables}
    if context.root() != Path.cwd().resolve():
        env |= {k: str(Path(env[k]).absolute()) for k in PATH_VARIABLES if env.get(k)}
    return env


def _run_bake(cmd: list[str], env: dict[str, str], retries: int = 1, progress: TextIO | None = None) -> None:
    """Run bake in the build files' folder, its progress on ``progress`` (our stderr); retry once on
    BuildKit's transient graph error."""
    proc = subprocess.Popen(cmd, env=env, cwd=context.root(), stderr=subprocess.PIPE, text=True, bufsize=1)
    transient, out = False, progress or sys.stderr
    for line in proc.stderr or []:
        out.write(line)
        transient = transient or TRANSIENT_ERROR in line
    if proc.wait() == 0:
        return
    if transient and retries > 0:
        return _run_bake(cmd, env, retries - 1, progress)
    raise BakeError(f"`{' '.join(cmd)}` failed (BuildKit's output above names the stage)")


def stage_sizes(client: Any, image: str, manifest: dict[str, Any], base_image: str | None) -> dict[str, int]:
    """Bytes per stage: the runtime image's layers split at the models layer, and each producing stage's
    files as the manifest lists them (their sum is the models layer, plus the manifest itself)."""
    history = client.images.get(image).history()  # newest layer first
    sizes: dict[str, int] = {}
    models_at = next((i for i, h in enumerate(history) if h["CreatedBy"].startswith("COPY /models/ /models/")), None)
    below = sum(h["Size"] for h in history[models_at + 1 :]) if models_at is not None else 0
    if base_image:
        try:
            sizes["runtime base image"] = int(client.images.get(base_image).attrs["Size"])
            below -= sizes["runtime base image"]
        except Exception:  # pulled by digest or gone: report runtime-base with its base included
            pass
    sizes["runtime-base (python, onnxruntime)"] = below
    for model in manifest.get("models", []):
        sizes[model["stage"]] = sizes.get(model["stage"], 0) + sum(f["bytes"] for f in model["files"])
    if models_at is not None:
        sizes["models layer"] = int(history[models_at]["Size"])
    sizes["runtime image"] = int(client.images.get(image).attrs["Size"])
    return sizes


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: an origin such as https://user:TOKEN@host/repo or
    .../repo?access_token=TOKEN must not reach a label; "" for one that does not parse (a bad port)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url
    try:
        port = parts.port
    except ValueError:  # e.g. host:99999: not a URL to publish
        return ""
    netloc = parts.hostname + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def _provenance(environ: Mapping[str, str]) -> dict[str, str]:
    """GIT_REVISION and SOURCE_URL for the OCI labels, from modelbake's checkout when not given (an installed
    modelbake has none: the folder the user is in is another project); never credentials."""
    found = {}
    checkout = context.checkout()
    for variable, git in (("GIT_REVISION", ["rev-parse", "HEAD"]), ("SOURCE_URL", ["remote", "get-url", "origin"])):
        value = environ.get(variable, "")
        if not value and checkout is not None:
            proc = subprocess.run(["git", *git], capture_output=True, text=True, cwd=checkout)
            value = proc.stdout.strip() if proc.returncode == 0 else ""
        # A clone of a local folder has a path as origin: not a source URL worth publishing.
        if value and variable == "GIT_REVISION":
            found[variable] = value
        elif value.startswith("https://"):
            found[variable] = public_url(value)
        elif value:
            found[variable] = ""
    return found


def bake(
    selection: Selection,
    targets: list[str] | None = None,
    *,
    overrides: list[str] | None = None,
    image: str | None = None,
    inspect: bool = True,
    push: str | None = None,
    kubernetes: Path | None = None,
    service_image: str | None = None,
    sign_key: Path | None = None,
    cache: str | None = None,
    platforms: str | None = None,
    environ: Mapping[str, str] | None = None,
    progress: TextIO | None = None,
) -> BakeResult:
    """Validate, bake, then inspect ``image`` (default ``$IMAGE:$TAG``) with the Docker SDK. With ``runtime``
    a target, the built image's manifest sha256 is labelled on it (DIGEST_LABEL) by a build adding only that.
    ``push`` (``REGISTRY/NAME``): then the runtime image goes to ``REGISTRY/NAME:$TAG`` and the FROM-scratch
    ``models`` image to ``REGISTRY/NAME-models:$TAG``; ``pushed`` holds each by digest, for pulls that cannot
    be moved (a tag can). ``kubernetes``: a folder for the Deployments of :mod:`modelbake.kubernetes`, written
    with those digests, running ``service_image`` (an image built FROM the runtime image). ``sign_key``: an EC
    private key (PEM) given to the build as the secret ``model_signing_key``; the tree ships signed. With
    ``kubernetes`` too, the Deployments carry its public key and verify the signature at start, so the runtime
    image is built with MODEL_SIGNING=1 (it must hold model_signing to verify).
    ``cache`` (``REGISTRY/NAME[:TAG]``): a registry build cache every builder shares (mode=max; the
    containerd image store). ``platforms``: PLATFORMS. ``environ``, ``progress``: the environment bake runs
    with and where BuildKit's progress goes (default ours, our stderr)."""
    _check_request(targets, push, kubernetes, service_image)
    targets, overrides = targets or ["runtime"], overrides or []
    cmd, client = command(targets, overrides), sdk_client()
    env = _environment(selection, os.environ if environ is None else environ, sign_key, kubernetes)
    env |= {"BUILD_CACHE": check_cache(client, cache)} if cache is not None else {}
    env |= {"PLATFORMS": check_platforms(client, platforms, env)} if platforms else {}
    result = BakeResult(cmd)
    _run_bake(cmd, env, progress=progress)
    if "runtime" not in targets:
        return result
    result.image = image or f"{_setting(env, 'IMAGE')}:{_setting(env, 'TAG')}"
    _read_built_manifest(client, result, env, signed=sign_key is not None)
    if env.get("MODELS_MANIFEST_DIGEST") != result.manifest_digest:
        _label(result.image, DIGEST_LABEL, result.manifest_digest, env)
    if inspect:
        _inspect(client, result, env)
    if push is not None:
        _push_images(result, push, overrides, env)
    if kubernetes is not None:
        result.kubernetes = _write_kubernetes(result, kubernetes, str(service_image), sign_key)
    return result


def _environment(
    selection: Selection, environ: Mapping[str, str], sign_key: Path | None, kubernetes: Path | None
) -> dict[str, str]:
    """What bake runs with: the selection's variables, provenance and signing over ``environ``."""
    env = bake_env({**selection.variables(), **_provenance(environ), **_signing(sign_key)}, environ)
    if sign_key is not None and kubernetes is not None:
        env["MODEL_SIGNING"] = "1"  # the Deployments verify the signature: the runtime needs model_signing
    return env


def _write_kubernetes(result: BakeResult, folder: Path, service_image: str, sign_key: Path | None) -> list[Path]:
    """The Deployments of :mod:`modelbake.kubernetes` for the images just pushed, by digest."""
    from modelbake import kubernetes as k8s
    from modelbake.signature import public_key_pem

    return k8s.write(
        folder,
        service_image=service_image,
        models_image=result.pushed["models"],
        runtime_image=result.pushed["runtime"],
        manifest_digest=str(result.manifest_digest),
        signing_public_key=None if sign_key is None else public_key_pem(sign_key, private=True),
    )


def _check_request(
    targets: list[str] | None, push: str | None, kubernetes: Path | None, service_image: str | None
) -> None:
    """Refuse a combination of options that cannot work, before anything is built."""
    if kubernetes is not None and (push is None or not service_image):
        raise BakeError(
            "--kubernetes writes manifests with the pushed digests: give --push REGISTRY/NAME and --service-image "
            "REF (your service's image, built FROM the runtime image, e.g. examples/search_service)"
        )
    if push is not None:
        check_repository(push)
        if "runtime" not in (targets or ["runtime"]):
            raise BakeError(f"--push {push}: pushes the runtime and models images, so build the runtime target")


def _read_built_manifest(client: Any, result: BakeResult, env: dict[str, str], *, signed: bool) -> None:
    """The manifest in the image just built, and its digest; with ``signed`` the signature must be there."""

    def cat(path: str) -> bytes:
        return client.containers.run(result.image, [path], entrypoint="cat", network_mode="none", remove=True)

    raw = cat("/models/model_manifest.json")
    result.manifest = json.loads(raw)
    result.manifest_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if signed:  # the build was asked to sign: the signature must be in the image
        cat(f"/models/{SIGNATURE_NAME}")
        result.signed = env["SIGNING_KEY_ID"]


def _push_images(result: BakeResult, push: str, overrides: list[str], env: dict[str, str]) -> None:
    """The runtime image to ``push:TAG`` and the models tree as an image to ``push-models:TAG``, by digest."""
    tag = _setting(env, "TAG")
    _docker("tag", str(result.image), f"{push}:{tag}", env=env)
    result.pushed["runtime"] = _push(f"{push}:{tag}", env)
    # The models tree as an image: the same stages from BuildKit's cache, loaded into the engine.
    models = f"{push}-models:{tag}"
    # One tree for every platform of the runtime: the same layer under each (an index when several).
    platforms = [f"models.platform={env['PLATFORMS']}"] if env.get("PLATFORMS") else []
    _run_bake(command(["models"], [*overrides, *platforms, f"models.output=type=docker,name={models}"]), env)
    result.pushed["models"] = _push(models, env)


def _signing(sign_key: Path | None) -> dict[str, str]:
    """The bake variables that sign the tree: the key's path (bake passes the file as a secret) and its
    public fingerprint (a build argument: the signing step reruns for a new key)."""
    if sign_key is None:
        return {}
    from modelbake.signature import SigningError, key_id

    try:
        return {"SIGNING_KEY_FILE": str(sign_key.resolve()), "SIGNING_KEY_ID": key_id(sign_key, private=True)}
    except SigningError as exc:
        raise SigningError(f"--sign-key {exc}") from exc


def _containerd_store(client: Any) -> bool:
    """The engine keeps images in the containerd image store (multi-platform images, cache export)."""
    return dict(client.info().get("DriverStatus") or []).get("driver-type") == "io.containerd.snapshotter.v1"


_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$")


def check_platforms(client: Any, text: str, env: dict[str, str]) -> str:
    """``text`` (``linux/amd64,linux/arm64``) as PLATFORMS, once the builder can run each and the engine can
    hold the result: a classic image store takes one platform per image, and a platform other than the
    machine's needs an emulator registered with the kernel."""
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    if not wanted or not all(_PLATFORM.match(p) for p in wanted):
        raise BakeError(f"--platform {text!r}: give OS/ARCH[,OS/ARCH...] (e.g. linux/amd64,linux/arm64)")
    if len(wanted) > 1 and not _containerd_store(client):
        raise BakeError(
            f"--platform {','.join(wanted)}: this engine's image store holds one platform per image; turn on the "
            'containerd image store ({"features": {"containerd-snapshotter": true}} in daemon.json)'
        )
    inspect = subprocess.run(["docker", "buildx", "inspect"], capture_output=True, text=True, env=env)
    line = next((ln for ln in inspect.stdout.splitlines() if ln.strip().startswith("Platforms:")), "")
    can = {p.strip().split("*")[0] for p in line.partition(":")[2].split(",")}
    if missing := [p for p in wanted if p.split("/v")[0] not in can and p not in can]:
        raise BakeError(
            f"--platform: this builder cannot run {', '.join(missing)} (it runs {', '.join(sorted(can))}); register "
            "an emulator with the kernel (docker/setup-engine.sh does: qemu-user-static and binfmt_misc)"
        )
    return ",".join(wanted)


def check_cache(client: Any, ref: str) -> str:
    """``ref`` as a cache reference (``:buildcache`` when it has no tag), if this engine can export one: the
    classic image store's ``docker`` driver cannot, and bake would fail only after the whole build."""
    repository, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    try:
        check_repository(repository)
    except BakeError as exc:
        raise BakeError(f"--cache {ref!r}: give REGISTRY/NAME[:TAG] (e.g. 127.0.0.1:5000/modelbake-cache)") from exc
    if not _containerd_store(client):
        raise BakeError(
            f"--cache {ref}: this engine's image store cannot export a build cache; turn on the containerd image "
            'store ({"features": {"containerd-snapshotter": true}} in daemon.json) or use a docker-container builder'
        )
    return f"{repository}:{tag or 'buildcache'}"


def check_repository(repository: str) -> None:
    """``REGISTRY/NAME`` without a tag or digest: the push adds $TAG and reports digests."""
    name = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    registry = r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?"
    if not re.fullmatch(rf"{registry}{name}(?:/{name})*", repository):
        raise BakeError(
            f"--push {repository!r}: give a repository as REGISTRY/NAME (e.g. 127.0.0.1:5000/modelbake), "
            "without a tag or digest; the image's TAG is added and the digest reported"
        )


def _docker(*args: str, env: dict[str, str]) -> str:
    proc = docker(*args, env=env)
    if proc.returncode != 0:
        raise BakeError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _push(ref: str, env: dict[str, str]) -> str:
    """Push ``ref`` (REPOSITORY:TAG); its REPOSITORY@sha256:... as the registry stored it."""
    _docker("push", "--quiet", ref, env=env)
    repository = ref.rsplit(":", 1)[0]
    digests = json.loads(_docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref, env=env))
    mine = [d for d in digests if d.startswith(f"{repository}@")]
    if not mine:
        raise BakeError(f"pushed {ref}, but the engine reports no digest for {repository} ({digests})")
    return mine[0]


def _label(image: str, key: str, value: str, env: dict[str, str]) -> None:
    """Add one label to ``image`` without building anything else: ``FROM image`` + the label, same tag.

    Not a second bake with the digest as a build arg: that one is only as good as BuildKit's cache, and a
    cache pruned in between reruns a stage, whose new tree then disagrees with the digest (seen in CI).
    """
    platforms = ["--platform", env["PLATFORMS"]] if env.get("PLATFORMS") else []  # every platform the image has
    proc = subprocess.run(
        ["docker", "build", "--quiet", "--network", "none", *platforms, "--label", f"{key}={value}", "-t", image, "-"],
        input=f"FROM {image}\n",
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise BakeError(f"labelling {image} with {key} failed: {proc.stderr.strip()[-2000:]}")


def _setting(env: dict[str, str], name: str) -> str:
    return env.get(name) or BY_NAME[name].default


def _inspect(client: Any, result: BakeResult, env: dict[str, str]) -> None:
    """Size, labels and size per stage of the built image, and a verify run in a container with no network."""
    built = client.images.get(result.image)
    result.image_size = int(built.attrs["Size"])
    result.labels = dict(built.labels)
    base = env.get("RUNTIME_BASE_IMAGE") or _setting(env, "BASE_IMAGE")
    result.stage_sizes = stage_sizes(client, result.image, result.manifest or {}, base)
    container = client.containers.run(result.image, network_mode="none", detach=True)
    try:
        result.verify_ok = container.wait()["StatusCode"] == 0
        result.verify_output = container.logs().decode()
    finally:
        container.remove(force=True)
