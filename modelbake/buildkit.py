"""BuildKit's plain progress output (``--progress=plain``) read back: which steps ran, which were
cached, and how long each took. The stage-cache test and bench/image_build.py both read builds this way.

A step is announced as ``#12 [clip-export 3/3] RUN ...`` (bake may put the target first:
``#12 [runtime clip-export 3/3] RUN ...``) and ends with ``#12 CACHED`` or ``#12 DONE 35.2s``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An intermittent BuildKit scheduler bug when targets share steps (moby/buildkit#2303): the build fails
# with this message and a retry resumes from the cache.
TRANSIENT_ERROR = "inconsistent graph state"

_HEADER = re.compile(r"^\[(?:(?P<target>\S+) )?(?P<stage>[\w.-]+) (?P<n>\d+)/(?P<of>\d+)\] (?P<instruction>[A-Z]+)")


@dataclass
class Step:
    name: str  # "[clip-export 3/3] RUN python build/clip_export.py ..."
    stage: str | None  # "clip-export"; None for BuildKit's own steps ("[internal] load ...")
    instruction: str | None  # RUN, COPY, ...
    cached: bool = False
    seconds: float | None = None  # for steps that ran (DONE)


def parse_plain(log: str) -> list[Step]:
    """Every step of a plain progress log, in the order BuildKit announced them."""
    steps: dict[str, Step] = {}
    for line in log.splitlines():
        number, _, rest = line.partition(" ")
        if not number.startswith("#"):
            continue
        if number not in steps and rest.startswith("["):
            header = _HEADER.match(rest)
            steps[number] = Step(rest, header["stage"] if header else None, header["instruction"] if header else None)
        elif number in steps and rest == "CACHED":
            steps[number].cached = True
        elif number in steps and rest.startswith("DONE"):
            seconds = rest.split()[1].rstrip("s") if len(rest.split()) > 1 else ""
            steps[number].seconds = float(seconds) if seconds else 0.0
    return list(steps.values())


def stage_runs(steps: list[Step], stage: str) -> list[Step]:
    """The RUN steps of ``stage`` (the work a stage does; COPY/ENV steps cost next to nothing)."""
    return [s for s in steps if s.stage == stage and s.instruction == "RUN"]


def ran(steps: list[Step], stage: str) -> bool:
    """True when any RUN step of ``stage`` executed rather than came from the cache."""
    return any(s.seconds is not None and not s.cached for s in stage_runs(steps, stage))


def stage_seconds(steps: list[Step], stage: str) -> float:
    """Seconds the RUN steps of ``stage`` took in this build (0 when all were cached)."""
    return sum(s.seconds or 0.0 for s in stage_runs(steps, stage) if not s.cached)
