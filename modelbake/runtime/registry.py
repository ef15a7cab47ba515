"""Run-time loaders by model kind: ``open_models`` and ``verify`` find each manifest model's loader here.

A kind is one class: built from its manifest entry (``Loader(folder, model, variant=..., threads=...)``),
opening each ONNX role's file through :meth:`Loader.onnx` (the variant choice of :mod:`.variants`), and
owning the replay of its own input pipeline (tokenizer, image preprocessing) on the raw probe inputs
``verify`` reads from the golden files. The built-in kinds register themselves on import; a new kind
registers with :func:`register_loader` and needs nothing else at run time.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np

from modelbake.kinds import KINDS
from modelbake.manifest import Variant, checked_model, resolve_inside
from modelbake.runtime.sessions import OPENVINO, checked_session, engine_of, openvino_session, session
from modelbake.runtime.variant_check import cache_dir, openvino_cache
from modelbake.runtime.variants import choose, requested
from modelbake.signature import check_signature

BUILTIN = tuple(k.loader for k in KINDS.values())  # the built-in kinds' loader modules
LOADERS: dict[str, type[Loader]] = {}


class Loader:
    """Base of the run-time model classes; ``kind`` names the manifest models it reads."""

    kind: ClassVar[str]
    variants: ClassVar[tuple[Variant, ...]] = (Variant.FP32,)  # what the kind's stage can build

    def __init__(
        self,
        folder: Path,
        model: dict[str, Any],
        *,
        variant: str | None = None,
        int8: bool = False,
        threads: int | None = None,
        unverified: bool = False,
    ) -> None:
        self.name = model["name"]
        self.folder, self.threads = folder, threads
        self.unverified = unverified  # files found by name without a manifest (allow_unverified): no digests
        self.requested = requested(variant, int8)
        self.chosen: dict[str, str] = {}  # role -> the variant each ONNX role runs ("int8", "openvino/bf16")
        self.why: dict[str, str] = {}  # role -> why it runs that variant here
        self._checked: dict[str, Any] = {}  # role -> a session the variant check here already opened

    def onnx(self, model: dict[str, Any], role: str) -> dict[str, Any]:
        """The ONNX entry of ``role`` this loader runs: ``variant`` as asked; ``auto`` by the build's timings
        on a CPU of the build machine's class, else as checked here (:func:`.variants.choose`)."""
        choice = choose(model, role, self.requested, root=self.folder, threads=self.threads)
        self.chosen[role], self.why[role] = choice.variant, choice.why
        if choice.session is not None:
            self._checked[role] = choice.session
        return choice.entry

    def onnx_session(self, model: dict[str, Any], role: str) -> Any:
        """A session of the variant :meth:`onnx` picks for ``role`` (the check's own, when it made one): its file
        run by its engine (:mod:`.sessions`), built from the bytes its digest check read."""
        entry = self.onnx(model, role)
        if self.unverified:  # found by name: opened from its path, nothing to check its bytes against
            path = resolve_inside(self.folder, entry["path"])
            engine, precision = engine_of(self.chosen[role])
            if engine == OPENVINO:
                return openvino_session(path, entry, self.threads, precision=precision)
            return session(path, self.threads)
        if (checked := self._checked.pop(role, None)) is not None:
            return checked
        variant = self.chosen[role]
        cache = openvino_cache(cache_dir(self.folder)) if engine_of(variant)[0] == OPENVINO else None
        return checked_session(self.folder, model, entry, self.threads, variant=variant, cache_dir=cache)

    @property
    def engines(self) -> dict[str, str]:
        """role -> the engine and precision it runs: "onnxruntime/int8", "openvino/bf16"."""
        return {role: "/".join(engine_of(variant)) for role, variant in self.chosen.items()}

    @property
    def variant(self) -> str:
        """The variant every role runs, or ``mixed`` (see ``chosen``)."""
        used = set(self.chosen.values())
        return used.pop() if len(used) == 1 else ("mixed" if used else self.requested)

    @classmethod
    def from_folder(
        cls,
        folder: Path | str,
        name: str | None = None,
        *,
        manifest_sha256: str | None = None,
        public_key: Path | str | None = None,
        **kwargs: Any,
    ) -> Self:
        """The ``kind`` model ``name`` (default: the first listed) of the tree at ``folder``: the tree's
        signature checked when a public key is set (``public_key`` or $MODELBAKE_SIGNING_PUBLIC_KEY), the
        manifest against ``manifest_sha256`` or $MODELBAKE_MANIFEST_SHA256 when pinned, the model's files."""
        folder = Path(folder)
        check_signature(folder, public_key)
        return cls(folder, checked_model(folder, cls.kind, name, manifest_sha256=manifest_sha256), **kwargs)

    @classmethod
    def replay(
        cls, root: Path, model: dict[str, Any], entry: dict[str, Any], golden: dict[str, np.ndarray]
    ) -> tuple[bool, str] | None:
        """Run this kind's input pipeline on the golden file's raw inputs and compare with the recorded
        model inputs: (same, what was compared), or None when the kind has no such pipeline."""
        return None


L = TypeVar("L", bound=type[Loader])


def register_loader(cls: L) -> L:
    """Class decorator: ``cls`` loads the manifest models of ``cls.kind``."""
    if LOADERS.get(cls.kind, cls) is not cls:
        raise ValueError(f"kind {cls.kind!r} already has a loader ({LOADERS[cls.kind].__name__})")
    LOADERS[cls.kind] = cls
    return cls


def loader_for(kind: str) -> type[Loader]:
    for module in BUILTIN:
        importlib.import_module(module)
    if kind not in LOADERS:
        raise LookupError(
            f"no run-time loader for model kind {kind!r} (this modelbake knows {', '.join(sorted(LOADERS))}); "
            "use the modelbake release that built the tree"
        )
    return LOADERS[kind]
