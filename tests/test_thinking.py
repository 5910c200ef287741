"""Thinking models (packager/spec/thinking.py): the real templates of llama.cpp's models/templates
(vendored in llama-cpp-python's sdist) say whether and how a model thinks; the splitter keeps a
streamed reply's reasoning apart from its answer wherever the pieces break."""

from __future__ import annotations

import itertools

import pytest

from models import llama_cpp_src
from packager.spec.chat_template import render
from packager.errors import ThinkingSwitchError
from packager.spec.thinking import (NOT_THINKING, Part, Thinking, ThinkSplitter, split_reply, starts_in_reasoning,
                                    thinking_of)

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def template(name: str) -> str:
    return (llama_cpp_src() / "models" / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def prompt(t: str, thinking: Thinking, think: bool | None) -> str:
    return render(t, CHAT, **TOKENS, **thinking.context(think))


def test_qwen3_has_the_enable_thinking_switch_on_by_default():
    t = template("Qwen-Qwen3-0.6B")
    th = thinking_of(t, **TOKENS)
    assert th == Thinking(True, "enable_thinking", True)
    on, off, default = prompt(t, th, True), prompt(t, th, False), prompt(t, th, None)
    assert default == on and off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and on != off
    # either way the reply starts outside a <think> block: on, the model opens one itself
    assert not starts_in_reasoning(on, th) and not starts_in_reasoning(off, th)


def test_smollm3_switch_is_found_by_what_it_renders():
    t = template("HuggingFaceTB-SmolLM3-3B")
    th = thinking_of(t, **TOKENS)
    assert (th.thinks, th.switch, th.default) == (True, "enable_thinking", True)
    assert prompt(t, th, False).endswith("<think>\n\n</think>\n") and not prompt(t, th, True).endswith("</think>\n")


def test_r1_distill_always_thinks_and_its_reply_starts_inside_the_block():
    t = template("deepseek-ai-DeepSeek-R1-Distill-Llama-8B")
    th = thinking_of(t, **TOKENS)
    assert th == Thinking(True, None, True)
    p = prompt(t, th, True)
    assert p.endswith("<think>\n") and starts_in_reasoning(p, th)
    with pytest.raises(ThinkingSwitchError) as e:
        th.context(False)
    assert "\n" not in str(e.value) and "always thinks" in str(e.value) and "enable_thinking" in str(e.value)
    assert e.value.exit_code == 2  # asked of a model that cannot: bad input


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
                                  "microsoft-Phi-3.5-mini-instruct", "google-gemma-2-2b-it"])
def test_models_that_do_not_think(name):
    th = thinking_of(template(name), **TOKENS)
    assert th == NOT_THINKING and th.context(False) == {} and th.context(None) == {}
    with pytest.raises(ThinkingSwitchError, match="does not think"):
        th.context(True)


def test_a_switch_whose_absence_is_a_third_way_has_no_known_default():
    th = thinking_of(template("openbmb-MiniCPM5-1B"), **TOKENS)
    assert (th.thinks, th.switch, th.default) == (True, "enable_thinking", None)
    assert th.context(None) == {} and th.context(False) == {"enable_thinking": False}


def test_manifest_round_trip():
    for th in (Thinking(True, "enable_thinking", True), Thinking(True, None, True), Thinking(True, "x", None),
               NOT_THINKING):
        assert Thinking.from_manifest(th.as_manifest()) == th
    assert Thinking.from_manifest(None) == NOT_THINKING  # bundles packed before the field


# -- the splitter ----------------------------------------------------------------------------------

QWEN3_REPLY = "<think>\nThe user asks 2 + 2. That is 4.\n</think>\n\nThe answer is 4."
R1_REPLY = "Okay, 2 + 2 < 5 and <th is not a tag.\n</think>\n\n**4**"  # the prompt opened the block


def _stream(pieces: list[str], in_reasoning: bool) -> tuple[str, str, list[Part]]:
    s = ThinkSplitter(in_reasoning=in_reasoning)
    parts = [p for piece in pieces for p in s.feed(piece)] + s.finish()
    return ("".join(p.text for p in parts if p.kind == "reasoning"),
            "".join(p.text for p in parts if p.kind == "answer"), parts)


def test_whole_replies_split():
    assert split_reply(QWEN3_REPLY) == ("The user asks 2 + 2. That is 4.", "The answer is 4.")
    assert split_reply(R1_REPLY, in_reasoning=True) == ("Okay, 2 + 2 < 5 and <th is not a tag.", "**4**")
    assert split_reply("<think>\n\n</think>\n\nHi!") == ("", "Hi!")  # Qwen3 with thinking off
    assert split_reply("Plain <b>text</b> <thinking> stays.\n") == ("", "Plain <b>text</b> <thinking> stays.\n")
    assert split_reply("Ends on <thi") == ("", "Ends on <thi")  # a tag's start at the very end is text
    assert split_reply("<think>cut off mid-thought") == ("cut off mid-thought", "")


@pytest.mark.parametrize("reply,in_reasoning", [(QWEN3_REPLY, False), (R1_REPLY, True)])
def test_every_split_of_the_stream_gives_the_same_parts(reply, in_reasoning):
    """Tags (and the whitespace around them) broken across pieces anywhere: two and three pieces at
    every cut, and one character at a time."""
    want = split_reply(reply, in_reasoning=in_reasoning)
    cuts = [[i] for i in range(1, len(reply))] + [list(c) for c in itertools.combinations(range(1, len(reply)), 2)]
    for cut in cuts:
        bounds = [0, *cut, len(reply)]
        pieces = [reply[a:b] for a, b in zip(bounds, bounds[1:])]
        assert _stream(pieces, in_reasoning)[:2] == want, pieces
    reasoning, answer, parts = _stream(list(reply), in_reasoning)
    assert (reasoning, answer) == want
    assert [k for k, _ in itertools.groupby(p.kind for p in parts)] == ["reasoning", "answer"]  # reasoning first
    assert all("<think>" not in p.text and "</think>" not in p.text for p in parts)


def test_reasoning_streams_before_the_answer_arrives():
    s = ThinkSplitter()
    assert s.feed("<think>\nFirst") == [Part("reasoning", "First")]
    assert s.feed(" idea</thi") == [Part("reasoning", " idea")]
    assert s.feed("nk>\n\nDone") == [Part("answer", "Done")]
    assert s.finish() == []


# -- the manifest --------------------------------------------------------------------------------

def test_pack_records_whether_the_model_thinks_and_how_to_switch_it(tiny_qwen2, tmp_path):
    """tiny_qwen2 as shipped (Qwen2.5's template: no thinking), and with Qwen3's template."""
    import json
    import shutil

    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    thinker = tmp_path / "tiny-thinker"
    shutil.copytree(tiny_qwen2, thinker, symlinks=True)
    cfg = json.loads((thinker / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template("Qwen-Qwen3-0.6B")
    (thinker / "tokenizer_config.json").write_text(json.dumps(cfg))
    (thinker / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "dist"
    plain = pack_model(tiny_qwen2, PackOptions(quant="Q8_0", output=out, quiet=True)).manifest
    thinks = pack_model(thinker, PackOptions(quant="Q8_0", output=out, quiet=True)).manifest
    assert Thinking.from_manifest(plain["thinking"]) == NOT_THINKING
    assert thinks["thinking"] == {"thinks": True, "switch": "enable_thinking", "default": True,
                                  "tags": ["<think>", "</think>"]}
