"""Gemma 3 1B's KV cache at long context: the plan against what llama.cpp allocates, windowed vs full.

The checkpoint is google/gemma-3-1b-it's config.json (26 layers, every sixth global, 512-token
window, 1 kv head x 256) with zero weights (a sparse safetensors file: no 2 GB of random numbers
to make or hold) and the test fixture's Gemma-style tokenizer, converted to Q4_0 by edgepack's
converter. The KV cache llama.cpp allocates depends on the metadata only, not on the weights.

For each context, llama.cpp (llama-cpp-python, f16 cache, n_ubatch 512) loads the GGUF twice:
with swa_full=False (what packager.load passes: sliding layers keep their window plus a batch)
and swa_full=True (llama-cpp-python's default: every layer keeps the whole context). The
allocation is llama.cpp's own log ("KV buffer size = ... MiB", summed over its caches); the
plan is packager.plan's KV line (formats/base.kv_bytes, windowed as the GGUF format plans it).

    flock /tmp/bench.lock python3 benchmarks/gemma3_kv.py                 # 4096, 8192, 32768
    flock /tmp/bench.lock python3 benchmarks/gemma3_kv.py --ctx 32768

Results are appended to benchmarks/results/gemma3_kv.jsonl; a markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import models  # noqa: E402  (tests/models.py: the fixture tokenizer and the cache folder)

from packager.convert.gguf.converter import convert  # noqa: E402
from packager.formats.base import kv_bytes  # noqa: E402
from packager.plan.planner import memory, scheme  # noqa: E402
from packager.quants import get_quant  # noqa: E402
from packager.source.resolver import resolve  # noqa: E402
from packager.spec.model import spec_from_config  # noqa: E402

GEMMA3_1B = {  # google/gemma-3-1b-it's config.json, as the hub has it
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "sliding_window": 512,
    "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "vocab_size": 262144, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "torch_dtype": "bfloat16",
}
MiB = 1 << 20


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, ff, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                    p + "mlp.down_proj.weight": (h, ff)})
    return out


def _zero_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """safetensors' documented layout (header length, JSON header, data) with the data left a hole."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # zeros, sparse on disk


def build() -> Path:
    """The zero-weight Gemma 3 1B as a Q4_0 GGUF (cached)."""
    tok = models.tiny_gemma3()

    def make(tmp: Path) -> None:
        src = tmp / "gemma-3-1b-zeros"
        src.mkdir()
        for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok / f).exists():
                shutil.copyfile(tok / f, src / f)
        (src / "config.json").write_text(json.dumps(GEMMA3_1B, indent=1))
        _zero_safetensors(src / "model.safetensors", _shapes(GEMMA3_1B))
        convert(resolve(src, hash_files=False, quiet=True), get_quant("Q4_0"), tmp / "model.gguf", quiet=True)
        (src / "model.safetensors").unlink()

    return models._atomic_build(models.CACHE / "bench-gemma3-1b-zeros-v1", make) / "model.gguf"


def allocated_kv(gguf: Path, n_ctx: int, swa_full: bool) -> float:
    """MiB of KV buffers llama.cpp logs while it opens a context."""
    import llama_cpp

    with models.logged_kv_buffers() as found:
        llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=2, swa_full=swa_full, verbose=False).close()
    return sum(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 8192, 32768])
    args = ap.parse_args()
    gguf = build()
    spec = spec_from_config(GEMMA3_1B)
    rows = []
    for n_ctx in args.ctx:
        planned = memory(spec, scheme("gguf", "Q4_0"), n_ctx, "f16").kv_cache / MiB
        planned_full = kv_bytes(spec, n_ctx, "f16") / MiB
        windowed, full = allocated_kv(gguf, n_ctx, False), allocated_kv(gguf, n_ctx, True)
        rows.append({"model": "gemma-3-1b (config, zero weights)", "quant": "Q4_0", "n_ctx": n_ctx, "kv_type": "f16",
                     "planned_kv_mib": round(planned, 2), "allocated_kv_mib": windowed,
                     "planned_full_kv_mib": round(planned_full, 2), "allocated_full_kv_mib": full,
                     "plan_error": round(planned / windowed - 1, 4), "full_over_windowed": round(full / windowed, 2),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    out = HERE / "results" / "gemma3_kv.jsonl"
    with open(out, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("| n_ctx | planned KV (MiB) | llama.cpp, swa_full=False | plan error | full-context plan | "
          "llama.cpp, swa_full=True | full / windowed |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n_ctx']} | {r['planned_kv_mib']:.2f} | {r['allocated_kv_mib']:.2f} | {r['plan_error']:+.2%} | "
              f"{r['planned_full_kv_mib']:.2f} | {r['allocated_full_kv_mib']:.2f} | {r['full_over_windowed']:.2f}x |")


if __name__ == "__main__":
    main()
