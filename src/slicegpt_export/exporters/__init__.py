"""Exporters: each a pure function of a sliced checkpoint (ONNX and GGUF arrive in later issues)."""
