import pytest

from modelbake.spec import (
    CLIP_ONNX_PATTERN,
    SpecError,
    clip_onnx_name,
    parse_clip,
    parse_clip_list,
    parse_reranker,
    parse_reranker_list,
)


@pytest.mark.parametrize(
    ("text", "arch", "tag", "key"),
    [
        ("ViT-B/32", "ViT-B-32", "openai", "ViT-B_32"),
        ("ViT-B-32", "ViT-B-32", "openai", "ViT-B_32"),
        ("RN50", "RN50", "openai", "RN50"),
        ("ViT-L/14@336px", "ViT-L-14-336", "openai", "ViT-L_14_336px"),
        ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k", "ViT-B_32-laion2b_s34b_b79k"),
    ],
)
def test_clip_hub_specs(text: str, arch: str, tag: str, key: str) -> None:
    spec = parse_clip(text)
    assert (spec.arch, spec.tag, spec.key, spec.local) == (arch, tag, key, None)


def test_clip_local_specs() -> None:
    spec = parse_clip("tiny@dir:/sources/clip/tiny")
    assert spec.local is not None and (spec.local.kind, spec.local.path, spec.key) == (
        "dir",
        "/sources/clip/tiny",
        "tiny",
    )
    spec = parse_clip("ViT-B/32@file:/sources/ckpt.pt")
    assert spec.arch == "ViT-B-32" and spec.local is not None and spec.local.kind == "file" and spec.key == "ViT-B_32"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ViT-B-32@main", "pretrained tag after ':'"),
        ("tiny@dir:", "empty path"),
        ("tiny:openai@dir:/x", "a pretrained tag goes with @file: only"),
        ("-bad", "starts with a model name"),
    ],
)
def test_clip_bad_specs(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_clip(text)


def test_a_local_copy_of_a_tag_keeps_the_tag_name_and_settings() -> None:
    """Air-gapped bundles rewrite ARCH:TAG to ARCH:TAG@file:PATH: same file names, and the tag's settings
    (the OpenAI weights need QuickGELU; SigLIP's preprocessing is its own) instead of the bare defaults."""
    from modelbake.producers.openclip_source import tag_settings

    local, hub = parse_clip("ViT-B-32:laion2b_s34b_b79k@file:/s/ckpt.bin"), parse_clip("ViT-B-32:laion2b_s34b_b79k")
    assert local.key == hub.key == "ViT-B_32-laion2b_s34b_b79k" and local.tag == "laion2b_s34b_b79k"
    assert parse_clip("ViT-B/32:openai@file:/s/ckpt.bin").key == "ViT-B_32"
    assert tag_settings(parse_clip("ViT-B-32:openai@file:/s/ckpt.bin"))["force_quick_gelu"] is True
    assert tag_settings(parse_clip("ViT-B-32@file:/s/ckpt.bin")) == {}  # a bare checkpoint: the arch's defaults
    siglip = tag_settings(parse_clip("ViT-B-16-SigLIP:webli@file:/s/ckpt.bin"))
    assert siglip["image_mean"] == (0.5, 0.5, 0.5) and siglip["image_resize_mode"] == "squash"


def test_lists_and_duplicates() -> None:
    assert [s.key for s in parse_clip_list("ViT-B/32, RN50,\nViT-B/16")] == ["ViT-B_32", "RN50", "ViT-B_16"]
    with pytest.raises(SpecError, match="twice"):
        parse_clip_list("ViT-B/32,ViT-B-32")
    with pytest.raises(SpecError, match="no CLIP model"):
        parse_clip_list(" , ")
    with pytest.raises(SpecError, match="no reranker"):
        parse_reranker_list("")


def test_reranker_specs() -> None:
    spec = parse_reranker("cross-encoder/ms-marco-MiniLM-L-6-v2@abc123")
    assert (spec.repo, spec.revision, spec.key) == (
        "cross-encoder/ms-marco-MiniLM-L-6-v2",
        "abc123",
        "cross-encoder__ms-marco-MiniLM-L-6-v2",
    )
    spec = parse_reranker("tiny@dir:/sources/r")
    assert spec.local is not None and spec.local.path == "/sources/r"
    with pytest.raises(SpecError, match="a folder"):
        parse_reranker("tiny@file:/x.pt")


def test_onnx_names_follow_the_seed() -> None:
    name = clip_onnx_name(parse_clip("ViT-B/32").key, "text")
    assert name == "clip_ViT-B_32_text_encoder.onnx"
    match = CLIP_ONNX_PATTERN.match(clip_onnx_name("RN50", "image"))
    assert match is not None and match["key"] == "RN50" and match["tower"] == "image"
    with pytest.raises(ValueError):
        clip_onnx_name("RN50", "audio")


def test_openclip_names_are_checked_without_open_clip_and_the_recorded_list_is_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bake driver's set (``.[bake]``) has no open_clip; its architecture check once switched itself off
    there. The names of the pinned release ship as data, checked here against open_clip itself."""
    import json
    import sys
    from importlib import resources

    import open_clip

    from modelbake.bake import Selection
    from modelbake.spec import openclip_architectures

    recorded = json.loads(resources.files("modelbake.data").joinpath("openclip_architectures.json").read_text())
    assert recorded == sorted(open_clip.list_models()), (
        "regenerate: python -c 'import json, open_clip; print(json.dumps(sorted(open_clip.list_models()), indent=0))'"
        " > modelbake/data/openclip_architectures.json"
    )
    monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed, as in the driver's own set
    openclip_architectures.cache_clear()
    try:
        assert "ViT-B-32" in openclip_architectures()
        with pytest.raises(SpecError, match=r"'ViT-B/33': unknown OpenCLIP architecture 'ViT-B/33'; close names: ViT"):
            Selection(clip=["ViT-B/33"]).variables()
    finally:
        openclip_architectures.cache_clear()
