"""The Kubernetes manifests the bake driver writes: valid for Kubernetes 1.36, pinned by digest, in sync with
examples/kubernetes/. No cluster runs here; kubernetes-validate checks them against the 1.36 schemas."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from modelbake import kubernetes as k8s

ZERO = "sha256:" + "0" * 64
EXAMPLE = {  # the placeholder digests examples/kubernetes/ was rendered with
    "service_image": f"registry.example:5000/search@{ZERO}",
    "models_image": f"registry.example:5000/modelbake-models@{ZERO}",
    "runtime_image": f"registry.example:5000/modelbake@{ZERO}",
    "manifest_digest": ZERO,
}


def validate(path: Path) -> list[dict]:
    documents = list(yaml.safe_load_all(path.read_text()))
    for doc in documents:
        kubernetes_validate.validate(doc, "1.36", strict=True)
    return documents


def test_the_examples_are_what_the_driver_writes(tmp_path: Path) -> None:
    written = k8s.write(tmp_path, **EXAMPLE)
    assert [p.name for p in written] == ["image-volume.yaml", "init-copy.yaml"]
    for path in written:
        assert path.read_text() == (REPO / "examples" / "kubernetes" / path.name).read_text(), (
            f"examples/kubernetes/{path.name} is stale; render it again with modelbake.kubernetes.write"
        )


@pytest.mark.parametrize("name", ["image-volume.yaml", "init-copy.yaml"])
def test_the_manifests_are_valid_kubernetes_1_36_and_pin_the_tree(name: str) -> None:
    deployment, service = validate(REPO / "examples" / "kubernetes" / name)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"MODELBAKE_MODELS": "/models", "MODELBAKE_MANIFEST_SHA256": EXAMPLE["manifest_digest"]}
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    (volume,) = pod["volumes"]
    if name == "image-volume.yaml":
        assert volume["image"]["reference"] == EXAMPLE["models_image"] and "initContainers" not in pod
    else:
        (init,) = pod["initContainers"]
        assert "emptyDir" in volume and init["image"] == EXAMPLE["runtime_image"]


def test_the_validator_catches_a_field_kubernetes_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        (REPO / "examples" / "kubernetes" / "image-volume.yaml").read_text().replace("readOnly:", "readonly:")
    )
    with pytest.raises(kubernetes_validate.ValidationError, match="readonly"):
        validate(tmp_path / "bad.yaml")


def test_kubernetes_needs_a_push_and_a_service_image(tmp_path: Path) -> None:
    from modelbake.bake import BakeError, Selection, bake

    with pytest.raises(BakeError, match="give --push REGISTRY/NAME and --service-image"):
        bake(Selection(), ["runtime"], kubernetes=tmp_path, push="127.0.0.1:5055/m")
    assert list(tmp_path.iterdir()) == []
