"""What cannot be packed is refused first: one line, exit 2, before any weight is read or downloaded.

`pack plan` and `pack model` read config.json alone to know whether the chosen format's converter
takes the architecture; a hub id's weights are never fetched for a model that would be refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


def pack(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=600)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _checkpoint(tiny_qwen2: Path, dst: Path, architecture: str, model_type: str | None = None,
                corrupt_weights: bool = False) -> Path:
    """tiny_qwen2's files under another architecture; with ``corrupt_weights`` its safetensors is garbage,
    so any read of a weight (or even its header) would fail with another message."""
    dst.mkdir(parents=True)
    for f in tiny_qwen2.iterdir():
        if f.is_file() and f.name != "config.json" and not (corrupt_weights and f.suffix == ".safetensors"):
            (dst / f.name).symlink_to(f)
    if corrupt_weights:
        (dst / "model.safetensors").write_bytes(b"\xff" * 4096)
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    cfg["architectures"] = [architecture]
    if model_type is not None:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_plan_refuses_an_architecture_no_converter_takes_before_reading_weights(fmt, tiny_qwen2, tmp_path):
    src = _checkpoint(tiny_qwen2, tmp_path / "foo", "FooForCausalLM", "foo", corrupt_weights=True)
    r = pack("plan", src, "--target", "laptop", "--format", fmt)
    line = one_line(r)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert f"'FooForCausalLM' is not supported by edgepack's {fmt.upper()} converter" in line
    assert "supported: " in line and "Qwen2ForCausalLM" in line and "LlamaForCausalLM" in line
    assert "pack it with" not in line  # neither format takes it


def test_plan_names_the_other_format_where_it_takes_the_architecture(tiny_qwen2, tmp_path):
    """Gemma-2's class under a model type optimum-onnx has never heard of: ONNX has no converter for it, GGUF has."""
    src = _checkpoint(tiny_qwen2, tmp_path / "gemma-ish", "Gemma2ForCausalLM", "gemma2-unknown-to-optimum")
    r = pack("plan", src, "--target", "laptop", "--format", "onnx")
    line = one_line(r)
    assert r.returncode == 2, r.stderr
    assert "'Gemma2ForCausalLM' is not supported by edgepack's ONNX converter" in line
    assert line.endswith("pack it with --format gguf instead"), line
    # and where GGUF is the format asked, nothing sends the user to an ONNX converter that lacks it too
    r = pack("plan", _checkpoint(tiny_qwen2, tmp_path / "foo", "FooForCausalLM", "foo"), "--format", "gguf")
    assert r.returncode == 2 and "pack it with" not in one_line(r), r.stderr


def test_plan_of_a_supported_architecture_still_plans(tiny_qwen2):
    r = pack("plan", tiny_qwen2, "--target", "laptop", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["format"] == "gguf"


def test_pack_model_refuses_before_reading_weights(tiny_qwen2, tmp_path):
    src = _checkpoint(tiny_qwen2, tmp_path / "foo", "FooForCausalLM", "foo", corrupt_weights=True)
    out = tmp_path / "dist"
    r = pack("model", src, "-o", out, "-q")
    line = one_line(r)
    assert r.returncode == 2 and "'FooForCausalLM' is not supported by edgepack's GGUF converter" in line, r.stderr
    assert not out.exists()


def _hub_cache(tmp_path: Path, repo: str, files: dict[str, str]) -> Path:
    """An HF hub cache holding ``repo``'s main revision with only ``files``: what the hub would have given
    after fetching them and nothing else."""
    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return cache


def test_pack_model_refuses_a_hub_id_from_its_config_before_downloading_weights(tiny_qwen2, tmp_path):
    """Offline, with only config.json in the cache: the refusal comes from config.json alone. Had pack asked
    for the snapshot first it would have failed for the missing weights instead (or, online, fetched them)."""
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    cache = _hub_cache(tmp_path, "acme/foo-tiny", {"config.json": json.dumps(cfg)})
    env = dict(ENV, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "dist"
    for command in (["model", "acme/foo-tiny", "-o", out, "-q"], ["plan", "acme/foo-tiny"]):
        r = pack(*command, env=env)
        line = one_line(r)
        assert r.returncode == 2 and "'FooForCausalLM' is not supported by edgepack's GGUF converter" in line, (
            command, r.stderr)
    assert not out.exists()
    # --quant auto and mix measure against the F16 GGUF: refused the same way, before any download
    r = pack("model", "acme/foo-tiny", "--quant", "auto", "-o", out, "-q", env=env)
    assert r.returncode == 2 and "GGUF converter" in one_line(r), r.stderr
    assert not out.exists()
