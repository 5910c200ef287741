"""GGUF bundles through llama-cpp-python.

Tokens are driven by llama-cpp-python's own ``Llama.generate`` loop (one persistent
sampler chain, the prompt's KV prefix reused between calls: a chat's earlier turns are
not decoded again). A Python loop of ``eval()`` + ``sample()`` builds a new sampler
per token and is ~25% slower (measured: 47 vs 62.6 tokens/s). We do not go through
``create_completion`` either: it re-detokenizes the whole completion at every token
(quadratic in the reply's length); here each token's bytes go through one incremental
UTF-8 decoder.
"""

from __future__ import annotations

import codecs
import ctypes
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gguf

from packager.bundle.manifest import Runtime
from packager.bundle.verify import Bundle
from packager.errors import BundleError, ChatTemplateError, ConversionError, UsageError, missing_backend
from packager.host import default_threads
from packager.progress import quiet_llama_log
from packager.runtime.model import Engine, EngineInfo, GenOptions, Message, Model
from packager.spec.chat_template import ChatFormatter as Jinja2ChatFormatter


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    return llama_cpp


def check_loads(path: Path) -> None:
    """Load a written GGUF in llama.cpp (weights mapped, no context) and free it: `pack` publishes no
    bundle its own runtime cannot open (a config that disagrees with the weights, a writer bug)."""
    lc = _llama_cpp()
    params = lc.llama_model_default_params()
    # Mapped, not repacked: ggml-cpu's repacked copies of a 3B model would be gigabytes of anonymous
    # memory; the mapped file's pages are page cache (a 3B pack stays at ~0.3 GB RssAnon).
    params.n_gpu_layers, params.use_mmap, params.use_extra_bufts = 0, True, False
    with quiet_llama_log():
        model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ConversionError(f"{path.name}: llama.cpp cannot load the GGUF just written; nothing was published "
                              f"(run with EDGEPACK_DEBUG=1 and report it, with the source's config.json)")
    with quiet_llama_log():
        lc.llama_model_free(model)


class LlamaEngine(Engine):
    """The llama.cpp context a LlamaModel loaded, driven as llama-bench drives it (llama_decode of a
    batch, no sampling, then llama_synchronize)."""

    def __init__(self, model: "LlamaModel") -> None:
        self._model, self._lc, self._llm = model, model._llama_cpp, model._llm

    @property
    def info(self) -> EngineInfo:
        llm, lc = self._llm, self._lc
        ctx = llm.context_params
        return EngineInfo(
            model_type=llm._model.desc(), model_size=int(llm._model.size()), model_n_params=int(llm._model.n_params()),
            n_ctx=llm.n_ctx(), n_batch=llm.n_batch, n_ubatch=int(ctx.n_ubatch),
            type_k=_ggml_type_name(getattr(ctx, "type_k", None)), type_v=_ggml_type_name(getattr(ctx, "type_v", None)),
            n_threads=int(ctx.n_threads), n_gpu_layers=int(llm.model_params.n_gpu_layers),
            flash_attn=int(getattr(ctx, "flash_attn_type", getattr(ctx, "flash_attn", 0))),
            backends=_backends(lc), gpu_offload=bool(lc.llama_supports_gpu_offload()),
            engine=f"llama.cpp (llama-cpp-python {getattr(lc, '__version__', '?')})")

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def bos(self) -> int | None:
        bos = self._llm.token_bos()
        return bos if bos is not None and bos >= 0 else None

    def reset(self) -> None:
        self._model._blocks = []  # what generation cached is gone
        self._llm.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        # llama_decode may return before a GPU backend (Metal, CUDA) has finished; Llama.eval reads no
        # logits, so nothing waits for it. Wait here, as llama-bench does after every decode.
        self._model._blocks = []
        self._llm.eval(list(tokens))
        self._lc.llama_synchronize(self._llm._ctx.ctx)


def _ggml_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return gguf.GGMLQuantizationType(int(value)).name.lower()
    except ValueError:
        return str(value)


def _backends(llama_cpp: Any) -> str:
    """llama-bench's backends column: the ggml backends this llama.cpp build has ('CPU', 'CUDA', ...)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    names = [part.split(":", 1)[0].strip() for part in info.split("|") if ":" in part and "=" not in part.split(":", 1)[0]]
    names = [n for n in names if n and n.isupper()]
    return ",".join(dict.fromkeys(names)) or "CPU"


class LlamaModel(Model):
    """A GGUF bundle loaded into llama.cpp."""

    ENGINE = "llama_cpp"  # the module that runs it (pack bench times its import apart from the load)

    def __init__(self, bundle: Bundle, *, n_ctx: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, seed: int | None = None, use_mmap: bool = True,
                 n_batch: int = 512, flash_attn: bool | None = None) -> None:
        super().__init__()
        llama_cpp = _llama_cpp()
        runtime = bundle.meta.runtime
        self.bundle = bundle
        self.n_ctx = int(n_ctx or runtime.n_ctx or 2048)
        # The plan's thread count is the target device's; here we run on this machine.
        self.n_threads = int(n_threads or default_threads())
        if self.n_ctx < 16 or self.n_threads < 1:
            raise UsageError(f"n_ctx must be >= 16 and n_threads >= 1, got n_ctx={self.n_ctx}, n_threads={self.n_threads}")
        self.defaults = dict(runtime.generation)
        self._seeds = random.Random(seed)  # a fresh sampling seed per call unless the call gives one
        self._llama_cpp = llama_cpp
        kv_type = (runtime.kv_type or "f16").lower()
        kv = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}", None)
        if kv is None:
            raise BundleError(f"{bundle.path}: manifest runtime.kv_type {kv_type!r} is unknown to llama.cpp; "
                              f"pack the bundle again")
        # llama.cpp quantizes the V cache only with flash attention on.
        flash = bool(flash_attn) if flash_attn is not None else kv_type not in ("f16", "f32", "bf16")
        try:
            self._llm = self._open(llama_cpp, bundle, seed, use_mmap, n_batch, n_gpu_layers, runtime,
                                   dict(type_k=kv, type_v=kv, flash_attn=flash))
        except ValueError as exc:  # llama.cpp could not read the file: a size-preserving corruption
            raise BundleError(f"{bundle.model_file}: llama.cpp cannot load it ({exc}); run `pack verify "
                              f"{bundle.path}` or load with verify=True to check the weights") from None
        except Exception as exc:  # llama-cpp-python compiles the GGUF's chat templates while loading
            if not type(exc).__module__.startswith("jinja2") and not isinstance(exc, RecursionError):
                raise
            raise ChatTemplateError(f"{bundle.model_file}: its chat template does not compile "
                                    f"({' '.join(str(exc).split())[:200]}); the GGUF is broken, pack it again") from None
        self._vocab = self._llm._model.vocab
        self.n_vocab = self._llm.n_vocab()
        self._buf = ctypes.create_string_buffer(256)
        self._formatter = None
        self._blocks: list[int] = []  # the cached prompt's whole n_batch blocks (see _keep_blocks)

    def _open(self, llama_cpp: Any, bundle: Bundle, seed: int | None, use_mmap: bool, n_batch: int,
              n_gpu_layers: int | None, runtime: Runtime, kv: dict[str, Any]) -> Any:
        return llama_cpp.Llama(
            model_path=str(bundle.model_file),
            n_ctx=self.n_ctx,
            n_batch=n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=int(n_gpu_layers if n_gpu_layers is not None else runtime.n_gpu_layers),
            seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
            use_mmap=use_mmap,
            logits_all=False,  # logits of the last position only: no per-token copy of n_vocab floats
            verbose=False,
            **kv,
        )

    # -- tokens -------------------------------------------------------------------------
    def _encode(self, text: str, *, add_special: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def _decode_ids(self, ids: Sequence[int]) -> str:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return "".join(dec.decode(self._piece(t)) for t in ids) + dec.decode(b"", final=True)

    def _piece(self, token: int, buf: Any = None) -> bytes:
        """The bytes of one token (special tokens render as nothing, like llama.cpp's output)."""
        buf = buf if buf is not None else ctypes.create_string_buffer(256)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: n is minus the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _chat_prompt(self, messages: list[Message]) -> tuple[list[int], tuple[str, ...]]:
        fmt = self._chat_formatter()
        try:
            rendered = fmt(messages=messages)
        except ChatTemplateError:  # hostile, runaway, or refusing these messages: already one clear line
            raise
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise UsageError(f"the bundle's chat template rejected these messages: {exc}") from None
        ids = self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        stops = tuple(s for s in (rendered.stop or []) if isinstance(s, str) and s)
        return ids, stops

    def _chat_formatter(self):
        if self._formatter is None:
            # edgepack's bounded sandbox (packager.spec.chat_template), not llama-cpp-python's
            # Jinja2ChatFormatter: a template from a stranger must not hang or exhaust the app.
            template = self._llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise UsageError(f"{self.bundle.path}: the model has no chat template; use generate() or stream() "
                                 f"with a raw prompt")
            m = self._llm._model

            def text(tok: int) -> str:
                return m.token_get_text(tok) if tok != -1 else ""

            # Always the bundle's own template (never a built-in guess), as transformers renders it.
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=text(m.token_eos()),
                                                  bos_token=text(m.token_bos()))
        return self._formatter

    # -- generation -----------------------------------------------------------------------
    def _generate(self, ids: list[int], opts: GenOptions, tick: Callable[[], bool]) -> Iterator[str]:
        llm, lc = self._llm, self._llama_cpp
        max_tokens = min(opts.max_tokens, self.n_ctx - len(ids))
        llm.set_seed(opts.seed if opts.seed is not None else self._seeds.randrange(2**31))
        self._keep_blocks(ids)
        tokens = llm.generate(
            ids, top_k=opts.top_k, top_p=opts.top_p, min_p=0.0, typical_p=1.0, temp=opts.temperature,
            repeat_penalty=opts.repeat_penalty,
        )
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buf = self._buf
        n = 0
        try:
            for token in tokens:
                if n == 0:  # the prompt is in the cache now, in whole blocks from position 0
                    self._blocks = list(ids[:len(ids) // llm.n_batch * llm.n_batch])
                if not tick():
                    return "cancelled"
                if lc.llama_vocab_is_eog(self._vocab, token):
                    break
                n += 1
                text = dec.decode(self._piece(token, buf))
                if text:
                    yield text
                if n >= max_tokens:
                    tail = dec.decode(b"", final=True)
                    if tail:
                        yield tail
                    return "length"
        finally:
            tokens.close()
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail
        return "stop"

    def _keep_blocks(self, ids: list[int]) -> None:
        """Keep only the cached prompt blocks a fresh load would compute the same way.

        The promise: the same prompt and settings give the same tokens, whatever this model
        generated before. llama.cpp's results depend on how a prompt is cut into batches (a
        near-tie between two tokens can flip), and llama-cpp-python reuses any cached prefix,
        so a prompt seen before was evaluated as 1 token where a fresh load evaluates it as n.
        Here the cache is reused only in whole n_batch blocks from position 0 of an earlier
        prompt (evaluated from a block boundary, as on a fresh load); the rest of the prompt is
        evaluated in the same batches as on a fresh load. Long conversations keep most of their
        cache; a short prompt is evaluated afresh.
        """
        llm, block = self._llm, self._llm.n_batch
        common = 0
        for a, b in zip(self._blocks, ids):
            if a != b:
                break
            common += 1
        keep = max(0, min(common, len(ids) - 1)) // block * block
        self._blocks = []  # until this call's prompt is in the cache
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep  # llama-cpp-python's generate() drops the cache after this prefix

    def _engine(self) -> LlamaEngine:
        return LlamaEngine(self)

    def _free(self) -> None:
        self._llm.close()
