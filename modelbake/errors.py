"""The project's errors: one base, so a command line or a service catches every refusal in one place.

Each message is one line naming what is wrong and the fix. The tree: a selection that does not parse
(:class:`modelbake.spec.SpecError`), a tree or manifest that does not check out
(:class:`modelbake.manifest.ManifestError`), a producer that cannot make what was asked
(:class:`modelbake.producers.common.ProducerError`), an engine or build that fails
(:class:`modelbake.bake.BakeError`), an output folder that cannot be written safely (:class:`OutputError`).
Torch-free and stdlib-only.
"""

from __future__ import annotations


class ModelbakeError(Exception):
    """Base of every error modelbake raises on purpose; the message names the problem and the fix."""


class OutputError(ModelbakeError):
    """An output folder (or the scratch beside it) cannot be used: not this user's, or not writable."""


def first_line(exc: BaseException, *, with_type: bool = True, limit: int = 300) -> str:
    """What a one-line error keeps of a library's exception: the first line of its message (``Type: line``
    with ``with_type``), cut at ``limit`` characters; libraries such as model_signing repr every digest."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if with_type else text or type(exc).__name__
