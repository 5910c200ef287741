"""Qwen2 (Qwen2.5): a plain decoder with q/k/v biases; llama.cpp's qwen2 reads the common keys."""

from __future__ import annotations

import gguf

from packager.archs.registry import Arch, Family, OnnxArch, register

register(Family(("Qwen2ForCausalLM",), gguf=Arch(gguf.MODEL_ARCH.QWEN2), onnx=OnnxArch("qwen2")))
