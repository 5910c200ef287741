"""Hostile chat templates: refused with a clear error, never executed, never left running.

Each attack is tried in the renderer itself, at pack time (a checkpoint whose
tokenizer_config.json carries it, and a GGUF source whose tokenizer.chat_template
does), and at load time (a bundle whose GGUF carries it, used through
packager.load(...).chat). Real templates render exactly as transformers renders them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from packager.spec.chat_template import MAX_STRING, render
from packager.errors import ChatTemplateError, UnsafeChatTemplateError

MSGS = [{"role": "user", "content": "hi"}]
ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


def marker_attack(marker: Path) -> dict[str, str]:
    """Templates that would write ``marker`` if any of them ever reached Python."""
    cmd = f"touch {marker}"
    return {
        "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "cycler-globals": "{{ cycler.__init__.__globals__.os.system('" + cmd + "') }}",
        "joiner-globals": "{{ joiner.__init__.__globals__['os'].popen('" + cmd + "').read() }}",
        "namespace-globals": "{{ namespace.__init__.__globals__.sys.modules.os.system('" + cmd + "') }}",
        "lipsum-globals": "{{ lipsum.__globals__['os'].system('" + cmd + "') }}",
        "attr-filter": "{{ (''|attr('__class__')|attr('__mro__'))[1] }}",
        "format-field": "{{ '{0.__class__.__mro__}'.format('') }}",
        "self-context": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('" + cmd + "') }}",
    }


RUNAWAY = {
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string-multiplication": "{{ 'x' * 1000000000 }}",
    "list-multiplication": "{{ ([1] * 100000) * 100000 }}",
    "power": "{{ 2 ** 100000000 }}",
    "namespace-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "macro-doubling": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
    "center-filter": "{{ 'x'|center(1000000000) }}",
    "str-method": "{{ 'x'.ljust(1000000000) }}",
    "percent-width": "{{ '%0999999999d' % 1 }}",
    "format-width": "{{ '{:>999999999}'.format(1) }}",
    "replace-empty": "{{ ('x' * 100000)|replace('', 'y' * 1000) }}",
    "huge-output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", list(marker_attack(Path("/x"))))
def test_reaching_for_python_internals_is_refused_and_never_runs(name, tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(UnsafeChatTemplateError, match="outside its sandbox") as e:
        render(marker_attack(marker)[name], MSGS)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", list(RUNAWAY))
def test_runaway_templates_are_stopped_by_a_limit(name):
    t = time.monotonic()
    with pytest.raises(UnsafeChatTemplateError, match="limit|stopped") as e:
        render(RUNAWAY[name], MSGS, time_limit=1.0)
    assert time.monotonic() - t < 3.0, "the limit must stop it, not the template finishing"
    assert "\n" not in str(e.value)


def test_the_render_thread_really_stops():
    import threading

    with pytest.raises(UnsafeChatTemplateError, match="ran for more than"):
        render(RUNAWAY["nested-range"], MSGS, time_limit=0.5)
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "edgepack-chat-template"]


# Work that runs in C holding the GIL: an exception sent to the render thread waits until the C
# call returns, and every other thread (the watchdog's too) is frozen until then: minutes here.
GIL_BOUND = {
    "power-chain": "{% set a = 99999 ** 64 %}{% set b = a ** 64 %}{% set c = b ** 64 %}{% set d = c ** 64 %}{{ d > 5 }}",
    "squaring": "{% set ns = namespace(x=99999) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
                "{{ ns.x > 5 }}",
}
WATCH = r"""
import json, sys, threading, time
from packager.spec.chat_template import render
t0 = time.monotonic()
try:
    render(sys.argv[1], [{"role": "user", "content": "hi"}], time_limit=1.0)
    error = None
except Exception as exc:
    error = type(exc).__name__ + ": " + str(exc)
returned = time.monotonic() - t0
cpu = time.process_time()
time.sleep(1.0)
print(json.dumps({"error": error, "returned_s": returned, "cpu_after_s": time.process_time() - cpu,
                  "threads": [t.name for t in threading.enumerate()]}))
"""


@pytest.mark.parametrize("name", list(GIL_BOUND))
def test_a_runaway_in_c_is_stopped_and_nothing_keeps_running(name):
    r = subprocess.run([sys.executable, "-c", WATCH, GIL_BOUND[name]], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-1000:]
    out = json.loads(r.stdout)
    assert out["error"].startswith("UnsafeChatTemplateError") and "limit" in out["error"], out
    assert out["returned_s"] < 2.0 and out["threads"] == ["MainThread"], out
    assert out["cpu_after_s"] < 0.2, out  # no render left computing in the background


def test_legitimate_large_work_still_renders():
    long = "word " * 200_000  # a 1 MB message: far below the limits
    out = render("{% for m in messages %}{{ m['content'] }}{% endfor %}", [{"role": "user", "content": long}])
    assert out == long and len(out) < MAX_STRING


def test_template_refusal_and_syntax_errors_are_plain_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="refused these messages: no system role") as e:
        render("{{ raise_exception('no system role') }}", MSGS)
    assert not isinstance(e.value, UnsafeChatTemplateError)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}", MSGS)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_real_templates_render_exactly_as_transformers_does(fixture, request):
    from transformers import AutoTokenizer

    from packager.convert.gguf.tokenizer_gate import CHAT, _hf_render

    hf = AutoTokenizer.from_pretrained(str(request.getfixturevalue(fixture)))
    for gen in (True, False):
        assert _hf_render(hf, list(CHAT), gen) == hf.apply_chat_template(list(CHAT), tokenize=False,
                                                                         add_generation_prompt=gen)


# -- pack time ----------------------------------------------------------------------------------------

def pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def _checkpoint_with_template(tiny_qwen2: Path, dst: Path, template: str) -> Path:
    dst.mkdir()
    for f in tiny_qwen2.iterdir():
        if f.name.endswith(".safetensors"):
            (dst / f.name).symlink_to(f)  # the weights are not what this test is about
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("attack", ["cycler-globals", pytest.param("nested-range", marks=pytest.mark.slow),
                                    pytest.param("string-multiplication", marks=pytest.mark.slow)])
def test_pack_refuses_a_checkpoint_with_a_hostile_template(attack, tmp_path, tiny_qwen2):
    marker = tmp_path / "PWNED"
    template = {**marker_attack(marker), **RUNAWAY}[attack]
    src = _checkpoint_with_template(tiny_qwen2, tmp_path / "src", template)
    out = tmp_path / "dist"
    # --skip-tokenizer-check must not let it through either: it skips a mismatch, not a hostile template.
    r = pack("model", src, "--quant", "Q8_0", "-o", out, "-q", "--skip-tokenizer-check")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat template" in lines[0], r.stderr
    assert not marker.exists()
    assert not out.exists() or not any((p / "manifest.json").exists() for p in out.iterdir())


# -- GGUF sources and load time ------------------------------------------------------------------

def gguf_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of ``src`` whose tokenizer.chat_template is ``template`` (tensors copied as they are)."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "tokenizer.chat_template"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    w.add_chat_template(template)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def hostile_gguf(smollm2_gguf, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "PWNED"
    template = marker_attack(marker)["cycler-globals"]
    return gguf_with_template(smollm2_gguf, d / "SmolLM2-135M-Instruct.Q4_1.gguf", template), marker


def test_pack_refuses_a_gguf_source_with_a_hostile_template(hostile_gguf, tmp_path):
    path, marker = hostile_gguf
    r = pack("model", path, "-o", tmp_path / "dist", "-q")
    assert r.returncode == 1 and "outside its sandbox" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()


def _bundle_of(gguf_path: Path, out: Path) -> Path:
    from packager.bundle.writer import BundleWriter

    with BundleWriter(out) as bw:
        shutil.copyfile(gguf_path, bw.path("model/m.gguf"))
        bw.commit({"format": "gguf", "model_file": "model/m.gguf", "runtime": {"n_ctx": 256, "n_gpu_layers": 0}},
                  quiet=True)
    return out


def test_load_time_chat_refuses_a_hostile_template_and_generate_still_works(hostile_gguf, tmp_path):
    import packager

    path, marker = hostile_gguf
    with packager.load(_bundle_of(path, tmp_path / "b")) as m:
        with pytest.raises(UnsafeChatTemplateError, match="outside its sandbox"):
            m.chat(MSGS, max_tokens=4)
        assert not marker.exists()
        assert m.generate("Hello", max_tokens=4, temperature=0.0)  # the model itself is fine


def test_load_time_runaway_template_is_stopped_and_the_model_is_usable(smollm2_gguf, tmp_path):
    import packager

    path = gguf_with_template(smollm2_gguf, tmp_path / "loop.gguf", RUNAWAY["nested-range"])
    with packager.load(_bundle_of(path, tmp_path / "b")) as m:
        t = time.monotonic()
        with pytest.raises(UnsafeChatTemplateError, match="ran for more than"):
            m.chat(MSGS, max_tokens=4)
        assert time.monotonic() - t < 30
        assert m.generate("Hello", max_tokens=4, temperature=0.0)  # the lock was released


@pytest.mark.slow
def test_load_time_template_that_does_not_compile_is_a_clear_error(smollm2_gguf, tmp_path):
    import packager

    path = gguf_with_template(smollm2_gguf, tmp_path / "broken.gguf", "{% for %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        packager.load(_bundle_of(path, tmp_path / "b"))
