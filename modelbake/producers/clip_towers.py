"""The two CLIP encoders as the modules the ONNX exporter traces: the image tower, and the text tower with
attention written out so the exported graph takes a dynamic sequence axis."""

from __future__ import annotations

import torch


class TextTower(torch.nn.Module):
    """``encode_text``; with ``cut``, the same computation on as many positions as ``input_ids`` has.

    CLIP's text tower is causal and pools at the end-of-text token, so the positions after the longest
    end-of-text token of a batch change nothing: the run time drops them and the graph takes a dynamic
    sequence axis. nn.MultiheadAttention's export bakes the length 77 into a Reshape, so attention is
    written out here with the same weights. The gate proves the outputs equal open_clip's 77-position
    ``encode_text`` (ViT-B/32, an 11-token query: 9.9 ms instead of 73 ms).
    """

    def __init__(self, clip: torch.nn.Module, cut: bool) -> None:
        super().__init__()
        self.clip, self.cut = clip, cut

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.cut:
            return self.clip.encode_text(input_ids)
        from open_clip.transformer import text_global_pool

        clip, n = self.clip, input_ids.shape[1]
        x = clip.token_embedding(input_ids) + clip.positional_embedding[:n]
        mask = clip.attn_mask[:n, :n]
        for block in clip.transformer.resblocks:
            x = x + block.ls_1(_attention(block.attn, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = text_global_pool(clip.ln_final(x), input_ids, clip.text_pool_type)
        if isinstance(clip.text_projection, torch.nn.Linear):
            return clip.text_projection(x)
        return x if clip.text_projection is None else x @ clip.text_projection


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's self-attention (batch first, additive mask), with every size traced."""
    b, n, d = x.shape
    heads = attn.num_heads
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5 + mask
    return attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class ImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)
