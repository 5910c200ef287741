"""A .gguf file's ModelSpec and quant type, from its metadata alone (no tensor data read)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

from packager.archs import FAMILIES, LayerKind
from packager.archs.gemma4 import layer_kinds as gemma4_layers
from packager.archs.layers import conv_layer
from packager.errors import CorruptFileError
from packager.quants import QUANTS
from packager.source.gguf_check import Layout, check_layout
from packager.spec.model import ModelSpec


def open_gguf(path: Path) -> Layout:
    """The GGUF's metadata and tensor table, every length checked against the file (packager.source.gguf_check);
    values are decoded when asked for, so a 150k-token vocabulary costs nothing until read."""
    return check_layout(path)


def _field(reader: Layout, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError, struct.error) as exc:  # e.g. a string that is not UTF-8
        raise CorruptFileError(f"{reader.path}: field {key} is unreadable ({exc}); re-download the GGUF") from None


def _int(value, key: str, path: Path) -> int:
    """A metadata value that must be an integer (per-layer arrays count by their largest entry)."""
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = max(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptFileError(f"{path}: {key} must be an integer, got {value!r:.40}; the GGUF metadata is wrong")
    return value


def _sliding(r: Layout, arch: str, n_layers: int, path: Path) -> dict:
    """Which layers llama.cpp gives a sliding window: the GGUF's per-layer list, else its pattern (or the
    architecture's own), over the window it names; none where it names no window or the family has none."""
    pattern = next((f.gguf.swa_pattern for f in FAMILIES.values()
                    if f.gguf is not None and f.gguf.name == arch and f.gguf.swa_pattern), 0)
    window = _field(r, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch))
    if not pattern or not window:
        return {}
    window = _int(window, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch), path)
    listed = _field(r, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch), pattern)
    if isinstance(listed, list):
        if len(listed) != n_layers:
            raise CorruptFileError(f"{path}: {gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)} lists "
                                   f"{len(listed)} layers, not {n_layers}; the GGUF metadata is wrong")
        flags = tuple(bool(v) for v in listed)
    else:  # llama.cpp's set_swa_pattern: every n-th layer is full
        every = _int(listed, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch), path)
        flags = tuple(every == 0 or i % every < every - 1 for i in range(n_layers))
    return {"sliding_window": window, "sliding_layers": flags} if any(flags) else {}


def _layers(r: Layout, arch: str, hidden: int, n_heads: int, n_kv: int, head_dim: int) -> tuple[LayerKind, ...]:
    """Each layer's kind where the GGUF mixes kinds, as llama.cpp tells them (its is_recr): a per-layer
    head_count_kv with zeros on LFM2's convolution layers, or Qwen3.5's recurrent_layers with its delta-net's
    sizes (R: (conv_kernel - 1) x (inner + 2 x groups x state) floats, S: state x inner), or Gemma 4's two head
    dims and shared-KV layers; () for a plain transformer."""
    swa_dim = _field(r, gguf.Keys.Attention.KEY_LENGTH_SWA.format(arch=arch))
    pattern = _field(r, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if isinstance(swa_dim, int) and not isinstance(swa_dim, bool) and isinstance(pattern, list):
        # Gemma 4: sliding layers of head dim key_length_swa, full ones of key_length; the last shared_kv_layers
        # read llama.cpp's source layer's cache (n_layer_kv_from_start - 2 if sliding, - 1 if full) and hold none
        shared = _field(r, gguf.Keys.Attention.SHARED_KV_LAYERS.format(arch=arch), 0)
        heads = _field(r, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_kv)
        heads = heads if isinstance(heads, list) and len(heads) == len(pattern) else [n_kv] * len(pattern)
        first = len(pattern) - (shared if isinstance(shared, int) and 0 <= shared < len(pattern) else 0)
        return gemma4_layers(pattern, heads, swa_dim, head_dim, first)
    recurrent = _field(r, f"{arch}.attention.recurrent_layers")
    if isinstance(recurrent, list):
        ssm = {k: _field(r, f"{arch}.ssm.{k}") for k in ("conv_kernel", "state_size", "group_count", "inner_size")}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in ssm.values()):
            conv, state, groups, inner = (ssm[k] for k in ("conv_kernel", "state_size", "group_count", "inner_size"))
            linear = LayerKind("linear", 0, head_dim, r_floats=(conv - 1) * (inner + 2 * groups * state),
                               s_floats=state * inner)
            return tuple(linear if rec else LayerKind("full", n_kv, head_dim) for rec in recurrent)
    per_layer = _field(r, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))
    width = _field(r, gguf.Keys.ShortConv.L_CACHE.format(arch=arch))
    if not isinstance(per_layer, list) or 0 not in per_layer or not isinstance(width, int):
        return ()
    return tuple(LayerKind("full", int(n), hidden // n_heads) if n else conv_layer(hidden, hidden // n_heads, width)
                 for n in per_layer)


def spec_from_gguf(path: Path, layout: Layout | None = None) -> tuple[ModelSpec, str | None]:
    """The model's spec and its quant name (None when the file type is one edgepack does not list); ``layout``:
    the file's open_gguf, where the caller has it."""
    r = layout if layout is not None else open_gguf(path)
    arch = _field(r, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise CorruptFileError(f"{path}: no general.architecture; not a model GGUF")

    def hp(key: str, default=None) -> int:
        value = _field(r, key.format(arch=arch), default)
        if value is None:
            raise CorruptFileError(f"{path}: missing {key.format(arch=arch)}; the GGUF is incomplete")
        return _int(value, key.format(arch=arch), path)

    n_heads = hp(gguf.Keys.Attention.HEAD_COUNT)
    hidden = hp(gguf.Keys.LLM.EMBEDDING_LENGTH)
    if n_heads <= 0:
        raise CorruptFileError(f"{path}: {gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)} must be positive, got {n_heads}")
    tokens = r.fields.get(gguf.Keys.Tokenizer.LIST)
    names = {t.name for t in r.tensors}
    n_kv = int(hp(gguf.Keys.Attention.HEAD_COUNT_KV, n_heads))
    head_dim = int(hp(gguf.Keys.Attention.KEY_LENGTH, hidden // n_heads))
    spec = ModelSpec(
        architecture=arch, model_type=arch, n_layers=int(hp(gguf.Keys.LLM.BLOCK_COUNT)), hidden_size=hidden,
        intermediate_size=int(hp(gguf.Keys.LLM.FEED_FORWARD_LENGTH)), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=int(hp(gguf.Keys.LLM.VOCAB_SIZE, tokens.count if tokens else 0)),
        context_length=int(hp(gguf.Keys.LLM.CONTEXT_LENGTH, 2048)),
        tied_embeddings="output.weight" not in names,
        n_params=int(sum(int(t.n_elements) for t in r.tensors)),
        **_sliding(r, arch, int(hp(gguf.Keys.LLM.BLOCK_COUNT)), path),
        layers=_layers(r, arch, hidden, n_heads, n_kv, head_dim),
    )
    ftype = _field(r, gguf.Keys.General.FILE_TYPE)
    quant = None
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        for q in QUANTS.values():
            if int(q.ftype) == int(ftype):
                quant = q.name
    return spec, quant
