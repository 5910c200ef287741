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
import hashlib
import json
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gguf
import numpy as np

from packager.bundle.manifest import Runtime
from packager.bundle.verify import Bundle
from packager.errors import BundleError, ChatTemplateError, ConversionError, UsageError, missing_backend
from packager.formats.base import NO_FLASH_KV
from packager.host import default_threads
from packager.kernels.speculative import accept_greedy, sample_at, target_probs
from packager.progress import quiet_llama_log
from packager.runtime.first_token import llama_decodes
from packager.runtime.model import Engine, EngineInfo, GenOptions, Message, Model, common_prefix
from packager.runtime.prompt_cache import MIN_TOKENS, PromptCache, PromptCacheWarning
from packager.runtime.speculative import AdaptiveLength, DraftStats, LookupDrafter, invariant_batch
from packager.source.gguf_check import check_layout, tokenizer_difference
from packager.spec.chat_template import ChatFormatter as Jinja2ChatFormatter


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    return llama_cpp


def check_loads(path: Path) -> None:
    """Load a written GGUF in llama.cpp (weights mapped), decode a token with it (runtime/first_token.py)
    and free it: `pack` publishes no bundle its own runtime cannot open or run (a config that disagrees
    with the weights, a writer bug)."""
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
    try:
        llama_decodes(lc, model, path)  # and decodes a token: some graphs fail only when they run
    finally:
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


def _cache_identity(llama_cpp: Any, bundle: Bundle, kv_type: str, flash: bool) -> dict[str, Any]:
    """What a saved prompt state is valid for: these weights, this llama.cpp build and CPU features, this cache layout."""
    folder = bundle.manifest["model_file"].rpartition("/")[0]
    weights = sorted((e["path"], e.get("sha256")) for e in bundle.files if e["path"].rpartition("/")[0] == folder)
    return {
        "model": hashlib.sha256(json.dumps(weights).encode()).hexdigest(),
        "engine": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}; "
                  f"{llama_cpp.llama_print_system_info().decode('utf-8', 'replace').strip()}",
        "cache_layout": f"type_k={kv_type} type_v={kv_type} flash_attn={int(flash)}",
    }


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


def check_draft(draft: Path, target: Path) -> Path:
    """A draft model's GGUF that can draft for ``target``: the same tokenizer, and smaller; else one line why not."""
    if not draft.is_file() or draft.suffix != ".gguf":
        raise UsageError(f"draft {draft}: not a GGUF file; pass a .gguf of a smaller model with the same tokenizer, "
                         f"or 'lookup'")
    a, b = check_layout(draft), check_layout(target)
    key = tokenizer_difference(a.tokenizer, b.tokenizer)
    if key is not None:
        raise UsageError(f"draft {draft.name} has another tokenizer than {target.name} ({key} differs); a draft "
                         f"must share the target's vocabulary, merges and special tokens")
    split = re.search(r"-\d{5}-of-(\d{5})\.gguf$", target.name)  # a split model: every part's tensors count
    parts = sorted(target.parent.glob(target.name[:split.start()] + "-*-of-" + split.group(1) + ".gguf")) if split else [target]
    da = sum(t.nbytes for t in a.tensors)
    db = sum(t.nbytes for part in parts for t in (b if part == target else check_layout(part)).tensors)
    if da >= db:
        raise UsageError(f"draft {draft.name} ({da / 1e6:.0f} MB of weights) is not smaller than {target.name} "
                         f"({db / 1e6:.0f} MB): it cannot pay off; pick a smaller model or a lower-bit quant")
    return draft


# llama.cpp (0.3.36's ggml-cpu ops.cpp, llama-kv-cache.cpp) gives one query token flash attention
# split across threads when the cache view holds >= 512 cells, and the view is the used cells padded
# to 256: so from position 256 on. A margin, so that a change of padding by a few cells stays safe.
LONE_TOKEN_CELLS = 256 - 32


class ModelDrafter:
    """Drafts with a second, smaller GGUF of the same tokenizer: greedy steps of its own per proposal.

    Its cache follows the committed tokens: before each proposal the part that no longer matches
    (rejected drafts) is dropped and what the target committed since is evaluated in one batch.
    """

    def __init__(self, llm: Any, llama_cpp: Any) -> None:
        self._llm, self._lc = llm, llama_cpp
        self._tokens: list[int] = []
        self._n_vocab = llm.n_vocab()

    def reset(self, tokens: Sequence[int]) -> None:
        self._tokens = [int(t) for t in tokens]

    def extend(self, tokens: Sequence[int]) -> None:
        self._tokens.extend(int(t) for t in tokens)

    def propose(self, k: int) -> list[int]:
        llm, toks = self._llm, self._tokens
        if k <= 0 or not toks:
            return []
        common = 0
        for a, b in zip(llm.input_ids[:llm.n_tokens], toks):
            if a != b:
                break
            common += 1
        llm.n_tokens = min(common, len(toks) - 1)  # evaluate at least the last token: its logits draft
        llm.eval(toks[llm.n_tokens:])  # eval() drops the cache after n_tokens first
        out: list[int] = []
        ctx = llm._ctx.ctx
        while True:
            row = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(ctx, -1), shape=(self._n_vocab,))
            out.append(int(np.argmax(row)))
            if len(out) == k or self._lc.llama_vocab_is_eog(llm._model.vocab, out[-1]):
                return out
            llm.eval(out[-1:])

    def close(self) -> None:
        self._llm.close()


class _Reply:
    """Hands a reply's tokens out as text, one incremental UTF-8 decoder for all of them, and says where it ends:
    at end-of-generation ("stop"), at max_tokens ("length"), or when ``tick()`` says stop ("cancelled")."""

    def __init__(self, model: "LlamaModel", max_tokens: int, tick: Callable[[], bool]) -> None:
        self._model, self._max, self._tick = model, max_tokens, tick
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n = 0  # tokens handed out

    def hand_out(self, tokens: Sequence[int]) -> Iterator[str]:
        """Yield the text of ``tokens``; return why the reply ends among them, or None."""
        m = self._model
        for t in tokens:
            if not self._tick():
                return "cancelled"
            if m._llama_cpp.llama_vocab_is_eog(m._vocab, t):
                return (yield from self.end("stop"))
            self.n += 1
            text = self._dec.decode(m._piece(t, m._buf))
            if text:
                yield text
            if self.n >= self._max:
                return (yield from self.end("length"))
        return None

    def end(self, reason: str) -> Iterator[str]:
        tail = self._dec.decode(b"", final=True)
        if tail:
            yield tail
        return reason


class LlamaModel(Model):
    """A GGUF bundle loaded into llama.cpp."""

    ENGINE = "llama_cpp"  # the module that runs it (pack bench times its import apart from the load)

    def __init__(self, bundle: Bundle, *, n_ctx: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, seed: int | None = None, use_mmap: bool = True,
                 n_batch: int = 512, flash_attn: bool | None = None,
                 draft: str | os.PathLike[str] | bool | None = None, draft_min: int = 0,
                 draft_max: int | None = None, deterministic: bool = False,
                 prompt_cache: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if not isinstance(deterministic, bool):
            raise UsageError(f"deterministic must be True or False, got {deterministic!r}")
        self.deterministic = deterministic
        if not (isinstance(draft_min, int) and draft_min >= 0 and (draft_max is None or (
                isinstance(draft_max, int) and draft_max >= max(1, draft_min)))):
            raise UsageError(f"need 0 <= draft_min <= draft_max and draft_max >= 1, got draft_min={draft_min!r}, "
                             f"draft_max={draft_max!r}")
        shipped = bundle.manifest.get("draft") or {}
        if draft is None:  # the bundle's own draft, where pack measured that it pays off
            draft = (shipped.get("kind") if shipped.get("kind") == "lookup" else bundle.file(shipped["file"])
                     if shipped.get("file") else None) if shipped.get("enabled") else None
        draft_file = None
        if draft is True or (draft not in (None, False, "lookup") and not isinstance(draft, (str, os.PathLike))):
            raise UsageError(f"draft must be 'lookup', a draft model's GGUF path, False (none) or None (the "
                             f"bundle's own), got {draft!r}")
        if draft not in (None, False, "lookup"):
            draft_file = check_draft(Path(draft), bundle.model_file)
            draft = "model"
        draft = draft or None
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
        # llama.cpp quantizes the V cache only with flash attention on. Drafting needs it too: without
        # it, a batch's logits differ from one token's (runtime/speculative.py).
        flash = bool(flash_attn) if flash_attn is not None else (draft is not None or kv_type not in NO_FLASH_KV)
        if prompt_cache is not None:
            self.prompt_cache = PromptCache(prompt_cache, _cache_identity(llama_cpp, bundle, kv_type, flash))
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
        self.draft = draft  # None, "lookup" or "model"
        self.draft_min, self.draft_max = draft_min, draft_max  # drafts per step, where drafts are found
        self.draft_file = draft_file
        self._drafter: ModelDrafter | None = None
        self.draft_stats = DraftStats()  # of the last reply
        self.draft_batch = 1  # tokens one verification step may hold and stay bit-identical
        self._spec_batch, self._spec_capacity = None, 0
        self._step_seconds: list[float] = []
        self._length: AdaptiveLength | None = None
        self.lone_threads: int | None = None  # past LONE_TOKEN_CELLS: lone tokens on 1 thread, or None (filler rows)
        try:
            if draft_file is not None:
                with quiet_llama_log():
                    self._drafter = ModelDrafter(llama_cpp.Llama(
                        model_path=str(draft_file), n_ctx=self.n_ctx, n_batch=n_batch, n_threads=self.n_threads,
                        n_threads_batch=self.n_threads, n_gpu_layers=0 if not runtime.n_gpu_layers else -1,
                        use_mmap=use_mmap, logits_all=False, verbose=False, flash_attn=flash), llama_cpp)
            if draft is not None:
                # Measured here, not taken from the manifest: another CPU may switch kernels elsewhere. The
                # packing machine's figure is checked first (one comparison), searched only if it fails.
                packed = int((shipped.get("measured") or {}).get("max_batch") or 0)
                self.draft_batch = (packed if packed > 1 and self._measure_invariance((packed,)) == packed
                                    else self._measure_invariance())
        except BaseException:
            self._free()  # nothing of a half-loaded model stays mapped
            raise

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
            # Sliding-window layers (Gemma 2/3) cache only their window, as the plan counts them; llama-cpp-python's
            # default gives them the whole context. No effect on models without sliding layers.
            swa_full=False,
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

    def _render(self, messages: list[Message], context: dict[str, Any]) -> Any:
        fmt = self._chat_formatter()
        try:
            return fmt(messages=messages, **context)
        except ChatTemplateError:  # hostile, runaway, or refusing these messages: already one clear line
            raise
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise UsageError(f"the bundle's chat template rejected these messages: {exc}") from None

    def _chat_text(self, messages: list[Message], **context: Any) -> str:
        return self._render(messages, context).prompt

    def _template(self) -> str | None:
        return self._llm.metadata.get("tokenizer.chat_template") or None

    def _chat_prompt(self, messages: list[Message], **context: Any) -> tuple[list[int], tuple[str, ...]]:
        rendered = self._render(messages, context)
        ids = self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        stops = tuple(s for s in (rendered.stop or []) if isinstance(s, str) and s)
        return ids, stops

    @property
    def has_chat_template(self) -> bool:
        return bool(self._llm.metadata.get("tokenizer.chat_template"))

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
    def _generate(self, ids: list[int], opts: GenOptions, tick: Callable[[], bool], *, fixed: int = 0) -> Iterator[str]:
        self.draft_stats = DraftStats()
        deterministic = self._is_deterministic(opts)
        self._reuse(ids, deterministic, fixed)
        if self._drafting(opts):
            return (yield from self._generate_drafted(ids, opts, tick, deterministic))
        llm = self._llm
        max_tokens = min(opts.max_tokens, self.n_ctx - len(ids))
        llm.set_seed(opts.seed if opts.seed is not None else self._seeds.randrange(2**31))
        # generate() keeps the n_tokens that _reuse left (its own longest-prefix match finds exactly those)
        tokens = llm.generate(
            ids, top_k=opts.top_k, top_p=opts.top_p, min_p=0.0, typical_p=1.0, temp=opts.temperature,
            repeat_penalty=opts.repeat_penalty,
        )
        out = _Reply(self, max_tokens, tick)
        try:
            for token in tokens:
                if out.n == 0 and deterministic:  # the prompt is in the cache now, in whole blocks from position 0
                    self._blocks = list(ids[:len(ids) // llm.n_batch * llm.n_batch])
                end = yield from out.hand_out((token,))
                if end is not None:
                    return end
        finally:
            tokens.close()
        return (yield from out.end("stop"))

    # -- speculative decoding (runtime/speculative.py) ----------------------------------------
    def _drafting(self, opts: GenOptions) -> bool:
        """A model with a draft decodes in the verifying loop, with drafts or (speculative=False) without.

        Past LONE_TOKEN_CELLS tokens and with threads > 1, llama.cpp's flash attention splits a lone
        token's cache across threads, which sums in another order than a batch does, so a single-token
        step there would not give a batch row's logits. Both ways, a step with nothing to draft then
        runs its lone token on one thread (no split: a batch row's logits, checked at load), or, where
        that costs more here than a batch of two, verifies one filler token as well (lookup's best
        guess, else the last token; kept if right). A repeat penalty's sampler keeps a window of
        accepted tokens that llama.cpp holds and we cannot roll back: such calls go through
        llama.cpp's own chain, undrafted.
        """
        return self.draft is not None and self.draft_batch > 1 and opts.repeat_penalty == 1.0

    def _rows(self, tokens: Sequence[int], pos: int) -> Any:
        """Evaluate ``tokens`` at positions ``pos``.. as one batch; their logits, one row each."""
        lc, ctx = self._llama_cpp, self._llm._ctx.ctx
        if self._spec_batch is None or len(tokens) > self._spec_capacity:
            if self._spec_batch is not None:
                lc.llama_batch_free(self._spec_batch)
            self._spec_capacity = max(len(tokens), 16)
            self._spec_batch = lc.llama_batch_init(self._spec_capacity, 0, 1)
        b = self._spec_batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos + i, 1, 1
            b.seq_id[i][0] = 0
        rc = lc.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {len(tokens)} at position {pos}")
        return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(tokens), self.n_vocab))

    def _measure_invariance(self, sizes: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9)) -> int:
        """The largest verification batch that gives the logits of single steps, bit for bit, here.

        The same pass times each batch size: ``self._step_seconds[n]``, what a step of n tokens
        costs, from which the draft length is chosen (runtime/speculative.py's AdaptiveLength).
        """
        text = ("The river rose for three days. The farmers moved their animals to the hills, and the village "
                "school became a shelter. When the water fell, the fields were covered in silt.")
        tokens = self._encode(text, add_special=True)
        llm = self._llm
        times: dict[int, list[float]] = {}
        reference: list[Any] = []  # the first pass of lone tokens (invariant_batch's own reference)

        def logits_of(toks: Sequence[int], batch: int) -> Any:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            out, pos = [], 8
            self._rows(toks[:pos], 0)
            while pos < len(toks):
                chunk = toks[pos:pos + batch]
                t0 = time.perf_counter()
                out.append(self._rows(chunk, pos).copy())
                times.setdefault(len(chunk), []).append(time.perf_counter() - t0)
                pos += len(chunk)
            result = np.concatenate(out)
            if batch == 1 and not reference:
                reference.append(result)
            return result

        compared = tokens[:8 + 2 * max(sizes)]
        lone: list[float] = []
        try:
            best = invariant_batch(logits_of, compared, prefix=8, sizes=sizes)
            if best > 1 and self.n_threads > 1:
                # A lone token on one thread never takes llama.cpp's split-cache path; it should give a batch
                # row's logits as any thread count does (each row is one thread's sum). Checked, and timed.
                n_single = len(times[1])
                self._single_threads(1)
                try:
                    same = bool(np.array_equal(logits_of(compared, 1), reference[0]))
                finally:
                    self._single_threads(self.n_threads)
                lone = times[1][n_single:] if same else []
                del times[1][n_single:]
        finally:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        # Each size's median; sizes not timed lie on the line between the nearest ones that were.
        known = {n: float(np.median(v)) for n, v in times.items() if n <= best}
        xs = sorted(known)
        self._step_seconds = [0.0] + [float(np.interp(n, xs, [known[x] for x in xs])) for n in range(1, best + 1)]
        if best > 1:
            self._length = AdaptiveLength(best - 1, self._step_seconds)
            # Past LONE_TOKEN_CELLS a step without drafts is a lone token on one thread or a batch of two
            # (a filler row): whichever costs less here.
            self.lone_threads = 1 if lone and float(np.median(lone)) < self._step_seconds[2] else None
        return best

    def _single_threads(self, n: int) -> None:
        """Threads for a lone token's step (llama.cpp's n_threads); batches keep all of them."""
        self._llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, n, self.n_threads)

    def _generate_drafted(self, ids: list[int], opts: GenOptions, tick: Callable[[], bool],
                          deterministic: bool) -> Iterator[str]:
        """Decoding that verifies drafts (none with speculative=False): greedy, the same tokens either way;
        sampled, the model's distribution, the same tokens for the same seed either way (kernels/speculative.py's
        sample_at)."""
        llm, lc = self._llm, self._llama_cpp
        max_tokens = min(opts.max_tokens, self.n_ctx - len(ids))
        llm.eval(ids[llm.n_tokens:])  # what the cache lacks (_reuse), in the batches llm.generate() would use
        if deterministic:
            self._blocks = list(ids[:len(ids) // llm.n_batch * llm.n_batch])
        greedy = opts.temperature == 0
        seed = opts.seed if opts.seed is not None else self._seeds.randrange(2**31)

        def choose(row: Any, position: int) -> int:
            """The model's token at ``position`` from the logits before it: argmax, or a seeded sample."""
            if greedy:
                return int(np.argmax(row))
            probs = target_probs(row, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
            return sample_at(probs, seed, position)

        last = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(self.n_vocab,))
        tok = choose(last, len(ids))
        drafter = (self._drafter or LookupDrafter()) if opts.speculative else None
        if drafter is not None:
            drafter.reset(ids)
        pad = self.n_threads > 1  # see _drafting
        length = self._length  # its costs and acceptance carry over from reply to reply
        stats = self.draft_stats
        out, pos = _Reply(self, max_tokens, tick), len(ids)
        pending: list[int] = [tok]  # tokens decided but not yet handed out
        one_thread = False  # lone tokens on one thread from LONE_TOKEN_CELLS on (self.lone_threads)
        try:
            while True:
                end = yield from out.hand_out(pending)
                if end is not None:
                    return end
                n = out.n
                tok = pending[-1]
                # Never draft past the reply's end or the context's: a kept draft must be one we could hand out.
                cap = min(length.k_max, self.draft_max or length.k_max)
                room = min(cap, max_tokens - n - 1, self.n_ctx - pos - 1)
                t0 = time.perf_counter()
                drafts, key, proposal = [], 0, []
                if drafter is not None:
                    drafter.extend(pending)
                    if room > 0 and getattr(drafter, "free", False):  # lookup: the longest, cut to what pays
                        proposal = drafter.propose(room)
                        key = drafter.match
                        k = min(cap, max(self.draft_min, length.length(key)))
                        if proposal and k == 0:
                            length.skipped(key)
                        drafts = proposal[:k]
                    elif room > 0:
                        k = min(cap, max(self.draft_min, length.length(0)))
                        if k == 0:
                            length.skipped(0)
                        drafts = drafter.propose(min(room, k))
                drafting = time.perf_counter() - t0
                lone = pad and not drafts and pos + 1 > LONE_TOKEN_CELLS
                if lone and self.lone_threads is not None and not one_thread:
                    self._single_threads(self.lone_threads)  # see _drafting
                    one_thread = True
                filler = lone and not one_thread and self.n_ctx - pos > 1
                if filler:  # a guess that costs a batch row: the step stays a batch (see _drafting)
                    drafts = proposal[:1] or [tok]  # the row is paid for: the best guess there is
                t0 = time.perf_counter()
                rows = self._rows([tok] + drafts, pos)
                length.observe_step(1 + len(drafts), time.perf_counter() - t0)
                # Row i gives the token at pos + 1 + i; drafts are kept while they are that token.
                choices = [choose(rows[0], pos + 1)]
                while len(choices) <= len(drafts) and choices[-1] == drafts[len(choices) - 1]:
                    choices.append(choose(rows[len(choices)], pos + 1 + len(choices)))
                kept = accept_greedy(choices, drafts)
                nxt = choices[kept]
                llm.input_ids[pos:pos + 1 + kept] = [tok] + drafts[:kept]
                pos += 1 + kept
                llm.n_tokens = pos
                if kept < len(drafts):  # the rejected drafts leave the cache
                    llm._ctx.kv_cache_seq_rm(-1, pos, -1)
                if not filler:
                    length.update(len(drafts), kept, drafting if self._drafter is not None else None, key)
                    stats.drafted += len(drafts)
                    stats.accepted += kept
                stats.steps += 1
                stats.emitted += kept + 1
                pending = drafts[:kept] + [nxt]
        finally:
            if one_thread:
                self._single_threads(self.n_threads)

    def _reuse(self, ids: list[int], deterministic: bool, fixed: int) -> None:
        """Leave in the cache (``llm.n_tokens``) the prefix of ``ids`` this call keeps; the caller evaluates the rest.

        By default that is everything the cache holds of ``ids`` (the previous prompt and reply, as far as they
        agree), and at least the last token is evaluated again for its logits. With a prompt cache, a fixed
        prefix (a chat's system prompt) the cache lacks is restored from disk, or read and saved there.
        ``deterministic`` keeps only what a fresh load computes the same way (_keep_blocks).
        """
        if deterministic:
            self._keep_blocks(ids)
            return
        llm = self._llm
        self._blocks = []  # what this call evaluates is cut into other batches than a fresh load's
        keep = self._window_keeps(min(common_prefix(llm.input_ids[:llm.n_tokens], ids), len(ids) - 1))
        if self.prompt_cache is not None and keep < fixed < len(ids) and fixed >= MIN_TOKENS:
            keep = self._fixed_state(ids[:fixed], keep)
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep  # llama-cpp-python's generate() and eval() drop the cache after this prefix

    def _window_keeps(self, keep: int) -> int:
        """``keep``, or 0 where a sliding-window layer has already dropped cells the tokens after ``keep`` attend to.

        With swa_full=False (Gemma 2/3) a sliding layer holds only the last window of positions; rewinding to
        ``keep`` needs the window before it (llama-server's rule: the oldest cell kept must not be past
        ``keep - n_swa``). Models without sliding layers keep everything from position 0.
        """
        if keep == 0:
            return 0
        lc, llm = self._llama_cpp, self._llm
        oldest = lc.llama_memory_seq_pos_min(lc.llama_get_memory(llm._ctx.ctx), 0)
        return 0 if oldest > max(0, keep - lc.llama_model_n_swa(llm._model.model)) else keep

    def _fixed_state(self, prefix: list[int], keep: int) -> int:
        """Put ``prefix`` in the cache from the prompt cache, or read it (after the ``keep`` tokens already there)
        and save it; the tokens the cache then holds."""
        llm, lc, cache = self._llm, self._llama_cpp, self.prompt_cache
        n = len(prefix)
        path = cache.find(prefix)
        if path is not None:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            got = (lc.llama_token * n)()
            n_got = ctypes.c_size_t(0)
            with quiet_llama_log():
                read = lc.llama_state_seq_load_file(llm._ctx.ctx, os.fsencode(path), 0, got, n, ctypes.byref(n_got))
            if read and n_got.value == n and list(got) == prefix:
                llm.input_ids[:n] = prefix
                llm.n_tokens = n
                cache.hits += 1
                return n
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # a state llama.cpp refused: nothing of it stays
            keep = 0
            warnings.warn(f"prompt cache {path}: llama.cpp could not restore it; ignored, it is rebuilt",
                          PromptCacheWarning, stacklevel=2)
        elif cache.is_saved(prefix):  # saved by this process, then left the cache (another conversation)
            return keep
        llm.n_tokens = keep
        llm.eval(prefix[keep:])

        def write(dest: Path) -> None:
            toks = (lc.llama_token * n)(*prefix)
            if not lc.llama_state_seq_save_file(llm._ctx.ctx, os.fsencode(dest), 0, toks, n):
                raise OSError(f"llama.cpp could not write {dest}")

        cache.store(prefix, write)
        return n

    def _keep_blocks(self, ids: list[int]) -> None:
        """Keep only the cached prompt blocks a fresh load would compute the same way (deterministic=True).

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
        keep = self._window_keeps(max(0, min(common, len(ids) - 1)) // block * block)
        self._blocks = []  # until this call's prompt is in the cache
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep  # llama-cpp-python's generate() drops the cache after this prefix

    def _engine(self) -> LlamaEngine:
        return LlamaEngine(self)

    def _free(self) -> None:
        if self._drafter is not None:
            self._drafter.close()
        if self._spec_batch is not None:
            self._llama_cpp.llama_batch_free(self._spec_batch)
            self._spec_batch = None
        self._llm.close()
