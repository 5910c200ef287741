"""`pack` end to end, as a user runs it: real conversion, real llama.cpp, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from packager.bundle.verify import verify

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


def pack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def _bundles(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if (p / "manifest.json").exists()] if out.exists() else []


@pytest.fixture(scope="module")
def qwen_bundle(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = pack("model", tiny_qwen2, "--target", "laptop", "--quant", "Q4_K_M", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    return Path(info["path"])


def test_pack_model_writes_a_verified_bundle(qwen_bundle, tiny_qwen2):
    man = json.loads((qwen_bundle / "manifest.json").read_text())
    assert qwen_bundle.name == f"{tiny_qwen2.name}-laptop"
    assert man["quant"] == "Q4_K_M" and man["format"] == "gguf"
    assert man["model_file"] == f"model/{tiny_qwen2.name}-Q4_K_M.gguf"
    assert man["tokenizer_check"]["status"] == "passed"
    assert (qwen_bundle / "LICENSE").exists() and (qwen_bundle / "README.md").exists()
    src_files = {f["path"]: f for f in man["source"]["files"]}
    import hashlib

    # hashed while converting, in one read: must equal a plain hash of the file
    assert src_files["model.safetensors"]["sha256"] == hashlib.sha256((tiny_qwen2 / "model.safetensors").read_bytes()).hexdigest()
    assert src_files["config.json"]["sha256"] == hashlib.sha256((tiny_qwen2 / "config.json").read_bytes()).hexdigest()
    assert man["runtime"]["n_ctx"] >= 512
    assert verify(qwen_bundle) == []
    r = pack("verify", qwen_bundle)
    assert r.returncode == 0 and "verified" in r.stderr


def test_pack_verify_reports_tampering(qwen_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(qwen_bundle, b)
    (b / "README.md").write_text("changed")
    r = pack("verify", b)
    assert r.returncode == 1 and "README.md: changed" in r.stderr


def test_pack_run_streams_text(qwen_bundle):
    r = pack("run", qwen_bundle, "Hello", "-n", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    import packager

    with packager.load(qwen_bundle) as m:  # the same greedy reply through the Python API
        s = m.chat([{"role": "user", "content": "Hello"}], stream=True, max_tokens=8, temperature=0.0)
        reply = "".join(s)
    assert s.n_generated >= 1 and r.stdout == reply + "\n"


def test_existing_output_refused_without_force(qwen_bundle, tiny_qwen2):
    r = pack("model", tiny_qwen2, "--quant", "Q4_K_M", "-o", qwen_bundle.parent, "-q")
    assert r.returncode == 1 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _bad_source(tmp_path: Path, tiny_qwen2: Path, how: str) -> Path:
    import shutil

    d = tmp_path / "src"
    shutil.copytree(tiny_qwen2, d)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "corrupt-header":
        with open(d / "model.safetensors", "r+b") as f:
            f.write(b"\xff" * 8)
    elif how == "truncated":
        p = d / "model.safetensors"
        os.truncate(p, p.stat().st_size - 1000)
    elif how == "unknown-arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["MambaForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,needle", [
    ("no-config", "config.json"),
    ("corrupt-header", "header claims"),
    ("truncated", "truncated"),
    ("unknown-arch", "not supported"),
])
def test_bad_source_one_line_error_no_bundle(how, needle, tmp_path, tiny_qwen2):
    src = _bad_source(tmp_path, tiny_qwen2, how)
    out = tmp_path / "dist"
    r = pack("model", src, "-o", out, "-q")
    assert r.returncode == (2 if how == "unknown-arch" else 1), r.stderr  # no converter takes it: bad input
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert _bundles(out) == []
    assert not out.exists() or [p for p in out.iterdir() if ".partial-" in p.name] == []


@pytest.mark.parametrize("args,needle", [
    (["--quant", "Q9_X"], "Q9_X"),
    (["--target", "toaster"], "unknown target"),
])
def test_usage_errors_exit_2(args, needle, tmp_path, tiny_qwen2):
    r = pack("model", tiny_qwen2, "-o", tmp_path / "dist", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert _bundles(tmp_path / "dist") == []


def test_unwritable_output(tmp_path, tiny_qwen2):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = pack("model", tiny_qwen2, "-o", blocker / "dist", "-q")
    assert r.returncode == 1 and "cannot create output directory" in r.stderr


def test_help_teaches_with_examples():
    for args in (["--help"], ["model", "--help"], ["verify", "--help"], ["run", "--help"]):
        r = pack(*args)
        assert r.returncode == 0 and "Example" in r.stdout, args


def test_default_source_is_the_embedded_smollm2(tmp_path):
    r = pack("model", "-o", tmp_path / "plain")  # the README's first command, as a person sees it
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "wrote" in r.stderr and "SmolLM2-135M-Instruct-laptop" in r.stderr
    r = pack("model", "-o", tmp_path / "dist", "--json", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert Path(info["path"]).name == "SmolLM2-135M-Instruct-laptop"
    assert info["quant"] == "Q4_1"  # fits the laptop as it is: bundled unchanged
    assert info["source"]["kind"] == "gguf"


def test_tokenizer_gate_refuses_then_skip_is_recorded(tmp_path, tiny_qwen2):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    # <|object_ref_start|> (151646) is no end-of-generation token for llama.cpp: a reply ending
    # with it would never stop.
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151646]}))
    out = tmp_path / "dist"
    r = pack("model", src, "--quant", "Q8_0", "-o", out, "-q")
    assert r.returncode == 1 and "151646" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _bundles(out) == []
    r = pack("model", src, "--quant", "Q8_0", "-o", out, "--skip-tokenizer-check", "--json", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["tokenizer_check"]["status"] == "skipped" and "151646" in man["tokenizer_check"]["error"]
    assert "skipped" in r.stderr


def test_gguf_source_requantized_from_f16(tmp_path, tiny_qwen2):
    import oracle

    f16 = oracle.reference_gguf(tiny_qwen2, "f16")
    r = pack("model", f16, "--quant", "Q4_K_M", "-o", tmp_path / "dist", "--json", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["quant"] == "Q4_K_M" and man["source"]["kind"] == "gguf"
    assert verify(Path(man["path"])) == []


def test_low_bit_gguf_not_requantized_without_consent(tmp_path, smollm2_gguf):
    out = tmp_path / "dist"
    r = pack("model", smollm2_gguf, "--quant", "Q4_K_M", "-o", out, "-q")
    assert r.returncode == 2 and "--allow-requantize" in r.stderr and _bundles(out) == []
    r = pack("model", smollm2_gguf, "--quant", "Q4_K_M", "-o", out, "--allow-requantize", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert "quality" in r.stderr  # the warning says what it costs
    assert json.loads(r.stdout)["quant"] == "Q4_K_M"


def test_preflight_refuses_when_the_disk_is_too_small(tmp_path):
    from packager.errors import PreflightError
    from packager.pack.preflight import check_disk

    with pytest.raises(PreflightError, match="not enough disk"):
        check_disk(tmp_path / "new" / "dir", 1 << 60)


def test_pickle_checkpoint_converts_only_with_allow_pickle(tmp_path, tiny_qwen2):
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_qwen2 / "model.safetensors"), src / "pytorch_model.bin")
    out = tmp_path / "dist"
    r = pack("model", src, "--quant", "Q8_0", "-o", out, "-q")
    assert r.returncode == 1 and "--allow-pickle" in r.stderr and _bundles(out) == []
    r = pack("model", src, "--quant", "Q8_0", "-o", out, "--allow-pickle", "--json", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert [f["path"] for f in man["source"]["files"] if f["path"].endswith(".bin")] == ["pytorch_model.bin"]
    assert verify(Path(man["path"])) == []


def test_imatrix_from_calibration_text_changes_the_quantization(tmp_path, tiny_qwen2, qwen_bundle):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200 + "def f(x):\n    return x * 2\n" * 50)
    r = pack("model", tiny_qwen2, "--quant", "Q4_K_M", "--imatrix-text", text, "-o", tmp_path / "dist", "--json", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["imatrix"]["text"] == "calib.txt"
    ours = next(f["sha256"] for f in man["files"] if f["path"] == man["model_file"])
    plain = json.loads((qwen_bundle / "manifest.json").read_text())
    assert ours != next(f["sha256"] for f in plain["files"] if f["path"] == plain["model_file"])


def test_low_bit_quant_gets_the_shipped_calibration_by_default(tmp_path, tiny_qwen2):
    r = pack("model", tiny_qwen2, "--quant", "IQ2_XS", "-o", tmp_path / "dist", "--json", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["quant"] == "IQ2_XS" and man["imatrix"]["text"] == "edgepack calibration.txt"


def test_imatrix_file_of_another_model_is_refused(tmp_path, tiny_qwen2):
    import gguf

    bogus = tmp_path / "other.imatrix.gguf"
    w = gguf.GGUFWriter(bogus, "llama")
    w.add_type("imatrix")
    import numpy as np

    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 7), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "dist"
    r = pack("model", tiny_qwen2, "--quant", "Q4_K_M", "--imatrix", bogus, "-o", out, "-q")
    assert r.returncode == 2 and "another model" in r.stderr, r.stderr
    assert _bundles(out) == []
