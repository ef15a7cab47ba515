"""modelbake.testing.buildkit against a real rawjson capture (tests/data/buildkit_rawjson.jsonl, buildx 0.13.1).

The capture is bake's stderr for two targets of this Dockerfile, the second build after a first
``docker buildx bake --progress=plain work`` (so ``base`` comes from the cache and ``work`` runs with a
new N)::

    FROM modelbake/debian-base:bookworm AS base
    RUN echo base ready

    FROM base AS work
    ARG N=1
    RUN echo "work $N" && sleep 1

    FROM base AS broken
    RUN sleep 3 && echo "giving up" >&2 && exit 3

with targets ``work`` (args N) and ``broken``, both ``output = ["type=cacheonly"]``, recorded by
``N=9777 docker buildx bake --progress=rawjson work broken 2> buildkit_rawjson.jsonl``. buildx 0.13 indents
each status over several lines; the plain text after the JSON is BuildKit's final error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modelbake.engine import TRANSIENT_ERROR
from modelbake.testing.buildkit import (
    RawJsonReader,
    describe,
    parse_rawjson,
    ran,
    render,
    stage_outcomes,
    stage_runs,
    stage_seconds,
)

CAPTURE = (Path(__file__).parent / "data" / "buildkit_rawjson.jsonl").read_text()
WORK = '[work work 1/1] RUN echo "work 9777" && sleep 1'
BASE = "[work base 2/2] RUN echo base ready"
BROKEN = '[broken broken 1/1] RUN sleep 3 && echo "giving up" >&2 && exit 3'


def _by_name() -> dict:
    return {step.name: step for step in parse_rawjson(CAPTURE)}


def test_a_step_that_ran_one_from_the_cache_and_one_that_failed() -> None:
    steps = parse_rawjson(CAPTURE)
    (work,), (base,), (broken,) = (stage_runs(steps, s) for s in ("work", "base", "broken"))
    assert (work.name, base.name, broken.name) == (WORK, BASE, BROKEN)
    assert not work.cached and work.done and work.error is None
    # completed - started of its one run: 13:18:14.135247274 - 13:18:12.684007303 (to the microsecond)
    assert work.seconds == pytest.approx(1.451240, abs=2e-6)
    assert base.cached and base.done and base.seconds < 0.01
    assert not broken.cached and not broken.done
    assert broken.error.endswith("did not complete successfully: exit code: 3")
    assert broken.seconds == pytest.approx(3.449664, abs=2e-6)
    assert ran(steps, "work") and not ran(steps, "base") and not ran(steps, "broken")
    assert stage_seconds(steps, "work") == pytest.approx(1.451240, abs=2e-6)
    assert stage_seconds(steps, "base") == 0.0 and stage_seconds(steps, "broken") == 0.0
    assert stage_runs(steps, "no-such-stage") == [] and not ran(steps, "no-such-stage")
    outcomes = stage_outcomes(steps, ("work", "base", "broken", "no-such-stage"))
    assert outcomes == {"work": ["1.5s"], "base": ["CACHED"], "broken": [f"ERROR: {broken.error}"], "no-such-stage": []}


def test_updates_are_merged_by_digest_in_the_order_announced() -> None:
    steps = parse_rawjson(CAPTURE)
    digests = list(dict.fromkeys(re.findall(r'"digest": "(sha256:[0-9a-f]{64})"', CAPTURE)))
    assert [s.digest for s in steps] == digests and len(digests) == 10
    assert steps[0].name == "[internal] load local bake definitions" and steps[0].stage is None
    # The base stage is one vertex under both targets' names; the record keeps the first.
    base = [s.name for s in steps if s.stage == "base"]
    assert base == [BASE, "[work base 1/2] FROM docker.io/modelbake/debian-base:bookworm"]
    assert "[broken base 2/2] RUN echo base ready" in CAPTURE


def test_a_step_that_ran_twice_counts_both_runs() -> None:
    # Started 12.645887128, completed 12.646017411; started again 12.646133647, completed 12.656612796.
    step = _by_name()["[work internal] load build definition from Dockerfile"]
    assert step.seconds == pytest.approx(0.000130 + 0.010479, abs=3e-6)
    assert step.instruction is None and not step.cached


def test_one_start_spelt_twice_is_one_run_and_a_late_resend_does_not_reopen_it() -> None:
    # Seen on the second engine (containerd image store): the same start under two spellings of one instant.
    vertex = {"digest": "sha256:" + "7" * 64, "name": "[runtime-base 2/6] COPY a /tmp/"}
    lines = [
        {**vertex, "started": "2026-12-03T07:43:53.073147Z", "completed": "2026-12-03T07:43:53.084170Z"},
        {**vertex, "started": "2026-12-03T07:43:53.073147000Z"},
    ]
    (step,) = parse_rawjson("".join(json.dumps({"vertexes": [line]}) + "\n" for line in lines))
    assert step.done and step.seconds == pytest.approx(0.011023, abs=2e-6)


def test_a_step_announced_but_never_started_is_not_a_step() -> None:
    # As bake announced the models target's last RUN when the step after it came from the cache: the
    # vertex is listed (digest, inputs, name) and never started; plain progress does not show it.
    unused = {
        "digest": "sha256:" + "9" * 64,
        "inputs": ["sha256:" + "8" * 64],
        "name": "[models manifest 4/4] RUN python build/merge_manifest.py /models --drop-fragments",
    }
    steps = parse_rawjson(json.dumps({"vertexes": [unused]}) + "\n" + CAPTURE)
    assert steps == parse_rawjson(CAPTURE) and stage_runs(steps, "manifest") == []


def test_output_and_trailing_text() -> None:
    steps = _by_name()
    assert steps[WORK].log_tail == "work 9777\n"
    assert steps[BROKEN].log_tail == "giving up\n"
    reader = RawJsonReader()
    for line in CAPTURE.splitlines(keepends=True):
        reader.feed(line)
    reader.close()
    assert reader.text[0] == "Dockerfile:9" and reader.text[-1].startswith("ERROR: failed to solve: process ")
    assert not any(TRANSIENT_ERROR in line for line in reader.text)


def test_text_that_looks_like_json_does_not_swallow_the_progress() -> None:
    def read(log: str) -> RawJsonReader:
        reader = RawJsonReader()
        for line in log.splitlines(keepends=True):
            reader.feed(line)
        reader.close()
        return reader

    noisy, clean = read("{ not a status\n" + CAPTURE), read(CAPTURE)
    assert noisy.steps == clean.steps and noisy.text == ["{ not a status", *clean.text]


def test_one_status_per_line_reads_the_same() -> None:
    """Later buildx versions print each status on one line, unindented."""
    decoder, at, lines = json.JSONDecoder(), 0, []
    while CAPTURE[at:].lstrip().startswith("{"):
        status, at = decoder.raw_decode(CAPTURE, len(CAPTURE) - len(CAPTURE[at:].lstrip()))
        lines.append(json.dumps(status, separators=(",", ":")) + "\n")
    assert len(lines) == 43
    assert parse_rawjson("".join(lines) + CAPTURE[at:].lstrip()) == parse_rawjson(CAPTURE)


def test_a_step_still_running_when_the_stream_ends() -> None:
    cut = CAPTURE[: CAPTURE.index('"completed": "2026-11-29T13:18:14.135247274Z"')]
    steps = {s.name: s for s in parse_rawjson(cut)}
    assert steps[WORK].seconds is None and not steps[WORK].done and not ran(list(steps.values()), "work")
    assert steps[BASE].cached and steps[BROKEN].error is None
    assert describe(steps[WORK]) == WORK + " ..."


def test_describe_and_render_for_people() -> None:
    steps = _by_name()
    assert describe(steps[WORK]) == WORK + " 1.5s"
    assert describe(steps[BASE]) == BASE + " CACHED"
    assert describe(steps[BROKEN]) == BROKEN + " ERROR: " + steps[BROKEN].error
    lines = render(CAPTURE).splitlines()
    assert lines[0] == "[internal] load local bake definitions 0.0s"
    # In the order the steps finished, each under the name it finished with.
    assert lines.index(BASE + " CACHED") < lines.index("[broken base 2/2] RUN echo base ready CACHED")
    assert lines.index(WORK + " 1.5s") < lines.index(describe(steps[BROKEN]))
    assert lines[lines.index(f"--- output of {BROKEN}:") + 1] == "giving up"
    assert lines[-1].startswith("ERROR: failed to solve: ")


def test_fed_line_by_line_each_step_is_shown_once_when_it_finishes() -> None:
    reader, shown = RawJsonReader(), []
    for line in CAPTURE.splitlines(keepends=True):
        finished = reader.feed(line)
        assert all(s.seconds is not None for s in finished)
        shown += [s.name for s in finished]
    assert shown.count(WORK) == 1 and shown.count(BROKEN) == 1 and shown.index(WORK) < shown.index(BROKEN)
    assert shown.count(BASE) == 1 and shown.count("[broken base 2/2] RUN echo base ready") == 1
    assert len(shown) == 14  # the two .dockerignore loads of "broken" each finish, as BuildKit shows them


@pytest.mark.parametrize(
    ("name", "stage", "instruction"),
    [
        ("[clip-export 3/3] RUN python build/clip_export.py", "clip-export", "RUN"),
        ("[runtime clip-export 3/3] RUN python build/clip_export.py", "clip-export", "RUN"),
        ("[models reranker-cache 2/4] COPY build/ build/", "reranker-cache", "COPY"),
        ("[2/2] RUN echo hello", None, "RUN"),
        ("[internal] load build definition from Dockerfile", None, None),
        ("[runtime internal] load .dockerignore", None, None),
        ("exporting to image", None, None),
    ],
)
def test_stage_and_instruction_from_the_name(name: str, stage: str | None, instruction: str | None) -> None:
    status = {
        "vertexes": [
            {
                "digest": "sha256:1",
                "name": name,
                "started": "2026-01-01T00:00:00Z",
                "completed": "2026-01-01T00:00:02.5Z",
            }
        ]
    }
    (step,) = parse_rawjson(json.dumps(status))
    assert (step.stage, step.instruction, step.seconds, step.cached) == (stage, instruction, 2.5, False)


def test_a_step_shared_by_two_targets_ran_if_either_ran_it() -> None:
    name = "[runtime clip-export 3/3] RUN x"
    updates = [
        {"digest": "sha256:1", "name": name, "started": "2026-01-01T00:00:00Z", "completed": "2026-01-01T00:00:04Z"},
        {
            "digest": "sha256:1",
            "name": "[models clip-export 3/3] RUN x",
            "started": "2026-01-01T00:00:01Z",
            "completed": "2026-01-01T00:00:05Z",
            "cached": True,
        },
    ]
    (step,) = parse_rawjson("\n".join(json.dumps({"vertexes": [u]}) for u in updates))
    assert step.name == name and not step.cached and ran([step], "clip-export")
    assert step.seconds == 5.0  # overlapping runs count once
