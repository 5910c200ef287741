"""SmolLM3: Llama's layout (Q/K rows un-permuted for llama.cpp), without RoPE on some layers ("NoPE").

config.json's no_rope_layers holds one flag per layer, 1 where the layer applies RoPE, 0 where
it does not (transformers builds it as every fourth layer off when absent). llama.cpp's smollm3
reads no key for it: it skips RoPE on every fourth layer (3, 7, 11, ...) whatever the file says,
so a GGUF is written only for configs with that pattern. The ONNX graph takes any pattern.
"""

from __future__ import annotations

import gguf

from packager.archs.common import refuse_sliding_window
from packager.archs.llama import llama_hparams, llama3_rope_freqs
from packager.archs.registry import Arch, Config, Family, OnnxArch, register
from packager.errors import SourceError, UnsupportedArchitectureError

LLAMA_CPP_NOPE_STEP = 4  # llama.cpp's smollm3: hparams.n_no_rope_layer_step, fixed


def smollm3_rope_layers(cfg: Config) -> tuple[bool, ...]:
    """Whether each layer applies RoPE, from no_rope_layers (or no_rope_layer_interval, as transformers builds it)."""
    n = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise SourceError(f"config.json: no_rope_layer_interval must be a positive integer, got {interval!r:.40}; "
                              "the config is malformed, re-download it")
        return tuple((i + 1) % interval != 0 for i in range(n))
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise SourceError(f"config.json: no_rope_layers must list one 0 or 1 per layer ({n}), got {flags!r:.60}; "
                          "the config is malformed, re-download it")
    return tuple(bool(f) for f in flags)


def _smollm3_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    refuse_sliding_window(cfg, "SmolLM3")
    rope = smollm3_rope_layers(cfg)
    llama_cpp = tuple((i + 1) % LLAMA_CPP_NOPE_STEP != 0 for i in range(len(rope)))
    if rope != llama_cpp:
        nope = [i for i, r in enumerate(rope) if not r]
        raise UnsupportedArchitectureError(
            f"config.json: no_rope_layers skips RoPE on layers {nope}, but llama.cpp's smollm3 skips it on every "
            f"fourth layer (3, 7, ...) whatever the GGUF says, so the GGUF would compute a different model; "
            "pack it with --format onnx instead"
        )
    llama_hparams(cfg, w)  # SmolLM3 writes what Llama writes: vocab size and rope dimensions


register(Family(
    ("SmolLM3ForCausalLM",),
    gguf=Arch(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True, extra_hparams=_smollm3_hparams, extra_tensors=llama3_rope_freqs),
    onnx=OnnxArch("smollm3", rope_layers=smollm3_rope_layers, check=lambda cfg: refuse_sliding_window(cfg, "SmolLM3")),
))
