"""Run-time side: load and verify a model tree with onnxruntime + numpy only.

Nothing under this package may import torch, open_clip, transformers or sentence-transformers:
the runtime image does not have them (a test enforces it).
"""
