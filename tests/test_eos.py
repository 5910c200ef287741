"""Conflicting end-of-sequence sources are resolved, not refused (packager/spec/eos.py).

Fixtures are written the way transformers writes them: a tokenizer loaded and saved with
``save_pretrained`` after its eos_token was set to ``<|endoftext|>`` (what it writes after
loading a GGUF), next to a generation_config.json that ends at ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ggufview
import packager
from packager.spec.eos import resolve_eos

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


def pack(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=900)


def conflicting(model_dir: Path, dest: Path, *, tokenizer_eos: str, generation_eos: int | list[int]) -> Path:
    """A copy of ``model_dir`` whose tokenizer files (saved by transformers) name ``tokenizer_eos``
    while generation_config.json ends at ``generation_eos``."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                    "vocab.json", "merges.txt"))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.eos_token = tokenizer_eos
    tok.save_pretrained(dest)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": generation_eos}))
    assert json.loads((dest / "tokenizer_config.json").read_text())["eos_token"] == tokenizer_eos
    return dest


@pytest.mark.parametrize("fixture, eos, text", [
    ("tiny_qwen2", 151645, "<|im_end|>"), ("tiny_llama", 128009, "<|eot_id|>"), ("smollm2_hf", 2, "<|im_end|>"),
])
def test_eos_is_the_token_that_ends_the_assistants_turn(fixture, eos, text, request):
    choice = resolve_eos(request.getfixturevalue(fixture))
    assert (choice.eos_id, choice.eos_text) == (eos, text)
    assert choice.sources["chat template"] == [eos] and choice.eog_ids[0] == eos
    assert "generation_config.json" in choice.sources


def test_conflicting_qwen_eos_packs_in_both_formats_and_says_what_it_chose(tiny_qwen2, tmp_path):
    """tokenizer_config.json and special_tokens_map.json say <|endoftext|> (151643), generation_config
    151645: `pack model` used to refuse ("the GGUF's eos token 151643 ... is not one of
    generation_config.json's eos ids [151645]") with no useful way forward."""
    src = conflicting(tiny_qwen2, tmp_path / "src", tokenizer_eos="<|endoftext|>", generation_eos=151645)
    for fmt in ("gguf", "onnx"):
        out = tmp_path / f"dist-{fmt}"
        r = pack("model", src, "--format", fmt, *(["--quant", "Q8_0"] if fmt == "gguf" else []), "-o", out, "--json")
        assert r.returncode == 0, r.stderr[-1500:]
        # transformers 5's save_pretrained writes no special_tokens_map.json: only the files there disagree
        disagreed = ["tokenizer_config.json"] + ["special_tokens_map.json"] * (src / "special_tokens_map.json").exists()
        assert f"eos sources disagree ({', '.join(disagreed)}" in r.stderr, r.stderr
        man = json.loads(r.stdout)
        assert man["eos"]["eos_id"] == 151645 and man["eos"]["eos_text"] == "<|im_end|>"
        assert man["eos"]["eog_ids"] == [151645, 151643]
        assert set(man["eos"]["disagreed"]) == set(disagreed)
        bundle = Path(man["path"]) if "path" in man else next(p for p in out.iterdir() if (p / "manifest.json").exists())
        if fmt == "gguf":
            assert ggufview.fields(next(bundle.glob("model/*.gguf")))["tokenizer.ggml.eos_token_id"] == 151645
            assert man["tokenizer_check"]["status"] == "passed" and man["tokenizer_check"]["eos_id"] == 151645
        else:
            genai = json.loads((bundle / "model" / "genai_config.json").read_text())
            assert genai["model"]["eos_token_id"] == [151645, 151643]


def test_a_config_eos_nothing_else_ends_with_is_refused_naming_the_file(tiny_qwen2, tmp_path):
    """Only an inconsistent choice is refused, and the message says what to change in which file."""
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151646]}))
    r = pack("model", src, "--quant", "Q8_0", "-o", tmp_path / "dist", "-q")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "remove 151646 from eos_token_id in generation_config.json" in r.stderr, r.stderr


def test_an_eos_id_outside_the_vocabulary_is_refused(tiny_qwen2, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 999_999}))
    r = pack("model", src, "--quant", "Q8_0", "-o", tmp_path / "dist", "-q")
    assert r.returncode == 1 and "eos id 999999 is not a token of the vocabulary" in r.stderr, r.stderr
    assert "generation_config.json" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_greedy_chat_stops_at_the_end_of_the_turn_with_conflicting_eos(smollm2_hf, tmp_path, fmt):
    """SmolLM2 (real weights) with its tokenizer's eos rewritten to <|endoftext|> (0) and
    generation_config ending at <|im_end|> (2): the packed bundle's greedy reply ends where the
    assistant's turn ends, in both formats."""
    src = conflicting(smollm2_hf, tmp_path / "src", tokenizer_eos="<|endoftext|>", generation_eos=2)
    out = tmp_path / "dist"
    r = pack("model", src, "--format", fmt, *(["--quant", "Q8_0"] if fmt == "gguf" else []), "-o", out, "-q")
    assert r.returncode == 0, r.stderr[-1500:]
    bundle = next(p for p in out.iterdir() if (p / "manifest.json").exists())
    with packager.load(bundle, n_threads=2) as m:
        s = m.chat_stream([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                          max_tokens=200, temperature=0.0)
        reply = "".join(s)
    assert s.finish_reason == "stop", (s.finish_reason, reply)
    assert "Paris" in reply and "<|im" not in reply and "<|endoftext|>" not in reply, reply
