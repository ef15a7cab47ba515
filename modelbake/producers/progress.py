"""Progress bars for long producer work (exports, gates, training epochs).

tqdm draws them on a terminal and stays silent in a Docker build log (no TTY), where the INFO log
lines already say what happens. ``MODELBAKE_PROGRESS=1`` forces them on (tests, CI logs), ``0`` off.
Downloads show huggingface_hub's own bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def _enabled() -> bool | None:
    """tqdm's ``disable``: None means "only on a TTY"."""
    wanted = os.environ.get("MODELBAKE_PROGRESS", "")
    return {"1": False, "0": True}.get(wanted)


@contextmanager
def steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` steps; call the yielded function with the step just finished."""
    with tqdm(
        total=total, desc=description, unit="step", disable=_enabled(), file=sys.stderr, leave=True, dynamic_ncols=True
    ) as bar:

        def done(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update(1)

        yield done
