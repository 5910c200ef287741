"""Importance matrices: collect them by running a GGUF in llama.cpp, read and write llama.cpp's files.

``compute_imatrix(gguf_path, text)`` does what llama.cpp's ``llama-imatrix`` does:
it loads the (F16 or Q8_0) GGUF with llama-cpp-python on the CPU, cuts the
tokenized calibration text into chunks of ``n_ctx`` tokens, decodes each chunk
from an empty KV cache, and watches the computation through the scheduler's
eval callback (``cb_eval`` in llama_context_params). ggml asks the callback
about every graph node before computing it (``ask=True``); we say yes to each
matrix multiplication by a model weight (``blk.*``), ggml then computes up to
that node and calls again (``ask=False``) with its inputs filled, and we read
src1, the f32 activations the weight multiplies, into the per-column sums of
squares that kernels/imatrix.py keeps. The result maps GGUF tensor names to
one float per column, what ``packager.convert.gguf.converter.convert(imatrix=...)`` and
ggml's quantizers take.

``save_imatrix`` / ``read_imatrix`` use llama.cpp's imatrix GGUF format
(tools/imatrix/imatrix.cpp ``save_imatrix``, common/imatrix-loader.cpp):
``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count``,
``imatrix.chunk_size``, and per weight two F32 tensors, ``<name>.in_sum2``
(ne = [values per count, n_counts], raw sums of x^2) and ``<name>.counts``
(ne = [1, n_counts], tokens summed). ``read_imatrix`` also reads the older
``.dat`` files. So files made by ``llama-imatrix`` work with ``--imatrix``,
and ours work with ``llama-quantize --imatrix``.

The ggml_tensor layout is mirrored with ctypes from ggml/include/ggml.h of the
llama.cpp that llama-cpp-python 0.3.36 vendors, and checked against the loaded
library on first use (a tensor and a MUL_MAT node built by ggml itself), so a
different ggml fails with a message instead of reading the wrong bytes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import struct
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np

from packager.errors import ConversionError, UsageError, missing_backend
from packager.host import default_threads
from packager.kernels.ggml import _lib
from packager.kernels.imatrix import Entry, ImatrixStats
from packager.progress import progress_bar, quiet_llama_log
from packager.source.resolver import sha256_file

__all__ = [
    "DEFAULT_CALIBRATION",
    "check_imatrix",
    "collect_imatrix",
    "compute_imatrix",
    "default_calibration_text",
    "load_imatrix",
    "read_imatrix",
    "save_imatrix",
]

DEFAULT_CALIBRATION = "calibration.txt"  # in packager/data/, shipped in the wheel
MIN_TOKENS = 16  # llama-imatrix ignores multiplications over fewer tokens ("small batches")

IN_SUM2 = ".in_sum2"
COUNTS = ".counts"
GGUF_MAGIC = b"GGUF"


def default_calibration_text() -> str:
    """The calibration text edgepack ships: original, varied English prose, dialogue, code and numbers (CC0)."""
    return (importlib.resources.files("packager") / "data" / DEFAULT_CALIBRATION).read_text(encoding="utf-8")


def user_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A user's --imatrix file (llama-imatrix's or edgepack's) and its manifest record."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--imatrix {path}: no such file; pass a file made by llama-imatrix or edgepack")
    return load_imatrix(path), {"file": path.name, "sha256": sha256_file(path)}


def calibration_text(text_file: Path | None) -> tuple[str, str]:
    """The --imatrix-text file's text and name, or (None) the calibration text edgepack ships."""
    if text_file is None:
        return default_calibration_text(), "edgepack calibration.txt"
    try:
        return Path(text_file).read_text(encoding="utf-8"), Path(text_file).name
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--imatrix-text {text_file}: cannot read it as UTF-8 text ({exc})") from None


# -- ggml's tensor struct, as ggml/include/ggml.h declares it ---------------------------

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` (read only: we never write through it)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _ggml() -> tuple[ctypes.CDLL, int, int]:
    """libggml-base with the calls we make, and the ids of GGML_OP_MUL_MAT / MUL_MAT_ID, layout checked."""
    lib = _lib()
    sigs = {
        "ggml_init": (ctypes.c_void_p, [_InitParams]),
        "ggml_free": (None, [ctypes.c_void_p]),
        "ggml_new_tensor_2d": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        "ggml_set_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "ggml_get_data": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_mul_mat": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_tensor_overhead": (ctypes.c_size_t, []),
        "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
        "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes

    mismatch = "the ggml in llama-cpp-python does not match the ggml_tensor layout edgepack reads ({}); " \
               "install the llama-cpp-python version edgepack supports: pip install 'edgepack[gguf]'"
    if lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(GGMLTensor):
        raise ConversionError(mismatch.format(f"struct size {lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE}"))
    ctx = lib.ggml_init(_InitParams(1 << 16, None, False))
    if not ctx:
        raise ConversionError("ggml_init failed for a 64 KB context; the machine is out of memory")
    try:
        a = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 32, 3)
        b = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 32, 5)
        lib.ggml_set_name(a, b"blk.0.probe.weight")
        mm = lib.ggml_mul_mat(ctx, a, b)
        ta, tm = GGMLTensor.from_address(a), GGMLTensor.from_address(mm)
        op_mul_mat = tm.op
        checks = {
            "ne": tuple(ta.ne) == (32, 3, 1, 1),
            "nb": tuple(ta.nb) == (4, 128, 384, 384),
            "name": ta.name == b"blk.0.probe.weight",
            "data": ta.data == lib.ggml_get_data(a),
            "src": (tm.src[0], tm.src[1]) == (a, b),
            "op": lib.ggml_op_name(op_mul_mat) == b"MUL_MAT",
            "op id": lib.ggml_op_name(op_mul_mat + 1) == b"MUL_MAT_ID",  # declared right after MUL_MAT
        }
    finally:
        lib.ggml_free(ctx)
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConversionError(mismatch.format(", ".join(bad) + " differ"))
    return lib, op_mul_mat, op_mul_mat + 1


def _base_name(name: bytes) -> str:
    """The weight's GGUF name: a backend copy is called ``CUDA0#blk.0.attn_k.weight#0``."""
    s = name.decode("utf-8", errors="replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


class _Reader:
    """Reads a ggml tensor's data as a numpy array (a copy when it lives off the host)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def array(self, t: GGMLTensor, addr: int, dtype: np.dtype) -> np.ndarray:
        ne, nb = list(t.ne), list(t.nb)
        if any(n == 0 for n in ne):
            return np.zeros(ne[::-1], dtype=dtype)
        extent = dtype.itemsize + sum((n - 1) * s for n, s in zip(ne, nb))
        if t.buffer and not self._lib.ggml_backend_buffer_is_host(t.buffer):
            host = np.empty(extent, dtype=np.uint8)
            self._lib.ggml_backend_tensor_get(addr, host.ctypes.data, 0, extent)
            base: Any = host
        else:
            base = (ctypes.c_char * extent).from_address(t.data)
        # numpy order: ne reversed; strides are ggml's nb, in bytes.
        return np.ndarray(shape=tuple(ne[::-1]), dtype=dtype, buffer=base, strides=tuple(nb[::-1]))


class _Collector:
    """The eval callback: picks the weight multiplications and feeds their inputs to ImatrixStats."""

    def __init__(self, stats: ImatrixStats, process_output: bool) -> None:
        self.lib, self.op_mul_mat, self.op_mul_mat_id = _ggml()
        self.stats = stats
        self.process_output = process_output
        self.reader = _Reader(self.lib)
        self.error: BaseException | None = None
        import llama_cpp

        # Kept on self: ggml holds the raw function pointers while the context lives.
        self.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self._callback)
        self.cb_abort = llama_cpp.ggml_abort_callback(lambda _data: self.error is not None)

    def _wanted(self, t: GGMLTensor) -> bool:
        if t.op == self.op_mul_mat_id:
            return True
        if t.op != self.op_mul_mat or not t.src[0] or not t.src[1]:
            return False
        src1 = GGMLTensor.from_address(t.src[1])
        if src1.ne[1] < MIN_TOKENS or src1.type != GGML_TYPE_F32:
            return False
        name = _base_name(GGMLTensor.from_address(t.src[0]).name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _callback(self, addr: int, ask: bool, _user_data: int) -> bool:
        # An exception must not cross into C: keep it, abort the decode, re-raise after.
        if self.error is not None:
            return False
        try:
            t = GGMLTensor.from_address(addr)
            if ask:
                return self._wanted(t)
            self._collect(t)
            return True
        except BaseException as e:  # noqa: BLE001 - re-raised by decode()
            self.error = e
            return False

    def _collect(self, t: GGMLTensor) -> None:
        src0 = GGMLTensor.from_address(t.src[0])
        src1 = GGMLTensor.from_address(t.src[1])
        name = _base_name(src0.name)
        if src1.type != GGML_TYPE_F32:
            return  # only a MUL_MAT_ID gets here unasked about its type; activations are f32 in practice
        x = self.reader.array(src1, t.src[1], np.dtype(np.float32))
        if t.op == self.op_mul_mat_id:
            ids_t = GGMLTensor.from_address(t.src[2])
            if ids_t.type != GGML_TYPE_I32 or src1.ne[3] != 1:
                raise ConversionError(f"{name}: unexpected mixture-of-experts layout; please report it")
            ids = self.reader.array(ids_t, t.src[2], np.dtype(np.int32))[0, 0]  # (tokens, experts used)
            self.stats.add_experts(name, x[0], ids, n_expert=int(src0.ne[2]))
        else:
            self.stats.add_dense(name, x, n_mat=(int(src0.ne[2]), int(src0.ne[3])))


def _tokenize(llama_cpp: Any, vocab: Any, text: str) -> list[int]:
    """The text as llama-imatrix tokenizes it: special tokens added, none parsed from the text."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    for _ in range(2):
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
        if n >= 0:
            return list(buf[:n])
        n_max = -n
    raise ConversionError("llama.cpp could not tokenize the calibration text; check that it is UTF-8 text")


def collect_imatrix(
    gguf_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    n_threads: int | None = None,
    process_output: bool = False,
    dataset: str = "",
    quiet: bool = False,
) -> ImatrixStats:
    """Run ``gguf_path`` over ``text`` in llama.cpp and collect every weight's activations.

    Chunks of ``n_ctx`` tokens, each decoded from an empty cache with its first
    token replaced by BOS when the model adds one, as llama-imatrix does; the
    tokens past the last whole chunk are dropped; ``n_chunks`` caps the count.
    ``process_output`` also collects ``output.weight`` (llama-imatrix's
    ``--process-output``). ``dataset`` names the text in a saved file.
    """
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    if n_ctx < MIN_TOKENS:
        raise UsageError(f"imatrix chunks of {n_ctx} tokens are too short; use at least {MIN_TOKENS} (512 is usual)")
    if n_chunks is not None and n_chunks < 1:
        raise UsageError(f"n_chunks must be at least 1, got {n_chunks}")
    if n_threads is None:
        n_threads = default_threads()

    stats = ImatrixStats(chunk_size=n_ctx, datasets=[dataset] if dataset else [])
    collector = _Collector(stats, process_output)

    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0  # host memory: the callback reads activations in place
    with quiet_llama_log():
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise ConversionError(f"{gguf_path}: llama.cpp cannot load this GGUF; re-run the conversion")
    ctx = None
    batch = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = _tokenize(llama_cpp, vocab, text)
        available = len(tokens) // n_ctx
        if available == 0:
            raise UsageError(
                f"the calibration text is {len(tokens)} tokens long, less than one chunk of {n_ctx}; "
                f"give a longer text (llama-imatrix users give a few hundred chunks) or a smaller n_ctx"
            )
        count = available if n_chunks is None else min(n_chunks, available)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = min(n_ctx, 512)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = int(n_threads)
        cparams.cb_eval = collector.cb_eval
        cparams.cb_eval_user_data = None
        cparams.abort_callback = collector.cb_abort
        cparams.abort_callback_data = None
        cparams.no_perf = True
        with quiet_llama_log():
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ConversionError(
                f"{gguf_path}: llama.cpp could not create a context of {n_ctx} tokens; free memory or lower n_ctx"
            )
        memory = llama_cpp.llama_get_memory(ctx)

        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            # Every token is an output, as in llama-imatrix: otherwise llama.cpp prunes the last
            # layer's feed-forward to the one token whose logits are asked for.
            batch.logits[i] = 1
        batch.n_tokens = n_ctx

        with progress_bar(total=count, desc="computing imatrix", unit="chunk", quiet=quiet) as bar:
            for c in range(count):
                chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
                if add_bos:
                    chunk[0] = bos
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                llama_cpp.llama_memory_clear(memory, True)
                rc = llama_cpp.llama_decode(ctx, batch)
                if collector.error is not None:
                    raise collector.error
                if rc != 0:
                    raise ConversionError(f"{gguf_path}: llama.cpp failed to decode chunk {c + 1} (code {rc})")
                stats.chunk_count += 1
                bar.update(1)
    finally:
        with quiet_llama_log():
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
            if ctx:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
    if not stats.entries:
        raise ConversionError(f"{gguf_path}: no weight multiplication was seen while decoding; please report it")
    return stats


def compute_imatrix(
    gguf_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    n_threads: int | None = None,
    process_output: bool = False,
    quiet: bool = False,
) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 importance per column, from running ``gguf_path`` over ``text``.

    See ``collect_imatrix``; the values are the mean of x_j^2 over the tokens.
    """
    stats = collect_imatrix(
        gguf_path, text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
        process_output=process_output, quiet=quiet,
    )
    return stats.importance()


# -- llama.cpp's imatrix files -----------------------------------------------------------

def save_imatrix(stats: ImatrixStats, path: Path) -> Path:
    """Write ``stats`` as llama.cpp's imatrix GGUF (what ``llama-imatrix -o x.gguf`` writes)."""
    path = Path(path)
    w = gguf.GGUFWriter(path, arch="")
    # llama-imatrix writes no general.architecture; GGUFWriter adds one on creation.
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(stats.datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, stats.chunk_count)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, stats.chunk_size)
    for name in sorted(stats.entries):
        e = stats.entries[name]
        if len(name) + len(IN_SUM2) >= GGML_MAX_NAME:
            raise UsageError(f"{name}: the name is too long for a GGUF tensor name ({GGML_MAX_NAME - 1} bytes)")
        n = e.counts.size
        w.add_tensor(name + IN_SUM2, e.sums.astype(np.float32).reshape(n, -1))
        w.add_tensor(name + COUNTS, e.counts.astype(np.float32).reshape(n, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_imatrix(path: Path, *, legacy_chunk_size: int = 512) -> ImatrixStats:
    """Read an imatrix file made by ``llama-imatrix`` (GGUF, or the older .dat) or by ``save_imatrix``.

    A .dat file stores per-chunk means; like llama.cpp, they become sums and
    counts by assuming chunks of ``legacy_chunk_size`` tokens (only merging cares).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise UsageError(
            f"{path}: no such imatrix file; give the path of one that llama-imatrix or edgepack wrote"
        ) from None
    except OSError as e:
        raise UsageError(
            f"{path}: cannot read the imatrix file ({e.strerror}); check the path and permissions"
        ) from None
    try:
        stats = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path, legacy_chunk_size)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path}: not a readable importance matrix ({e}); make one with llama-imatrix or edgepack's --imatrix-text"
        ) from None
    if not stats.entries:
        raise UsageError(f"{path}: the file holds no importance matrix entries; give an imatrix made for this model")
    return stats


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An imatrix file as the converter takes it: tensor name -> float32 importance per column."""
    return read_imatrix(path).importance()


def _read_gguf(path: Path) -> ImatrixStats:
    r = gguf.GGUFReader(path)

    def field(key: str, default: Any) -> Any:
        f = r.get_field(key)
        return default if f is None else f.contents()

    stats = ImatrixStats(
        chunk_size=int(field(gguf.Keys.IMatrix.CHUNK_SIZE, 0)),
        chunk_count=int(field(gguf.Keys.IMatrix.CHUNK_COUNT, 0)),
        datasets=[str(d) for d in field(gguf.Keys.IMatrix.DATASETS, [])],
    )
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((IN_SUM2, sums), (COUNTS, counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"{t.name} is {t.tensor_type.name}, llama.cpp writes F32")
                into[t.name[: -len(suffix)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if sums.keys() != counts.keys():
        odd = sorted(sums.keys() ^ counts.keys())[0]
        has, lacks = (IN_SUM2, COUNTS) if odd in sums else (COUNTS, IN_SUM2)
        raise ValueError(f"{odd} has {odd}{has} but no {odd}{lacks}")
    for name in sums:
        n = counts[name].size
        if n == 0 or sums[name].size % n:
            raise ValueError(f"{name}: {sums[name].size} sums do not split into {n} counts")
        stats.entries[name] = Entry(sums[name].reshape(n, -1), np.rint(counts[name]).astype(np.int64))
    return stats


def _read_legacy(path: Path, chunk_size: int) -> ImatrixStats:
    """The .dat format (imatrix.cpp save_imatrix_legacy): int32 n, then per entry name, ncall, nval, floats."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    (n_entries,) = take("i")
    if n_entries < 1:
        raise ValueError("no entries")
    stats = ImatrixStats(chunk_size=chunk_size)
    for _ in range(n_entries):
        (length,) = take("i")
        name = raw[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("ii")
        if nval < 1 or length < 1:
            raise ValueError(f"entry {name!r} has {nval} values")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        # Stored: mean * ncall. Sums and counts that give the same mean, as llama.cpp rebuilds them.
        # (a zero ncall means the values are the means themselves, as llama-quantize reads them)
        stats.entries[name] = Entry(values * chunk_size, [max(ncall, 1) * chunk_size])
    if pos + 4 <= len(raw):  # optional trailer: chunk count, dataset name
        (stats.chunk_count,) = take("i")
        if pos + 4 <= len(raw):
            (length,) = take("i")
            if length > 0:
                stats.datasets.append(raw[pos:pos + length].decode("utf-8", errors="replace"))
    return stats


def check_imatrix(imatrix: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], origin: str) -> int:
    """Check an imatrix against the tensors it will quantize (name -> numpy shape); return how many it covers.

    Raises ``UsageError`` when it covers none of them (made for another model)
    or when an entry's length is not that tensor's columns (times its experts).
    """
    covered = 0
    for name, shape in shapes.items():
        vec = imatrix.get(name)
        if vec is None or len(shape) < 2:
            continue
        expected = int(shape[-1]) * int(np.prod(shape[:-2], dtype=np.int64))
        if np.asarray(vec).size != expected:
            raise UsageError(
                f"{origin}: {name} has {np.asarray(vec).size} importance values but the tensor has {expected} "
                "columns; the imatrix was made for another model, make one for this model"
            )
        covered += 1
    if imatrix and not covered:
        raise UsageError(
            f"{origin}: none of its {len(imatrix)} entries names a tensor of this model "
            f"(it has e.g. {next(iter(imatrix))!r}); the imatrix was made for another model"
        )
    return covered
