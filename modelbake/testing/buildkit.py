"""BuildKit's structured progress (``--progress=rawjson``) read back: which steps ran, which came from
the cache, how long each took and which failed. The stage-cache test and bench/image_build.py read
builds this way; people get BuildKit's own plain progress, or ``describe``/``render`` of these records.

The stream is a sequence of JSON SolveStatus objects (buildx 0.13 indents them over several lines, later
versions print one per line; both are read), possibly followed by plain text such as the final
``ERROR: failed to solve: ...``. A step is a vertex: ``{"digest", "name", "started", "completed",
"cached", "error"}``, sent again on every change, so updates are merged by digest. Bake prefixes the name
with the target when it builds several (``[runtime clip-export 3/3] RUN ...``) and a step two targets
share is one vertex under both names; its record keeps the first name.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

# "[clip-export 3/3] RUN ...", "[runtime clip-export 3/3] RUN ..." (bake, several targets), "[2/2] RUN ..."
# (a build without stage names); BuildKit's own steps ("[internal] load ...", "exporting to image") have
# no stage.
_NAME = re.compile(r"^\[(?:(?:\S+ )?(?P<stage>[\w.-]+) )?\d+/\d+\] (?P<instruction>[A-Z]+)")
_LOG_TAIL = 4000  # characters of a step's output kept for a failure report


@dataclass
class Step:
    name: str  # "[clip-export 3/3] RUN python build/clip_export.py ..."
    stage: str | None  # "clip-export"; None for BuildKit's own steps
    instruction: str | None  # RUN, COPY, ...
    digest: str = ""
    cached: bool = False  # completed, and every completion came from the cache
    seconds: float | None = None  # time between started and completed (over all its runs); None until done
    error: str | None = None  # BuildKit's message when the step failed or was canceled
    log_tail: str = field(default="", repr=False)  # the end of what it printed (stdout and stderr)

    @property
    def done(self) -> bool:
        """Completed without an error (ran, or came from the cache)."""
        return self.seconds is not None and self.error is None


@dataclass
class _Vertex:
    step: Step
    intervals: dict[float, tuple[float, float | None]] = field(default_factory=dict)  # by start time
    executed: bool = False  # a completion that was not from the cache
    from_cache: bool = False


def _time(stamp: str) -> float:
    """RFC 3339 with up to nanoseconds, as Go writes it (Python keeps microseconds)."""
    return datetime.fromisoformat(stamp).timestamp()


def _busy_seconds(intervals: list[tuple[float, float | None]]) -> float | None:
    """Length of the union of the intervals; None while one is open."""
    total, end = 0.0, None
    for start, stop in sorted(intervals, key=lambda interval: interval[0]):
        if stop is None:
            return None
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


class RawJsonReader:
    """Reads rawjson progress line by line; ``feed`` returns copies of the steps a line finished (to show)."""

    def __init__(self) -> None:
        self._vertexes: dict[str, _Vertex] = {}
        self._buffer: list[str] = []
        self.text: list[str] = []  # lines that were not progress (the final error, warnings)

    @property
    def steps(self) -> list[Step]:
        """Every step BuildKit started so far, in the order it announced them. A vertex announced but never
        started was not needed (a later step came from the cache); plain progress does not show it either."""
        return [v.step for v in self._vertexes.values() if v.intervals]

    def feed(self, line: str) -> list[Step]:
        if self._buffer and not line[:1].isspace() and line.rstrip("\r\n") != "}":  # not inside a status
            self.close()
        if not self._buffer and not line.lstrip().startswith("{"):
            if line.strip():
                self.text.append(line.rstrip("\r\n"))
            return []
        self._buffer.append(line)
        # A status ends on a line that closes it: "{...}" alone, or "}" at the start of a line (indented).
        one_line = len(self._buffer) == 1 and line.rstrip().endswith("}")
        if not (one_line or line.rstrip("\r\n") == "}"):
            return []
        chunk, self._buffer = "".join(self._buffer), []
        try:
            status = json.loads(chunk)
        except ValueError:
            status = None
        if not isinstance(status, dict):
            self.text.extend(chunk.splitlines())
            return []
        return self._update(status)

    def close(self) -> None:
        """End of the stream: an unfinished status was text."""
        self.text.extend("".join(self._buffer).splitlines())
        self._buffer = []

    def _update(self, status: dict[str, Any]) -> list[Step]:
        for log in status.get("logs") or []:  # first: the output that came with a step's completion
            vertex = self._vertexes.get(log.get("vertex", ""))
            if vertex is not None and log.get("data"):
                text = base64.b64decode(log["data"]).decode(errors="replace")
                vertex.step.log_tail = (vertex.step.log_tail + text)[-_LOG_TAIL:]
        completed: dict[str, str] = {}  # digest -> the name it completed under
        for update in status.get("vertexes") or []:
            digest = update.get("digest")
            if not digest:
                continue
            vertex = self._vertexes.get(digest)
            if vertex is None:
                name = update.get("name", "")
                match = _NAME.match(name)
                step = Step(name, match["stage"] if match else None, match["instruction"] if match else None, digest)
                vertex = self._vertexes[digest] = _Vertex(step)
            if self._apply(vertex, update):
                completed[digest] = update.get("name") or vertex.step.name
        # As each finished (a copy, under the name this completion came with): a step may run again.
        steps = [(self._vertexes[d].step, name) for d, name in completed.items()]
        return [replace(step, name=name) for step, name in steps if step.seconds is not None]

    @staticmethod
    def _apply(vertex: _Vertex, update: dict[str, Any]) -> bool:
        """Merge one update; True when it closed a run of the step."""
        step = vertex.step
        if update.get("error") and step.error is None:
            step.error = update["error"]
        started, completed = update.get("started"), update.get("completed")
        if not started:
            return False
        # By the instant, not the stamp's text: BuildKit may send one start under two spellings that Python
        # reads as the same microsecond (seen on the containerd image store), and a late one without its
        # completion must not reopen the run.
        start = _time(started)
        closed_before = vertex.intervals.get(start, (0.0, None))[1] is not None
        if completed or not closed_before:
            vertex.intervals[start] = (start, _time(completed) if completed else None)
        if completed:
            if update.get("cached"):
                vertex.from_cache = True
            else:
                vertex.executed = True
        step.cached = vertex.from_cache and not vertex.executed
        step.seconds = _busy_seconds(list(vertex.intervals.values()))
        return bool(completed) and not closed_before


def parse_rawjson(log: str) -> list[Step]:
    """Every step BuildKit started in a rawjson progress log, in the order it announced them."""
    reader = RawJsonReader()
    for line in log.splitlines(keepends=True):
        reader.feed(line)
    reader.close()
    return reader.steps


def describe(step: Step) -> str:
    """One line for people, as BuildKit's plain progress ends a step: "... 12.3s", "CACHED", "ERROR: ..."."""
    if step.error is not None:
        return f"{step.name} {'CANCELED' if step.error.endswith('context canceled') else 'ERROR: ' + step.error}"
    if step.seconds is None:
        return f"{step.name} ..."
    return f"{step.name} {'CACHED' if step.cached else f'{step.seconds:.1f}s'}"


def render(log: str) -> str:
    """A rawjson log for people: a line per finished step, a failed step's last output, then the text."""
    reader = RawJsonReader()
    lines = []
    for line in log.splitlines(keepends=True):
        lines += [describe(step) for step in reader.feed(line)]
    reader.close()
    lines += [describe(s) for s in reader.steps if s.seconds is None and s.error is not None]  # never closed
    for step in reader.steps:
        if step.error is not None and not step.error.endswith("context canceled") and step.log_tail:
            lines += [f"--- output of {step.name}:", step.log_tail.rstrip("\n")]
    return "\n".join(lines + reader.text) + "\n"


def stage_runs(steps: list[Step], stage: str) -> list[Step]:
    """The RUN steps of ``stage`` (the work a stage does; COPY/ENV steps cost next to nothing)."""
    return [s for s in steps if s.stage == stage and s.instruction == "RUN"]


def stage_outcomes(steps: list[Step], stages: tuple[str, ...]) -> dict[str, list[str]]:
    """How each RUN step of each stage ended ("CACHED", "9.3s", "ERROR: ..."): an assertion's message."""
    return {stage: [describe(s).removeprefix(s.name).strip() for s in stage_runs(steps, stage)] for stage in stages}


def ran(steps: list[Step], stage: str) -> bool:
    """True when any RUN step of ``stage`` executed (and succeeded) rather than came from the cache."""
    return any(s.done and not s.cached for s in stage_runs(steps, stage))


def stage_seconds(steps: list[Step], stage: str) -> float:
    """Seconds the RUN steps of ``stage`` ran in this build (0 when all were cached)."""
    return sum(s.seconds or 0.0 for s in stage_runs(steps, stage) if s.done and not s.cached)
