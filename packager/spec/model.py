"""ModelSpec: what planning needs to know about a model, from its config alone.

No weights are read: a hub model's spec needs only config.json (and, for exact
tensor sizes, the safetensors headers or index).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.archs import LayerKind, attention_layers, implied_tensors, layer_kinds, spec_fields, text_config
from packager.errors import SourceError


MAX_DIM = (1 << 31) - 1


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and shape of a decoder-only transformer."""

    architecture: str  # HF class name, e.g. "Qwen2ForCausalLM"
    model_type: str  # HF model_type, e.g. "qwen2"
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    n_params: int
    attention_bias: bool = False
    # Layers that attend to a sliding window of this many tokens (one flag per layer; empty: none).
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    # Each layer's kind where the model mixes kinds (LFM2's convolutions, per-layer KV heads); empty: every
    # layer attends with n_kv_heads x head_dim, sliding where sliding_layers says (see ``layer_kinds``).
    layers: tuple[LayerKind, ...] = ()
    # The GGUF tensors (names, numpy-order shapes) where the family's layers are not the plain decoder's
    # (Qwen3.5's: formats.gguf.gguf_tensors takes them as they are); empty: gguf_tensors derives them. Read from
    # the config, never kept in a manifest (its tensors are the GGUF's own).
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layers and not all(isinstance(k, LayerKind) for k in self.layers):  # a manifest's spec: dicts
            try:
                object.__setattr__(self, "layers", tuple(k if isinstance(k, LayerKind) else LayerKind(**k)
                                                         for k in self.layers))
            except (TypeError, ValueError) as exc:
                raise SourceError(f"spec: layers are malformed ({exc})") from None
        if self.layers and len(self.layers) != self.n_layers:
            raise SourceError(f"spec: {len(self.layers)} layer kinds for {self.n_layers} layers")
        for name in ("n_layers", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                     "context_length"):
            if getattr(self, name) <= 0:
                raise SourceError(f"config.json: {name} must be positive, got {getattr(self, name)}")
            # llama.cpp keeps hyperparameters in 32-bit ints; a larger value is a lying or broken config.
            if getattr(self, name) > MAX_DIM:
                raise SourceError(f"config.json: {name} = {getattr(self, name)} is not plausible (at most {MAX_DIM})")
        if self.n_heads % self.n_kv_heads:
            raise SourceError(
                f"config.json: num_attention_heads ({self.n_heads}) is not a multiple of num_key_value_heads ({self.n_kv_heads})"
            )

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and layer < len(self.sliding_layers) and self.sliding_layers[layer]

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Every layer's kind: the explicit ones, else derived from the shape fields (each layer attends
        with n_kv_heads x head_dim and owns its cache; sliding where is_sliding)."""
        if self.layers:
            return self.layers
        return tuple(LayerKind("sliding" if self.is_sliding(i) else "full", self.n_kv_heads, self.head_dim)
                     for i in range(self.n_layers))

    @property
    def quant_kv_heads(self) -> int:
        """The KV heads llama.cpp's quant mixes derive n_gqa from: hparams.n_gqa() without a layer reads
        layer 0's (0 on a hybrid whose first layer is a convolution, which turns the GQA rules off)."""
        return self.layer_kinds[0].n_kv_heads

    def kv_layers(self) -> list[int]:
        """The layers that own a KV cache (llama.cpp's cache skips state layers and shared-KV layers)."""
        return [i for i, k in enumerate(self.layer_kinds) if k.owns_kv]

    def state_floats(self, layers: "range | list[int] | None" = None) -> int:
        """F32 floats of recurrent state of one sequence over ``layers`` (default: all)."""
        kinds = self.layer_kinds
        return sum(kinds[i].state_floats for i in (range(self.n_layers) if layers is None else layers))


def _get(config: dict[str, Any], keys: list[str], where: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise SourceError(f"{where}: missing {keys[0]!r}; this checkpoint's config is incomplete or not a causal LM")


def _int(value: Any, key: str, where: str) -> int:
    """A size field: an integer (or a whole float, or digits in a string), never a bool, list, inf or nan."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(f"{where}: {key} must be an integer, got {value!r:.40}; the config is malformed")
    return value


def spec_from_config(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed config.json (text_config is used for multimodal wrappers)."""
    if not isinstance(config, dict):
        raise SourceError(f"{where}: expected a JSON object")
    if isinstance(config.get("text_config"), dict):
        config = text_config(config)
    archs = config.get("architectures") or []
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise SourceError(f"{where}: missing 'architectures'; cannot tell which converter applies")
    hidden = _int(_get(config, ["hidden_size", "n_embd", "d_model"], where), "hidden_size", where)
    n_heads = _int(_get(config, ["num_attention_heads", "n_head"], where), "num_attention_heads", where)
    n_kv = _int(_get(config, ["num_key_value_heads", "n_kv_heads"], where, default=n_heads), "num_key_value_heads", where)
    head_dim = _int(config.get("head_dim") or (hidden // n_heads if n_heads else 0), "head_dim", where)
    n_layers = _int(_get(config, ["num_hidden_layers", "n_layer"], where), "num_hidden_layers", where)
    inter = _int(_get(config, ["intermediate_size", "n_inner", "ffn_dim"], where), "intermediate_size", where)
    vocab = _int(_get(config, ["vocab_size"], where), "vocab_size", where)
    ctx = _int(_get(config, ["max_position_embeddings", "n_positions", "seq_length"], where, default=2048),
               "max_position_embeddings", where)
    # Absent, transformers' PretrainedConfig default (tied) holds for the config classes that take no
    # tie_word_embeddings of their own (Gemma's, SmolLM3's: save_pretrained then leaves the key out).
    tied = bool(config.get("tie_word_embeddings",
                           config.get("model_type") in ("gemma", "gemma2", "gemma3_text", "smollm3")))
    bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    q, kv = n_heads * head_dim, n_kv * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    if bias:
        per_layer += q + 2 * kv
    params = vocab * hidden * (1 if tied else 2) + n_layers * per_layer + hidden
    window, sliding = attention_layers({**config, "num_hidden_layers": n_layers})
    tensors = implied_tensors(config)
    if tensors:  # the family's exact list: its parameters are those tensors'
        params = sum(math.prod(shape) for _, shape in tensors)
    fields = dict(
        architecture=archs[0], model_type=str(config.get("model_type", "")), n_layers=n_layers,
        hidden_size=hidden, intermediate_size=inter, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=vocab, context_length=ctx, tied_embeddings=tied, n_params=params, attention_bias=bias,
        sliding_window=window, sliding_layers=sliding, layers=layer_kinds({**config, "num_hidden_layers": n_layers}),
        tensors=tensors,
    )
    fields.update(spec_fields(config))  # what a hybrid family computes itself (LFM2's FFN width, its params)
    return ModelSpec(**fields)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} not found; pass the directory of a Hugging Face checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
        raise SourceError(f"{path} is not valid JSON ({str(exc) or type(exc).__name__}); re-download the checkpoint") from None
    except OSError as exc:
        raise SourceError(f"{path} cannot be read ({exc.strerror or exc}); check the checkpoint directory") from None


def load_spec(model_dir: Path) -> ModelSpec:
    """The spec of a local checkpoint directory."""
    return spec_from_config(read_config(model_dir), where=str(Path(model_dir) / "config.json"))
