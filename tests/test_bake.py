"""The bake driver without an engine: selection checks, the exact command, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli


def test_dry_run_prints_the_exact_command() -> None:
    proc = run_cli(
        "bake",
        "--dry-run",
        "--clip",
        "ViT-B/32,RN50",
        "--clip-int8",
        "runtime",
        "models",
        "--set",
        "*.platform=linux/amd64",
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    # Every selection parameter of the table, explicit, in the table's order.
    assert line.startswith("CLIP_MODELS=ViT-B/32,RN50 CLIP_INT8=1 CLIP_KEEP_PYTORCH=0 CLIP_PARITY_ATOL=1e-3 ")
    assert (
        " RERANKER_MODELS=cross-encoder/ms-marco-MiniLM-L-6-v2 RERANKER_INT8=0 " in line and " ONNX_OPSET=17 " in line
    )
    assert line.endswith("docker buildx bake --progress=auto runtime models --set '*.platform=linux/amd64'")


def test_unknown_architecture_fails_before_any_build() -> None:
    proc = run_cli("bake", "--clip", "ViT-B/32,ViT-B/33")
    assert proc.returncode == 2
    assert "'ViT-B/33': unknown OpenCLIP architecture 'ViT-B/33'; close names: ViT-B-32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_selection_file(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('clip = ["RN50"]\nreranker_int8 = true\n[regressor]\nfeature_dim = 1024\nepochs = 5\n')
    proc = run_cli("bake", "--dry-run", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "CLIP_MODELS=RN50 " in proc.stdout and "RERANKER_INT8=1" in proc.stdout
    assert "REGRESSOR_FEATURE_DIM=1024" in proc.stdout and "REGRESSOR_EPOCHS=5" in proc.stdout
    config.write_text('clip = ["RN50"]\nclpi_int8 = true\n')
    proc = run_cli("bake", "--dry-run", "--config", str(config))
    assert proc.returncode == 2 and "unknown keys ['clpi_int8']" in proc.stderr


def test_no_engine_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    proc = run_cli("bake", "--clip", "RN50")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    if shutil.which("docker") is None:
        assert "no docker client on PATH; install Docker" in proc.stderr
    elif subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        assert "the buildx plugin is missing" in proc.stderr
    else:
        assert "no Docker engine answers at unix:///nonexistent/docker.sock" in proc.stderr
        assert "start dockerd" in proc.stderr


def test_regressor_flags_become_bake_variables_and_are_checked() -> None:
    proc = run_cli(
        "bake",
        "--dry-run",
        "--clip",
        "RN50",
        "--regressor-feature-dim",
        "1024",
        "--regressor-seed",
        "7",
        "--regressor-epochs",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "REGRESSOR_FEATURE_DIM=1024 REGRESSOR_SEED=7 REGRESSOR_EPOCHS=5" in proc.stdout
    proc = run_cli("bake", "--dry-run", "--regressor-feature-dim", "big")
    assert proc.returncode == 2
    assert "REGRESSOR_FEATURE_DIM (--regressor-feature-dim) 'big': give a positive integer or 'auto'" in proc.stderr
    proc = run_cli("bake", "--dry-run", "--regressor-epochs", "0")
    assert proc.returncode == 2 and "REGRESSOR_EPOCHS (--regressor-epochs) '0' is below the minimum 1" in proc.stderr


def test_git_credentials_never_reach_the_source_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin with a token in it (https://user:TOKEN@host/repo) is published without the user info."""
    from modelbake import context
    from modelbake.bake import _provenance

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    origin = "https://me:s3cr3t@git.example/acme/x.git"
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", origin], check=True)
    monkeypatch.setattr(context, "checkout", lambda: tmp_path)  # the checkout modelbake runs from
    found = _provenance({})
    given = _provenance({"SOURCE_URL": "https://ci:tok@git.example:8443/acme/x"})
    assert found["SOURCE_URL"] == "https://git.example/acme/x.git"
    assert given["SOURCE_URL"] == "https://git.example:8443/acme/x"
    assert "s3cr3t" not in str(found) and "tok" not in str(given)
    # a token in the query or fragment, a port that is no port (it once raised a raw ValueError)
    assert _provenance({"SOURCE_URL": "https://git.example/acme/x?access_token=T0K#frag"})["SOURCE_URL"] == (
        "https://git.example/acme/x"
    )
    assert _provenance({"SOURCE_URL": "https://git.example:99999/acme/x"})["SOURCE_URL"] == ""


@pytest.mark.docker
def test_plain_bake_cleans_the_source_label_too() -> None:
    """`docker buildx bake` without the driver: docker-bake.hcl itself drops user info, query and fragment."""
    import json

    from conftest import REPO

    env = {**os.environ, "SOURCE_URL": "https://me:s3cr3t@git.example/acme/x.git?access_token=T0K#frag"}
    proc = subprocess.run(
        ["docker", "buildx", "bake", "-f", str(REPO / "docker-bake.hcl"), "--print", "runtime"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0 and "is not a docker command" in proc.stderr and os.environ.get("CI") != "true":
        pytest.skip("no docker buildx here; run `bash docker/setup-engine.sh` (root, Debian 12) to get one")
    assert proc.returncode == 0, proc.stderr
    labels = json.loads(proc.stdout)["target"]["runtime"]["labels"]
    assert labels["org.opencontainers.image.source"] == "https://git.example/acme/x.git"


def test_compose_services_run_hardened_and_take_the_token_as_a_secret() -> None:
    import yaml
    from conftest import REPO

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("mem_limit") and service.get("pids_limit"), name
    assert compose["services"]["modelbake"]["build"]["secrets"] == ["hf_token"]
    assert compose["secrets"]["hf_token"] == {"environment": "HF_TOKEN"}
    assert "HF_TOKEN" not in str(compose["services"]["modelbake"]["build"].get("args"))


def test_push_takes_a_repository_without_tag_or_digest() -> None:
    from modelbake.bake import BakeError, check_repository

    for good in ("127.0.0.1:5055/modelbake", "registry.example/team/modelbake-e2e", "modelbake"):
        check_repository(good)
    for bad in ("127.0.0.1:5055/modelbake:latest", "r/m@sha256:" + "0" * 64, "Registry/Upper", "r//m", ""):
        with pytest.raises(BakeError, match="give a repository as REGISTRY/NAME"):
            check_repository(bad)
