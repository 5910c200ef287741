"""The ONNX fallback for architectures edgepack's streaming converter lacks: optimum-onnx exports the
model (text-generation-with-past), ONNX Runtime's MatMulNBitsQuantizer makes its MatMuls int4.

Unlike converter.py this path holds the whole model: optimum loads the checkpoint in f32 and
traces it, and the quantizer loads the exported f32 graph. Peak RSS of the packing process tree
was 4.9 times the f32 model on a random Pythia-160M (benchmarks/onnx_pack.py --fallback), so
pack_onnx checks for 5 times (``fallback_memory``) before starting.

The exported graph computes attention itself (plain MatMul/Softmax with a concatenated KV cache):
onnxruntime-genai drives it with its generic decoder-only runner (model.type "llama"; the type picks
genai's input handling, the graph carries the architecture), without a shared KV buffer, and with
position_ids when the graph takes them.

--algorithm hqq uses ONNX Runtime's own HQQ quantizer, then rewrites its f32 zero points as uint8
ones plus a per-block correction (``_split_float_zero_points``), as the streaming converter stores
them: f32 zero points send MatMulNBits down a path ~300x slower on CPU (kernels/hqq.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from packager.convert.onnx.output import DecoderShape, copy_tokenizer, eog_ids, genai_config, read_json
from packager.convert.result import ConvertResult
from packager.errors import ConversionError
from packager.kernels.hqq import split_zero_points
from packager.kernels.int4 import Int4Blocks
from packager.progress import say
from packager.source.resolver import Source, sha256_file
from packager.spec.model import read_config

TASK = "text-generation-with-past"
EXPORTER = "optimum-onnx"
GENAI_TYPE = "llama"  # onnxruntime-genai's plain decoder-only runner
F32_COPIES = 5  # peak RSS over the f32 model's bytes, measured 4.9 (benchmarks/onnx_pack.py --fallback)


def optimum_installed() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("optimum.exporters.onnx") is not None
    except ImportError:  # no optimum at all
        return False


def optimum_transformers_clash() -> str:
    """Why the installed optimum-onnx cannot run beside the installed transformers, or "". optimum-onnx
    0.1 pins transformers < 4.58 while the core takes transformers 5: an environment can hold both
    (pip installs with a warning, or --no-deps), and then optimum fails inside its child process with
    an ImportError; this says it in one line before any work. Read off optimum-onnx's own metadata, so
    a release that takes transformers 5 passes unchanged."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        reqs, have = requires("optimum-onnx") or [], version("transformers")
    except PackageNotFoundError:  # no optimum-onnx distribution (or no transformers): nothing clashes here
        return ""
    from packaging.requirements import InvalidRequirement, Requirement  # transformers' own dependency

    for line in reqs:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name == "transformers" and not req.marker and not req.specifier.contains(have, prereleases=True):
            return (f"optimum-onnx {version('optimum-onnx')} needs transformers{req.specifier} and transformers "
                    f"{have} is installed: use the fallback in its own environment (pip install "
                    f"'edgepack[onnx-export]' there pins transformers for it)")
    return ""


# optimum runs in a child process: it needs transformers with torch, which the CLI switches off for
# its own imports (USE_TORCH=0, cli/app.py), and the f32 model it loads is freed when the child exits.
_CHECK = """
import sys
import optimum.exporters.onnx.model_configs  # registers the ONNX export configs
from optimum.exporters.tasks import TasksManager
try:
    tasks = TasksManager.get_supported_tasks_for_model_type(sys.argv[1], exporter="onnx", library_name="transformers")
except KeyError:
    tasks = []
print("yes" if sys.argv[2] in tasks else "no")
"""
_EXPORT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], device="cpu", library_name="transformers",
            do_validation=False, trust_remote_code=False)
"""


def _optimum(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:300]


@functools.lru_cache(maxsize=None)  # a child process each time; pack asks before any work and again to convert
def optimum_exports(model_type: str) -> bool:
    """Does the installed optimum-onnx export ``model_type`` for text generation with a KV cache?"""
    r = _optimum(_CHECK, model_type, TASK)
    if r.returncode != 0:
        raise ConversionError(f"optimum-onnx failed to start ({_last_line(r.stderr)}); reinstall it with "
                              "pip install 'edgepack[onnx-export]'")
    return r.stdout.strip() == "yes"


def fallback_memory(n_params: int) -> int:
    return F32_COPIES * 4 * n_params


def _quant_config(opts):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig

    if opts.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=opts.block_size, bits=4)
    return DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=opts.symmetric,
                                        accuracy_level=opts.accuracy_level)


def _quantize(model_path: Path, opts):
    """MatMulNBits for every MatMul with a constant weight; refuses a graph whose linear layers stay f32."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a node
    q = MatMulNBitsQuantizer(onnx.load(str(model_path)), accuracy_level=opts.accuracy_level,
                             algo_config=_quant_config(opts))
    with warnings.catch_warnings():  # torch's note on the read-only arrays HQQ's quantizer hands it
        warnings.simplefilter("ignore", UserWarning)
        q.process()
    graph = q.model.model.graph
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    left = [n.name for n in graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]
    n_int4 = sum(n.op_type == "MatMulNBits" for n in graph.node)
    if left or not n_int4:
        raise ConversionError(
            f"optimum's export keeps {len(left)} linear layers as f32 MatMul/Gemm that MatMulNBitsQuantizer does not "
            f"quantize ({n_int4} became int4); this architecture cannot be an int4 ONNX bundle here: pack it with "
            "--format gguf instead")
    for node in graph.node:  # HQQ's nodes carry no accuracy_level: the same compute precision as RTN's
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", opts.accuracy_level))
    if opts.algorithm == "hqq":
        _split_float_zero_points(graph)
    return q.model, n_int4


def _split_float_zero_points(graph) -> None:
    """ONNX Runtime's HQQ writes f32 zero points, which its CPU MatMulNBits runs ~300x slower than
    uint8 ones (kernels/hqq.py): rewrite each node as uint8 zero points plus the exact per-block
    correction, added after it as (block sums of A) @ correction^T, as edgepack's own graph does."""
    import numpy as np
    from onnx import helper, numpy_helper


    inits = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        zero = numpy_helper.to_array(inits[node.input[3]])
        if zero.dtype != np.float32:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bs = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        nb = -(-k // bs)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nb)
        packed = numpy_helper.to_array(inits[node.input[1]])
        zp, correction = split_zero_points(Int4Blocks(packed, scales, zero.reshape(n, nb)))
        name = node.name or node.output[0]
        graph.initializer.remove(inits[node.input[3]])
        graph.initializer.extend([numpy_helper.from_array(zp, node.input[3]),
                                  numpy_helper.from_array(np.ascontiguousarray(correction.T), f"{name}_zc")])

        def const(suffix: str, values: list[int]) -> str:
            graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64),
                                                             f"{name}_zc/constants/{suffix}"))
            return f"{name}_zc/constants/{suffix}"

        out, pre = node.output[0], f"{node.output[0]}_before_zc"
        node.output[0] = pre
        x = node.input[0]
        new = [helper.make_node("Reshape", [x, const("flat", [-1, k])], [f"{name}_zc/flat"])]
        if nb * bs != k:  # the quantizer zero-padded the last block
            new.append(helper.make_node("Pad", [new[-1].output[0], const("pads", [0, 0, 0, nb * bs - k])],
                                        [f"{name}_zc/padded"]))
        new += [
            helper.make_node("Reshape", [new[-1].output[0], const("blocks", [-1, nb, bs])], [f"{name}_zc/blocks"]),
            helper.make_node("ReduceSum", [f"{name}_zc/blocks", const("axes", [-1])], [f"{name}_zc/sums"], keepdims=0),
            helper.make_node("MatMul", [f"{name}_zc/sums", f"{name}_zc"], [f"{name}_zc/matmul"]),
            helper.make_node("Shape", [pre], [f"{name}_zc/shape"]),
            helper.make_node("Reshape", [f"{name}_zc/matmul", f"{name}_zc/shape"], [f"{name}_zc/correction"]),
            helper.make_node("Add", [pre, f"{name}_zc/correction"], [out]),
        ]
        graph.node.extend(new)  # save_model_to_file sorts the graph topologically


def _dim(value_info, axis: int) -> int:
    return int(value_info.type.tensor_type.shape.dim[axis].dim_value)


def decoder_shape(graph, cfg: dict[str, Any], n_ctx: int) -> DecoderShape:
    """What genai_config.json says of optimum's graph: names and KV shapes read from the graph itself."""
    inputs = {i.name: i for i in graph.input}
    n_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    past = inputs.get("past_key_values.0.key")
    if past is None or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ConversionError(f"optimum's export has inputs {sorted(inputs)}; onnxruntime-genai needs input_ids, "
                              "attention_mask and past_key_values.N.key/value")
    logits = next(o for o in graph.output if o.name == "logits")
    return DecoderShape(
        GENAI_TYPE, context_length=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or n_ctx),
        head_size=_dim(past, 3), hidden_size=int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")),
        n_heads=int(cfg.get("num_attention_heads") or cfg.get("n_head")), n_layers=n_layers, n_kv_heads=_dim(past, 1),
        vocab_size=_dim(logits, 2) or int(cfg["vocab_size"]), position_ids="position_ids" in inputs,
        share_buffer=False)  # the graph concatenates past and new keys itself


def convert_optimum(source: Source, out_dir: Path, opts, *, n_ctx: int = 4096, quiet: bool = False,
                    eos_ids: list[int] | None = None):
    """Export with optimum, quantize to MatMulNBits, write model.onnx(.data), genai_config.json, tokenizer."""
    cfg = read_config(source.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-optimum-", dir=out_dir.parent) as tmp:
        say(f"exporting {source.name} with optimum-onnx ({TASK}, f32)", quiet=quiet)
        r = _optimum(_EXPORT, str(source.path), tmp, TASK)
        if r.returncode != 0:  # optimum's own failure, one line: the model or its config
            raise ConversionError(f"optimum-onnx could not export {source.name} ({_last_line(r.stderr)}); "
                                  "pack it with --format gguf instead")
        exported = Path(tmp) / "model.onnx"
        if not exported.is_file():
            raise ConversionError(f"optimum-onnx wrote no model.onnx for {source.name} (it wrote "
                                  f"{sorted(p.name for p in Path(tmp).iterdir())}); pack it with --format gguf instead")
        say(f"quantizing to int4 ({opts.algorithm}, block {opts.block_size}) with ONNX Runtime's MatMulNBitsQuantizer",
            quiet=quiet)
        model, n_int4 = _quantize(exported, opts)
    model.save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=True)
    graph = model.model.graph
    gen = read_json(source.path / "generation_config.json")
    (out_dir / "genai_config.json").write_text(
        json.dumps(genai_config(decoder_shape(graph, cfg, n_ctx), cfg, gen, n_ctx, opts.execution_provider,
                                eos_ids=eog_ids(source.path) if eos_ids is None else eos_ids), indent=4),
        encoding="utf-8")
    copied = [out_dir / "model.onnx", out_dir / "model.onnx.data", out_dir / "genai_config.json",
              *copy_tokenizer(source.path, out_dir)]
    sha256s = {str(p.relative_to(source.path)): sha256_file(p) for p in source.weight_files}
    from importlib.metadata import version

    # The embedding stays an f32 Gather: the quantizer's Gather path has no float zero points (HQQ).
    exporter = f"{EXPORTER} {version('optimum-onnx')} (optimum {version('optimum')})"
    details = {"onnx": {**opts.as_dict(), "int4_embeddings": False, "exporter": exporter},
               "n_nodes": len(graph.node), "n_int4_matmuls": n_int4}
    return ConvertResult(out_dir, sum(p.stat().st_size for p in copied), sha256s, files=copied, details=details)
