"""Kubernetes manifests for a service whose models are pulled by digest: what ``modelbake bake --push
--kubernetes DIR`` writes, and what examples/kubernetes/ shows.

Two ways to get the model tree to ``/models``, read-only, in every pod:

- ``image-volume.yaml``: the FROM-scratch ``models`` image mounted as an image volume (Kubernetes ImageVolume:
  beta and on by default in 1.35, GA in 1.36; the nodes need containerd >= 2.1 or CRI-O >= 1.31);
- ``init-copy.yaml``, for older clusters: an init container copies the tree into an emptyDir. The models
  image has no files but the tree (no ``cp``), so the copier is the runtime image, which holds the same
  verified tree: both come from the build's ``runtime-verified`` stage.

Either way the service pins the manifest (``MODELBAKE_MANIFEST_SHA256``, the runtime image's
``io.modelbake.manifest-digest`` label) and refuses a tree that is not the one built. With a signing public
key, a ConfigMap carries it to every pod and ``MODELBAKE_SIGNING_PUBLIC_KEY`` points at it: the service then
verifies the tree's signature at start too (the runtime image needs MODEL_SIGNING=1). Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelbake.params import BY_NAME
from modelbake.signature import PUBLIC_KEY_ENV

SERVICE_PORT = 8080  # examples/search_service listens here
RUNTIME_UID = BY_NAME["RUNTIME_UID"].typed_default  # the runtime image's user
SIGNING_MOUNT = "/etc/modelbake/signing"  # the ConfigMap's folder in the service container
SIGNING_KEY_NAME = "model-signing.pub"
# The restricted Pod Security Standard's container settings, plus a read-only root. The one place the service
# writes is a scratch emptyDir at /tmp (SCRATCH): the variant check's cache and OpenVINO's compiled models for
# the pod's life, and the files OpenVINO reads a graph with external data from. Resources: the full-size
# default set (ViT-B/32, MiniLM-L6, the regressor) peaked at 1.05 GB in fp32 (bench/README.md, start-up);
# the 4 GiB limit leaves room for the batches of concurrent requests.
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
SERVICE_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
THREADS_FROM_REQUEST = {"containerName": "service", "resource": "requests.cpu", "divisor": "1"}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUNTIME_UID,
    "runAsGroup": RUNTIME_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
SCRATCH = {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}
COPIER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def _deployment(
    name: str, service_image: str, manifest_digest: str, models: dict[str, Any], replicas: int, signed: bool
) -> dict:
    labels = {"app.kubernetes.io/name": name}
    # /healthz is answered outside the service's request limit: clients holding every slot do not fail probes
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "timeoutSeconds": 5}
    container = {
        "name": "service",
        "image": service_image,
        "ports": [{"name": "http", "containerPort": SERVICE_PORT}],
        "env": [
            {"name": "MODELBAKE_MODELS", "value": "/models"},
            # The mounted tree must be the one built: its manifest's sha256, checked at start.
            {"name": "MODELBAKE_MANIFEST_SHA256", "value": manifest_digest},
            {"name": "MODELBAKE_VARIANT_CACHE", "value": "/tmp/modelbake-variants"},
            # Threads per model call from the pod's CPU request (rounded up), not the node's cores, which the
            # engines would count without a CPU limit; the service runs SEARCH_WORKERS (2) calls at once.
            {"name": "MODELBAKE_THREADS", "valueFrom": {"resourceFieldRef": THREADS_FROM_REQUEST}},
        ],
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": SCRATCH["name"], "mountPath": "/tmp"},
        ],
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},  # loading and hashing the tree
        "readinessProbe": {**probe, "periodSeconds": 10},
        "livenessProbe": {**probe, "periodSeconds": 30},
        "resources": SERVICE_RESOURCES,
        "securityContext": CONTAINER_SECURITY,
    }
    pod: dict[str, Any] = {
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": [{"name": "models", **models["volume"]}, SCRATCH],
    }
    if signed:  # the tree's signature is checked at start against the key of _signing_key()
        container["env"].append({"name": PUBLIC_KEY_ENV, "value": f"{SIGNING_MOUNT}/{SIGNING_KEY_NAME}"})
        container["volumeMounts"].append({"name": "signing-key", "mountPath": SIGNING_MOUNT, "readOnly": True})
        pod["volumes"].append({"name": "signing-key", "configMap": {"name": f"{name}-signing-key"}})
    if "init" in models:
        pod["initContainers"] = [models["init"]]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def _signing_key(name: str, public_key_pem: str) -> dict:
    # A public key is no secret: a ConfigMap (files 0644, readable by the service's user).
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-signing-key", "labels": {"app.kubernetes.io/name": name}},
        "data": {SIGNING_KEY_NAME: public_key_pem},
    }


def manifests(
    *,
    service_image: str,
    models_image: str,
    runtime_image: str,
    manifest_digest: str,
    name: str = "modelbake-search",
    replicas: int = 2,
    signing_public_key: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """File name -> its documents (a Deployment and a Service, after a ConfigMap with ``signing_public_key``,
    a PEM, when the tree is signed), for each way of mounting the models."""
    image_volume = {"volume": {"image": {"reference": models_image, "pullPolicy": "IfNotPresent"}}}
    copier = {
        "name": "models",
        "image": runtime_image,
        "command": ["python", "-c", "import shutil; shutil.copytree('/models', '/copy', dirs_exist_ok=True)"],
        "volumeMounts": [{"name": "models", "mountPath": "/copy"}],
        "resources": COPIER_RESOURCES,
        "securityContext": CONTAINER_SECURITY,
    }
    init_copy = {"volume": {"emptyDir": {}}, "init": copier}
    key = [] if signing_public_key is None else [_signing_key(name, signing_public_key)]
    signed = bool(key)
    return {
        file_name: [*key, _deployment(name, service_image, manifest_digest, models, replicas, signed), _service(name)]
        for file_name, models in (("image-volume.yaml", image_volume), ("init-copy.yaml", init_copy))
    }


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """Documents as one YAML stream, keys in the order written (kubectl's own order: apiVersion, kind, ...)."""
    import yaml

    # A round trip through JSON unshares the dicts used twice (labels, probes): no YAML anchors in the output.
    plain = json.loads(json.dumps(documents))
    return yaml.safe_dump_all(plain, sort_keys=False, explicit_start=True, width=120)


def write(folder: Path, **refs: str | None) -> list[Path]:
    """Write :func:`manifests` for ``refs`` into ``folder``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, documents in manifests(**refs).items():
        path = folder / file_name
        path.write_text(to_yaml(documents))
        written.append(path)
    return written
