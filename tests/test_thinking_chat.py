"""Thinking models through packager.load, both formats (issue 26): chat(think=...) sets the template's switch,
a reply's reasoning is kept apart from its answer, and pack run/chat print the answer (--think shows the
reasoning too). The model is the tiny random Qwen3 with real templates from llama.cpp's models/templates:
Qwen3's (an enable_thinking switch) and a DeepSeek-R1 distill's (always thinks: its generation prompt opens
the <think> block, so the whole reply of a random model is reasoning)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import models
import packager
from packager.errors import ThinkingSwitchError
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model

pytestmark = pytest.mark.slow

TEMPLATES = {"qwen3": "Qwen-Qwen3-0.6B", "r1": "deepseek-ai-DeepSeek-R1-Distill-Llama-8B"}
MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{(template, format): bundle path} for the tiny Qwen3 with each real template."""
    out = {}
    for name, file in TEMPLATES.items():
        src = tmp_path_factory.mktemp(f"src-{name}") / "tiny-qwen3"
        shutil.copytree(models.tiny_qwen3(), src)
        cfg_path = src / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = (models.llama_cpp_src() / "models" / "templates" / f"{file}.jinja").read_text()
        cfg_path.write_text(json.dumps(cfg))
        for fmt in ("gguf", "onnx"):
            dist = tmp_path_factory.mktemp(f"dist-{name}-{fmt}")
            out[name, fmt] = pack_model(str(src), PackOptions(format=fmt, output=dist, quiet=True)).path
    return out


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_the_switch_changes_the_prompt_and_the_reply_is_the_answer(bundles, fmt):
    bundle = bundles["qwen3", fmt]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["thinking"]["switch"] == "enable_thinking"
    with packager.load(bundle, n_threads=1, n_ctx=512) as m:
        assert m.thinking.thinks and m.thinking.switch == "enable_thinking"
        off = m._chat_text(MSGS, **m.thinking.context(False))
        on = m._chat_text(MSGS, **m.thinking.context(True))
        assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")  # Qwen3's own rule
        s = m.chat(MSGS, stream=True, think=False, max_tokens=12, temperature=0.0)
        answer = "".join(s)
        assert answer and s.reasoning == "" and s.n_prompt == len(m._chat_prompt(MSGS, enable_thinking=False)[0])
        s = m.chat(MSGS, stream=True, think=True, max_tokens=12, temperature=0.0)
        "".join(s)
        assert s.n_prompt == len(m._chat_prompt(MSGS, enable_thinking=True)[0]) < len(
            m._chat_prompt(MSGS, enable_thinking=False)[0])
        with pytest.raises(packager.errors.UsageError, match="think must be"):
            m.chat(MSGS, think="yes")


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_reply_that_starts_in_reasoning_keeps_it_apart(bundles, fmt):
    with packager.load(bundles["r1", fmt], n_threads=1, n_ctx=512, deterministic=True) as m:
        assert m.thinking.thinks and m.thinking.switch is None
        ids, _ = m._chat_prompt(MSGS)
        raw = m.generate(ids, max_tokens=16, temperature=0.0)  # the same tokens, no splitting
        s = m.chat(MSGS, stream=True, max_tokens=16, temperature=0.0)
        parts = list(s.parts())
        assert {p.kind for p in parts} == {"reasoning"} and s.reasoning == raw.strip() and s.reasoning
        assert m.chat(MSGS, max_tokens=16, temperature=0.0) == ""  # the answer never holds the <think> block
        with pytest.raises(ThinkingSwitchError) as exc:
            m.chat(MSGS, think=False)
        assert "\n" not in str(exc.value) and "no switch" in str(exc.value)


def test_pack_run_prints_the_answer_and_think_shows_the_reasoning(bundles):
    bundle = bundles["r1", "gguf"]
    run = [sys.executable, "-m", "packager.cli", "run", str(bundle), "What is 2 + 2?", "-n", "12", "--temperature", "0"]
    plain = subprocess.run(run, capture_output=True, text=True)
    shown = subprocess.run(run + ["--think"], capture_output=True, text=True)
    refused = subprocess.run(run + ["--no-think"], capture_output=True, text=True)
    with packager.load(bundle, n_threads=1) as m:
        s = m.chat(MSGS, stream=True, max_tokens=12, temperature=0.0)
        "".join(s)
    assert plain.returncode == 0 and plain.stdout.strip() == ""  # all reasoning: no answer to print
    assert shown.returncode == 0 and shown.stdout.strip() == s.reasoning  # --think shows it (not a tty: no dim codes)
    assert refused.returncode == 2 and "no switch" in refused.stderr and refused.stdout == ""
    qwen = bundles["qwen3", "gguf"]
    thinking = subprocess.run(run[:4] + [str(qwen)] + run[5:] + ["--think"], capture_output=True, text=True)
    assert thinking.returncode == 0 and thinking.stdout.strip()
    refused = subprocess.run(run[:4] + [str(qwen)] + run[5:] + ["--raw", "--think"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--raw" in refused.stderr
