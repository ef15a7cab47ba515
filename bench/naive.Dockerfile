# The naive way, for bench/image_build.py only: one stage with the whole build toolchain (torch,
# open_clip, sentence-transformers) and the models made in it by the same producers. Same base image,
# same wheelhouse and the same pinned requirement set as Dockerfile.models, so only the design differs.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM scratch AS wheelhouse
FROM scratch AS model-sources

FROM ${BASE_IMAGE}
ARG PIP_OFFLINE=0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/modelbake \
    HF_HOME=/tmp/hf-home
WORKDIR /opt/modelbake
COPY build/requirements-runtime.txt build/requirements-build.txt build/
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    python3 -m venv /opt/venv \
 && if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index; else set -- --extra-index-url "$TORCH_INDEX_URL"; fi \
 && pip install --no-cache-dir "$@" --find-links /wheelhouse -r build/requirements-build.txt
COPY modelbake/ modelbake/
ARG CLIP_MODELS=ViT-B/32
ARG RERANKER_MODELS=cross-encoder/ms-marco-MiniLM-L-6-v2
ARG CLIP_INT8=0
ARG REGRESSOR_EPOCHS=20
ARG SOURCE_DATE_EPOCH
RUN --mount=type=bind,from=model-sources,target=/sources \
    if [ "$CLIP_INT8" = 1 ]; then set -- --int8; fi \
 && python -m modelbake.cli download --clip "$CLIP_MODELS" --reranker "$RERANKER_MODELS" \
        --regressor-epochs "$REGRESSOR_EPOCHS" "$@" --out /models
ENV MODELBAKE_MODELS=/models HF_HUB_OFFLINE=1
CMD ["python", "-m", "modelbake.runtime", "verify", "/models"]
