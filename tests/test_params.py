"""The parameter table (modelbake.params) is the one home of every build parameter: the Dockerfile's ARGs,
the stages' RUN lines, the bake variables, compose's build args and the CLI flags must all agree with it."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

from modelbake.cli import build_parser
from modelbake.params import ARG, BAKE, COMPOSE, SELECTION, TABLE, for_stage
from modelbake.producers import STAGES

DOCKERFILE = (REPO / "Dockerfile.models").read_text()
_FROM = re.compile(r"^FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?$", re.MULTILINE)


def _sections() -> dict[str, str]:
    """Dockerfile text by stage name; "" is the part before the first FROM (the global ARGs)."""
    starts = list(_FROM.finditer(DOCKERFILE))
    sections = {"": DOCKERFILE[: starts[0].start()]}
    for match, end in zip(starts, [*[m.start() for m in starts[1:]], len(DOCKERFILE)], strict=True):
        sections[match[2] or match[1]] = DOCKERFILE[match.start() : end]
    return sections


def _args(text: str) -> dict[str, str | None]:
    """``ARG A=1 B`` lines -> {"A": "1", "B": None}."""
    found: dict[str, str | None] = {}
    for line in re.findall(r"^ARG (.+)$", text, re.MULTILINE):
        for item in line.split():
            name, eq, default = item.partition("=")
            found[name] = default.strip('"') if eq else None
    return found


def test_global_args_hold_every_default_of_the_table() -> None:
    declared = _args(_sections()[""])
    assert declared == {p.name: p.default for p in TABLE if ARG in p.where}


def test_each_stage_declares_exactly_the_args_it_reads_without_defaults() -> None:
    sections = _sections()
    from_lines = " ".join(m[1] for m in _FROM.finditer(DOCKERFILE))
    for stage, text in sections.items():
        if not stage:
            continue
        declared = _args(text)
        assert all(default is None for default in declared.values()), (stage, declared)  # defaults live above
        wanted = {p.name for p in TABLE if ARG in p.where and stage in p.stages and f"${{{p.name}}}" not in from_lines}
        assert set(declared) == wanted, stage


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_parameter_is_an_explicit_flag_in_its_run_line(stage: str) -> None:
    run = _sections()[stage].split("\nRUN ", 1)[1]
    passed = set(re.findall(r'(--[a-z0-9-]+) "\$([A-Z0-9_]+)"', run))
    assert passed == {(p.flag, p.name) for p in for_stage(stage)}


def test_bake_variables_and_args_match_the_table() -> None:
    hcl = (REPO / "docker-bake.hcl").read_text()
    variables = dict(re.findall(r'^variable "(\w+)" \{ default = (.+) \}$', hcl, re.MULTILINE))
    assert variables == {p.name: p.bake_default or f'"{p.default}"' for p in TABLE if BAKE in p.where}
    common_args = re.search(r"\n  args = \{\n(.*?)\n  \}", hcl, re.DOTALL)[1]
    passed = dict(re.findall(r"^\s+(\w+)\s+= (\w+)$", common_args, re.MULTILINE))
    assert passed == {p.name: p.name for p in TABLE if ARG in p.where and BAKE in p.where}


def test_compose_args_match_the_table() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    args = compose["services"]["modelbake"]["build"]["args"]
    wanted = {}
    for p in TABLE:
        if COMPOSE in p.where:
            # ${BASE_IMAGE} in a default is compose's own nested default: ${BASE_IMAGE:-<its default>}
            default = p.default.replace("${BASE_IMAGE}", "${BASE_IMAGE:-python:3.11-slim-bookworm}")
            wanted[p.name] = f"${{{p.name}:-{default}}}"
    assert args == wanted


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_commands_take_exactly_their_parameters(stage: str) -> None:
    assert _flags(stage) - {"-h", "--help", "--out"} == {p.flag for p in for_stage(stage)}


def test_download_bake_and_bundle_take_every_selection_parameter() -> None:
    for command in ("download", "bake", "bundle"):
        assert {p.flag for p in SELECTION} <= _flags(command), command


def test_download_reads_the_reranker_int8_gate() -> None:
    """The copies had drifted: download drove the reranker's int8 from --int8 and dropped its tolerance."""
    from modelbake.params import resolve

    args = build_parser().parse_args(
        ["download", "--int8", "--reranker-int8-top-k", "5", "--reranker-int8-min-tau", "0.5"]
    )
    values = resolve(args, SELECTION)
    assert values["RERANKER_INT8_TOP_K"] == 5 and values["RERANKER_INT8_MIN_TAU"] == 0.5 and args.int8
    with pytest.raises(SystemExit):  # tau is at most 1: a gate nothing could pass is a typo, said at once
        resolve(build_parser().parse_args(["download", "--reranker-int8-min-tau", "1.5"]), SELECTION)


def test_bad_values_name_the_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelbake.params import BY_NAME
    from modelbake.spec import SpecError

    monkeypatch.setenv("REGRESSOR_EPOCHS", "0")
    with pytest.raises(SpecError, match=r"REGRESSOR_EPOCHS \(--regressor-epochs\) '0' is below the minimum 1"):
        BY_NAME["REGRESSOR_EPOCHS"].from_env()
    with pytest.raises(SpecError, match=r"CLIP_INT8 .* 'maybe' is not a yes/no value"):
        BY_NAME["CLIP_INT8"].value("maybe")


# A setting's name as a keyword argument: its default belongs in the table (or TRAINING), never in a signature.
SETTING_NAMES = {
    "opset", "external_data_bytes", "int8_ship", "int8_required", "int8_min_cosine", "atol", "min_cosine",
    "top_k", "min_tau", "epochs", "seed", "lr", "batch_size", "patience", "val_fraction", "uid",
}  # fmt: skip


def test_no_build_time_signature_writes_a_default_of_a_setting() -> None:
    """Every default has one home (params.TABLE, params.TRAINING): a second one in a keyword default or
    a dataclass field would drift from it unseen. The run time's own API (batch sizes of encode_*) and the
    seeds of the tiny test models (modelbake/sources) are not build settings."""
    import ast

    found = []
    for path in sorted((REPO / "modelbake").rglob("*.py")):
        if {"runtime", "sources"} & set(path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                named = [*args.args[len(args.args) - len(args.defaults) :], *args.kwonlyargs]
                values = [*args.defaults, *args.kw_defaults]
                found += [
                    f"{path.name}:{node.lineno} {a.arg}"
                    for a, v in zip(named, values, strict=True)
                    if a.arg in SETTING_NAMES and isinstance(v, ast.Constant) and v.value is not None
                ]
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id in SETTING_NAMES
                and isinstance(node.value, ast.Constant)
            ):
                found.append(f"{path.name}:{node.lineno} {node.target.id}")
    assert found == []


def test_a_default_written_as_text_lives_only_in_the_table() -> None:
    """The table's distinctive defaults (a base image, an index, a uid, a byte limit) appear in no other module."""
    # (The default model lists live in modelbake.spec beside the grammar; the table imports them.)
    distinctive = [p.default for p in TABLE if re.search(r"[:/]", p.default) and not p.name.endswith("_MODELS")]
    distinctive += [str(p.typed_default) for p in TABLE if isinstance(p.typed_default, int) and p.typed_default > 999]
    assert "10001" in distinctive and "python:3.11-slim-bookworm" in distinctive
    for path in sorted((REPO / "modelbake").rglob("*.py")):
        if path.name == "params.py":
            continue
        text = path.read_text()
        assert [d for d in distinctive if d in text] == [], path


def test_the_training_command_defaults_are_the_training_settings() -> None:
    from modelbake.params import TRAINING, VAL_FRACTION

    args = build_parser().parse_args(["train-regressor", "data.json", "out.pth"])
    assert (args.epochs, args.seed, args.lr, args.batch_size, args.patience) == (
        TRAINING.epochs,
        TRAINING.seed,
        TRAINING.lr,
        TRAINING.batch_size,
        TRAINING.patience,
    )
    assert args.val_fraction == VAL_FRACTION
