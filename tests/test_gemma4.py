"""Gemma 4 E2B/E4B (issue 27): sliding and full layers of two head dims, shared-KV layers, per-layer input
embeddings; against llama.cpp's converter, its quantizer and its allocation; packed, loaded and chatted with;
what it cannot be, refused.

The fixture (tests/models.tiny_gemma4) is a random 6-layer Gemma 4 text model (sliding, full, x3; sliding heads
of 32, full heads of 64; layers 4 and 5 read the caches of layers 2 and 3 and have a double-wide FFN; 16-wide
per-layer inputs) with Gemma 4's real 262k vocabulary. Its config is transformers 5.25's save of
Gemma4TextConfig written out, so the fixture builds on transformers 4.57 (no Gemma 4 class) too. The tests
against llama.cpp's tools and the bundle's are slow (the 262k vocabulary: a pack takes about a minute here).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import models
import oracle
from packager.convert.gguf.converter import convert
from packager.convert.gguf.vocab import load_vocab
from packager.errors import UnsupportedArchitectureError
from packager.formats.base import kv_bytes
from packager.quants import get_quant
from packager.source.resolver import resolve
from packager.spec.model import load_spec, spec_from_config


ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
QT = gguf.GGMLQuantizationType
T5_PYTHON = Path("/work/venv-t5/bin/python")  # transformers 5, where this machine has it (for the logits)


# gguf-py's GGUFReader takes ~50 s on a file with Gemma 4's 262k tokens and 515k merges (an object per
# string); this reads the same layout directly: the keys with their raw values, then the tensor table.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read_gguf(path: Path) -> tuple[list[tuple[str, bytes]], dict[str, tuple[int, tuple[int, ...], bytes]]]:
    """(each key with its type and value as raw bytes, in file order; each tensor's type, ggml shape, data)."""
    data = path.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub in _SCALAR:
                pos += count * _SCALAR[sub]
            else:
                for _ in range(count):
                    skip(sub)
        else:
            pos += _SCALAR[vtype]

    kv = []
    for _ in range(n_kv):
        key = string()
        start = pos
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip(vtype)
        kv.append((key, data[start:pos]))
    table = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((name, qtype, shape, offset))
    base = -(-pos // 32) * 32
    ends = [t[3] for t in table[1:]] + [len(data) - base]
    tensors = {name: (qtype, shape, data[base + off: base + end]) for (name, qtype, shape, off), end in zip(table, ends)}
    return kv, tensors


def _assert_same(ours: Path, ref: Path, *, keys: bool = True) -> None:
    """The same tensors (type, shape, bytes, padding included) and, with ``keys``, in the same order and with the
    same keys in the same order and values, apart from general.* (named from the directory by each tool its own
    way). llama-quantize writes its tensors in an order of its own and keys of its own."""
    (okv, ot), (rkv, rt) = _read_gguf(ours), _read_gguf(ref)
    assert (list(ot) if keys else sorted(ot)) == (list(rt) if keys else sorted(rt))
    for name in rt:
        assert ot[name][:2] == rt[name][:2], name
        assert ot[name][2].rstrip(b"\0") == rt[name][2].rstrip(b"\0"), f"{name} differs"
    if keys:
        assert [kv for kv in okv if not kv[0].startswith("general.")] == [kv for kv in rkv if not kv[0].startswith("general.")]


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma4") / "gemma4-F16.gguf"
    convert(resolve(models.tiny_gemma4(), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


# -- spec and plan, no engine ---------------------------------------------------------------------------

def test_layers_have_their_kind_s_head_dim_and_shared_layers_no_cache():
    spec = load_spec(models.tiny_gemma4())
    kinds = spec.layer_kinds
    assert [(k.kind, k.head_dim, k.kv_source) for k in kinds] == [
        ("sliding", 32, None), ("full", 64, None), ("sliding", 32, None), ("full", 64, None),
        ("sliding", 32, 2), ("full", 64, 3)]  # llama.cpp's reuse: n_kv_from_start - 2 (sliding), - 1 (full)
    assert spec.kv_layers() == [0, 1, 2, 3] and spec.sliding_window == 32
    assert spec.n_params == sum(int(np.prod(s)) for _, s in spec.tensors)
    names = dict(spec.tensors)
    assert "blk.4.attn_k.weight" not in names and names["blk.3.attn_k.weight"] == (64, 64)
    assert names["blk.5.ffn_up.weight"] == (256, 64) and names["per_layer_token_embd.weight"] == (262144, 96)


def test_kv_counts_owned_caches_and_pads_v_without_flash_attention():
    """Sliding layers cache the window (32 + 512 -> 768 cells), full ones the context; the shared layers none.
    With flash attention off (edgepack's f16 default) llama.cpp stores every V at the widest layer's width."""
    spec = load_spec(models.tiny_gemma4())
    cells, window = 4096, 768
    k = 2 * 64 * cells + 2 * 32 * window  # full layers 1, 3; sliding 0, 2 (one KV head each)
    assert kv_bytes(spec, cells, "f16", windowed=True, flash_attn=True) == 2 * 2 * k
    assert kv_bytes(spec, cells, "f16", windowed=True) == 2 * (k + 2 * 64 * cells + 2 * 64 * window)
    assert kv_bytes(spec, cells, "q8_0", windowed=True) == int(2 * k * 34 / 32)  # quantized V: flash attention on


def test_decode_reads_one_row_of_the_per_layer_inputs_table():
    """A token reads its row of per_layer_token_embd (96 of its 262144 x 96 values) and the whole per-layer
    projection, not the table: the roofline's bytes per token, where the table is ~27x the rest of the model."""
    from packager.formats.gguf import gguf_layout
    from packager.quants import tensor_bytes

    spec = spec_from_config(models.GEMMA4_TINY_CONFIG)
    layout = gguf_layout(spec, get_quant("Q8_0"))
    table = tensor_bytes(QT.Q8_0, (262144, 96))  # llama.cpp's quantizer treats it as token_embd: Q8_0 here
    proj = tensor_bytes(QT.F16, (96, 64)) + tensor_bytes(QT.F32, (16,))  # per_layer_model_proj is never quantized
    assert layout.other >= table + proj
    assert layout.per_token == sum(layout.per_layer) + layout.output + layout.embedding + table // 262144 + proj


def test_a_per_layer_table_over_4_gib_is_read_from_the_file_not_loaded():
    """llama.cpp maps per_layer_token_embd and reads a row per token once it is over 4 GiB (a real E2B's at F16):
    the plan's memory leaves it out then; at Q8_0 the same table is under 4 GiB and loaded, as any tensor."""
    from packager.formats.gguf import LAZY_READ_BYTES, gguf_layout, memory
    from packager.quants import tensor_bytes

    spec = spec_from_config(dict(models.GEMMA4_TINY_CONFIG, hidden_size_per_layer_input=2048))
    for quant, qt in (("F16", QT.F16), ("Q8_0", QT.Q8_0)):
        layout = gguf_layout(spec, get_quant(quant))
        table = tensor_bytes(qt, (262144, 6 * 2048))
        lazy = table > LAZY_READ_BYTES
        assert lazy == (quant == "F16")
        assert layout.lazy == (table if lazy else 0) and layout.other >= table
        assert memory(spec, layout, 4096, "f16").weights == layout.total - (table if lazy else 0)


def test_decode_reads_the_shared_layers_sources_caches_again():
    """Layers 4 and 5 allocate no cache but attend over layers 2's and 3's: a decode step reads those again, and
    the plan's decode line counts them (half of all the KV read, on average over the context)."""
    from packager.formats.base import shared_kv_reads
    from packager.plan.planner import plan
    from packager.plan.targets import load_target

    spec = spec_from_config(models.GEMMA4_TINY_CONFIG)
    assert shared_kv_reads(spec, 4096, "f16") == kv_bytes(spec, 4096, "f16", layers=[2, 3], windowed=True) > 0
    assert shared_kv_reads(spec, 4096, "f16", layers=range(4)) == 0
    assert shared_kv_reads(spec_from_config(dict(models.GEMMA4_TINY_CONFIG, num_kv_shared_layers=0)), 4096, "f16") == 0
    # E2B-sized heads (8 KV heads of 256 and 512) and a long context, so the figure shows in the line's GB
    wide = spec_from_config(dict(models.GEMMA4_TINY_CONFIG, num_attention_heads=8, num_key_value_heads=8,
                                 head_dim=256, per_layer_config={str(i): {"head_dim": 512} for i in (1, 3, 5)},
                                 max_position_embeddings=32768))
    p = plan(wide, load_target("laptop"))
    line = next(x for x in p.explain if x.startswith("decode:"))
    own, reads = kv_bytes(wide, p.n_ctx, p.kv_type, windowed=True), shared_kv_reads(wide, p.n_ctx, p.kv_type)
    assert reads > 0.1e9 and f"{(own + reads) / 2 / 1e9:.2f} GB half the KV cache" in line, (line, own, reads)


@pytest.mark.parametrize(("change", "match"), [
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
                      "sliding_attention", "full_attention"]}, "sliding then full"),
    ({"enable_moe_block": True}, "mixture of experts"),
    ({"attention_k_eq_v": True}, "attention_k_eq_v"),
])
def test_configs_llama_cpp_would_run_otherwise_are_refused(change, match):
    with pytest.raises(UnsupportedArchitectureError, match=match) as exc:
        spec_from_config(dict(models.GEMMA4_TINY_CONFIG, **change))
    assert "\n" not in str(exc.value)


def test_vocab_is_the_converter_s_gemma4_kind():
    """Gemma 4's tokenizer.json as llama.cpp's converter reads it: its own tokenizer model, no pre, the special
    tokens CONTROL and the seven "visible" ones USER_DEFINED, byte tokens BYTE, scores -1000, BOS always added."""
    vocab = load_vocab(models.tiny_gemma4())
    t = gguf.TokenType
    assert (vocab.model, vocab.pre, vocab.n_vocab, vocab.force_add_bos) == ("gemma4", None, 262144, True)
    types = dict(zip(vocab.tokens, vocab.token_types))
    assert types["<bos>"] == types["<|turn>"] == t.CONTROL and types["<|channel>"] == types['<|"|>'] == t.USER_DEFINED
    assert types["<0x0A>"] == t.BYTE and types["\u2581the"] == t.NORMAL and set(vocab.scores) == {-1000.0}


def test_a_gguf_source_s_spec_knows_the_same_layers(tmp_path):
    """pack plan model.gguf: the layers, head dims and shared caches from the GGUF's keys as our converter writes
    them (no vocabulary: gguf-py's reader takes ~50 s over Gemma 4's), and so the same KV as the checkpoint's."""
    from packager import archs
    from packager.spec.gguf import spec_from_gguf

    cfg = dict(models.GEMMA4_TINY_CONFIG)
    path = tmp_path / "keys.gguf"
    w = gguf.GGUFWriter(path, "gemma4")
    archs.write_hparams(archs.arch_for("Gemma4ForCausalLM"), cfg, w)
    w.add_file_type(1)
    archs.arch_for("Gemma4ForCausalLM").after_file_type(cfg, w)
    w.add_vocab_size(cfg["vocab_size"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    spec, ckpt = spec_from_gguf(path)[0], load_spec(models.tiny_gemma4())
    assert spec.layer_kinds == ckpt.layer_kinds and spec.sliding_window == 32
    assert kv_bytes(spec, 4096, "f16", windowed=True) == kv_bytes(ckpt, 4096, "f16", windowed=True)


# -- against llama.cpp's converter and quantizer ---------------------------------------------------------

@pytest.mark.slow  # the reference converter / a whole pack of the 262k-vocabulary fixture
def test_f16_is_byte_identical_to_convert_hf_to_gguf(f16):
    """Every tensor (rope_freqs generated first, no attn_k/attn_v on the shared layers, the per-layer input
    tensors, layer_output_scale) and every key in its order, against convert_hf_to_gguf.py --outtype f16."""
    _assert_same(f16, oracle.reference_gguf(models.tiny_gemma4(), "f16"))
    kv, tensors = _read_gguf(f16)
    kv = dict(kv)
    # an int32 array (type 9 of 5) of each layer's width: twice as wide on the shared layers
    assert kv["gemma4.feed_forward_length"] == struct.pack("<IIQ6I", 9, 5, 6, 128, 128, 128, 128, 256, 256)
    assert kv["gemma4.attention.key_length"] == struct.pack("<II", 4, 64)
    assert kv["gemma4.attention.key_length_swa"] == struct.pack("<II", 4, 32)
    assert "blk.4.attn_k.weight" not in tensors and tensors["per_layer_token_embd.weight"][:2] == (QT.F16, (96, 262144))
    freqs = np.frombuffer(tensors["rope_freqs.weight"][2], dtype=np.float32)  # 0.25 of the 64 dims turn
    assert freqs.tolist() == np.array([1.0] * 8 + [1e30] * 24, dtype=np.float32).tolist()


@pytest.mark.slow  # the reference converter / a whole pack of the 262k-vocabulary fixture
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_equals_llama_quantize(quant, tmp_path):
    """Types per tensor (per_layer_token_embd as token_embd, per_layer_model_proj kept, attn_v counted on the
    layers that have one) and bytes, against llama_model_quantize on the converter's F16 file."""
    ref = oracle.reference_quantize(oracle.reference_gguf(models.tiny_gemma4(), "f16"), quant)
    ours = tmp_path / f"gemma4-{quant}.gguf"
    convert(resolve(models.tiny_gemma4(), hash_files=False, quiet=True), get_quant(quant), ours, quiet=True)
    _assert_same(ours, ref, keys=False)


_HF_LOGITS = """
import json, sys
import numpy as np, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with torch.no_grad():
    np.save(sys.argv[3], model(torch.tensor([json.loads(sys.argv[2])])).logits[0].numpy())
"""


def _transformers_5() -> str:
    """A Python whose transformers has Gemma 4: this one, else the transformers 5 venv beside it; skip without."""
    transformers = pytest.importorskip("transformers")
    if hasattr(transformers, "Gemma4ForCausalLM"):
        return sys.executable
    if T5_PYTHON.is_file():
        return str(T5_PYTHON)
    pytest.skip(f"transformers {transformers.__version__} has no Gemma 4, and no transformers 5 at {T5_PYTHON}")


@pytest.mark.slow  # transformers 5's import and load in a second interpreter: ~40-80 s here
def test_f16_logits_match_transformers(f16, tmp_path):
    """llama.cpp's gemma4 (per-layer inputs, shared caches, both head dims, proportional RoPE through rope_freqs,
    past the 32-token window) computes transformers 5's f32 logits of the checkpoint. ggml's GELU is a table
    lookup, so single positions dip to ~0.9997; on average they agree to 1e-4."""
    python = _transformers_5()
    import llama_cpp

    llm = llama_cpp.Llama(str(f16), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    prompt = ("<|turn>user\nThe quick brown fox jumps over the lazy dog while small language models run on phones, "
              "12345. Gemma shares its caches.<turn|>\n<|turn>model\n")
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    llm.close()
    # -P: the repository's kernels/ folder would shadow the hub's kernels package transformers imports
    subprocess.run([python, "-P", "-c", _HF_LOGITS, str(models.tiny_gemma4()), json.dumps(ids), str(tmp_path / "hf.npy")],
                   check=True, capture_output=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    hf = np.load(tmp_path / "hf.npy")
    cos = (ours * hf).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(hf, axis=-1)
    assert len(ids) > 32  # past the sliding window
    assert cos.min() > 0.999 and cos.mean() > 0.9999, cos
    assert (ours.argmax(-1) == hf.argmax(-1)).mean() >= 0.9


@pytest.mark.slow  # the reference converter, and a pack, of a second 262k-vocabulary checkpoint
def test_conditional_generation_packs_its_language_model(f16, tmp_path):
    """Gemma4ForConditionalGeneration (model.language_model.*, vision and audio towers and their embedders): the
    GGUF is llama.cpp's converter's and holds the text-only checkpoint's very tensors; the pack says what it left
    out, in one line."""
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    src = models.tiny_gemma4_vision()
    ours = tmp_path / "vision-F16.gguf"
    convert(resolve(src, hash_files=False, quiet=True), get_quant("F16"), ours, quiet=True)
    _assert_same(ours, oracle.reference_gguf(src, "f16"))
    assert _read_gguf(ours)[1] == _read_gguf(f16)[1]
    result = pack_model(str(src), PackOptions(quant="Q8_0", output=tmp_path / "dist", quiet=True))
    notes = [w for w in result.warnings if "vision and audio towers" in w]
    assert len(notes) == 1 and "\n" not in notes[0]


# -- the bundle: plan against llama.cpp's allocation, chat -----------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("gemma4-dist")
    return pack_model(str(models.tiny_gemma4()), PackOptions(quant="Q4_K_M", n_ctx=4096, output=out, quiet=True)).path


@pytest.mark.slow  # the reference converter / a whole pack of the 262k-vocabulary fixture
@pytest.mark.parametrize(("n_ctx", "flash"), [(1024, None), (4096, None), (4096, True)])
def test_plan_kv_equals_what_llama_cpp_allocates_at_load(bundle, n_ctx, flash):
    """The full layers' cache over the context and the sliding layers' over the window, nothing for the shared
    layers, against llama.cpp's two KV buffer lines (iswa: one cache of each kind) within 3%: with flash
    attention off (edgepack's f16 default, V padded to the full layers' width) and on."""
    import packager
    from packager.plan.planner import memory, scheme

    overrides = {} if flash is None else {"flash_attn": flash}
    with models.logged_kv_buffers() as kv:
        model = packager.load(bundle, n_ctx=n_ctx, **overrides)
    model.close()
    spec = load_spec(models.tiny_gemma4())
    plan = memory(spec, scheme("gguf", "Q4_K_M"), n_ctx, "f16")
    planned = (plan.kv_cache if flash is None else kv_bytes(spec, n_ctx, "f16", windowed=True, flash_attn=True))
    assert len(kv) == 2, kv  # the non-SWA cache (layers 1, 3) and the SWA cache (layers 0, 2)
    assert planned / (1 << 20) == pytest.approx(sum(kv), rel=0.03), (planned, kv)
    assert plan.state == 0
    print(f"n_ctx {n_ctx} flash {flash}: planned KV {planned / (1 << 20):.2f} MiB; llama.cpp {kv} MiB")


@pytest.mark.slow  # the reference converter / a whole pack of the 262k-vocabulary fixture
def test_chat_through_load_twice_the_same_and_a_next_turn_as_a_fresh_load(bundle):
    import packager

    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == "gguf" and [k["kv_source"] for k in man["spec"]["layers"]] == [None] * 4 + [2, 3]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with packager.load(bundle, n_threads=1, n_ctx=256) as m:
        one = m.chat(question, max_tokens=8)
        assert one and m.chat(question, max_tokens=8) == one  # the same again in the same session
        turn = question + [{"role": "assistant", "content": one}, {"role": "user", "content": "And Spain?"}]
        two = m.chat(turn, max_tokens=8)
    with packager.load(bundle, n_threads=1, n_ctx=256) as m:
        assert m.chat(turn, max_tokens=8) == two  # greedy: what the session reused gives a fresh load's reply
        assert m.chat(question, max_tokens=8) == one


# -- bad input through the CLI: one line, exit 2, nothing written -------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True, env=ENV)


@pytest.mark.parametrize(("change", "says"), [
    # layers 0 and 1 swapped: layer 0's weights are a sliding layer's (head dim 32), not a full one's
    ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                      "sliding_attention", "full_attention"]}, "make layer 0 a full-attention layer of head dim 64"),
    # no shared layers: layers 4 and 5 would need K and V of their own, which the weights do not have
    ({"num_kv_shared_layers": 0}, "have no blk.4.attn_k.weight"),
], ids=["kinds-swapped", "not-shared"])
@pytest.mark.parametrize("command", ["plan", "model"])
def test_layer_kinds_against_the_weights_refused_before_writing(command, change, says, tmp_path):
    src, out = models.linked_variant(models.tiny_gemma4(), tmp_path / "gemma4", **change), tmp_path / "dist"
    r = _cli(*(["plan", str(src)] if command == "plan" else ["model", str(src), "--output", str(out), "--quiet"]))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["plan", "model"])
def test_onnx_is_refused_in_one_line(command, tmp_path):
    out = tmp_path / "dist"
    args = (["plan", str(models.tiny_gemma4()), "--format", "onnx", "--target", "laptop"] if command == "plan" else
            ["model", str(models.tiny_gemma4()), "--format", "onnx", "--output", str(out), "--quiet"])
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "shared-KV layers" in lines[0] and "--format gguf" in lines[0], r.stderr
    assert not out.exists()
