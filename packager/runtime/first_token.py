"""The last check before `pack` publishes a bundle: its own runtime decodes a token from it.

Loading proves less than it seems. ONNX Runtime builds a session over a graph whose
GroupQueryAttention it will reject at the first forward pass (a partial rotary whose cos
cache is narrower than the kernel wants is only checked when it runs); llama.cpp maps a GGUF
whose graph it fails to build or compute only at the first llama_decode. So each check here
runs a one-token prompt and then the token the model chose, through the KV cache it just
wrote: the prompt path and the decode path, once each, on the engine the bundle ships for.

Both run without the memory an app's load adds (``check_loads`` in runtime/llama.py and
runtime/onnx.py say why): llama.cpp reads the mapped weights in place (no repacked copies)
with a context of one padded block of cells, ONNX Runtime's session packs nothing, and the
KV cache holds two tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import ConversionError, missing_backend
from packager.host import default_threads
from packager.progress import quiet_llama_log

CHECK_CTX = 256  # llama.cpp pads a context to 256 cells anyway; the check uses two of them
MAX_THREADS = 4  # two tokens: more threads only cost their start


def _first_id(n_vocab: int, bos: int) -> int:
    # The vocabulary's BOS where it has one (the token every prompt starts with), else id 0.
    return bos if 0 <= bos < n_vocab else 0


def _refused(name: str, engine: str, why: str) -> ConversionError:
    return ConversionError(f"{name}: {engine} loads the model just written but cannot decode a token with it "
                           f"({' '.join(why.split())[:300]}); nothing was published (run with EDGEPACK_DEBUG=1 and "
                           f"report it, with the source's config.json)")


def llama_decodes(lc: Any, model: Any, path: Path) -> None:
    """Decode a one-token prompt and the token after it with llama.cpp over a loaded ``model`` (a
    ``llama_model_load_from_file`` handle of ``path``); ConversionError, one line, where it cannot or
    where the logits are NaN."""
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = int(lc.llama_vocab_n_tokens(vocab))
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = CHECK_CTX, 1, 1, 1
    cparams.n_threads = cparams.n_threads_batch = min(MAX_THREADS, default_threads())
    cparams.no_perf = True
    with quiet_llama_log():
        ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        raise _refused(path.name, "llama.cpp", f"no context of {CHECK_CTX} tokens could be created")
    try:
        token = _first_id(n_vocab, int(lc.llama_vocab_bos(vocab)))
        for step in ("the prompt", "the first generated token"):
            ids = (lc.llama_token * 1)(token)
            with quiet_llama_log():
                rc = lc.llama_decode(ctx, lc.llama_batch_get_one(ids, 1))
            if rc != 0:
                raise _refused(path.name, "llama.cpp", f"llama_decode returned {rc} on {step}")
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            if np.isnan(logits).any():
                raise _refused(path.name, "llama.cpp", f"the logits of {step} are NaN")
            token = int(logits.argmax())
    finally:
        with quiet_llama_log():
            lc.llama_free(ctx)


def _present(past: str) -> str:
    """The output a past input's next value comes from (past_key_values.N.key -> present.N.key, past.N.conv ->
    present.N.conv)."""
    return "present." + past.split(".", 1)[1]


def onnx_decodes(model_dir: Path, options: Any) -> None:
    """Run a one-token prompt and the token after it through ONNX Runtime over ``model_dir``'s graph
    (edgepack's or optimum-onnx's inputs: input_ids, attention_mask, position_ids,
    past_key_values.N.key/value, a hybrid's states past.N.conv / past.N.recurrent), in a session of
    ``options``; ConversionError, one line, where ONNX Runtime rejects it or the logits are NaN.

    Unpacked (no prepacking), MatMulNBits dequantizes its whole weight to f32 at every call: for the
    lm_head that is vocabulary x hidden x 4 bytes (1.2 GB for Qwen2.5-3B). So the check's graph is
    the bundle's with the lm_head cut to the vocabulary's first LOGIT_ROWS rows (the same file's
    bytes, at an offset): every other node runs as written, and the largest copy is a layer's."""
    import onnxruntime as ort

    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    try:
        session = ort.InferenceSession(_lighter_logits(model_dir / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error
        raise _refused(model_dir.name, "ONNX Runtime", f"the check's session: {exc}") from None
    inputs = session.get_inputs()
    names = [o.name for o in session.get_outputs()]
    if "logits" not in names:
        raise _refused(model_dir.name, "ONNX Runtime", f"the graph has no 'logits' output (outputs: {', '.join(names)})")
    past: dict[str, np.ndarray] = {}
    for i in inputs:
        if i.name.startswith(("past_key_values.", "past.")):
            # [batch, kv heads, past length, head dim]: one sequence, nothing cached yet; a conv state
            # [batch, hidden, kernel - 1] or a delta-net's conv and recurrent state (fixed sizes): zeros, as
            # genai starts them
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[0] = 1
            past[i.name] = np.zeros(dims, dtype=_np_type(i, model_dir))
    missing = [n for n in past if _present(n) not in names]
    if missing:
        raise _refused(model_dir.name, "ONNX Runtime", f"the graph has no present output for {missing[0]}")
    run = ort.RunOptions()
    run.log_severity_level = 4  # the refusal below says it in one line; ONNX Runtime's log would say it again
    token, total = 0, 0
    for step in ("the prompt", "the first generated token"):
        total += 1
        feed: dict[str, np.ndarray] = {}
        for i in inputs:
            if i.name == "input_ids":
                feed[i.name] = np.array([[token]], dtype=_np_type(i, model_dir))
            elif i.name == "attention_mask":
                feed[i.name] = np.ones((1, total), dtype=_np_type(i, model_dir))
            elif i.name == "position_ids":
                feed[i.name] = np.array([[total - 1]], dtype=_np_type(i, model_dir))
            elif i.name in past:
                feed[i.name] = past[i.name]
            else:
                raise _refused(model_dir.name, "ONNX Runtime", f"the graph wants an input {i.name!r} that no "
                               "decoder of onnxruntime-genai feeds")
        try:
            out = dict(zip(names, session.run(None, feed, run)))
        except Exception as exc:  # onnxruntime's own error, on this step
            raise _refused(model_dir.name, "ONNX Runtime", f"{step}: {exc}") from None
        row = np.asarray(out["logits"], dtype=np.float32).reshape(-1, out["logits"].shape[-1])[-1]
        if np.isnan(row).any():
            raise _refused(model_dir.name, "ONNX Runtime", f"the logits of {step} are NaN")
        token = int(row.argmax())
        past = {name: out[_present(name)] for name in past}


# Vocabulary rows the check's lm_head computes: a multiple of 4096, so that every slice of a weight
# laid out row by row starts on a page boundary and is mapped, not copied (vocab 151936 x hidden 2048:
# 64 MB of f32 instead of 1.2 GB).
LOGIT_ROWS = 8192


def _lighter_logits(graph: Path) -> bytes:
    """The graph (initializers left in their data files) with the MatMulNBits that makes ``logits``
    cut to its first LOGIT_ROWS output rows: its weight, scales, zero points and bias become views of
    the same bytes (an offset and a length into the same data file), its N attribute the new width."""
    try:
        import onnx
    except ImportError:
        raise missing_backend("onnx", "onnx") from None
    model = onnx.load(str(graph), load_external_data=False)
    node = next((n for n in model.graph.node if "logits" in n.output), None)
    attrs = {a.name: a for a in node.attribute} if node is not None else {}
    if node is None or node.op_type != "MatMulNBits" or attrs["N"].i <= LOGIT_ROWS:
        return model.SerializeToString()
    n_rows = attrs["N"].i
    inits = {t.name: t for t in model.graph.initializer}
    for k, name in enumerate(node.input):
        if k == 0 or name not in inits or k == 4:  # the activations; g_idx (by input row, not output row)
            continue
        cut = _first_rows(onnx, inits[name], n_rows, f"{name}.first_{LOGIT_ROWS}")
        model.graph.initializer.append(cut)
        node.input[k] = cut.name
    attrs["N"].i = LOGIT_ROWS
    return model.SerializeToString()


def _first_rows(onnx: Any, t: Any, n_rows: int, name: str) -> Any:
    """The first LOGIT_ROWS of ``n_rows`` output rows of an initializer laid out output row first
    ([N, ...] or flattened [N * m]), without reading its data where it lives in a data file."""
    size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize * int(np.prod(t.dims))
    keep = size // n_rows * LOGIT_ROWS
    cut = onnx.TensorProto(name=name, data_type=t.data_type)
    cut.dims.extend([t.dims[0] // n_rows * LOGIT_ROWS, *t.dims[1:]])
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        cut.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", info["location"]), ("offset", str(int(info.get("offset", 0)))),
                           ("length", str(keep))):
            cut.external_data.add(key=key, value=value)
    else:
        raw = t.raw_data or onnx.numpy_helper.to_array(t).tobytes()
        cut.raw_data = raw[:keep]
    return cut


_NP_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}


def _np_type(i: Any, model_dir: Path) -> type:
    if i.type not in _NP_TYPES:
        raise _refused(model_dir.name, "ONNX Runtime", f"its input {i.name!r} is a {i.type}, which no decoder "
                       "of onnxruntime-genai feeds")
    return _NP_TYPES[i.type]
