"""Hugging Face checkpoint -> ONNX int4 decoder for onnxruntime-genai, in one streaming pass.

The graph is the one ONNX Runtime GenAI's builder emits (see graph.py), but it
is written without ever materializing the model: each checkpoint tensor is read from
its memory-mapped shard a block of rows at a time (in file order, hashed as read),
quantized to int4 blocks (kernels/int4.py) and written straight to its precomputed
offset in model.onnx.data. Memory does not grow with the model: the builder needs
the whole model in f32 (it was OOM-killed at 24 GB on a 3B model); this needs the
row blocks in flight.

Then genai_config.json and the tokenizer files go next to the model, where
onnxruntime-genai looks for them.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packager.archs import (FAMILIES, OnnxArch, attention_layers, onnx_arch_for, rope_parameters, supported,
                            text_config)
from packager.archs.registry import instead, unsupported
from packager.convert.onnx import delta_net
from packager.convert.onnx.graph import GraphBuilder
from packager.convert.onnx.shortconv import conv_slots
from packager.convert.onnx.optimum_export import optimum_exports, optimum_installed, optimum_transformers_clash
from packager.convert.onnx.output import DecoderShape, copy_tokenizer, eog_ids, genai_config, read_json
from packager.convert.result import ConvertResult
from packager.errors import (BackendMissingError, ConversionError, SourceError, UnknownArchitectureError,
                             UnsupportedArchitectureError, UsageError)
from packager.formats.onnx import (ALGORITHMS, CACHES, LOCAL_CACHES, Dims, WeightFormat, declare,
                                   layer_norms, state_layer_fields)
from packager.host import default_threads
from packager.kernels.hqq import quantize_int4_hqq, split_zero_points
from packager.kernels.int4 import check_block_size, quantize_int4
from packager.progress import progress_bar
from packager.source.resolver import Source
from packager.source.safetensors import Checkpoint, FileHasher, row_blocks
from packager.spec.model import read_config, spec_from_config

CHUNK_ELEMENTS = 4 << 20  # rows are quantized in blocks of about 16 MB of f32
# Execution providers onnxruntime-genai offers, by the backend names target profiles use.
EXECUTION_PROVIDERS = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "directml": "dml", "webgpu": "webgpu"}
# How weights become int4 blocks (formats.onnx.ALGORITHMS): round to nearest (ONNX Runtime's own
# routine) or HQQ (kernels/hqq.py). `pack model --help` describes them; GPTQ is refused with GPTQ_REFUSAL.
GPTQ_REFUSAL = (
    "--algorithm gptq is not offered for ONNX bundles: ONNX Runtime's GPTQ (onnxruntime.quantization's "
    "gptq_quantize) needs the whole f32 ONNX model with plain MatMul nodes loaded in memory and runs calibration "
    "text through it, which edgepack's streaming converter never builds (it would cost the f32 model's size "
    "and more in RAM); use --algorithm hqq (better than rtn, no calibration data, streams) or a GGUF bundle "
    "with --imatrix-text for calibration-aware quantization"
)


def check_family(hf_name: str) -> None:
    """A family known to need what neither exporter gives it is refused in one line (no fallback tried)."""
    refusal = getattr(FAMILIES.get(hf_name), "onnx_refusal", "")
    if refusal:
        raise UnknownArchitectureError(f"architecture {hf_name!r}: {refusal}")  # bad input: exit 2


def onnx_exporter(hf_name: str, model_type: str) -> str:
    """"edgepack" (the streaming converter here) or "optimum" (optimum_export.py: holds the f32
    model) for this architecture; neither is one line saying what to do."""
    if hf_name in supported("onnx"):
        return "edgepack"
    check_family(hf_name)
    ours, hint = unsupported(hf_name, "onnx"), instead(hf_name, "onnx")
    if not optimum_installed():
        raise UnknownArchitectureError(f"{ours}; the fallback for other architectures needs optimum-onnx, which "
                                       f"pins transformers < 4.58: pip install 'edgepack[onnx-export]' in an "
                                       f"environment of its own and pack from there{hint}")
    clash = optimum_transformers_clash()
    if clash:
        raise UnknownArchitectureError(f"{ours}; {clash}{hint}")
    if not optimum_exports(model_type):
        raise UnknownArchitectureError(f"{ours}, and optimum-onnx does not export model_type {model_type!r} for "
                                       f"text generation{hint}")
    return "optimum"


def execution_provider(backends: tuple[str, ...] | list[str], target_name: str) -> str:
    """The first of a target's backends that onnxruntime-genai has an execution provider for."""
    for b in backends:
        if b.lower() in EXECUTION_PROVIDERS:
            return EXECUTION_PROVIDERS[b.lower()]
    raise UnsupportedArchitectureError(
        f"target {target_name} runs on {', '.join(backends) or 'no backend'}, which no ONNX Runtime execution "
        f"provider covers (ONNX supports: {', '.join(sorted(set(EXECUTION_PROVIDERS)))}); use --format gguf or another target"
    )


@dataclass(frozen=True)
class OnnxOptions:
    """Quantization choices for the ONNX bundle."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    int4: bool = True  # False writes an f32 reference graph (tests)
    int4_embeddings: bool = True  # gather the embedding from int4 blocks (tied: lm_head's own)
    execution_provider: str = "cpu"
    algorithm: str = "rtn"  # one of ALGORITHMS; hqq is asymmetric (zero points + a correction, kernels/hqq.py)

    def __post_init__(self) -> None:
        try:
            check_block_size(self.block_size)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConversionError(f"accuracy level {self.accuracy_level} is not one of 0-4")
        if self.algorithm == "gptq":
            raise UsageError(GPTQ_REFUSAL)
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and self.symmetric:
            raise UsageError("HQQ quantizes with zero points: pass symmetric=False (--asymmetric) with algorithm hqq")

    @property
    def weight_format(self) -> WeightFormat:
        """The int4 scheme (formats.onnx.SCHEMES) these options write."""
        return WeightFormat(int4=self.int4, block_size=self.block_size, symmetric=self.symmetric,
                            accuracy_level=self.accuracy_level, zero_correction=self.algorithm == "hqq")

    @property
    def quant_name(self) -> str:
        return self.weight_format.name

    def as_dict(self) -> dict[str, Any]:
        return {"bits": 4 if self.int4 else 32, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "algorithm": self.algorithm,
                "int4_embeddings": self.int4_embeddings, "execution_provider": self.execution_provider}


@dataclass(frozen=True)
class Slot:
    """Where rows of one checkpoint tensor go: into a linear layer's blocks or a float initializer."""

    kind: str  # "linear" or "float"
    target: str  # linear base name, or initializer name
    dst_row: int = 0  # first row (2-D) or element (1-D) written
    src_rows: tuple[int, int] | None = None  # only these source rows; None: all
    offset: float = 0.0  # added to the values (Gemma-style norms)


def _dims(cfg: dict[str, Any], arch: OnnxArch) -> Dims:
    if arch.check:
        arch.check(cfg)
    spec = spec_from_config(cfg)
    rope = rope_parameters(cfg)
    fraction = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0)
    window, sliding = _window(cfg, spec.context_length)
    graph = {"attn_scale": 1.0 / math.sqrt(spec.head_dim), **(arch.graph(cfg) if arch.graph else {})}
    return Dims(
        n_layers=spec.n_layers, hidden=spec.hidden_size, intermediate=spec.intermediate_size, n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, vocab=spec.vocab_size,
        rms_eps=float(cfg.get("rms_norm_eps") or cfg.get("norm_eps") or 1e-6), rotary_dim=int(spec.head_dim * fraction),
        max_positions=spec.context_length, window=window, sliding_layers=sliding,
        qk_norm=arch.qk_norm, rope_layers=arch.rope_layers(cfg) if arch.rope_layers else (),
        local_rope=arch.local_rope, sandwich_norms=arch.sandwich_norms, **graph, **state_layer_fields(spec),
    )


def _window(cfg: dict[str, Any], context: int) -> tuple[int, tuple[bool, ...]]:
    """GroupQueryAttention's local_window_size (-1: none) and the layers that take it (empty: every layer)."""
    window, sliding = attention_layers(cfg)
    if sliding:  # the family says which layers slide (Gemma 3)
        # transformers lets position i see j where i - j < window (i itself counted), and so does ONNX Runtime's
        # GroupQueryAttention with local_window_size = window, measured over a prompt and step by step past the
        # window; window - 1 or + 1 moves the logits (tests/test_gemma3.py holds both).
        return window, sliding
    if cfg.get("use_sliding_window", cfg.get("model_type") != "qwen2") and cfg.get("sliding_window"):
        window = int(cfg["sliding_window"])
        return (window if window < context else -1), ()
    return -1, ()


def rope_tables(cfg: dict[str, Any], arch: OnnxArch) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(RoPE parameters of every layer, or the full layers' where the sliding ones have their own; the
    sliding layers' or None), each of a kind the caches compute: else one line naming it."""
    tables = arch.rope(cfg) if arch.rope else (rope_parameters(cfg), None)
    for rope in (t for t in tables if t is not None):
        kind = _rope_kind(rope)
        if kind not in arch.rope_types:
            raise UnsupportedArchitectureError(
                f"config.json: rope scaling {kind!r} is not supported by the ONNX converter for {arch.genai_type} "
                f"(supported: {', '.join(arch.rope_types)}); pack it with --format gguf instead"
            )
    return tables


def _rope_kind(rope: dict[str, Any]) -> str:
    return str(rope.get("rope_type") or rope.get("type") or "default").lower()


def check_config(model_dir: Path) -> None:
    """What the streaming converter refuses in this checkpoint's config (one line naming the field),
    checked before a bundle is started."""
    cfg = text_config(read_config(model_dir))
    arch = onnx_arch_for(spec_from_config(cfg).architecture)
    _dims(cfg, arch)
    rope_tables(cfg, arch)


def rope_caches(rope: dict[str, Any], rotary_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, rotary_dim / 2] for GroupQueryAttention, as transformers computes RoPE
    (``rope``: one of :func:`rope_tables`)."""
    kind = _rope_kind(rope)
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif kind == "llama3":
        factor = float(rope.get("factor", 8.0))
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old = float(rope.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    # float32 positions times float32 frequencies, as transformers' rotary embedding computes them.
    freqs = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def plan_slots(ckpt: Checkpoint, cfg: dict[str, Any], arch: OnnxArch, opts: OnnxOptions, part_bytes: int | None = None):
    """Every initializer's place in the data file (formats.onnx.declare, as the planner sizes it), and
    where each checkpoint tensor's rows go."""
    d = _dims(cfg, arch)
    spec = spec_from_config(cfg)
    fmt = opts.weight_format
    slots: dict[str, list[Slot]] = {}

    def put(src: str, slot: Slot) -> None:
        src = renamed(src, arch.renames)
        if src not in ckpt:
            raise SourceError(f"tensor {src!r} is missing from the checkpoint; it does not match its config "
                              f"({spec.architecture}) or is incomplete; re-download it")
        slots.setdefault(src, []).append(slot)

    m, head = tensor_names(ckpt)
    has_bias = any(f"{m}layers.{i}.self_attn.q_proj.bias" in ckpt for i in range(d.n_layers))
    tied = spec.tied_embeddings or head not in ckpt
    decl = declare(d, fmt, has_bias=has_bias, tied=tied, int4_embeddings=opts.int4_embeddings)
    norm = dict(offset=arch.norm_offset)  # Gemma's (w - 1), on every norm
    for i in range(d.n_layers):
        pre, src, att = f"model.layers.{i}", f"{m}layers.{i}", f"{m}layers.{i}.self_attn"
        for name in layer_norms(d):
            put(f"{src}.{name}.weight", Slot("float", f"{pre}.{name}.weight", **norm))
        if d.conv(i):  # LFM2's short convolution in the attention's place
            for name, kind, target in conv_slots(src, pre):
                put(name, Slot(kind, target))
        elif d.is_linear(i):  # Qwen3.5's gated delta-net layer
            delta_net.slots(put, Slot, d, src, pre)
        else:
            _attention_slots(put, arch, d, att, pre, has_bias, norm)
        gate_up = f"{pre}.mlp.gate_up_proj"
        if arch.fused_gate_up:
            put(f"{src}.mlp.gate_up_proj.weight", Slot("linear", gate_up))
        else:
            put(f"{src}.mlp.gate_proj.weight", Slot("linear", gate_up, 0))
            put(f"{src}.mlp.up_proj.weight", Slot("linear", gate_up, d.intermediate))
        put(f"{src}.mlp.down_proj.weight", Slot("linear", f"{pre}.mlp.down_proj"))
    put(f"{m}norm.weight", Slot("float", "model.norm.weight", **norm))
    # The lm_head reads the embedding as stored: Gemma's sqrt(hidden) scale is the graph's, after the gather.
    put(f"{m}embed_tokens.weight" if tied else head, Slot("linear", "lm_head"))
    if decl.embed_base == "model.embed_tokens":  # untied: the embedding's own int4 blocks
        put(f"{m}embed_tokens.weight", Slot("linear", "model.embed_tokens"))
    elif decl.embed_base is None:
        put(f"{m}embed_tokens.weight", Slot("float", "model.embed_tokens.weight"))
    layout = decl.layout
    if part_bytes and layout.size > part_bytes:  # a channel's part size: the data in several files
        layout = layout.split(part_bytes)
    return d, fmt, layout, slots, has_bias, decl.embed_base, decl.embed_zp


def _attention_slots(put, arch: OnnxArch, d: Dims, att: str, pre: str, has_bias: bool, norm: dict[str, float]) -> None:
    """Where one attention layer's q/k/v (fused into qkv_proj), biases, q/k norms and o_proj go."""
    q_n, kv_n = d.q_rows, d.n_kv_heads * d.head_dim  # q_proj's rows (Qwen3.5's: query and gate per head)
    qkv = f"{pre}.attn.qkv_proj"
    if arch.fused_qkv:
        put(f"{att}.qkv_proj.weight", Slot("linear", qkv))
    else:
        for name, row in (("q_proj", 0), ("k_proj", q_n), ("v_proj", q_n + kv_n)):
            put(f"{att}.{name}.weight", Slot("linear", qkv, row))
    if has_bias:
        for name, row in (("q_proj", 0), ("k_proj", q_n), ("v_proj", q_n + kv_n)):
            put(f"{att}.{name}.bias", Slot("float", f"{qkv}.bias", row))
    if d.qk_norm:
        for name in ("q_norm", "k_norm"):
            put(f"{att}.{name}.weight", Slot("float", f"{pre}.attn.{name}.weight", **norm))
    put(f"{att}.o_proj.weight", Slot("linear", f"{pre}.attn.o_proj"))


def renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with each (ours, theirs) dotted path replaced where it stands whole (OnnxArch.renames)."""
    for ours, theirs in renames:
        name = f".{name}.".replace(f".{ours}.", f".{theirs}.", 1)[1:-1]
    return name


# Where a checkpoint keeps the decoder (its layers, norm and embedding) and the lm_head: a causal LM, or a
# multimodal wrapper's language model as transformers saved it before 4.52 and since.
TENSOR_NAMES = (("model.", "lm_head.weight"), ("language_model.model.", "language_model.lm_head.weight"),
                ("model.language_model.", "lm_head.weight"))


def tensor_names(ckpt: Checkpoint) -> tuple[str, str]:
    """(the decoder's prefix, the lm_head's name) in this checkpoint; a vision tower beside them is not read."""
    for prefix, head in TENSOR_NAMES:
        if f"{prefix}embed_tokens.weight" in ckpt:
            return prefix, head
    return TENSOR_NAMES[0]  # plan_slots then names the first tensor missing


def _caches(cfg: dict[str, Any], arch: OnnxArch, d: Dims) -> dict[str, np.ndarray]:
    """The cos/sin caches by initializer name: every layer's (the full layers' where the sliding ones have their own)."""
    rope, local = rope_tables(cfg, arch)
    out = dict(zip(CACHES, rope_caches(rope, d.rotary_dim, d.max_positions)))
    if d.local_rope:
        out.update(zip(LOCAL_CACHES, rope_caches(local or rope, d.rotary_dim, d.max_positions)))
    return out


class _Writer:
    """Writes row blocks at their precomputed offsets (pwrite: blocks may finish in any order)."""

    def __init__(self, fds: list[int], layout, fmt) -> None:
        self.fds, self.layout, self.fmt = fds, layout, fmt  # one descriptor per data file
        self._lock = threading.Lock()  # Windows: seek + write must not interleave

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if hasattr(os, "pwrite"):
            return os.pwrite(fd, data, offset)
        with self._lock:  # Windows has no pwrite
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, data)

    def _put(self, name: str, row: int, data: np.ndarray) -> None:
        init = self.layout.inits[name]
        row_bytes = init.nbytes // init.shape[0] if len(init.shape) > 1 else np.dtype(data.dtype).itemsize
        buf = np.ascontiguousarray(data)
        n = self._pwrite(self.fds[init.file], memoryview(buf).cast("B"), init.offset + row * row_bytes)
        if n != buf.nbytes:
            raise ConversionError(f"short write to the ONNX data file ({n} of {buf.nbytes} bytes); is the disk full?")

    def write(self, slot: Slot, rows: np.ndarray, dst_row: int) -> None:
        if slot.offset:
            rows = rows + np.float32(slot.offset)
        if slot.kind == "float":
            self._put(slot.target, dst_row, rows.astype(np.float32, copy=False))
            return
        if not self.fmt.int4:
            self._put(f"{slot.target}.weight", dst_row, rows)
            return
        if self.fmt.zero_correction:
            q = quantize_int4_hqq(rows, self.fmt.block_size)
            zp, correction = split_zero_points(q)
        else:
            q = quantize_int4(rows, self.fmt.block_size, self.fmt.symmetric)
            zp, correction = q.zero_points, None
        self._put(f"{slot.target}.weight_Q4", dst_row, q.packed)
        self._put(f"{slot.target}.weight_scales", dst_row, q.scales)
        if zp is not None:
            self._put(f"{slot.target}.weight_zp", dst_row, zp)
        if correction is not None:
            self._put(f"{slot.target}.weight_zc", dst_row, correction)


def _jobs(ckpt: Checkpoint, slots: dict[str, list[Slot]]):
    """(source, row range) blocks in file order: each shard is read front to back once."""
    for src in sorted(slots, key=lambda s: (str(ckpt.refs[s].file), ckpt.refs[s].start)):
        for lo, hi in row_blocks(ckpt.refs[src].shape, CHUNK_ELEMENTS):
            yield src, lo, hi


def write_weights(ckpt: Checkpoint, slots: dict[str, list[Slot]], writer: _Writer, hasher: FileHasher,
                  n_threads: int, quiet: bool) -> None:
    """Read, quantize and write every slot; reading (and hashing) stays in order on this thread."""
    total = sum(ckpt.refs[s].nbytes for s in slots)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=max(1, n_threads), thread_name_prefix="edgepack-int4") as pool, \
            progress_bar(total=total, desc="writing ONNX int4" if writer.fmt.int4 else "writing ONNX", unit="B",
                         quiet=quiet) as bar:
        for src, lo, hi in _jobs(ckpt, slots):
            ref = ckpt.refs[src]
            data = ckpt.read_rows(src, lo, hi, hasher)
            data = data.reshape(data.shape[0], -1) if data.ndim > 1 else data
            for slot in slots[src]:
                s_lo, s_hi = slot.src_rows or (0, ref.shape[0])
                a, b = max(lo, s_lo), min(hi, s_hi)
                if a >= b:
                    continue
                part = data[a - lo:b - lo] if data.ndim > 1 else data
                dst = slot.dst_row + (a - s_lo)
                pending.append(pool.submit(writer.write, slot, part, dst))
            bar.update(data.size * ref.nbytes // max(int(np.prod(ref.shape)), 1))
            # Bound the blocks in flight: memory stays a few blocks, whatever the model's size.
            while len(pending) > 2 * max(1, n_threads):
                pending.pop(0).result()
        for f in pending:
            f.result()


def decoder_shape(d: Dims, arch: OnnxArch) -> DecoderShape:
    conv = {}
    if d.conv_layers:  # LFM2: which layers carry a conv state, and its length
        conv = dict(layer_types=tuple("conv" if c else "full_attention" for c in d.conv_layers),
                    conv_cache=d.conv_kernel - 1)
    return DecoderShape(arch.genai_type, d.max_positions, d.head_dim, d.hidden, d.n_heads, d.n_layers, d.n_kv_heads,
                        d.vocab, recurrent=any(d.linear_layers), **conv)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise BackendMissingError("onnx is not installed; install it with: pip install 'edgepack[onnx]'") from None
    return onnx


def convert(source: Source, out_dir: Path, opts: OnnxOptions = OnnxOptions(), *, n_ctx: int = 4096,
            n_threads: int | None = None, quiet: bool = False,
            eos_ids: list[int] | None = None, part_bytes: int | None = None) -> ConvertResult:
    """Write model.onnx, model.onnx.data, genai_config.json and the tokenizer files into ``out_dir``.

    With ``part_bytes``, weights larger than that go into several data files (model.onnx.data,
    model.onnx.data.2, ...) of at most ``part_bytes`` each, the graph naming each initializer's file.
    """
    onnx = _onnx()
    cfg = text_config(read_config(source.path))  # a multimodal wrapper: its language model's config
    spec = spec_from_config(cfg)
    arch = onnx_arch_for(spec.architecture)
    ckpt = Checkpoint.open(source.path)
    try:
        d, fmt, layout, slots, has_bias, embed_base, embed_zp = plan_slots(ckpt, cfg, arch, opts, part_bytes)
        caches = _caches(cfg, arch, d)
        out_dir.mkdir(parents=True, exist_ok=True)
        data_paths = [out_dir / f for f in layout.data_files]
        fds: list[int] = []
        try:
            for path, size in zip(data_paths, layout.sizes):
                fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644))
                os.ftruncate(fds[-1], size)
            writer = _Writer(fds, layout, fmt)
            for name, table in caches.items():
                writer._put(name, 0, table)
            if embed_zp == "model.embed_tokens.zp":
                zp = layout.inits[embed_zp]
                writer._put(embed_zp, 0, np.full(zp.shape, 0x88, dtype=np.uint8))
            hasher = FileHasher(ckpt)
            write_weights(ckpt, slots, writer, hasher, n_threads or default_threads(), quiet)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        sha256s = {str(path.relative_to(source.path)): digest for path, digest in hasher.digests().items()}
    finally:
        ckpt.close()
    model = GraphBuilder(d, fmt, layout).build(qkv_bias=has_bias, embed_base=embed_base, embed_zp=embed_zp)
    onnx.save_model(model, str(out_dir / "model.onnx"))
    gen = read_json(source.path / "generation_config.json")
    (out_dir / "genai_config.json").write_text(
        json.dumps(genai_config(decoder_shape(d, arch), cfg, gen, n_ctx, opts.execution_provider,
                                eos_ids=eog_ids(source.path) if eos_ids is None else eos_ids), indent=4),
        encoding="utf-8")
    copied = [out_dir / "model.onnx", *data_paths, out_dir / "genai_config.json", *copy_tokenizer(source.path, out_dir)]
    return ConvertResult(out_dir, sum(p.stat().st_size for p in copied), sha256s, files=copied,
                         details={"onnx": {**opts.as_dict(), "exporter": "edgepack"}, "n_nodes": len(model.graph.node)})
