"""Model families, one module each (llama, qwen2, qwen3, smollm3, gemma2, gemma3, gemma4, phi3, lfm2, qwen35),
registered in one table (registry.py) with what the GGUF converter, the ONNX converter, the spec and tensor naming need.
Tensor names are mapped by gguf-py's TensorNameMap, never by hand.

Adding a family is one module here that calls ``register``, and its import below.
"""

from packager.archs import gemma2, gemma3, gemma4, lfm2, llama, phi3, qwen2, qwen3, qwen35, smollm3  # noqa: F401  (each registers its family)
from packager.archs.layers import LAYER_TYPES, LayerKind
from packager.archs.common import (head_dim, layer_types, rope_parameters, sliding_layers, text_config, write_common_hparams,
                                   write_hparams, write_shape_hparams)
from packager.archs.llama import llama3_rope_freqs
from packager.archs.phi3 import phi3_rope_factors
from packager.archs.smollm3 import smollm3_rope_layers
from packager.archs.registry import (FAMILIES, Arch, Config, Family, OnnxArch, arch_for, attention_layers,
                                     implied_tensors, layer_kinds, onnx_arch_for, register, spec_fields, supported)

__all__ = ["FAMILIES", "LAYER_TYPES", "Arch", "Config", "Family", "LayerKind", "OnnxArch", "arch_for",
           "attention_layers", "head_dim", "implied_tensors", "layer_kinds", "layer_types", "spec_fields",
           "llama3_rope_freqs", "onnx_arch_for", "phi3_rope_factors", "register", "rope_parameters", "sliding_layers",
           "smollm3_rope_layers", "supported", "text_config", "write_common_hparams", "write_hparams",
           "write_shape_hparams"]
