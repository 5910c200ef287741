"""One test per bug the fuzzers found in a reader: each input crashed, hung or was silently accepted before.

GGUFReader's own hang is shown too (in a subprocess with a timeout): the reason
edgepack walks a GGUF's layout itself before handing it over.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fuzzkit  # noqa: E402

from packager.bundle.verify import read_bundle, verify  # noqa: E402
from packager.bundle.writer import BundleWriter  # noqa: E402
from packager.source.safetensors import Checkpoint  # noqa: E402
from packager.errors import CorruptFileError, ProfileError, SourceError, VerificationError  # noqa: E402
from packager.spec.gguf import spec_from_gguf  # noqa: E402
from packager.plan.targets import load_target  # noqa: E402
from packager.spec.model import load_spec, spec_from_config  # noqa: E402


# -- GGUF ---------------------------------------------------------------------------------------

def _patch_array_count(src: Path, dst: Path, key: bytes, count: int) -> Path:
    data = bytearray(src.read_bytes())
    at = data.index(key) + len(key)  # then: value type u32 (ARRAY), item type u32, count u64
    struct.pack_into("<Q", data, at + 8, count)
    dst.write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def seed_gguf(tmp_path_factory) -> Path:
    return fuzzkit.tiny_model_gguf(tmp_path_factory.mktemp("g") / "seed.gguf")


def test_lying_byte_array_count_is_refused_at_once_where_ggufreader_loops(seed_gguf, tmp_path):
    bad = _patch_array_count(seed_gguf, tmp_path / "bad.gguf", b"tokenizer.ggml.precompiled_charsmap", 2**62)
    t = time.monotonic()
    with pytest.raises(CorruptFileError, match="precompiled_charsmap' claims 4611686018427387904 items"):
        spec_from_gguf(bad)
    assert time.monotonic() - t < 2  # gguf-py alone would walk 2^62 items past the end (see the slow test)


@pytest.mark.slow
def test_ggufreader_itself_hangs_on_the_lying_count(seed_gguf, tmp_path):
    bad = _patch_array_count(seed_gguf, tmp_path / "bad.gguf", b"tokenizer.ggml.precompiled_charsmap", 2**62)
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", f"import gguf; gguf.GGUFReader({str(bad)!r})"], timeout=10,
                       capture_output=True)


def _gguf(path: Path, **kv) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    base = {"llama.block_count": 1, "llama.embedding_length": 32, "llama.feed_forward_length": 64,
            "llama.attention.head_count": 4}
    base.update(kv)
    for key, value in base.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kv, needle", [
    ({"llama.block_count": "two"}, "llama.block_count must be an integer"),  # was ValueError from int()
    ({"llama.attention.head_count": 0}, "head_count must be positive"),  # was ZeroDivisionError
])
def test_gguf_hyperparameters_of_the_wrong_kind(tmp_path, kv, needle):
    with pytest.raises(CorruptFileError, match=needle):
        spec_from_gguf(_gguf(tmp_path / "m.gguf", **kv))


def test_gguf_tensor_past_the_end_of_the_file(seed_gguf, tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(seed_gguf.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="ends at byte .* but the file has"):
        spec_from_gguf(bad)


# -- safetensors ----------------------------------------------------------------------------------

def _safetensors(path: Path, header_text: bytes, data: bytes = b"\0" * 64) -> Path:
    header_text += b" " * (-len(header_text) % 8)
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)
    return path


@pytest.mark.parametrize("entry", [
    '{"dtype": [], "shape": [4], "data_offsets": [0, 16]}',  # was TypeError: unhashable type 'list'
    '{"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 16]}',  # was OverflowError from int(inf)
    '{"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}',  # a bool is not a dimension
    '{"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.5]}',  # was silently truncated
    '["F32", [4], [0, 16]]',
])
def test_safetensors_malformed_entries(tmp_path, entry):
    path = _safetensors(tmp_path / "m.safetensors", b'{"w": ' + entry.encode() + b"}")
    with pytest.raises(CorruptFileError, match="'w'"):
        Checkpoint([path])


def test_safetensors_nesting_bomb(tmp_path):  # was RecursionError from json.loads
    path = _safetensors(tmp_path / "m.safetensors", b"[" * 100_000)
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        Checkpoint([path])


# -- config.json ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config(tiny_qwen2) -> dict:
    return json.loads((tiny_qwen2 / "config.json").read_text())


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_size", float("inf"), "hidden_size must be an integer"),  # was OverflowError
    ("hidden_size", 10**400, "not plausible"),  # was OverflowError in the planner's float math
    ("vocab_size", 1.5, "vocab_size must be an integer"),  # was silently 1
    ("num_attention_heads", True, "num_attention_heads must be an integer"),
    ("max_position_embeddings", -5, "context_length must be positive"),  # was accepted
])
def test_config_size_fields_of_the_wrong_kind(config, key, value, needle):
    with pytest.raises(SourceError, match=needle):
        spec_from_config({**config, key: value})


def test_config_whole_float_is_an_integer(config):
    assert spec_from_config({**config, "hidden_size": 256.0}).hidden_size == 256


def test_config_nesting_bomb(tmp_path):  # was RecursionError
    (tmp_path / "config.json").write_text("[" * 100_000)
    with pytest.raises(SourceError, match="not valid JSON"):
        load_spec(tmp_path)


# -- target profiles --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, needle", [
    ("ram_bytes", "inf", "finite"),  # was OverflowError
    ("ram_bytes", '"99999999999999999999TiB"', "not a plausible device size"),
    ("memory_bandwidth_gbps", "nan", "finite number"),  # was accepted: NaN tokens/s in every plan
    ("compute_gflops", "inf", "finite number"),
    ("cpu_threads", "9999999999999999", "not plausible"),
])
def test_profile_numbers_that_would_poison_the_planner(tmp_path, key, value, needle):
    from packager.plan.targets import _builtin

    lines = [f"{key} = {value}" if line.startswith(key + " ") else line
             for line in _builtin()["laptop"].read_text().splitlines()]
    path = tmp_path / "t.toml"
    path.write_text("\n".join(lines))
    with pytest.raises(ProfileError, match=needle):
        load_target(path)


def test_profile_nesting_bomb(tmp_path):  # was RecursionError from tomllib
    path = tmp_path / "t.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_target(path)


# -- manifests --------------------------------------------------------------------------------------

@pytest.fixture
def bundle(tmp_path) -> Path:
    with BundleWriter(tmp_path / "b") as bw:
        bw.add_text("model/m.gguf", "weights")
        bw.commit({"model_file": "model/m.gguf"}, quiet=True)
    return tmp_path / "b"


def _rewrite(bundle: Path, **changes) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    man.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("path, needle", [
    ("a" * 5000, "too long"),  # was OSError: File name too long
    ("a/" * 3000 + "b", "too long"),
    (".", "unsafe path"),  # was accepted: the bundle directory itself
    ("a\x00b", "unsafe path"),
])
def test_manifest_paths_the_filesystem_cannot_take(bundle, path, needle):
    _rewrite(bundle, files=[{"path": path, "bytes": 1, "sha256": "0" * 64}])
    with pytest.raises(VerificationError, match=needle):
        verify(bundle)


def test_model_file_must_be_listed(bundle):  # was accepted: load() would run a file nothing vouches for
    (bundle / "model" / "other.gguf").write_text("x")
    _rewrite(bundle, model_file="model/other.gguf")
    with pytest.raises(VerificationError, match="not in the file list"):
        read_bundle(bundle)


def test_manifest_nesting_bomb(bundle):  # was RecursionError
    (bundle / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(VerificationError, match="not valid JSON"):
        verify(bundle)
