"""Bundles split to a store's part size: llama.cpp's split GGUF, written in the converter's one pass.

The parts must load through packager.load and llama.cpp's own tools from the first part,
decode what the whole file decodes, and be byte-identical to what llama.cpp's
``llama-gguf-split --split --split-max-size`` writes from the whole file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import packager
from packager.bundle.verify import read_bundle, verify
from packager.convert.gguf.parts import GGUFParts, TensorInfo, part_paths
from packager.errors import ConversionError, PartSizeError
from packager.formats.gguf import SPLIT_UNIT, padded, split_layout

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
PROMPT = "Write one sentence about the sea."


def pack(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def packed(*args: object) -> Path:
    r = pack("model", *args, "--json")
    assert r.returncode == 0, r.stderr
    return Path(json.loads(r.stdout)["path"])


def model_files(bundle: Path) -> list[Path]:
    return sorted((bundle / "model").glob("*.gguf"))


def greedy(bundle: Path) -> str:
    with packager.load(bundle) as m:
        return m.generate(PROMPT, max_tokens=24)


# --- the layout rule, pure -------------------------------------------------------------------

def test_layout_follows_gguf_splits_rule_and_caps_every_file():
    tensors = [("a", 3_000_000), ("b", 1_500_001), ("c", 1_000_000), ("d", 2_999_990), ("e", 10)]
    layout = split_layout(tensors, part_bytes=4_600_000, meta_bytes=500_000)
    assert layout.max_tensor_bytes == 4 * SPLIT_UNIT  # 4.1 MB left, rounded down to whole MB
    assert layout.parts == (("a",), ("b", "c"), ("d", "e"))  # a+b would be 4_500_032 > 4 MB
    sizes = dict(tensors)
    for part in layout.parts:
        assert sum(padded(sizes[n]) for n in part) <= layout.max_tensor_bytes
    assert layout.gguf_split_command.startswith("llama-gguf-split --split --split-max-size 4M ")


def test_part_smaller_than_largest_tensor_names_it_and_the_size_that_works():
    with pytest.raises(PartSizeError, match=r"tensor big alone is 5\.0 MB.*smallest part size that works is 6MB"):
        split_layout([("small", 10), ("big", 5_000_000)], part_bytes=5_300_000, meta_bytes=400_000)
    assert split_layout([("small", 10), ("big", 5_000_000)], part_bytes=6_000_000, meta_bytes=400_000).parts


def test_parts_writer_refuses_bytes_out_of_order(tmp_path):
    tensors = [TensorInfo("a", (4, 8), 0, 128), TensorInfo("b", (8,), 0, 32)]
    out = GGUFParts(tmp_path / "m.gguf", b"", 0, tensors)
    with pytest.raises(ConversionError, match="out of order"):
        out.write("b", bytes(32))
    out.abort()
    assert part_paths(tmp_path / "m.gguf", 3)[2].name == "m-00003-of-00003.gguf"


# --- packing, end to end (tiny random Qwen2 with Qwen2's real tokenizer) ------------------------

@pytest.fixture(scope="module")
def too_small(tiny_qwen2, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("too-small")
    return pack("model", tiny_qwen2, "--quant", "Q8_0", "--part-size", "1MB", "-o", out), out


@pytest.fixture(scope="module")
def smallest_part(too_small) -> int:
    """The smallest part size (MB) the refusal names: the token embedding (most of this tiny model)
    and the metadata in the first part, the 2 layers in the second."""
    return int(too_small[0].stderr.split("smallest part size that works is ")[1].split("MB")[0])


@pytest.fixture(scope="module")
def whole_and_split(tiny_qwen2, smallest_part, tmp_path_factory) -> tuple[Path, Path, int]:
    whole = packed(tiny_qwen2, "--quant", "Q8_0", "-o", tmp_path_factory.mktemp("whole"))
    split = packed(tiny_qwen2, "--quant", "Q8_0", "--part-size", f"{smallest_part}MB",
                   "-o", tmp_path_factory.mktemp("split"))
    return whole, split, smallest_part * SPLIT_UNIT


def test_split_bundle_holds_parts_within_the_size_and_decodes_as_the_whole(whole_and_split):
    whole, split, part = whole_and_split
    files = model_files(split)
    manifest = json.loads((split / "manifest.json").read_text())
    assert len(files) >= 2
    assert [f.name for f in files] == manifest["split"]["parts"]
    assert manifest["model_file"] == f"model/{files[0].name}" and files[0].name.endswith(f"-00001-of-{len(files):05d}.gguf")
    assert all(f.stat().st_size <= part for f in files), [f.stat().st_size for f in files]
    assert sum(f.stat().st_size for f in files) > model_files(whole)[0].stat().st_size  # each part has a header
    assert verify(split) == []
    assert read_bundle(split).model_bytes == sum(f.stat().st_size for f in files)  # what pack bench reports
    assert greedy(split) == greedy(whole)


def test_a_changed_or_missing_part_fails_verification(whole_and_split, tmp_path):
    import shutil

    _, split, _ = whole_and_split
    copy = Path(shutil.copytree(split, tmp_path / "b"))
    last = model_files(copy)[-1]
    with open(last, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert verify(copy) == [f"model/{last.name}: changed (sha256 differs from the manifest)"]
    last.unlink()
    r = pack("run", copy, "hi", "--max-tokens", "2")
    assert r.returncode != 0 and f"model/{last.name}" in r.stderr


def test_part_size_below_the_largest_tensor_is_one_line_exit_2(too_small, whole_and_split):
    r, out = too_small
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert "token_embd.weight" in lines[-1] and "smallest part size that works is" in lines[-1], r.stderr
    assert [line for line in lines if line.startswith("error")] == [lines[-1]]
    # Nothing written: no bundle, no partial directory (the run's lock file may stay, as after any run).
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []
    assert len(model_files(whole_and_split[1])) == 2  # and the size it names does work


def test_target_part_size_splits_by_default_and_no_split_keeps_one_file(tiny_qwen2, smallest_part, tmp_path):
    profile = re.sub(r'(?m)^part_size = ".*"$', f'part_size = "{smallest_part}MB"',
                     (ROOT / "targets" / "android-flagship.toml").read_text())
    assert f'part_size = "{smallest_part}MB"' in profile
    target = tmp_path / "small-parts.toml"
    target.write_text(profile.replace('name = "android-flagship"', 'name = "small-parts"'))
    by_default = packed(tiny_qwen2, "--target", target, "--quant", "Q8_0", "-o", tmp_path / "a")
    assert len(model_files(by_default)) >= 2
    one = packed(tiny_qwen2, "--target", target, "--quant", "Q8_0", "--no-split", "-o", tmp_path / "b")
    assert len(model_files(one)) == 1 and "split" not in json.loads((one / "manifest.json").read_text())
    both = pack("model", tiny_qwen2, "--part-size", "60MB", "--no-split", "-o", tmp_path / "c")
    assert both.returncode == 2 and "--no-split" in both.stderr


# --- llama.cpp's own tools as the oracle (built from the vendored source: ~6 min once) --------

def _gguf_split_parts(whole_gguf: Path, max_tensor_bytes: int, out: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.llama_tools import llama_tool

    out.mkdir()
    subprocess.run([llama_tool("llama-gguf-split"), "--split", "--split-max-size", f"{max_tensor_bytes // SPLIT_UNIT}M",
                    whole_gguf, out / "model"], check=True, capture_output=True, timeout=300)
    return sorted(out.glob("*.gguf"))


def _loads_in_llama_bench(first_part: Path) -> None:
    from benchmarks.llama_tools import llama_tool

    r = subprocess.run([llama_tool("llama-bench"), "-m", first_part, "-p", "8", "-n", "4", "-r", "1", "-t", "2", "-o", "json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(r.stdout)  # one record for the prompt test, one for generation
    assert [(x["n_prompt"], x["n_gen"]) for x in runs] == [(8, 0), (0, 4)] and all(x["avg_ts"] > 0 for x in runs)


@pytest.mark.slow
def test_converted_parts_are_byte_identical_to_llama_gguf_split(whole_and_split, tmp_path):
    whole, split, _ = whole_and_split
    record = json.loads((split / "manifest.json").read_text())["split"]
    theirs = _gguf_split_parts(model_files(whole)[0], record["max_tensor_bytes"], tmp_path / "theirs")
    ours = model_files(split)
    assert len(theirs) == len(ours)
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from llama-gguf-split's {b.name}"
    _loads_in_llama_bench(ours[0])


@pytest.mark.slow
def test_a_gguf_source_is_split_as_llama_gguf_split_splits_it(smollm2_gguf, tmp_path):
    """A GGUF source bundled as it is goes through split_gguf (no converter): the same parts."""
    bundle = packed(smollm2_gguf, "--quant", "Q4_1", "--part-size", "40MB", "-o", tmp_path / "out")
    record = json.loads((bundle / "manifest.json").read_text())["split"]
    ours = model_files(bundle)
    assert len(ours) >= 3 and all(p.stat().st_size <= 40 * SPLIT_UNIT for p in ours)
    theirs = _gguf_split_parts(smollm2_gguf, record["max_tensor_bytes"], tmp_path / "theirs")
    assert [p.read_bytes() == q.read_bytes() for p, q in zip(ours, theirs)] == [True] * len(theirs)
    assert len(ours) == len(theirs)
    _loads_in_llama_bench(ours[0])
    with packager.load(bundle) as m:
        split_text = m.generate(PROMPT, max_tokens=24)
    whole = packed(smollm2_gguf, "--quant", "Q4_1", "-o", tmp_path / "whole")
    assert split_text == greedy(whole)


# --- ONNX: external data in several files ------------------------------------------------------

def test_onnx_data_in_parts_loads_and_decodes_as_one_file(tiny_qwen2, tmp_path):
    whole = packed(tiny_qwen2, "--target", "web", "-o", tmp_path / "whole")
    split = packed(tiny_qwen2, "--target", "web", "--part-size", "20MB", "-o", tmp_path / "split")
    data = sorted((split / "model").glob("model.onnx.data*"))
    assert len(data) >= 2 and [p.name for p in data] == ["model.onnx.data"] + [
        f"model.onnx.data.{i}" for i in range(2, len(data) + 1)]
    assert all(p.stat().st_size <= 20 * SPLIT_UNIT for p in data)
    # The same bytes, less the page-alignment padding a file's start does not need.
    assert 0 <= (whole / "model" / "model.onnx.data").stat().st_size - sum(p.stat().st_size for p in data) < 4096 * len(data)
    assert verify(split) == []
    graph = (split / "model" / "model.onnx").stat().st_size
    assert read_bundle(split).model_bytes == graph + sum(p.stat().st_size for p in data)

    def chat(bundle: Path) -> str:
        with packager.load(bundle, execution_provider="cpu") as m:
            return m.chat([{"role": "user", "content": PROMPT}], max_tokens=24)

    assert chat(split) == chat(whole)


def test_onnx_part_size_below_the_largest_initializer_is_one_line_exit_2(tiny_qwen2, tmp_path):
    r = pack("model", tiny_qwen2, "--target", "web", "--part-size", "5MB", "-o", tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "lm_head.weight_Q4" in lines[-1] and "smallest part size that works is" in lines[-1]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_onnx_data_written_without_pwrite_is_the_same(tiny_qwen2, tmp_path, monkeypatch):
    """Windows has no os.pwrite: the converter's seek-and-write under a lock writes the same bytes, in parts too."""
    from packager.convert.onnx.converter import convert
    from packager.source.resolver import resolve

    src = resolve(str(tiny_qwen2), quiet=True)
    with_pwrite = convert(src, tmp_path / "a", quiet=True, part_bytes=20 * SPLIT_UNIT)
    monkeypatch.delattr(os, "pwrite")
    without = convert(src, tmp_path / "b", quiet=True, part_bytes=20 * SPLIT_UNIT)
    names = sorted(p.name for p in with_pwrite.files)
    assert names == sorted(p.name for p in without.files) and any(n.endswith(".data.2") for n in names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
