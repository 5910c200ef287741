"""Quality of a quantized model against its reference: perplexity, KL divergence, top-1 agreement.

The method is llama.cpp's ``llama-perplexity`` (tools/perplexity/perplexity.cpp,
``perplexity()`` and ``kl_divergence()``), reproduced through llama-cpp-python's
low-level API so that the figures match that tool's:

- the whole text is tokenized once, with the model's special tokens added (BOS
  when the vocabulary adds one) and none parsed from the text;
- it is cut into chunks of ``n_ctx`` tokens (the tail past the last whole chunk
  is dropped); each chunk is decoded from an empty KV cache with its first token
  replaced by BOS when the model adds one;
- the n_ctx/2 - 1 predictions of tokens n_ctx/2+1 .. n_ctx-1 are scored (the
  outputs at positions n_ctx/2 .. n_ctx-2), so every scored token has at least
  n_ctx/2 tokens of context. llama.cpp is asked for logits at positions
  n_ctx/2 .. n_ctx-1 only (the batch's per-token ``logits`` flags, as
  llama-perplexity sets them): it then runs the last layer and the vocabulary
  projection for those rows alone. The last row's prediction lies past the
  chunk and is not scored, but asking for it keeps llama-perplexity's exact
  graph: with 255 rows instead of 256 the CPU's tiled matmuls round the last
  layer differently (ppl moved by 1.5e-7 on a 3B Q4_K_M), for a 0.4% saving.
- the logits are read in place from llama.cpp's buffer, block by block, and not
  copied: the log-softmax takes each block's one float64 copy.

The reference runs first, once, and its log-probabilities go to a float32 file
in a work directory, one chunk at a time (rows x vocab: 255 x 152k floats is
150 MB per chunk for Qwen, so nothing holds all chunks in memory). Each
candidate then streams its logits chunk by chunk against that file. ``--quant
auto`` measures every candidate against the one reference pass.

One difference from llama-perplexity, on purpose: it refuses a text shorter
than two chunks; we need one.

The reference is always a high-precision GGUF run by llama.cpp; a candidate may be a GGUF or an
ONNX bundle's model.onnx, run over the same tokens by ONNX Runtime (its logits for every position
of the chunk, from an empty cache), so both formats are scored on one scale.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from packager.bundle.manifest import Runtime
from packager.errors import QualityError, UsageError, missing_backend
from packager.formats import format_of_file
from packager.host import default_threads
from packager.kernels.quality import QualityStats, Summary, log_softmax, score_block, stored
from packager.progress import progress_bar, quiet_llama_log
from packager.quants import QUANTS

__all__ = [
    "DEFAULT_CTX",
    "Reference",
    "RunSettings",
    "Summary",
    "Estimate",
    "build_reference",
    "decision_text",
    "default_evaluation_text",
    "estimate",
    "measure",
    "read_text",
]

DEFAULT_TEXT = "evaluation.txt"  # in packager/data/, shipped in the wheel
DECISION_TEXT = "decision.txt"  # --quant mix decides on this one; neither calibrates nor reports
DEFAULT_CTX = 512  # llama-perplexity's usual -c
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml_type ids


def default_evaluation_text() -> str:
    """The evaluation text edgepack ships (original prose, CC0; see its header line)."""
    return (importlib.resources.files("packager") / "data" / DEFAULT_TEXT).read_text(encoding="utf-8")


def decision_text() -> tuple[str, str]:
    """The text quantization decisions are made on (original prose, CC0), apart from calibration and evaluation."""
    body = (importlib.resources.files("packager") / "data" / DECISION_TEXT).read_text(encoding="utf-8")
    return body, f"edgepack {DECISION_TEXT}"


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """Mean KLD over the chunks measured so far, and the half-width of its 95% confidence interval.

    Tokens of one chunk share their context, so the chunks (not the tokens) are the independent samples.
    """

    mean: float
    half: float
    n_chunks: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        return f"{self.mean:.5f} ± {self.half:.5f}" if self.half < float("inf") else f"{self.mean:.5f}"


def estimate(chunk_means: list[float]) -> Estimate:
    n = len(chunk_means)
    m = float(np.mean(chunk_means)) if n else float("nan")
    if n < 2:
        return Estimate(m, float("inf"), n)
    sd = float(np.std(chunk_means, ddof=1))
    return Estimate(m, (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / np.sqrt(n), n)


def read_text(path: Path | None) -> tuple[str, str]:
    """(text, its name for people): the user's file, or the shipped evaluation text."""
    if path is None:
        return default_evaluation_text(), f"edgepack {DEFAULT_TEXT}"
    try:
        return Path(path).read_text(encoding="utf-8"), Path(path).name
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {path}: cannot read it as UTF-8 text ({exc}); pass a plain text file") from None


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp runs a model: the bundle's runtime settings, threads from this machine."""

    n_threads: int
    n_gpu_layers: int = 0
    kv_type: str = "f16"

    @classmethod
    def from_runtime(cls, runtime: Runtime, n_threads: int | None = None) -> "RunSettings":
        return cls(n_threads=int(n_threads or default_threads()), n_gpu_layers=runtime.n_gpu_layers,
                   kv_type=runtime.kv_type or "f16")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    return llama_cpp


@dataclass(frozen=True)
class ModelInfo:
    """What must agree between a candidate and its reference."""

    arch: str
    n_vocab: int
    n_layer: int
    n_embd: int

    def describe(self) -> str:
        return f"{self.arch}, {self.n_layer} layers, width {self.n_embd}, vocabulary {self.n_vocab}"


def _info(lc: Any, model: Any, meta: Any) -> ModelInfo:
    # From the metadata: a vocab-only load (model_info) has no layers to count.
    arch = meta("general.architecture")
    num = lambda key: int(meta(f"{arch}.{key}") or 0)  # noqa: E731
    return ModelInfo(arch, int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))), num("block_count"),
                     num("embedding_length"))


def model_info(path: Path) -> tuple[ModelInfo, str | None]:
    """A model file's shape and quant name, without its weights: a GGUF from llama.cpp's header and
    vocabulary parse, an ONNX bundle's model.onnx from its genai_config.json and manifest."""
    return INFO[_format(path)](Path(path))


def _gguf_info(path: Path) -> tuple[ModelInfo, str | None]:
    lc = _llama_cpp()
    mparams = lc.llama_model_default_params()
    mparams.vocab_only = True
    with quiet_llama_log():
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise QualityError(f"{path}: llama.cpp cannot read this GGUF; check that it is a complete model file")
    try:
        def meta(key: str) -> str:
            buf = ctypes.create_string_buffer(256)
            n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", "replace") if n >= 0 else ""

        info = _info(lc, model, meta)
        ftype = meta("general.file_type")
    finally:
        with quiet_llama_log():
            lc.llama_model_free(model)
    quant = next((q.name for q in QUANTS.values() if ftype.isdigit() and int(q.ftype) == int(ftype)), None)
    return info, quant


class _Runner:
    """One GGUF loaded in llama.cpp with a context of n_ctx tokens, decoding chunks."""

    def __init__(self, path: Path, n_ctx: int, settings: RunSettings) -> None:
        self.llama_cpp = lc = _llama_cpp()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.first = n_ctx // 2
        self.rows = n_ctx - self.first  # outputs asked for: positions first .. n_ctx-1 (the last is not scored)
        self.ctx = self.batch = None
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        with quiet_llama_log():
            self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise QualityError(f"{path}: llama.cpp cannot load this GGUF; check that it is a complete model file")
        try:
            self.vocab = lc.llama_model_get_vocab(self.model)
            self.info = _info(lc, self.model, self._meta)
            self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
            self.bos = int(lc.llama_vocab_bos(self.vocab))
            if lc.llama_vocab_get_add_eos(self.vocab):
                raise QualityError(f"{path}: the vocabulary appends EOS to every text; llama.cpp's perplexity "
                                   "method does not apply to it")
            if settings.kv_type not in KV_TYPES:
                raise UsageError(f"KV cache type {settings.kv_type!r} is unknown; use one of {', '.join(KV_TYPES)}")
            cparams = lc.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = n_ctx
            cparams.n_ubatch = min(n_ctx, 512)
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = settings.n_threads
            cparams.type_k = cparams.type_v = KV_TYPES[settings.kv_type]
            cparams.no_perf = True
            with quiet_llama_log():
                self.ctx = lc.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise QualityError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens "
                                   f"(KV cache {settings.kv_type}); free memory or pass a smaller --ctx")
            self.memory = lc.llama_get_memory(self.ctx)
            self.batch = lc.llama_batch_init(n_ctx, 0, 1)
            for i in range(n_ctx):
                self.batch.pos[i] = i
                self.batch.n_seq_id[i] = 1
                self.batch.seq_id[i][0] = 0
                self.batch.logits[i] = 1 if i >= self.first else 0  # llama-perplexity's need_logits
            self.batch.n_tokens = n_ctx
        except BaseException:
            self.close()
            raise

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def tokenize(self, text: str) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special=false), as llama-perplexity calls it."""
        lc = self.llama_cpp
        data = text.encode("utf-8")
        n_max = len(data) + 8
        for _ in range(2):
            buf = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
            if n >= 0:
                return np.array(buf[:n], dtype=np.int32)
            n_max = -n
        raise QualityError(f"{self.path}: llama.cpp could not tokenize the evaluation text; check that it is UTF-8 text")

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        """Float32 logits (n_ctx - n_ctx/2, vocab) for positions n_ctx/2 .. n_ctx-1 of one chunk.

        A read-only view of llama.cpp's own buffer, valid until the next call (or close): read it, don't keep it.
        """
        lc = self.llama_cpp
        for i, tok in enumerate(chunk.tolist()):
            self.batch.token[i] = tok
        if self.add_bos:
            self.batch.token[0] = self.bos
        lc.llama_memory_clear(self.memory, True)
        rc = lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise QualityError(f"{self.path}: llama.cpp failed to decode a chunk (code {rc}); free memory and retry")
        ptr = lc.llama_get_logits(self.ctx)
        n = self.rows * self.info.n_vocab
        view = np.ctypeslib.as_array(ptr, shape=(n,)).reshape(self.rows, self.info.n_vocab)
        view.flags.writeable = False
        return view

    def close(self) -> None:
        lc = self.llama_cpp
        with quiet_llama_log():
            if self.batch is not None:
                lc.llama_batch_free(self.batch)
                self.batch = None
            if self.ctx:
                lc.llama_free(self.ctx)
                self.ctx = None
            if self.model:
                lc.llama_model_free(self.model)
                self.model = None


def _onnx_info(path: Path) -> tuple[ModelInfo, str | None]:
    """An ONNX bundle's shape, in llama.cpp's terms (its manifest's model type names the architecture)."""
    manifest_file = path.parent.parent / "manifest.json"  # absent for a bare converter output (tests)
    try:
        decoder = json.loads((path.parent / "genai_config.json").read_text(encoding="utf-8"))["model"]
        manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
        arch = (manifest.get("spec") or {}).get("model_type") or decoder["type"]
        info = ModelInfo(str(arch), int(decoder["vocab_size"]), int(decoder["decoder"]["num_hidden_layers"]),
                         int(decoder["decoder"]["hidden_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QualityError(f"{path}: not an ONNX bundle's model ({exc}); pass a bundle that `pack model` wrote") from None
    return info, manifest.get("quant")


class _OnnxRunner:
    """An ONNX bundle's graph in ONNX Runtime (the session onnxruntime-genai builds over the same file),
    run over whole chunks from an empty KV cache: the graph returns every position's logits."""

    def __init__(self, path: Path, n_ctx: int, settings: RunSettings) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_backend("onnxruntime", "onnx") from None
        from tokenizers import Tokenizer

        self.path, self.n_ctx, self.first = Path(path), n_ctx, n_ctx // 2
        self.info, _ = _onnx_info(self.path)
        cfg = json.loads((self.path.parent / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        self._inputs = dict(cfg["inputs"])
        self._kv = (cfg["num_key_value_heads"], cfg["head_size"], cfg["num_hidden_layers"])
        self._tok = Tokenizer.from_file(str(self.path.parent / "tokenizer.json"))
        # llama-perplexity replaces each chunk's first token with BOS when the vocabulary adds one.
        empty = self._tok.encode("", add_special_tokens=True).ids
        self.add_bos, self.bos = bool(empty), (empty[0] if empty else -1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = settings.n_threads, 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own error: a damaged bundle
            raise QualityError(f"{path}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:200]}); "
                               f"run `pack verify` on the bundle") from None

    def tokenize(self, text: str) -> np.ndarray:
        return np.array(self._tok.encode(text, add_special_tokens=True).ids, dtype=np.int32)

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        """Float32 logits (n_ctx - n_ctx/2, vocab) for positions n_ctx/2 .. n_ctx-1 of one chunk."""
        ids = chunk.astype(np.int64).reshape(1, -1).copy()
        if self.add_bos:
            ids[0, 0] = self.bos
        n_kv, head, layers = self._kv
        feeds: dict[str, np.ndarray] = {self._inputs.get("input_ids", "input_ids"): ids,
                                        self._inputs.get("attention_mask", "attention_mask"): np.ones_like(ids)}
        if "position_ids" in self._inputs:  # optimum's graphs take them
            feeds[self._inputs["position_ids"]] = np.arange(ids.shape[1], dtype=np.int64).reshape(1, -1)
        empty = np.zeros((1, n_kv, 0, head), np.float32)
        for i in range(layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = empty
        return self._sess.run(["logits"], feeds)[0][0, self.first:]

    def close(self) -> None:
        self._sess = None


# Where each format's logits come from, by the format's name (packager/formats): llama.cpp's for a
# GGUF, ONNX Runtime's session over the bundle's graph for ONNX.
LOGITS: dict[str, type[_Runner] | type[_OnnxRunner]] = {"gguf": _Runner, "onnx": _OnnxRunner}
INFO = {"gguf": _gguf_info, "onnx": _onnx_info}  # a model's shape, without its weights


def _format(path: Path) -> str:
    f = format_of_file(str(path))
    return f.name if f is not None else "gguf"  # llama.cpp says what is wrong with anything else


@contextmanager
def _runner(path: Path, n_ctx: int, settings: RunSettings) -> Iterator[_Runner | _OnnxRunner]:
    r = LOGITS[_format(path)](path, n_ctx, settings)
    try:
        yield r
    finally:
        r.close()


@dataclass
class Reference:
    """The reference model's pass over the text: tokens, and per chunk its log-probabilities on disk."""

    path: Path
    info: ModelInfo
    tokens: np.ndarray  # int32, n_chunks * n_ctx
    n_ctx: int
    n_chunks: int
    logp: np.memmap  # float32 (n_chunks, rows, vocab); rows = n_ctx - n_ctx/2 - 1
    top: np.ndarray  # int32 (n_chunks, rows): the reference's argmax
    text_sha256: str
    text_name: str
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.n_ctx - self.n_ctx // 2 - 1

    def targets(self, c: int) -> np.ndarray:
        """The tokens that the scored rows of chunk c predict."""
        start = c * self.n_ctx + self.n_ctx // 2 + 1
        return self.tokens[start:start + self.rows]


def check_ctx(n_ctx: int, n_chunks: int | None) -> None:
    if not 16 <= n_ctx <= 1 << 16 or n_ctx % 2:
        raise UsageError(f"--ctx {n_ctx}: use an even number of tokens from 16 to 65536 (512 is llama.cpp's usual)")
    if n_chunks is not None and n_chunks < 1:
        raise UsageError(f"--chunks {n_chunks}: evaluate at least 1 chunk")


def build_reference(path: Path, text: str, workdir: Path, *, n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None,
                    settings: RunSettings, text_name: str = "", quiet: bool = False) -> Reference:
    """Run the reference GGUF over ``text`` and keep its log-probabilities in ``workdir``."""
    check_ctx(n_ctx, n_chunks)
    t0 = time.perf_counter()
    with _runner(path, n_ctx, settings) as r:
        tokens = r.tokenize(text)
        available = len(tokens) // n_ctx
        if available == 0:
            raise UsageError(f"the evaluation text {text_name or ''} is {len(tokens)} tokens long, shorter than one "
                             f"chunk of {n_ctx}; give a longer --text or a smaller --ctx".replace("  ", " "))
        count = available if n_chunks is None else min(n_chunks, available)
        rows = n_ctx - n_ctx // 2 - 1
        workdir.mkdir(parents=True, exist_ok=True)
        logp = np.lib.format.open_memmap(workdir / "reference-logprobs.npy", mode="w+", dtype=np.float32,
                                         shape=(count, rows, r.info.n_vocab))
        top = np.zeros((count, rows), dtype=np.int32)
        tokens = tokens[:count * n_ctx]
        ref = Reference(Path(path), r.info, tokens, n_ctx, count, logp, top,
                        hashlib.sha256(text.encode("utf-8")).hexdigest(), text_name)
        with progress_bar(total=count, desc="reference pass", unit="chunk", quiet=quiet) as bar:
            for c in range(count):
                logits = r.logits(tokens[c * n_ctx:(c + 1) * n_ctx])[:rows]  # a view: no copy
                for lo in range(0, rows, _BLOCK):
                    block = logits[lo:lo + _BLOCK]
                    logp[c, lo:lo + len(block)] = stored(log_softmax(block))
                top[c] = np.argmax(logits, axis=-1)
                bar.update(1)
        logp.flush()
    ref.seconds = time.perf_counter() - t0
    return ref


_BLOCK = 32  # rows per float64 log-softmax: 32 x 152k x 8 B = 39 MB at most


def check_compatible(ref_info: ModelInfo, ref_path: Path, info: ModelInfo, path: Path) -> None:
    """Refuse to compare two different models (the figures would mean nothing)."""
    if info != ref_info:
        raise QualityError(f"{Path(path).name} ({info.describe()}) is not the same model as the reference "
                           f"{Path(ref_path).name} ({ref_info.describe()}); pass the F16/BF16 GGUF or the checkpoint "
                           "this bundle was packed from")


@dataclass(frozen=True)
class Measured:
    summary: Summary
    seconds: float
    kld: Estimate | None = None  # the mean KLD with its interval over the chunks measured


def measure(path: Path, ref: Reference, *, settings: RunSettings, text: str | None = None, quiet: bool = False,
            desc: str = "measuring", decided: Callable[[Estimate], bool] | None = None,
            min_chunks: int = 2) -> Measured:
    """Stream ``path``'s logits chunk by chunk against the reference's; the figures of the comparison.

    With ``text`` (the one the reference ran over), first check that ``path`` tokenizes it the same way.
    With ``decided``, stop as soon as it returns True for the running estimate (after ``min_chunks``
    chunks): the comparison at hand is settled; the reference's chunks are the cap. The progress
    bar shows the running estimate.
    """
    t0 = time.perf_counter()
    stats = QualityStats()
    with _runner(path, ref.n_ctx, settings) as r:
        check_compatible(ref.info, ref.path, r.info, Path(path))
        if text is not None:
            _tokens_agree(r.tokenize(text)[:len(ref.tokens)], ref, Path(path))
        chunk_means: list[float] = []
        with progress_bar(total=ref.n_chunks, desc=desc, unit="chunk", quiet=quiet) as bar:
            for c in range(ref.n_chunks):
                logits = r.logits(ref.tokens[c * ref.n_ctx:(c + 1) * ref.n_ctx])[:ref.rows]  # a view: no copy
                targets = ref.targets(c)
                first = len(stats.klds)
                for lo in range(0, ref.rows, _BLOCK):
                    hi = min(lo + _BLOCK, ref.rows)
                    stats.add(score_block(logits[lo:hi], ref.logp[c, lo:hi], ref.top[c, lo:hi], targets[lo:hi]))
                chunk_means.append(float(np.concatenate(stats.klds[first:]).mean()))
                est = estimate(chunk_means)
                bar.update(1)
                if decided is not None:
                    bar.set_postfix_str(f"KLD {est}")
                    if len(chunk_means) >= min_chunks and decided(est):
                        break
    return Measured(stats.summary(), time.perf_counter() - t0, estimate(chunk_means))


def _tokens_agree(mine: np.ndarray, ref: Reference, path: Path) -> None:
    """The candidate tokenizes the text as the reference did (else the comparison means nothing)."""
    if len(mine) < len(ref.tokens) or not np.array_equal(mine, ref.tokens):
        raise QualityError(f"{path.name} tokenizes the text differently from the reference {ref.path.name}; "
                           "pass the reference this bundle was packed from")


def as_manifest(ref_label: str, ref: Reference, summary: Summary, *, n_ctx: int) -> dict[str, Any]:
    """The manifest's ``quality`` entry."""
    return {
        "reference": ref_label,
        "text": ref.text_name,
        "text_sha256": ref.text_sha256,
        "n_ctx": n_ctx,
        "n_chunks": summary.n_tokens // ref.rows,  # those measured (an adaptive measurement may stop early)
        "n_tokens": summary.n_tokens,
        "ppl": round(summary.ppl, 6),
        "ppl_ref": round(summary.ppl_ref, 6),
        "kld_mean": round(summary.kld_mean, 8),
        "kld_p99": round(summary.kld_p99, 8),
        "top1": round(summary.top1, 6),
        "method": "llama-perplexity: chunks scored on their second half; KLD(reference || quantized)",
    }

