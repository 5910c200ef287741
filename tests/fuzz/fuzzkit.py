"""Shared pieces of the mutation fuzzers: settings, the property, seeds and mutations.

The property every reader must keep, for every input: it returns, or it raises
one of edgepack's own errors with a one-line message. Any other exception is a
bug; so is an input that takes more than TIME_LIMIT seconds (a SIGALRM cuts it
off and fails the example) or that makes the process allocate more than
MEMORY_LIMIT bytes beyond what it already has (RLIMIT_AS is lowered around each
example, so a header that claims a huge tensor and is believed fails with
MemoryError instead of eating the machine).

EDGEPACK_FUZZ_EXAMPLES sets the number of inputs per target (default: a short
run that keeps the whole fuzz suite under a minute); benchmarks/fuzz_long.py
runs a long one and records the counts.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import struct
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from packager.errors import EdgepackError

TIME_LIMIT = 5.0  # seconds per input: every reader here answers in milliseconds
MEMORY_LIMIT = 1 << 30  # extra address space an input may make the process map
DEFAULT_EXAMPLES = {"gguf": 250, "safetensors": 300, "config": 400, "profile": 300, "manifest": 250}
COUNTS_FILE = os.environ.get("EDGEPACK_FUZZ_COUNTS")  # where to append how many inputs ran


def examples(target: str) -> int:
    n = os.environ.get("EDGEPACK_FUZZ_EXAMPLES")
    return int(n) if n else DEFAULT_EXAMPLES[target]


def fuzz_settings(target: str) -> settings:
    return settings(
        max_examples=examples(target),
        deadline=timedelta(seconds=TIME_LIMIT),
        suppress_health_check=list(HealthCheck),
        derandomize=not os.environ.get("EDGEPACK_FUZZ_RANDOM"),  # reproducible in CI; random in long runs
        database=None,
        print_blob=True,
    )


class Hang(Exception):
    """An input took longer than TIME_LIMIT."""


@contextmanager
def bounded(seconds: float = TIME_LIMIT, memory: int = MEMORY_LIMIT):
    """Fail the example on a hang (SIGALRM) or a large allocation (RLIMIT_AS)."""

    def alarm(signum, frame):
        raise Hang(f"input took more than {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_size()
    if vm:
        limit = vm + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Counter:
    """How many inputs a target ran, and how they ended (recorded for the issue note)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.ok = 0
        self.errors: dict[str, int] = {}

    def __call__(self, fn: Callable[[], Any]) -> Any:
        """Run one input under the property."""
        try:
            with bounded():
                result = fn()
        except EdgepackError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"{type(exc).__name__} message is not one line: {message!r}"
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return None
        self.ok += 1
        return result

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())

    def record(self) -> None:
        if COUNTS_FILE:
            with open(COUNTS_FILE, "a") as f:
                f.write(json.dumps({"target": self.target, "inputs": self.total, "ok": self.ok,
                                    "errors": self.errors}) + "\n")


# -- byte-level mutations --------------------------------------------------------------

INTERESTING_U64 = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536,
                   2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def byte_mutations(draw, data: bytes, hot: int | None = None) -> bytes:
    """``data`` with 1-4 random edits: byte overwrites (mostly within the first ``hot`` bytes),
    truncation, insertion, deletion, or an interesting 4/8-byte integer written somewhere."""
    buf = bytearray(data)
    hot = min(hot or len(buf), len(buf))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "byte", "int", "truncate", "insert", "delete", "bomb"]))
        if not buf:
            break
        pos = draw(st.integers(0, max(0, (hot if draw(st.booleans()) or kind != "byte" else len(buf)) - 1)))
        pos = min(pos, len(buf) - 1)
        if kind == "byte":
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "int":
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(INTERESTING_U64) | st.integers(0, 2**64 - 1)) % (1 << (8 * width))
            buf[pos:pos + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "bomb":  # deep nesting: recursive parsers must fail cleanly
            buf[pos:pos] = draw(st.sampled_from([b"[", b"{\"a\":", b"[{"])) * draw(st.sampled_from([100, 5000, 100000]))
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[pos:pos + draw(st.integers(1, 16))]
    return bytes(buf)


def int_slots(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer of a GGUF header: lengths, counts, types, dims, offsets, values."""
    import gguf
    import numpy as np

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgepack-fuzz-slots-{os.getpid()}.gguf"
    path.write_bytes(data)
    try:
        r = gguf.GGUFReader(path)
        base = r.data.__array_interface__["data"][0]
        slots = set()
        for f in list(r.fields.values()) + [t.field for t in r.tensors]:
            for part in f.parts:
                if isinstance(part, np.ndarray) and part.dtype.kind in "ui" and part.itemsize in (4, 8):
                    start = part.__array_interface__["data"][0] - base
                    for i in range(min(part.size, 4)):
                        slots.add((start + i * part.itemsize, part.itemsize))
        del r
    finally:
        path.unlink(missing_ok=True)
    return sorted(slots)


@st.composite
def gguf_mutations(draw, data: bytes, slots: list[tuple[int, int]], header_end: int) -> bytes:
    """Structure-aware: rewrite 1-3 header integers with interesting values; or plain byte edits."""
    if draw(st.booleans()):
        return draw(byte_mutations(data, hot=header_end))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        off, width = draw(st.sampled_from(slots))
        old = int.from_bytes(buf[off:off + width], "little")
        value = draw(st.sampled_from(INTERESTING_U64) | st.sampled_from([old + 1, old - 1, old * 2, old + 32,
                                                                          len(data), len(data) - off])
                     | st.integers(0, 2**64 - 1))
        buf[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf)


# -- JSON values ------------------------------------------------------------------------

# Values that broke readers before (each guarded by a test now): inf/nan/huge where a size
# belongs, bools and strings where an int belongs, paths that escape or are too long for the OS.
HOSTILE = st.sampled_from([
    0, 1, -1, 2, 7, 64, 2**31, 2**63, 10**30, 10**400, -(2**63), float("inf"), float("-inf"), float("nan"),
    1e308, 1.5, 4096.0, True, False, None, [], {}, [1, 2], "", "0", "12", "1e999", "nan", "abc",
    "../../etc/passwd", "/etc/passwd", "a\x00b", "\ud800", "x" * 300, "a" * 5000, "a/" * 3000 + "b",
    "model/../../x", ".", "./", "a//b", "C:\\x", "BF16", "F32", "I8", "README.md", "model/m.gguf",
]).map(copy.deepcopy)  # sampled_from hands out the same [] and {} each time: a mutation of one made [[...]]
SCALARS = (HOSTILE | HOSTILE | st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@st.composite
def json_mutations(draw, doc: Any, extra_keys: list[str] = ()) -> Any:
    """``doc`` (a parsed JSON value) with 1-3 values replaced, keys deleted or added anywhere in it."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        # Walk down a random path of containers.
        parent, key = None, None
        node = doc
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            parent, node = node, node[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if parent is None:
            if action == "add" and isinstance(doc, dict):
                doc[draw(st.sampled_from(list(extra_keys) or ["x"]) | st.text(max_size=8))] = draw(JSON)
            elif action == "replace" and not draw(st.integers(0, 9)):
                doc = draw(JSON)  # rarely, the whole document
            continue
        if action == "replace":
            parent[key] = draw(JSON)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(list(extra_keys) or ["x"]) | st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return doc


# -- seeds -------------------------------------------------------------------------------

def tiny_model_gguf(path: Path) -> Path:
    """A small but complete llama GGUF: hyperparameters, a 32-token vocabulary, a chat
    template, and F32, F16 and Q8_0 tensors (a few KB, so each input reads in a millisecond)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_token_types([1] * 32)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    # A byte array, as SentencePiece models carry: GGUFReader reads it item by item, so a
    # lying count made it loop past the end of the file (found by this fuzzer).
    w.add_key_value("tokenizer.ggml.precompiled_charsmap", list(b"charsmap"), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.UINT8)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((32, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((64, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def header_end(data: bytes) -> int:
    """Where a GGUF's tensor data begins (mutations concentrate before it)."""
    from packager.source.gguf_check import check_layout

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgepack-fuzz-head-{os.getpid()}.gguf"
    path.write_bytes(data)
    try:
        return check_layout(path).data_offset
    finally:
        path.unlink(missing_ok=True)


def tiny_safetensors(path: Path) -> Path:
    """A small safetensors file with F32, F16, BF16, I64 and 0-d/empty tensors."""
    import numpy as np

    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": ("F32", rng.standard_normal((4, 8), dtype=np.float32).tobytes(), [4, 8]),
        "b.weight": ("F16", rng.standard_normal((8,)).astype(np.float16).tobytes(), [8]),
        "c.weight": ("BF16", (rng.standard_normal((3, 4), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(), [3, 4]),
        "d.ids": ("I64", np.arange(5, dtype=np.int64).tobytes(), [5]),
        "e.scalar": ("F32", np.float32(1.5).tobytes(), []),
        "f.empty": ("F32", b"", [0, 4]),
    }
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blob = b""
    for name, (dtype, raw, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + blob)
    return path


# -- GGUFs whose metadata lies ------------------------------------------------------------------

def lying_ggufs(src: Path, out: Path, only: Sequence[str] | None = None) -> dict[str, Path]:
    """Copies of a real model GGUF, each with one lie in its header, by name (all, or ``only`` those)."""
    import gguf

    r = gguf.GGUFReader(src)
    base = r.data.__array_interface__["data"][0]

    def at(part) -> int:
        return part.__array_interface__["data"][0] - base

    data = src.read_bytes()
    n_tensors = len(r.tensors)
    t0, tl = r.tensors[0].field, r.tensors[-1].field  # parts: name len, name, n_dims, dims, type, offset
    tokens = r.fields["tokenizer.ggml.tokens"]  # parts: key len, key, type, item type, count, items...
    del r
    patches: dict[str, list[tuple[int, int, int]]] = {  # name -> [(offset, width, value)]
        "tensor-count-too-high": [(8, 8, n_tensors + 1000)],
        "tensor-count-huge": [(8, 8, 2**63 - 1)],
        "kv-count-huge": [(16, 8, 2**62)],
        "token-array-count-huge": [(at(tokens.parts[4]), 8, 2**62)],
        "tensor-offset-past-end": [(at(tl.parts[5]), 8, len(data) * 4)],
        "tensor-dims-past-end": [(at(tl.parts[3]), 8, 1 << 40)],
        "tensor-type-unknown": [(at(t0.parts[4]), 4, 200)],
        "tensor-ndims-too-many": [(at(t0.parts[2]), 4, 9)],
    }
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, edits in patches.items():
        if only is not None and name not in only:
            continue
        buf = bytearray(data)
        for off, width, value in edits:
            buf[off:off + width] = value.to_bytes(width, "little")
        made[name] = out / f"{name}.gguf"
        made[name].write_bytes(buf)
    if only is None or "truncated-half" in only:
        made["truncated-half"] = out / "truncated-half.gguf"
        made["truncated-half"].write_bytes(data[:len(data) // 2])
    return made
