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
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env == {
        "MODELBAKE_MODELS": "/models",
        "MODELBAKE_MANIFEST_SHA256": EXAMPLE["manifest_digest"],
        "MODELBAKE_VARIANT_CACHE": "/tmp/modelbake-variants",  # on the scratch emptyDir: the root is read-only
        # a thread a CPU requested per model call (the downward API rounds 1 or 500m up to 1), not the node's
        "MODELBAKE_THREADS": {
            "resourceFieldRef": {"containerName": "service", "resource": "requests.cpu", "divisor": "1"}
        },
    }
    assert container["resources"]["requests"]["cpu"] == "1"
    assert container["volumeMounts"] == [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "scratch", "mountPath": "/tmp"},
    ]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    volume, scratch = pod["volumes"]
    assert scratch == {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}
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


# The restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards), its
# controls as the pod-security-admission checks word them, baseline's included: a restricted namespace
# refuses a pod that breaks any of them.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
RESTRICTED_VOLUMES |= {"secret"}


def restricted_violations(pod: dict) -> list[str]:
    found = []
    context = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"host namespaces: {key}")
    for volume in pod.get("volumes", []):
        kind = next(k for k in volume if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            found.append(f"volume types: {volume['name']} is {kind}")
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            found.append(f"privileged: {name}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"host ports: {name}")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"privilege escalation: {name} must set allowPrivilegeEscalation=false")
        if not sc.get("runAsNonRoot", context.get("runAsNonRoot")):
            found.append(f"running as non-root: {name}")
        if sc.get("runAsUser", context.get("runAsUser")) == 0:
            found.append(f"running as non-root user: {name} runs as 0")
        seccomp = sc.get("seccompProfile", context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"seccomp: {name} must set seccompProfile.type RuntimeDefault or Localhost")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"capabilities: {name} must drop ALL and add at most NET_BIND_SERVICE")
        if sc.get("procMount", "Default") != "Default" or sc.get("seLinuxOptions", {}).get("type", "") not in (
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ):
            found.append(f"procMount or SELinux: {name}")
    return found


@pytest.mark.parametrize("name", ["image-volume.yaml", "init-copy.yaml"])
def test_the_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    """Both ways pass every control but one: the restricted profile's volume allowlist does not name image
    volumes (the image-volume way needs a namespace that admits them). Read-only roots and resources too."""
    deployment = validate(REPO / "examples" / "kubernetes" / name)[0]
    pod = deployment["spec"]["template"]["spec"]
    expected = ["volume types: models is image"] if name == "image-volume.yaml" else []
    assert restricted_violations(pod) == expected
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # the check itself catches what the manifests once lacked
    bare = {**pod, "securityContext": {"runAsNonRoot": True, "runAsUser": 10001}}
    assert any(v.startswith("seccomp: service") for v in restricted_violations(bare))
