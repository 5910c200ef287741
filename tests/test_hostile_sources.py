"""Sources that lie or try to run code: refused with one clear line, nothing left behind, no code run.

- GGUFs whose header lies (counts, offsets, sizes, types, truncation) as `pack model`
  sources; llama.cpp itself is asked about the same files in a subprocess.
- A pickle `.bin` that writes a marker file when unpickled.
- A checkpoint whose auto_map points at a module that writes a marker when imported.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

import fuzzkit  # noqa: E402

from packager.errors import CorruptFileError  # noqa: E402
from packager.source.gguf_check import check_layout  # noqa: E402
from packager.spec.gguf import spec_from_gguf  # noqa: E402

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


def pack(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=600)


def assert_refused(r: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    leftovers = list(out.iterdir()) if out.exists() else []
    assert not [p for p in leftovers if (p / "manifest.json").exists() or ".partial-" in p.name], leftovers


# -- the header walk is a GGUF reader ----------------------------------------------------------

def test_the_header_walk_reads_what_gguf_py_reads(smollm2_gguf):
    # spec/gguf.py and the tests' ggufview read GGUFs through check_layout's fields, not GGUFReader
    # (20 s for a 150k-token vocabulary): on a real file, every value and tensor must come out the same.
    import gguf
    import numpy as np

    import ggufview

    reader = gguf.GGUFReader(smollm2_gguf)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    layout = check_layout(smollm2_gguf)
    assert list(layout.fields) == list(theirs)  # every key, in the file's order
    assert {k: f.contents() for k, f in layout.fields.items()} == theirs
    assert {k: f.type for k, f in layout.fields.items()} == {k: int(reader.fields[k].types[0]) for k in theirs}
    assert ggufview.fields(smollm2_gguf) == theirs
    ours = ggufview.tensors(smollm2_gguf)
    assert list(ours) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        o = ours[t.name]
        assert (o.tensor_type, list(o.shape), o.n_bytes, o.n_elements) == \
            (t.tensor_type, [int(d) for d in t.shape], int(t.n_bytes), int(t.n_elements)), t.name
        assert o.data.shape == np.asarray(t.data).shape and o.data.dtype == np.asarray(t.data).dtype, t.name
        assert o.data.tobytes() == np.asarray(t.data).tobytes(), t.name


# -- GGUFs that lie -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lying(smollm2_gguf, tmp_path_factory) -> dict[str, Path]:
    return fuzzkit.lying_ggufs(smollm2_gguf, tmp_path_factory.mktemp("lying"))


NEEDLES = {
    "tensor-count-too-high": "more than the file has left",
    "tensor-count-huge": "more than the file can hold",
    "kv-count-huge": "more than the file can hold",
    "token-array-count-huge": "'tokenizer.ggml.tokens' claims",
    "tensor-offset-past-end": "claims data offset",
    "tensor-dims-past-end": "but the file has",
    "tensor-type-unknown": "unknown type 200",
    "tensor-ndims-too-many": "9 dimensions",
    "truncated-half": "but the file has",
}


@pytest.mark.parametrize("name", list(NEEDLES))
def test_lying_gguf_is_a_corrupt_file_error(lying, name):
    with pytest.raises(CorruptFileError, match=NEEDLES[name]) as e:
        spec_from_gguf(lying[name])
    assert "\n" not in str(e.value) and ("re-download" in str(e.value) or "upgrade" in str(e.value))


@pytest.mark.parametrize("name", ["tensor-dims-past-end", pytest.param("token-array-count-huge", marks=pytest.mark.slow),
                                  pytest.param("tensor-type-unknown", marks=pytest.mark.slow)])
def test_pack_model_refuses_a_lying_gguf_source(lying, name, tmp_path):
    out = tmp_path / "dist"
    assert_refused(pack("model", lying[name], "-o", out, "-q"), out, NEEDLES[name])


LLAMA_LOAD = """
import sys, llama_cpp
try:
    llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
    print("LOADED")
except ValueError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDLES))
def test_llama_cpp_itself_refuses_the_lying_gguf_without_crashing(lying, name):
    """What llama.cpp (as llama-cpp-python 0.3.36 vendors it) does with the same files: its
    gguf reader and model loader refuse each one cleanly ("failed to read tensor info",
    "data is not within the file bounds", ...); none crashes the process."""
    r = subprocess.run([sys.executable, "-c", LLAMA_LOAD, str(lying[name])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("REFUSED"), (r.returncode, r.stdout, r.stderr[-500:])


# -- pickle that runs code ------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_checkpoint(tiny_qwen2: Path, dst: Path, marker: Path, *, keep_safetensors: bool) -> Path:
    dst.mkdir()
    for f in tiny_qwen2.iterdir():
        if f.name.endswith(".safetensors"):
            if keep_safetensors:
                (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    return dst


def test_crafted_pickle_is_refused_and_never_unpickled(tmp_path, tiny_qwen2):
    marker = tmp_path / "PWNED"
    src = _pickle_checkpoint(tiny_qwen2, tmp_path / "src", marker, keep_safetensors=False)
    out = tmp_path / "dist"
    assert_refused(pack("model", src, "-o", out, "-q"), out, "--allow-pickle")
    assert not marker.exists()


def test_crafted_pickle_with_allow_pickle_is_still_not_run(tmp_path, tiny_qwen2):
    """--allow-pickle loads with torch's weights_only unpickler, which refuses os.system."""
    marker = tmp_path / "PWNED"
    src = _pickle_checkpoint(tiny_qwen2, tmp_path / "src", marker, keep_safetensors=False)
    out = tmp_path / "dist"
    assert_refused(pack("model", src, "-o", out, "-q", "--allow-pickle"), out, "not a loadable weights-only checkpoint")
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_pickle_beside_safetensors_is_ignored(tmp_path, tiny_qwen2):
    marker = tmp_path / "PWNED"
    src = _pickle_checkpoint(tiny_qwen2, tmp_path / "src", marker, keep_safetensors=True)
    r = pack("model", src, "--quant", "Q8_0", "-o", tmp_path / "dist", "-q")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


# -- auto_map: the checkpoint's own code ---------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _remote_code_checkpoint(tiny_qwen2: Path, dst: Path, marker: Path, *, native_arch: bool) -> Path:
    dst.mkdir()
    for f in tiny_qwen2.iterdir():
        if f.name.endswith(".safetensors"):
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    (dst / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                       "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if not native_arch:
        cfg["architectures"], cfg["model_type"] = ["EvilForCausalLM"], "evil"
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


def test_checkpoint_that_needs_its_own_code_is_refused(tmp_path, tiny_qwen2):
    marker = tmp_path / "PWNED"
    src = _remote_code_checkpoint(tiny_qwen2, tmp_path / "src", marker, native_arch=False)
    out = tmp_path / "dist"
    assert_refused(pack("model", src, "-o", out, "-q"), out, "never runs")
    assert not marker.exists()


def test_auto_map_beside_a_native_architecture_is_ignored_never_imported(tmp_path, tiny_qwen2):
    """Like Phi-3.5-mini: auto_map points at custom code, the architecture is converted natively;
    the tokenizer check loads the tokenizer with trust_remote_code=False."""
    marker = tmp_path / "PWNED"
    src = _remote_code_checkpoint(tiny_qwen2, tmp_path / "src", marker, native_arch=True)
    r = pack("model", src, "--quant", "Q8_0", "-o", tmp_path / "dist", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    man = json.loads(r.stdout)["manifest"] if "manifest" in json.loads(r.stdout) else json.loads(
        (Path(json.loads(r.stdout)["path"]) / "manifest.json").read_text())
    assert any("never run" in w for w in man["warnings"])
    assert man["tokenizer_check"]["status"] == "passed"


# -- a config that lies about its weights ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("edit, needle", [
    ({"num_hidden_layers": 1}, "config.json implies blk.{n}.attn_norm.weight ({m} layers), which the weights do not have"),
    ({"intermediate_size": 2}, "in the weights but config.json implies"),
])
def test_a_config_that_disagrees_with_the_weights_writes_nothing(tmp_path, tiny_qwen2, fmt, edit, needle):
    """More layers or another FFN width in config.json than in the weights: this used to give a bundle
    that `pack verify` called verified and llama.cpp could not load. Now one line, exit 1, nothing written."""
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    for key, delta in edit.items():
        cfg[key] = cfg[key] + delta if key == "num_hidden_layers" else cfg[key] * delta
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "dist"
    r = pack("model", src, "--format", fmt, "-o", out, "-q")
    assert_refused(r, out, needle.format(n=n, m=n + 1))


@pytest.mark.parametrize("fmt, written, says", [
    ("gguf", lambda result: result.path, "llama.cpp cannot load the GGUF just written; nothing was published"),
    ("onnx", lambda result: result.path / "model.onnx.data",
     "ONNX Runtime cannot load the model just written.*nothing was published"),
])
def test_a_model_its_runtime_cannot_load_is_never_published(tmp_path, tiny_qwen2, monkeypatch, fmt, written, says):
    """The last gate before the rename: the written model is opened by the bundle's own runtime."""
    import importlib

    from packager.errors import ConversionError
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    packer = importlib.import_module(f"packager.pack.{fmt}")
    real = packer.convert

    def convert_then_damage(*args, **kw):
        result = real(*args, **kw)
        damaged = written(result)
        with open(damaged, "r+b") as f:  # a writer bug: the weights cut short
            f.truncate(damaged.stat().st_size // 2)
        return result

    monkeypatch.setattr(packer, "convert", convert_then_damage)
    out = tmp_path / "dist"
    with pytest.raises(ConversionError, match=says):
        pack_model(str(tiny_qwen2), PackOptions(quant="Q8_0" if fmt == "gguf" else None, format=fmt, output=out,
                                                quiet=True))
    assert not [p for p in out.iterdir() if (p / "manifest.json").exists() or ".partial-" in p.name]
