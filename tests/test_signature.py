"""Signed model trees (OpenSSF model signing, key-based, offline): signed by us, verified by us and by
model_signing's own CLI; a tampered file, a tampered manifest, an added file, an unsigned tree and the
wrong key are refused, by open_models and by verify, before anything loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelbake.manifest import ManifestError
from modelbake.runtime.models import open_models
from modelbake.runtime.verify import verify
from modelbake.signature import PUBLIC_KEY_ENV, key_id, sign_tree, verify_tree
from modelbake.spec import MANIFEST_NAME, SIGNATURE_NAME


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"ours": _key_pair(folder, "ours"), "other": _key_pair(folder, "other")}


@pytest.fixture(scope="module")
def signed(built_tree: Path, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("signed") / "models"
    shutil.copytree(built_tree, tree)
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.signature", "sign", str(tree), "--private-key", str(keys["ours"][0])],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"signed: {tree / SIGNATURE_NAME} (key {key_id(keys['ours'][1])})")
    assert [p.name for p in tree.parent.iterdir()] == ["models"]  # nothing left beside the tree
    return tree


def _copy(signed: Path, tmp_path: Path) -> Path:
    tree = tmp_path / "models"
    shutil.copytree(signed, tree)
    return tree


def test_a_signed_tree_verifies_here_and_with_model_signings_own_cli(
    signed: Path, keys: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    public = keys["ours"][1]
    assert verify_tree(signed, public) == f"{SIGNATURE_NAME} verified with key {key_id(public)}"
    cli = Path(sys.executable).with_name("model_signing")
    proc = subprocess.run(
        [
            str(cli),
            "verify",
            "key",
            str(signed),
            "--signature",
            str(signed / SIGNATURE_NAME),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr  # interoperability: the tool's own verifier accepts our tree
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    rows = verify(signed)
    assert [r.detail for r in rows if r.what == "signature"] == [f"{SIGNATURE_NAME} verified with key {key_id(public)}"]
    assert all(r.ok for r in rows)
    # the health check (every 30 s in the image) hashes nothing, so it leaves the signature to start-up
    assert all(r.what != "signature" for r in verify(signed, quick=True))
    assert open_models(signed, variant="fp32").clip  # loads once the signature holds


@pytest.mark.parametrize("tamper", ["model file", "manifest", "added file", "unsigned", "wrong key"])
def test_a_tampered_or_unsigned_tree_is_refused_before_anything_loads(
    signed: Path, keys: dict[str, tuple[Path, Path]], tmp_path: Path, tamper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = _copy(signed, tmp_path)
    public = keys["ours"][1]
    expected = "signature check failed"
    if tamper == "model file":
        graph = next(tree.glob("onnx/*.onnx"))
        data = bytearray(graph.read_bytes())
        data[-1] ^= 1
        graph.write_bytes(bytes(data))
    elif tamper == "manifest":  # a consistent edit (still valid JSON and schema): only the signature sees it
        manifest = json.loads((tree / MANIFEST_NAME).read_text())
        manifest["created"] = "2000-01-01T00:00:00Z"
        (tree / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    elif tamper == "added file":
        (tree / "onnx" / "extra.onnx").write_bytes(b"not signed")
    elif tamper == "unsigned":
        (tree / SIGNATURE_NAME).unlink()
        expected = f"unsigned ({SIGNATURE_NAME} missing) but a public key is configured"
    else:
        public = keys["other"][1]
        expected = "signature check failed (Key mismatch"
    with pytest.raises(ManifestError, match=re.escape(expected)) as error:
        open_models(tree, public_key=public)
    assert "\n" not in str(error.value) and len(str(error.value)) < 600  # one line, not model_signing's digests
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    (row,) = [r for r in verify(tree) if r.what == "signature"]
    assert not row.ok and expected in row.detail
    proc = subprocess.run(
        [sys.executable, "-m", "modelbake.signature", "verify", str(tree), "--public-key", str(public)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and expected in proc.stderr


@pytest.mark.parametrize("tamper", ["graph and manifest together", "unsigned"])
def test_every_per_model_loader_checks_the_signature_too(
    signed: Path, keys: dict[str, tuple[Path, Path]], tmp_path: Path, tamper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaders of one model (not only open_models) once skipped the signature: a signed tree whose graph
    and manifest were rewritten together, or whose model.sig was deleted, loaded through them."""
    from modelbake.manifest import sha256_file
    from modelbake.runtime.clip import ClipEncoder
    from modelbake.runtime.regressor import BoundaryRegressorONNX, find_weights
    from modelbake.runtime.reranker import Reranker

    tree = _copy(signed, tmp_path)
    if tamper == "unsigned":
        (tree / SIGNATURE_NAME).unlink()
    else:  # the regressor's graph replaced by another, the manifest saying so: every file checks out
        import onnx

        graph = tree / "onnx" / "boundary_regressor.onnx"
        swapped = onnx.load(graph)
        swapped.doc_string = "not the graph that was signed"
        onnx.save(swapped, graph)
        manifest = json.loads((tree / MANIFEST_NAME).read_text())
        for model in manifest["models"]:
            for entry in model["files"]:
                if entry["path"] == "onnx/boundary_regressor.onnx":
                    entry.update(sha256=sha256_file(graph), bytes=graph.stat().st_size)
        (tree / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys["ours"][1]))
    for load in (ClipEncoder.from_folder, Reranker.from_folder, BoundaryRegressorONNX.from_folder, find_weights):
        with pytest.raises(ManifestError, match=r"signature check failed|unsigned"):
            load(tree)
    monkeypatch.delenv(PUBLIC_KEY_ENV)
    assert BoundaryRegressorONNX.from_folder(tree, public_key=None)  # no key set: the file check alone
    with pytest.raises(ManifestError, match=r"signature check failed|unsigned"):
        BoundaryRegressorONNX.from_folder(tree, public_key=keys["ours"][1])  # or given as an argument


def test_without_a_public_key_an_unsigned_tree_loads_as_before(
    built_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    assert not (built_tree / SIGNATURE_NAME).exists()
    assert all(r.what != "signature" for r in verify(built_tree, quick=True))


def test_a_bad_key_is_one_line_and_writes_nothing(built_tree: Path, tmp_path: Path) -> None:
    tree = tmp_path / "models"
    shutil.copytree(built_tree, tree)
    rsa_like = tmp_path / "not-a-key.pem"
    rsa_like.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ManifestError, match="cannot sign with it"):
        sign_tree(tree, rsa_like)
    with pytest.raises(ManifestError, match=r"missing\.pem: no key there"):
        sign_tree(tree, tmp_path / "missing.pem")
    assert not (tree / SIGNATURE_NAME).exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "models",
        "not-a-key.pem",
    ]


def test_a_public_key_where_model_signing_is_not_installed_names_the_build_argument(
    signed: Path, keys: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "model_signing", None)  # as in a runtime image built with MODEL_SIGNING=0
    with pytest.raises(ManifestError, match=r"needs model_signing .*build it with MODEL_SIGNING=1"):
        open_models(signed, public_key=keys["ours"][1])


def test_the_host_cli_signs_what_it_downloads_and_drops_a_stale_signature(
    keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from conftest import run_cli

    out = tmp_path / "models"
    regressor_only = ["download", "--regressor-only", "--regressor-feature-dim", "8", "--regressor-epochs", "1"]
    bad = run_cli(*regressor_only, "--out", str(out), "--sign-key", str(keys["ours"][1]))  # a public key
    assert bad.returncode == 1 and "not an unencrypted EC private key in PEM" in bad.stderr, bad.stderr
    assert not out.exists()  # refused before any stage ran
    signed = run_cli(*regressor_only, "--out", str(out), "--sign-key", str(keys["ours"][0]), check=True)
    assert f"signed: {out / SIGNATURE_NAME} (key {key_id(keys['ours'][1])})" in signed.stdout
    verify_tree(out, keys["ours"][1])
    again = run_cli(*regressor_only, "--out", str(out), check=True)
    assert "it signed an earlier tree" in again.stdout and not (out / SIGNATURE_NAME).exists()


def test_kubernetes_deployments_carry_the_public_key_the_pod_verifies_with(
    signed: Path, keys: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `modelbake bake --push --kubernetes DIR --sign-key KEY` writes: the public key (derived from the
    # private one) in a ConfigMap, mounted read-only where MODELBAKE_SIGNING_PUBLIC_KEY points.
    import kubernetes_validate
    import yaml

    from modelbake import kubernetes as k8s
    from modelbake.signature import public_key_pem

    zero = "sha256:" + "0" * 64
    refs = {"service_image": f"r.example/s@{zero}", "models_image": f"r.example/m@{zero}"}
    pem = public_key_pem(keys["ours"][0], private=True)
    assert pem == keys["ours"][1].read_text()
    (path, _) = k8s.write(tmp_path / "k8s", **refs, runtime_image=f"r.example/r@{zero}", manifest_digest=zero,
                          signing_public_key=pem)  # fmt: skip
    config_map, deployment, _ = yaml.safe_load_all(path.read_text())
    for doc in (config_map, deployment):
        kubernetes_validate.validate(doc, "1.36", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    key_path = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}[PUBLIC_KEY_ENV]
    (mount,) = [m for m in container["volumeMounts"] if key_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] and volume["configMap"]["name"] == config_map["metadata"]["name"]
    # The pod's view: the ConfigMap's files under the mount path, then start-up's check with that key.
    pod_root, mounted = tmp_path / "pod", tmp_path / "pod" / mount["mountPath"].lstrip("/")
    mounted.mkdir(parents=True)
    for name, text in config_map["data"].items():
        (mounted / name).write_text(text)
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(pod_root / key_path.lstrip("/")))
    (row,) = [r for r in verify(signed) if r.what == "signature"]
    assert row.ok, row.detail
    (pod_root / key_path.lstrip("/")).write_text(keys["other"][1].read_text())
    with pytest.raises(ManifestError, match="signature"):
        open_models(signed)
    # Unsigned trees keep the manifests as they were: no ConfigMap, no key variable.
    plain = k8s.manifests(**refs, runtime_image=f"r.example/r@{zero}", manifest_digest=zero)
    assert all(doc["kind"] != "ConfigMap" for docs in plain.values() for doc in docs)
