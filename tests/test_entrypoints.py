"""The stage entrypoints in build/ and the CLI: arguments, clear errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from modelbake.spec import FRAGMENTS_DIR, MANIFEST_NAME


@pytest.mark.parametrize("script", ["clip_export.py", "reranker_cache.py", "regressor_seed.py", "merge_manifest.py"])
def test_entrypoints_have_help(script: str) -> None:
    proc = run_cli("--help", script=script)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_clip_entrypoint_rejects_unknown_architecture_before_anything(tmp_path: Path) -> None:
    proc = run_cli("--clip", "ViT-B/33", "--out", str(tmp_path / "out"), script="clip_export.py")
    assert proc.returncode == 1
    assert (
        "unknown OpenCLIP architecture 'ViT-B/33'" in proc.stderr
        or "unknown OpenCLIP architecture 'ViT-B-33'" in proc.stderr
    )
    assert "ViT-B-32" in proc.stderr  # close names are suggested
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_clip_entrypoint_rejects_unknown_tag(tmp_path: Path) -> None:
    proc = run_cli("--clip", "ViT-B-32:nope", "--out", str(tmp_path), script="clip_export.py")
    assert proc.returncode == 1
    assert "no pretrained tag 'nope'" in proc.stderr and "openai" in proc.stderr


def test_bad_spec_grammar_exits_2(tmp_path: Path) -> None:
    proc = run_cli("--clip", "tiny@dir:", "--out", str(tmp_path), script="clip_export.py")
    assert proc.returncode == 2
    assert "empty path" in proc.stderr


def test_missing_local_source_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("--clip", f"tiny@dir:{tmp_path / 'absent'}", "--out", str(out), script="clip_export.py")
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr
    assert list(out.rglob("*")) == []


def test_reranker_falls_back_and_records_why(tmp_path: Path, tiny_specs: dict[str, str]) -> None:
    out = tmp_path / "out"
    missing = f"gone@dir:{tmp_path / 'gone'}"
    run_cli(
        "--reranker", f"{missing},{tiny_specs['reranker']}", "--out", str(out), script="reranker_cache.py", check=True
    )
    fragment = json.loads((out / FRAGMENTS_DIR / "reranker-cache.json").read_text())
    (model,) = fragment["models"]
    assert model["name"] == "tiny-bert"
    assert model["details"] == {"activation": "sigmoid", "num_labels": 1}
    assert any("gone@dir" in note and "no config.json" in note for note in model["notes"])
    assert (out / "reranker" / "tiny-bert" / "tokenizer.json").is_file()


def test_reranker_with_no_working_candidate_fails_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        "--reranker", f"a@dir:{tmp_path / 'a'},b@dir:{tmp_path / 'b'}", "--out", str(out), script="reranker_cache.py"
    )
    assert proc.returncode == 1
    assert "no reranker candidate" in proc.stderr and "a@dir" in proc.stderr and "b@dir" in proc.stderr
    assert list(out.rglob("*")) == []


def test_regressor_entrypoint_reads_its_build_args_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGRESSOR_FEATURE_DIM", "64")
    monkeypatch.setenv("REGRESSOR_EPOCHS", "2")
    run_cli("--out", str(tmp_path), script="regressor_seed.py", check=True)
    fragment = json.loads((tmp_path / FRAGMENTS_DIR / "regressor-seed.json").read_text())
    details = fragment["models"][0]["details"]
    assert details["feature_dim"] == 64 and details["metrics"]["epochs"] == 2


def test_merge_entrypoint_and_verify(built_tree: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    (root / MANIFEST_NAME).unlink()
    proc = run_cli(str(root), "--drop-fragments", script="merge_manifest.py")
    assert proc.returncode == 0, proc.stderr
    assert (root / MANIFEST_NAME).is_file() and not (root / FRAGMENTS_DIR).exists()
    proc = run_cli("verify", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "inference clip_tiny-vit_image_encoder.onnx" in proc.stdout


def test_download_rejects_two_only_flags(tmp_path: Path) -> None:
    proc = run_cli("download", "--clip-only", "--reranker-only", "--out", str(tmp_path))
    assert proc.returncode == 2 and "at most one" in proc.stderr


def test_download_shows_progress_and_a_summary_table(download_run: tuple[Path, str, str]) -> None:
    _, stdout, stderr = download_run
    # one bar per model, each run to its end (int8 on: load + 2 towers x (fp32 + int8) for CLIP)
    for bar in ("CLIP tiny-vit: 100%", "5/5", "reranker tiny-bert: 100%", "4/4", "regressor seed: 100%", "3/3"):
        assert bar in stderr, bar
    table = stdout.splitlines()
    assert table[0].split()[:3] == ["stage", "kind", "name"]
    rows = {line.split()[2]: line.split() for line in table[1:] if len(line.split()) == 8}
    assert set(rows) == {"tiny-vit", "tiny-rn", "tiny-bert", "boundary_regressor"}
    assert "peak GB" in table[0]
    assert float(rows["tiny-vit"][6]) > 0 and rows["boundary_regressor"][6] == "-"  # the regressor is not measured
    manifest = json.loads((download_run[0] / MANIFEST_NAME).read_text())
    for model in manifest["models"]:
        assert rows[model["name"]][3] == str(len(model["files"]))  # the files column is the manifest's
    # Readable by a non-root service when mounted, as the image's tree (safetensors writes 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in download_run[0].rglob("*") if p.is_file()} == {"0o644"}


def test_merge_sets_every_mtime_to_source_date_epoch(built_tree: Path, tmp_path: Path) -> None:
    """File times go into the models layer: with SOURCE_DATE_EPOCH they are all that time."""
    import shutil

    root = tmp_path / "m"
    shutil.copytree(built_tree, root)
    (root / MANIFEST_NAME).unlink()
    stage_times = [json.loads(p.read_text())["created"] for p in (root / ".manifest.d").glob("*.json")]
    run_cli(
        str(root), "--drop-fragments", script="merge_manifest.py", env={"SOURCE_DATE_EPOCH": "1700000000"}, check=True
    )
    paths = [root, *root.rglob("*")]
    assert {int(p.stat().st_mtime) for p in paths} == {1700000000}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {"0o644"}
    # The manifest's time is its stages' (they ran without SOURCE_DATE_EPOCH here), not the merge's.
    assert json.loads((root / MANIFEST_NAME).read_text())["created"] == max(stage_times)


def test_strict_reranker_takes_no_fallback(tmp_path: Path, tiny_specs: dict[str, str]) -> None:
    out = tmp_path / "out"
    missing = f"gone@dir:{tmp_path / 'gone'}"
    proc = run_cli(
        "--reranker",
        f"{missing},{tiny_specs['reranker']}",
        "--reranker-strict",
        "--out",
        str(out),
        script="reranker_cache.py",
    )
    assert proc.returncode == 1 and "RERANKER_STRICT: the first candidate failed" in proc.stderr
    assert "gone@dir" in proc.stderr and list(out.rglob("*")) == []


def test_an_unexpected_error_is_not_taken_for_a_fallback(
    tmp_path: Path, tiny_specs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or an out-of-memory in the first candidate used to ship the second with a green build."""
    from modelbake.params import defaults, for_stage
    from modelbake.producers import reranker

    def out_of_memory(*args: object) -> None:
        raise MemoryError("injected")

    monkeypatch.setattr(reranker, "_load_saved", out_of_memory)
    values = defaults(for_stage("reranker-cache"), RERANKER_MODELS=f"{tiny_specs['reranker']},{tiny_specs['reranker']}")
    with pytest.raises(MemoryError):
        reranker.run(tmp_path / "out", values)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []
