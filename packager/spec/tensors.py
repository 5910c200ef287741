"""The exact tensor list of a checkpoint as llama.cpp names and types it: GGUF name, source tensor,
shape and ggml type per tensor, from the checkpoint's header and config alone (no weights read).

The GGUF converter writes these tensors; the planner sums their sizes, so both see one list.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from packager import quants
from packager.archs import Arch, text_config
from packager.errors import SourceError
from packager.source.safetensors import Checkpoint
from packager.spec.model import spec_from_config

# HF buffers that are not weights and that llama.cpp recomputes itself.
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
# A multimodal checkpoint's vision side (Gemma3ForConditionalGeneration's): the text bundle leaves it out.
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where it comes from, its shape (numpy order) and type."""

    name: str
    src: str | None  # checkpoint tensor name; None for generated tensors
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    # "permute_q", "permute_k", "norm_offset", "arch" (the family's Arch.tensor_transform) or ""
    transform: str = ""


def plan_tensors(ckpt: Checkpoint, cfg: dict, arch: Arch, quant: quants.QuantType,
                 has_imatrix: bool = False, n_vocab: int | None = None) -> tuple[list[TensorJob], dict[str, np.ndarray]]:
    """Map checkpoint tensors to GGUF names and types; the generated tensors come back as data.

    ``n_vocab``: the GGUF vocabulary's size, where the family trims token_embd to it (Gemma 3).
    """
    cfg = text_config(cfg)  # a multimodal wrapper's language model, as the family's hooks read it
    spec = spec_from_config(cfg)
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, spec.n_layers)
    generated = dict(arch.extra_tensors(cfg))
    entries: list[tuple[str, str | None, tuple[int, ...], str]] = [
        (name, None, data.shape, "") for name, data in generated.items()
    ]
    # In file order: each shard is then read (and hashed) front to back, once.
    for src, ref in sorted(ckpt.refs.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        if src.endswith(SKIP_SUFFIXES) or any(part in src for part in VISION_PARTS) or (arch.skip and arch.skip(src)):
            continue
        if src == "lm_head.weight" and spec.tied_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        # A multimodal wrapper's language model (model.language_model.*, language_model.model.*) is named
        # as the plain model's, as llama.cpp's converter does.
        key = src.replace("language_model.", "")
        for old, new in arch.renames:
            key = key[: -len(old)] + new if key.endswith(old) else key
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SourceError(
                f"tensor {src!r} in {ref.file.name} has no GGUF name for {arch.name}; "
                "the checkpoint does not match its config's architecture"
            )
        transform = ""
        if arch.permute_qk and name.endswith("attn_q.weight"):
            transform = "permute_q"
        elif arch.permute_qk and name.endswith("attn_k.weight"):
            transform = "permute_k"
        elif arch.norm_offset and name.endswith("norm.weight"):
            transform = "norm_offset"
        elif arch.tensor_transform and arch.tensor_transform(cfg, name) is not None:
            transform = "arch"
        shape = ref.shape
        if arch.squeeze and name.endswith(arch.squeeze):
            # the rows read stay the same (each block is flattened to rows x columns); only the shape is squeezed
            shape = (shape[0], *(d for d in shape[1:] if d != 1))
        if arch.trim_embedding and n_vocab and name == "token_embd.weight" and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # rows past the tokenizer's ids: llama.cpp's converter drops them
        entries.append((name, src, shape, transform))
    types = quants.tensor_types(
        quant, [(e[0], e[2]) for e in entries], n_head=spec.n_heads, n_head_kv=spec.quant_kv_heads,
        has_imatrix=has_imatrix, tied_embeddings=spec.tied_embeddings,
    )
    jobs = [TensorJob(name, src, tuple(shape), types[name], transform) for name, src, shape, transform in entries]
    return jobs, generated
