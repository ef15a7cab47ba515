"""Build-time producers (torch, open_clip, sentence-transformers). Never imported by modelbake.runtime.

One module per stage: ``clip`` (clip-export), ``reranker`` (reranker-cache), ``regressor`` (regressor-seed).
Each turns a selection into files under its output folder plus a manifest fragment, through the one
generic export-and-validate loop in ``onnx_export``.
"""
