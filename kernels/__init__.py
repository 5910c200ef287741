"""Numeric kernels the converters call: ggml quantization through ctypes, safetensors reads."""
