"""Bundles that were tampered with or try to escape: named or refused, nothing outside read or written.

Outside the bundle sit FIFOs where an escaping path leads: opening one for reading
blocks until a writer comes, so a check that read anything outside would hang
(each check runs in a subprocess with a timeout) instead of passing. Every file
under the test's directory is listed with its size and mtime before and after:
nothing may be written either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import packager
from packager.bundle.verify import read_bundle, verify
from packager.bundle.writer import BundleWriter
from packager.errors import VerificationError

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

import fuzzkit  # noqa: E402

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
LOAD = """
import sys, packager
from packager.errors import EdgepackError
try:
    packager.load(sys.argv[1], verify=True, n_threads=1, n_ctx=64).close()
except EdgepackError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
print("LOADED")
"""


def pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def load_in_child(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(bundle)], capture_output=True, text=True, env=ENV, timeout=120)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _link_or_copy(src: str, dst: str) -> None:
    # The weights are hard-linked (fast; never written through: tests that change them copy first).
    try:
        if src.endswith(".gguf"):
            return os.link(src, dst)
    except OSError:  # another filesystem
        pass
    shutil.copy2(src, dst)


@pytest.fixture
def bundle(smollm2_bundle, tmp_path) -> Path:
    """A copy of a real bundle with two more small files (so one can be removed and one changed)."""
    b = tmp_path / "b"
    shutil.copytree(smollm2_bundle, b, copy_function=_link_or_copy)
    man = json.loads((b / "manifest.json").read_text())
    for name, text in {"LICENSE": "license text\n", "NOTICE": "notice\n"}.items():
        (b / name).write_text(text)
        man["files"].append({"path": name, "bytes": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()})
    (b / "manifest.json").write_text(json.dumps(man))
    assert verify(b, weights=False) == []
    return b


def test_pack_verify_and_load_name_every_changed_added_and_removed_file(bundle, smollm2_bundle, tmp_path):
    model = next((bundle / "model").glob("*.gguf"))
    model_rel = f"model/{model.name}"
    shutil.copyfile(smollm2_bundle / model_rel, model.with_suffix(".copy"))
    model.with_suffix(".copy").replace(model)  # its own inode: the change below stays in this copy
    (bundle / "README.md").write_text("tampered card\n")
    (bundle / "NOTICE").unlink()
    (bundle / "extra.py").write_text("print('not from the packer')\n")
    (tmp_path / "elsewhere").mkdir()
    (bundle / "model" / "more").symlink_to(tmp_path / "elsewhere")  # an added link to a directory outside
    with open(model, "r+b") as f:  # same size, one byte of the weights changed
        f.seek(-7, os.SEEK_END)
        byte = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x5A]))
    expected = {"README.md: changed", "NOTICE: missing", "extra.py: added", "model/more: added", f"{model_rel}: changed"}

    r = pack("verify", bundle)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    for want in expected:
        assert sum(line.startswith(f"{bundle}: {want}") for line in lines) == 1, (want, r.stderr)
    assert "LICENSE" not in r.stderr and "Traceback" not in r.stderr

    j = json.loads(pack("verify", bundle, "--json").stdout)
    assert not j["ok"] and {next(w for w in expected if p.startswith(w)) for p in j["problems"]} == expected

    with pytest.raises(VerificationError) as e:
        packager.load(bundle, verify=True)
    assert {next(w for w in expected if p.startswith(w)) for p in e.value.problems} == expected
    for want in expected:
        assert want in str(e.value)
    with pytest.raises(VerificationError) as e:  # without verify=True the weights' bytes are not hashed
        packager.load(bundle)
    assert {next((w for w in expected if p.startswith(w)), p) for p in e.value.problems} == expected - {f"{model_rel}: changed"}


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _set(bundle: Path, key: str, value: str) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    if key == "files":
        man["files"].append({"path": value, "bytes": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"})
    else:
        man[key] = value
    (bundle / "manifest.json").write_text(json.dumps(man))


def _escape(kind: str, bundle: Path, outside: Path) -> str:
    """Make ``bundle`` reach for ``outside`` one way; return what the refusal says."""
    secret = _fifo(outside / "secret")
    model = next((bundle / "model").glob("*.gguf"))
    if kind == "absolute-path":
        _set(bundle, "files", str(secret))
    elif kind == "dotdot-path":
        _set(bundle, "files", "../outside/secret")
    elif kind == "dotdot-inside-path":
        _set(bundle, "files", "model/../../outside/secret")
    elif kind == "dotdot-model-file":
        _set(bundle, "model_file", "../outside/secret")
    elif kind == "file-symlink":
        (bundle / "README.md").unlink()
        (bundle / "README.md").symlink_to(secret)
        return "README.md: is a link"
    elif kind == "dir-symlink":  # the model directory swapped for one outside, holding the same name
        _fifo(outside / "model" / model.name)
        shutil.rmtree(bundle / "model")
        (bundle / "model").symlink_to(outside / "model")
        return f"model/{model.name}: is a link"
    elif kind == "manifest-symlink":
        (bundle / "manifest.json").rename(outside / "manifest.json")
        (bundle / "manifest.json").symlink_to(secret)
        return "manifest.json is a link"
    return "unsafe path"


ESCAPES = ["absolute-path", "dotdot-path", "dotdot-inside-path", "dotdot-model-file", "file-symlink", "dir-symlink",
           "manifest-symlink"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_escaping_bundles_are_refused_and_nothing_outside_is_read_or_written(bundle, tmp_path, kind):
    outside = tmp_path / "outside"
    needle = _escape(kind, bundle, outside)
    before = snapshot(tmp_path)

    r = pack("verify", bundle)  # a read of a FIFO outside would hang here: TimeoutExpired
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    loaded = load_in_child(bundle)
    assert loaded.returncode == 1 and loaded.stdout.startswith("VerificationError") and needle in loaded.stdout, (
        loaded.stdout, loaded.stderr[-500:])
    r = pack("run", bundle, "hi", "-n", "2")
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    assert snapshot(tmp_path) == before  # nothing written anywhere, inside or outside


LIES = ["tensor-type-unknown", pytest.param("tensor-dims-past-end", marks=pytest.mark.slow),
        pytest.param("truncated-half", marks=pytest.mark.slow)]


@pytest.mark.parametrize("lie", LIES)
def test_a_bundle_whose_gguf_lies_is_one_clear_error_on_load(smollm2_bundle, smollm2_gguf, tmp_path, lie):
    """A stranger's bundle can carry a lying GGUF with honest hashes: llama.cpp refuses it (see
    tests/test_hostile_sources.py) and load() says so in one BundleError, in a process that lives on."""
    lying = fuzzkit.lying_ggufs(smollm2_gguf, tmp_path / "lies", only=[lie])[lie]
    good = read_bundle(smollm2_bundle)
    with BundleWriter(tmp_path / "b") as bw:
        bw.add_file(good.manifest["model_file"], lying)
        bw.add_file("README.md", smollm2_bundle / "README.md")
        bw.commit({k: v for k, v in good.manifest.items() if k not in ("schema_version", "files")}, quiet=True)
    r = load_in_child(tmp_path / "b")
    assert r.returncode == 1 and r.stdout.startswith("BundleError") and "llama.cpp cannot load it" in r.stdout, (
        r.returncode, r.stdout, r.stderr[-500:])
    assert "\n" not in r.stdout.strip()


def test_a_huge_manifest_is_refused_without_reading_it(bundle):
    """A manifest is a few KB; one of gigabytes is refused by its size, not read into memory."""
    man = bundle / "manifest.json"
    with open(man, "r+b") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB that take no disk
    with pytest.raises(VerificationError, match="too large to be a manifest"):
        packager.load(bundle)


def _edit_manifest(bundle: Path, **runtime) -> dict:
    man = json.loads((bundle / "manifest.json").read_text())
    man["runtime"].update(runtime)
    (bundle / "manifest.json").write_text(json.dumps(man))
    return man


@pytest.mark.parametrize("field, value, says", [
    ("n_ctx", 10**9, "runtime.n_ctx = 1000000000 is over the model's own limit of 8192 tokens"),
    ("n_ctx", 4, "runtime.n_ctx = 4 is below 16 tokens"),
    ("n_threads", -3, "runtime.n_threads = -3 is outside 0..1024"),
    ("kv_type", "q3_z", "runtime.kv_type = 'q3_z' is not one of"),
])
def test_a_manifest_asking_the_impossible_is_named_before_anything_is_allocated(bundle, field, value, says):
    """An n_ctx of 10^9 used to make llama.cpp allocate for 47 s up to 20 GB of RSS, then blame the
    weights: the manifest's runtime values are checked against the model's limits first."""
    _edit_manifest(bundle, **{field: value})
    r = subprocess.run([sys.executable, "-c", "import sys, packager\npackager.load(sys.argv[1])", str(bundle)],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 1 and says in r.stderr and "pack verify" not in r.stderr, r.stderr[-800:]
    # A load option the model cannot honour names the option (a usage error of the caller).
    from packager.errors import UsageError
    _edit_manifest(bundle, n_ctx=2048, n_threads=2, kv_type="f16")
    with pytest.raises(UsageError, match="n_ctx=100000 is over the model's own limit of 8192"):
        packager.load(bundle, n_ctx=100_000)


def test_a_manifest_context_over_the_plans_memory_is_refused(bundle):
    """Within the model's limit but over what the plan's budget holds: said with the context that fits."""
    man = _edit_manifest(bundle, n_ctx=8192)
    mem, planned = man["plan"]["memory"], man["plan"]["n_ctx"]
    assert planned == 8192
    small_kv = mem["kv_cache"] * 512 // planned  # the plan as it would read for 512 tokens
    mem["total"] -= mem["kv_cache"] - small_kv
    mem["kv_cache"] = small_kv
    man["plan"].update(n_ctx=512, budget_bytes=mem["total"])  # what a 512-token plan needs, no more
    (bundle / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(VerificationError, match=r"runtime.n_ctx = 8192 needs .* GB .* use at most \d+ \(planned: 512\)"):
        packager.load(bundle)


ONNX_ESCAPE = """
import sys
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

path, location = sys.argv[1:3]
w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
for key, value in {"location": location, "offset": "0", "length": "64"}.items():
    entry = w.external_data.add()
    entry.key, entry.value = key, value
graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
open(path, "wb").write(model.SerializeToString())
try:
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    print("LOADED")
except Exception as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_onnx_external_data_outside_the_bundle_is_refused_by_onnxruntime(tmp_path, where):
    """An ONNX bundle's model.onnx (hashed, so vouched for) names its external data itself: a path
    out of the model folder would read a file the manifest never saw. onnxruntime (which genai
    runs on) refuses both kinds before opening anything; the target is a FIFO, so an open would hang."""
    pytest.importorskip("onnxruntime")
    secret = _fifo(tmp_path / "outside" / "secret")
    (tmp_path / "b" / "model").mkdir(parents=True)
    location = str(secret) if where == "absolute" else "../../outside/secret"
    r = subprocess.run([sys.executable, "-c", ONNX_ESCAPE, str(tmp_path / "b" / "model" / "model.onnx"), location],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("REFUSED") and "External data path" in r.stdout, (r.stdout, r.stderr[-500:])
