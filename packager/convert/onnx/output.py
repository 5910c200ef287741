"""What both ONNX exporters (the streaming converter and the optimum fallback) hand back and
write besides the graph: their result, genai_config.json, and the tokenizer files onnxruntime-genai reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import SourceError
from packager.spec.eos import resolve_eos

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# The state inputs and outputs of a hybrid's layers, as onnxruntime-genai 0.18 binds them (genai_config.json's
# past_conv_names / past_recurrent_names and present_*): a convolution's (LFM2's, and Qwen3.5's delta-net's) and a
# delta-net's recurrent state. The graph names layer i's by ``% i``.
PAST_CONV, PRESENT_CONV = "past.%d.conv", "present.%d.conv"
PAST_RECURRENT, PRESENT_RECURRENT = "past.%d.recurrent", "present.%d.recurrent"


def copy_tokenizer(src_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the tokenizer files onnxruntime-genai reads into ``out_dir``; tokenizer.json is required."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
            copied.append(out_dir / name)
    if not (out_dir / "tokenizer.json").is_file():
        raise SourceError(f"{src_dir}: no tokenizer.json; onnxruntime-genai needs the fast tokenizer's file")
    return copied


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class DecoderShape:
    """What genai_config.json says of a decoder graph."""

    genai_type: str  # model.type: which of onnxruntime-genai's runners drives it
    context_length: int
    head_size: int
    hidden_size: int
    n_heads: int
    n_layers: int
    n_kv_heads: int
    vocab_size: int
    position_ids: bool = False  # the graph takes position_ids (optimum's do)
    # genai keeps past and present in one buffer of max_length (our graph); optimum's graphs
    # concatenate past and new keys themselves and need their own buffers.
    share_buffer: bool = True
    # LFM2: each layer's kind as transformers' layer_types names it ("conv" / "full_attention") and the conv
    # state's length (kernel - 1); genai's LFM2 runner binds a KV cache to the attention layers alone and a
    # conv state (past.%d.conv -> present.%d.conv) to the others. Empty / 0 for a plain decoder.
    layer_types: tuple[str, ...] = ()
    conv_cache: int = 0
    # The graph carries gated delta-net state (Qwen3.5): past.N.conv / past.N.recurrent in, present.N.* out, as
    # onnxruntime-genai 0.18 binds them (its RecurrentState finds the layers that have them).
    recurrent: bool = False


def eog_ids(model_dir: Path) -> list[int] | None:
    """Every id that ends generation, the end of the assistant's turn first (spec/eos.py)."""
    choice = resolve_eos(model_dir)
    return choice.eog_ids if choice is not None else None


def genai_config(shape: DecoderShape, cfg: dict[str, Any], gen: dict[str, Any], n_ctx: int, ep: str,
                 eos_ids: list[int] | None = None) -> dict[str, Any]:
    """genai_config.json: what onnxruntime-genai needs to drive the graph (``gen``: generation_config.json;
    ``eos_ids``: the resolved end-of-generation ids, else generation_config's)."""
    eos = eos_ids or gen.get("eos_token_id", cfg.get("eos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    if shape.position_ids:
        inputs["position_ids"] = "position_ids"
    conv = {}
    if shape.conv_cache or shape.recurrent:
        inputs["past_conv_names"], outputs["present_conv_names"] = PAST_CONV, PRESENT_CONV
    if shape.conv_cache:
        conv = {"layer_types": list(shape.layer_types), "conv_cache_size": shape.conv_cache}
    if shape.recurrent:
        inputs["past_recurrent_names"], outputs["present_recurrent_names"] = PAST_RECURRENT, PRESENT_RECURRENT
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
            "context_length": shape.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [] if ep == "cpu" else [{ep: {}}]},
                "filename": "model.onnx",
                "head_size": shape.head_size,
                "hidden_size": shape.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": shape.n_heads,
                "num_hidden_layers": shape.n_layers,
                "num_key_value_heads": shape.n_kv_heads,
                **conv,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": shape.genai_type,
            "vocab_size": shape.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": min(n_ctx, shape.context_length), "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": shape.share_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
