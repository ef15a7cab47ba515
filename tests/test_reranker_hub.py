"""The reranker's hub path: the real huggingface_hub client against a hub-compatible server on loopback.

The server (tests/hub_server.py) serves the tiny cross-encoder the tests make as a hub repository; the
stage runs in a fresh interpreter with HF_ENDPOINT pointing at it, as in a build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import Hub, Repo

from modelbake.spec import FRAGMENTS_DIR


@pytest.fixture()
def hub(tiny_sources: Path, tmp_path: Path) -> Hub:
    with Hub({"acme/tiny-ce": Repo.from_folder(tiny_sources / "reranker" / "tiny-bert")}) as server:
        yield server


def _cache(hub: Hub, tmp_path: Path, models: str) -> tuple[object, Path]:
    out = tmp_path / "out"
    # Online towards the loopback hub only; a fresh HF_HOME so nothing comes from an earlier run's cache.
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }
    proc = run_cli("--reranker", models, "--out", str(out), script="reranker_cache.py", env=env)
    return proc, out


def _model(out: Path) -> dict:
    (model,) = json.loads((out / FRAGMENTS_DIR / "reranker-cache.json").read_text())["models"]
    return model


def test_hub_model_is_fetched_pinned_and_laid_out_as_a_plain_folder(hub: Hub, tmp_path: Path) -> None:
    proc, out = _cache(hub, tmp_path, "acme/tiny-ce")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = _model(out)
    commit = hub.repos["acme/tiny-ce"].commit
    assert model["source"] == {"type": "hub", "id": "acme/tiny-ce", "revision": commit}  # recorded when not given
    folder = out / "reranker" / "acme__tiny-ce"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in out.rglob("*") if p.is_symlink()]  # nothing a COPY --from could leave dangling
    assert not (out / "download").exists() and not list(out.glob(".staging-*"))
    # Downloaded at the commit the revision resolved to.
    assert any(path == f"/acme/tiny-ce/resolve/{commit}/model.safetensors" for _, path, _ in hub.requests)


def test_pinned_revision_and_a_resumed_download(hub: Hub, tmp_path: Path) -> None:
    # huggingface_hub writes 10 MB chunks: a 24 MB file whose first response is cut off halfway is
    # resumed from the last whole chunk with a Range request.
    repo = hub.repos["acme/tiny-ce"] = Repo({**hub.repos["acme/tiny-ce"].files, "extra.bin": os.urandom(24 << 20)})
    hub.faults["extra.bin"] = "flaky"
    proc, out = _cache(hub, tmp_path, f"acme/tiny-ce@{repo.commit}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _model(out)["source"]["revision"] == repo.commit
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("/extra.bin")]
    assert ranges == [None, "bytes=10485760-"], ranges
    assert "Trying to resume download" in proc.stderr


def test_each_bad_candidate_gets_one_clear_reason_and_nothing_is_left(hub: Hub, tmp_path: Path) -> None:
    hub.repos["acme/broken"] = Repo(dict(hub.repos["acme/tiny-ce"].files))
    hub.faults["model.safetensors"] = "broken"
    proc, out = _cache(hub, tmp_path, "acme/no-such-model,acme/tiny-ce@v9,acme/broken")
    assert proc.returncode == 1
    err = proc.stderr
    assert "no reranker candidate could be cached" in err and "Traceback" not in err
    assert "no repository 'acme/no-such-model' on the hub" in err
    assert "revision 'v9' does not exist in acme/tiny-ce" in err
    assert "'acme/broken': download failed" in err
    assert not out.exists() or list(out.rglob("*")) == []


def test_a_model_without_a_classifier_head_gets_one_saved_once(tiny_sources: Path, tmp_path: Path) -> None:
    """A bare encoder (no sequence-classification head): one head is made, saved, and reloaded identically."""
    from transformers import AutoModel

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_sources / "reranker" / "tiny-bert").save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_sources / "reranker" / "tiny-bert" / name).is_file():
            (bare / name).write_bytes((tiny_sources / "reranker" / "tiny-bert" / name).read_bytes())
    config = json.loads((bare / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = run_cli("--reranker", f"bare@dir:{bare}", "--out", str(out), script="reranker_cache.py")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out)
    # The head is saved with the model (the stage's offline reload and its score gate use the saved one),
    # and it is drawn from a fixed seed: two builds give the same weights, byte for byte.
    saved = json.loads((outs[0] / "reranker" / "bare" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    (graph,) = [f for f in _model(outs[0])["files"] if f["role"] == "reranker"]
    assert graph["variant"] == "fp32" and graph["parity"]["same_ranking"] is True
    weights = [(out / "reranker" / "bare" / "model.safetensors").read_bytes() for out in outs]
    assert weights[0] == weights[1]
    files = [{f["path"]: f["sha256"] for f in _model(out)["files"]} for out in outs]
    assert files[0] == files[1]


def test_not_a_sequence_classification_model_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "clip-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 8}))
    proc = run_cli("--reranker", f"clip-like@dir:{folder}", "--out", str(tmp_path / "out"), script="reranker_cache.py")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "clip-like" in proc.stderr and "sequence-classification" in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


def test_bundle_pins_the_hub_commit_and_a_damaged_bundle_is_refused(
    hub: Hub, tmp_path: Path, tiny_specs: dict[str, str]
) -> None:
    """`modelbake bundle` downloads from the hub (loopback here) at the commit the revision means, keeps it
    as the model's origin through the offline build, and a file damaged in transit stops the build by name."""
    bundle = tmp_path / "bundle"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    clip = tiny_specs["clip"].split(",")[0]
    proc = run_cli("bundle", str(bundle), "--no-wheels", "--clip", clip, "--reranker", "acme/tiny-ce", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commit = hub.repos["acme/tiny-ce"].commit
    folder = bundle / "sources" / "reranker" / "acme__tiny-ce"
    assert json.loads((folder / "modelbake_origin.json").read_text())["revision"] == commit
    assert 'reranker = "acme__tiny-ce@dir:/sources/reranker/acme__tiny-ce"' in (bundle / "selection.toml").read_text()
    # The stage on the bundled folder (offline) records where the model came from.
    out = tmp_path / "out"
    proc = run_cli("--reranker", f"acme__tiny-ce@dir:{folder}", "--out", str(out), script="reranker_cache.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _model(out)["source"]["origin"] == {"type": "hub", "id": "acme/tiny-ce", "revision": commit}
    assert _model(out)["name"] == "acme__tiny-ce"
    proc = run_cli("bake", "--dry-run", "--config", str(bundle / "selection.toml"))
    assert proc.returncode == 0 and "files checked" in proc.stderr, proc.stderr
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = run_cli("bake", "--dry-run", "--config", str(bundle / "selection.toml"))
    assert proc.returncode == 1 and "model.safetensors: missing or not the file the bundle lists" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Without its manifest the bundle is refused too (it once built unchecked): its selection names /sources.
    (bundle / "bundle_manifest.json").unlink()
    proc = run_cli("bake", "--dry-run", "--config", str(bundle / "selection.toml"))
    assert (
        proc.returncode == 1
        and "bundle_manifest.json: unreadable" in proc.stderr
        and "copy the bundle again" in proc.stderr
    )
