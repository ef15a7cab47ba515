# docker buildx bake            -> the runtime image (group "default")
# docker buildx bake models     -> the model tree written to ./models on the host
# docker buildx bake --print    -> the resolved plan
# Every variable below can be overridden from the environment, e.g. CLIP_MODELS=RN50 docker buildx bake
# Bake also reads compose.yaml: its service is named "modelbake" so it never merges into a target here.

variable "BASE_IMAGE" { default = "python:3.11-slim-bookworm" }
variable "RUNTIME_BASE_IMAGE" { default = BASE_IMAGE }
variable "TORCH_INDEX_URL" { default = "https://download.pytorch.org/whl/cpu" }

# Model selection (see README "Model specs").
variable "CLIP_MODELS" { default = "ViT-B/32,ViT-B/16,RN50" }
variable "RERANKER_MODELS" { default = "cross-encoder/ms-marco-MiniLM-L-6-v2" }
variable "RERANKER_INT8" { default = "0" }
variable "RERANKER_INT8_TOP_K" { default = "3" }
variable "RERANKER_INT8_MIN_TAU" { default = "0.9" }
variable "RERANKER_STRICT" { default = "0" }
variable "INT8_SHIP" { default = "faster" }
variable "INT8_REQUIRED" { default = "0" }
variable "CLIP_INT8" { default = "0" }
variable "CLIP_KEEP_PYTORCH" { default = "0" }
variable "CLIP_PARITY_ATOL" { default = "1e-3" }
variable "CLIP_PARITY_MIN_COSINE" { default = "0.999" }
variable "CLIP_INT8_MIN_COSINE" { default = "0.99" }
variable "REGRESSOR_FEATURE_DIM" { default = "auto" }
variable "REGRESSOR_SEED" { default = "0" }
variable "REGRESSOR_EPOCHS" { default = "20" }
variable "ONNX_OPSET" { default = "17" }
variable "ONNX_EXTERNAL_DATA_BYTES" { default = "2000000000" }

# Optional local inputs: a wheelhouse folder (offline pip) and a model-sources folder (mounted at /sources).
variable "WHEELHOUSE" { default = "" }
variable "MODEL_SOURCES" { default = "" }
# 1 = install from WHEELHOUSE alone (no index); on by default when a wheelhouse is given.
variable "PIP_OFFLINE" { default = notequal(WHEELHOUSE, "") ? "1" : "0" }

# Target platforms of the runtime and models images, e.g. linux/amd64,linux/arm64 (empty: the builder's own).
# The models are exported once on the build platform whatever this says (Dockerfile.models, "Platforms").
# Several need an engine that holds multi-platform images (the containerd image store) or a push.
variable "PLATFORMS" { default = "" }

variable "IMAGE" { default = "modelbake" }
variable "TAG" { default = "latest" }
variable "PUSH_TO" { default = "" }
# A registry build cache shared by every builder: REGISTRY/NAME:TAG. Every target imports it; `runtime` (whose
# graph holds every stage) exports it with mode=max, so the producing stages are cached, not only the final
# image; its layers in zstd (gzip made the export 3x slower: 207 s against 67 s for the tiny models' 3.4 GB).
# Needs an engine that can export one (the containerd image store, or a docker-container builder).
variable "BUILD_CACHE" { default = "" }
# 1 = pushed images carry BuildKit's provenance attestation (mode=max); the same engines only.
variable "PROVENANCE" { default = "0" }
variable "MODELS_OUT" { default = "models" }
# Set it (e.g. to the last commit's time) for reproducible builds; empty means "now".
variable "SOURCE_DATE_EPOCH" { default = "" }
# sha256:... of the model_manifest.json the runtime image holds; `modelbake bake` computes it (the build
# checks it). Left empty by plain bake and compose, and then not labelled.
variable "MODELS_MANIFEST_DIGEST" { default = "" }
# SIGNING_KEY_FILE=KEY.pem (an EC private key) goes to the build as the secret model_signing_key, never an
# argument or a layer, and turns SIGN_MODELS on: the tree is signed (model.sig beside the manifest);
# SIGNING_KEY_ID is its public fingerprint (`modelbake bake --sign-key` sets it), so a new key signs again.
variable "SIGNING_KEY_FILE" { default = "" }
variable "SIGN_MODELS" { default = notequal(SIGNING_KEY_FILE, "") ? "1" : "0" }
variable "SIGNING_KEY_ID" { default = "" }
# 1 = the runtime image carries model_signing and verifies at start when MODELBAKE_SIGNING_PUBLIC_KEY is set.
variable "MODEL_SIGNING" { default = "0" }
variable "RUNTIME_OPENVINO" { default = "0" }
variable "GIT_REVISION" { default = "" }
variable "SOURCE_URL" { default = "" }

target "_common" {
  context    = "."
  dockerfile = "Dockerfile.models"
  contexts = merge(
    notequal(WHEELHOUSE, "") ? { wheelhouse = WHEELHOUSE } : {},
    notequal(MODEL_SOURCES, "") ? { model-sources = MODEL_SOURCES } : {},
  )
  secret = notequal(SIGNING_KEY_FILE, "") ? ["id=model_signing_key,src=${SIGNING_KEY_FILE}"] : []
  cache-from = notequal(BUILD_CACHE, "") ? ["type=registry,ref=${BUILD_CACHE}"] : []
  args = {
    BASE_IMAGE            = BASE_IMAGE
    RUNTIME_BASE_IMAGE    = RUNTIME_BASE_IMAGE
    TORCH_INDEX_URL       = TORCH_INDEX_URL
    PIP_OFFLINE           = PIP_OFFLINE
    CLIP_MODELS            = CLIP_MODELS
    CLIP_INT8              = CLIP_INT8
    CLIP_KEEP_PYTORCH      = CLIP_KEEP_PYTORCH
    CLIP_PARITY_ATOL       = CLIP_PARITY_ATOL
    CLIP_PARITY_MIN_COSINE = CLIP_PARITY_MIN_COSINE
    CLIP_INT8_MIN_COSINE   = CLIP_INT8_MIN_COSINE
    RERANKER_MODELS       = RERANKER_MODELS
    RERANKER_INT8         = RERANKER_INT8
    RERANKER_INT8_TOP_K   = RERANKER_INT8_TOP_K
    RERANKER_INT8_MIN_TAU = RERANKER_INT8_MIN_TAU
    RERANKER_STRICT       = RERANKER_STRICT
    INT8_SHIP             = INT8_SHIP
    INT8_REQUIRED         = INT8_REQUIRED
    REGRESSOR_FEATURE_DIM = REGRESSOR_FEATURE_DIM
    REGRESSOR_SEED        = REGRESSOR_SEED
    REGRESSOR_EPOCHS      = REGRESSOR_EPOCHS
    ONNX_OPSET            = ONNX_OPSET
    ONNX_EXTERNAL_DATA_BYTES = ONNX_EXTERNAL_DATA_BYTES
    SOURCE_DATE_EPOCH     = SOURCE_DATE_EPOCH
    MODELS_MANIFEST_DIGEST = MODELS_MANIFEST_DIGEST
    SIGN_MODELS           = SIGN_MODELS
    SIGNING_KEY_ID        = SIGNING_KEY_ID
    MODEL_SIGNING         = MODEL_SIGNING
    RUNTIME_OPENVINO      = RUNTIME_OPENVINO
  }
  # Labels live here only; every target inherits them.
  labels = merge({
    "org.opencontainers.image.title"    = "modelbake"
    # without user info, query or fragment (https://user:TOKEN@host/repo?access_token=...), as `modelbake bake` cleans it
    "org.opencontainers.image.source"   = regex_replace(SOURCE_URL, "^(https?://)?(?:[^@/?#]*@)?([^?#]*).*$", "$1$2")
    "org.opencontainers.image.revision" = GIT_REVISION
    "org.opencontainers.image.created" = notequal(SOURCE_DATE_EPOCH, "") ? formatdate("YYYY-MM-DD'T'hh:mm:ssZ", timeadd("1970-01-01T00:00:00Z", "${SOURCE_DATE_EPOCH}s")) : timestamp()
    "io.modelbake.clip-models"          = CLIP_MODELS
    "io.modelbake.reranker-models"      = RERANKER_MODELS
  }, notequal(MODELS_MANIFEST_DIGEST, "") ? { "io.modelbake.manifest-digest" = MODELS_MANIFEST_DIGEST } : {})
}

# The per-platform targets (runtime-base and what stands on it); the others are pinned to the build platform.
target "_platforms" {
  platforms = notequal(PLATFORMS, "") ? split(",", PLATFORMS) : []
}

group "default" { targets = ["runtime"] }
group "stages" { targets = ["clip-export", "reranker-cache", "regressor-seed"] }
group "push" { targets = ["runtime-push", "models-push"] }

target "base-image" {
  inherits = ["_common"]
  target   = "base-image"
  tags     = ["${IMAGE}-base:${TAG}"]
}

target "clip-export" {
  inherits = ["_common"]
  target   = "clip-export"
}

target "reranker-cache" {
  inherits = ["_common"]
  target   = "reranker-cache"
}

target "regressor-seed" {
  inherits = ["_common"]
  target   = "regressor-seed"
}

target "manifest" {
  inherits = ["_common"]
  target   = "manifest"
}

# The model tree, written to the host (./models by default).
target "models" {
  inherits = ["_common"]
  target   = "models"
  output   = ["type=local,dest=${MODELS_OUT}"]
}

target "runtime-base" {
  inherits = ["_common", "_platforms"]
  target   = "runtime-base"
  tags     = ["${IMAGE}-runtime-base:${TAG}"]
}

target "runtime" {
  inherits = ["_common", "_platforms"]
  target   = "runtime"
  tags     = ["${IMAGE}:${TAG}"]
  cache-to = notequal(BUILD_CACHE, "") ? ["type=registry,ref=${BUILD_CACHE},mode=max,compression=zstd"] : []
}

# Push from plain bake: PUSH_TO=REGISTRY/NAME docker buildx bake push --metadata-file push.json
# The runtime image goes to REGISTRY/NAME:TAG, the models image to REGISTRY/NAME-models:TAG; push.json holds
# each one's containerimage.digest. (`modelbake bake --push` does the same and labels the manifest digest.)
target "runtime-push" {
  inherits = ["runtime"]
  tags     = ["${PUSH_TO}:${TAG}"]
  output   = ["type=registry"]
  attest   = equal(PROVENANCE, "1") ? ["type=provenance,mode=max"] : []
}

target "models-push" {
  inherits = ["_common", "_platforms"]
  target   = "models"
  tags     = ["${PUSH_TO}-models:${TAG}"]
  output   = ["type=registry"]
  attest   = equal(PROVENANCE, "1") ? ["type=provenance,mode=max"] : []
}
