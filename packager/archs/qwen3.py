"""Qwen3 (dense): q/k RMSNorm per head before RoPE, head_dim from the config (not hidden/heads), no q/k/v biases.

llama.cpp's qwen3 reads the common keys (key/value length from head_dim); gguf-py names the
q/k norms attn_q_norm/attn_k_norm. The ONNX graph normalizes each head of q and k itself.
"""

from __future__ import annotations

import gguf

from packager.archs.common import refuse_sliding_window
from packager.archs.registry import Arch, Config, Family, OnnxArch, register


def _qwen3_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    refuse_sliding_window(cfg, "Qwen3")


register(Family(
    ("Qwen3ForCausalLM",),
    gguf=Arch(gguf.MODEL_ARCH.QWEN3, extra_hparams=_qwen3_hparams, qk_norm=True),
    onnx=OnnxArch("qwen3", qk_norm=True, check=lambda cfg: refuse_sliding_window(cfg, "Qwen3")),
))
