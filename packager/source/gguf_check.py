"""Check a GGUF file's layout against its own size before anything trusts it.

gguf-py's GGUFReader believes every count it reads: an array that claims 2^63
items past the end of the file makes it loop (almost) forever, and llama.cpp's
quantizer, handed a file whose tensors lie, reads out of bounds. So a GGUF from
a stranger is walked here first, field by field, with every length, count,
offset and size checked against the bytes that are really there, and with the
rules llama.cpp's own loader (ggml/src/gguf.cpp) applies: known value types, no
nested arrays, at most 4 dimensions, known tensor types with whole blocks per
row, tensors laid out contiguously in order inside the file, alignment a power
of two. Only the header is read (tensor data is never touched).

The walk also keeps each field's bytes (``Layout.fields``), decoded on demand: it is edgepack's
GGUF metadata reader. gguf-py's GGUFReader builds numpy views for every string of the vocabulary,
about 20 s for a 150k-token model; this walk takes a tenth of a second.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from packager.errors import CorruptFileError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME (includes the terminating NUL)
_SCALAR = {  # GGUFValueType -> (struct code, size)
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
    7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Field:
    """One metadata value as stored: its type, and its bytes after the type (an array's after its item
    type and count). ``contents()`` decodes it as gguf-py's ReaderField.contents() does."""

    type: int  # GGUFValueType
    raw: bytes
    item_type: int | None = None  # an array's
    count: int = 1  # an array's items

    def contents(self) -> object:
        """The value: int, float, bool or str; a list of them for an array. A string that is not UTF-8
        raises UnicodeDecodeError (a ValueError)."""
        if self.type == _STRING:
            return self.raw[8:].decode("utf-8")
        if self.type != _ARRAY:
            return struct.unpack("<" + _SCALAR[self.type][0], self.raw)[0]
        if self.item_type == _STRING:
            out, pos, raw = [], 0, self.raw
            for _ in range(self.count):
                n = _U64.unpack_from(raw, pos)[0]
                out.append(raw[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
            return out
        code = _SCALAR[self.item_type][0]
        return list(struct.unpack(f"<{self.count}{code}", self.raw))


@dataclass(frozen=True)
class Layout:
    version: int
    n_kv: int
    alignment: int
    data_offset: int
    tensors: tuple[TensorInfo, ...]
    strings: dict[str, str]  # the string fields asked for (``want``), decoded
    table_offset: int = 0  # where the keys end and the tensor table begins
    tokenizer: dict[str, str] = field(default_factory=dict)  # each tokenizer.ggml.* key's sha256 (type + raw value)
    fields: dict[str, Field] = field(default_factory=dict)  # every key, in the file's order
    path: Path | None = None


class _Cursor:
    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: {what} (at byte {self.pos} of {self.size}); the GGUF is corrupt or "
                                "truncated, re-download it")

    def take(self, code: str, n: int) -> int | float | bool:
        if self.pos + n > self.size:
            raise self.fail("the file ends inside the header")
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return int(self.take("I", 4))

    def u64(self) -> int:
        return int(self.take("Q", 8))

    def string(self, what: str) -> bytes:
        n = self.u64()
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes, more than the file has left")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s


def _skip_strings(c: _Cursor, count: int, key: str) -> None:
    """Step over ``count`` strings: a vocabulary's 150k+ tokens and merges, so one tight loop (c.string is 5x slower)."""
    buf, pos, size, unpack = c.buf, c.pos, c.size, _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            c.pos = pos
            raise c.fail("the file ends inside the header")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > size - pos:
            c.pos = pos
            raise c.fail(f"an item of {key!r} claims {n} bytes, more than the file has left")
        pos += n
    c.pos = pos


def _value(c: _Cursor, vtype: int, key: str) -> object:
    if vtype in _SCALAR:
        code, n = _SCALAR[vtype]
        return c.take(code, n)
    if vtype == _STRING:
        return c.string(f"a string of {key!r}")
    if vtype == _ARRAY:
        itype, count = c.u32(), c.u64()
        if itype == _ARRAY:
            raise c.fail(f"{key!r} is an array of arrays, which llama.cpp does not read")
        item = _SCALAR[itype][1] if itype in _SCALAR else 8 if itype == _STRING else None
        if item is None:
            raise c.fail(f"{key!r} is an array of unknown type {itype}")
        if count * item > c.size - c.pos:  # every item needs at least `item` bytes
            raise c.fail(f"{key!r} claims {count} items, more than the file can hold")
        if itype == _STRING:
            _skip_strings(c, count, key)
        else:
            c.pos += count * item
        return None
    raise c.fail(f"{key!r} has unknown value type {vtype}")


def check_layout(path: str | Path, want: frozenset[str] = frozenset()) -> Layout:
    """Walk the header of ``path``; a CorruptFileError names the first lie.

    ``want``: string fields to return (e.g. tokenizer.chat_template), without a GGUFReader.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CorruptFileError(f"{path}: {size} bytes is too short to be a GGUF file; re-download it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Cursor(buf, path), size, want)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _walk(c: _Cursor, size: int, want: frozenset[str]) -> Layout:
    if bytes(c.buf[:4]) != GGUF_MAGIC:
        raise CorruptFileError(f"{c.path}: not a GGUF file (bad magic); pass a .gguf model file")
    c.pos = 4
    version = c.u32()
    if version not in (2, 3):
        raise CorruptFileError(f"{c.path}: GGUF version {version} is not supported (2 and 3 are); convert it again")
    n_tensors, n_kv = c.u64(), c.u64()
    # Smallest possible records: a key-value pair 8+1+4+1 bytes, a tensor info 8+1+4+8+4+8.
    if n_kv * 14 > size - c.pos or n_tensors * 33 > size - c.pos:
        raise c.fail(f"the header claims {n_tensors} tensors and {n_kv} metadata fields, more than the file can hold")
    alignment = 32
    keys: set[bytes] = set()
    strings: dict[str, str] = {}
    tokenizer: dict[str, str] = {}
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        if not key:
            raise c.fail("a metadata key is empty")
        if key in keys:
            raise c.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = c.u32()
        shown = key.decode("utf-8", "replace")
        start = c.pos
        value = _value(c, vtype, shown)
        raw = bytes(c.buf[start:c.pos])
        if key.startswith(b"tokenizer.ggml."):  # what two models must share to draft for each other
            tokenizer[shown] = hashlib.sha256(struct.pack("<I", vtype) + raw).hexdigest()
        if vtype == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", raw)
            fields[shown] = Field(vtype, raw[12:], item_type, count)
        else:
            fields[shown] = Field(vtype, raw)
        if shown in want and isinstance(value, bytes):
            try:
                strings[shown] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise c.fail(f"{shown} is not UTF-8 text") from None
        if key == b"general.alignment":
            if vtype != 4 or not value or int(value) & (int(value) - 1):
                raise c.fail("general.alignment must be a power of two stored as uint32")
            alignment = int(value)
    table_offset = c.pos
    infos = []
    names: set[bytes] = set()
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        shown = name.decode("utf-8", "replace")
        if len(name) >= MAX_NAME:
            raise c.fail(f"tensor name {shown!r} is longer than llama.cpp allows ({MAX_NAME - 1} bytes)")
        if name in names:
            raise c.fail(f"tensor {shown!r} appears twice")
        names.add(name)
        n_dims = c.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {shown!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(c.u64() for _ in range(n_dims))
        ttype, offset = c.u32(), c.u64()
        infos.append((shown, shape, ttype, offset))
    data_offset = c.pos + (-c.pos % alignment)
    tensors, expected = [], 0
    for name, shape, ttype, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CorruptFileError(f"{c.path}: tensor {name!r} has unknown type {ttype}; the GGUF is corrupt or "
                                   "newer than this edgepack (upgrade llama-cpp-python and edgepack)") from None
        n = 1
        for d in shape:
            n *= d
        if n >= 1 << 63 or shape[0] % block:
            raise CorruptFileError(f"{c.path}: tensor {name!r} has an impossible shape {list(shape)} for "
                                   f"{qtype.name}; the GGUF is corrupt, re-download it")
        nbytes = n // block * type_size
        if offset != expected:  # llama.cpp requires the tensors in order, each padded to the alignment
            raise CorruptFileError(f"{c.path}: tensor {name!r} claims data offset {offset}, expected {expected}; "
                                   "the GGUF is corrupt, re-download it")
        start = data_offset + offset
        if start + nbytes > size:
            raise CorruptFileError(f"{c.path}: tensor {name!r} ends at byte {start + nbytes} but the file has {size}; "
                                   "the GGUF is truncated or lies about its sizes, re-download it")
        tensors.append(TensorInfo(name, shape, int(qtype), start, nbytes))
        expected = offset + nbytes + (-nbytes % alignment)
    return Layout(version, n_kv, alignment, data_offset, tuple(tensors), strings, table_offset, tokenizer, fields,
                  c.path)


# Fields in which a draft's tokenizer may differ from its target's. A draft never turns text into ids
# itself: it is fed the target's ids and proposes ids. So what must match is what an id means
# (tokens, their types, merges, pre-tokenizer, special ids); the flags that only steer how a text
# becomes ids (bos/eos added, a leading space) do not. llama.cpp's converter writes add_space_prefix
# and add_eos_token where edgepack's leaves them out, for the same tokenizer.
_TOKENIZER_FREE = frozenset({"tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                             "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"})


def tokenizer_difference(a: dict[str, str], b: dict[str, str]) -> str | None:
    """The first tokenizer field (vocabulary, merges, special ids, pre-tokenizer) in which two GGUFs'
    ``Layout.tokenizer`` differ, for a draft and its target."""
    for key in sorted((set(a) | set(b)) - _TOKENIZER_FREE):
        if a.get(key) != b.get(key):
            return key
    return None
