"""The Model every backend implements, and the Stream it hands out.

Threading contract (the same for every backend):

- One Model may be shared by any number of threads. Generation is serialized: a
  stream owns the model's context from its first ``next()`` until it ends (read to
  the end, ``close()``d, ``cancel()``led, or garbage-collected); another thread's
  stream, ``generate`` or ``chat`` waits for it. Pieces of two replies never mix.
  Waiting calls are served first come, first served: a thread that generates in a
  loop cannot starve another (a UI's request waits for one reply at most per caller
  ahead of it).
- ``tokenize``/``detokenize`` only read the vocabulary and never wait for a stream.
- ``Stream.cancel()`` may be called from any thread (a UI's Stop button): decoding
  stops before the next token, the stream ends with ``finish_reason == "cancelled"``,
  and the model is free for the next call at once.
- ``Model.close()`` from any thread cancels the stream in progress, waits for the
  token being decoded (never for the rest of the reply), then frees the model. The
  cancelled stream ends quietly (``finish_reason == "cancelled"``); every later call
  raises ModelClosedError.
- One thread may not start a second stream while its own first one is still open:
  that would wait for itself forever, so it raises UsageError instead.

A backend subclasses Model and implements the ``_`` hooks below; locking,
cancellation, stop strings, context checks and truncation live here, once.

What a model has read (the prompt cache, as llama.cpp's server calls it):

- A call evaluates only the prompt tokens its context does not hold yet: the longest common
  prefix with what it evaluated before, the previous reply included, is kept. A chat's later
  turns therefore read only the new message; an edit early in the history, another
  conversation or a prompt cut by ``truncate="left"`` reads again from where it differs.
- The price: llama.cpp's (and ONNX Runtime's) results depend slightly on how a prompt is cut
  into batches, so the same prompt can give other tokens at a near-tie after other calls than
  on a fresh load. ``deterministic=True`` (on load or per call; ``pack run --deterministic``)
  evaluates every prompt as a fresh load would, keeping only cached whole batches that a fresh
  load computes the same way: the same prompt and settings then give the same tokens whatever
  came before. Seeded sampling is seeded either way.
- ``load(..., prompt_cache=DIR)`` keeps a chat's fixed beginning (its system prompt, as the
  template renders it) on disk after the first time it is read, and a later load restores it
  instead of reading it again, where the backend can save its state (GGUF; the file records
  the model's hash, the engine build and the cache layout, and anything else is rebuilt).

Thinking models (Qwen3's ``enable_thinking``, the R1 distills' ``<think>`` blocks;
packager.spec.thinking): ``chat(messages, think=True|False)`` sets the template's switch (a
one-line ThinkingSwitchError where it has none), and a reply's reasoning is kept apart from its
answer: iterating a stream (and ``chat()``'s string) gives the answer only; ``Stream.reasoning``
holds the reasoning, and ``Stream.parts()`` streams both as ``Part(kind, text)``.

``Model.engine()`` hands measuring code (`pack bench`, `pack quality`) the engine under the
model, driven token by token without sampling, as llama-bench and llama-perplexity drive
llama.cpp: the same loaded weights, threads and context an app gets, for either format.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

from packager.errors import ContextOverflowError, ModelClosedError, UsageError
from packager.runtime.stops import StopFilter
from packager.spec.thinking import NOT_THINKING, Part, Thinking, ThinkSplitter, starts_in_reasoning, thinking_of

Message = dict[str, str]
TRUNCATE = (None, "left")


@dataclass(frozen=True)
class EngineInfo:
    """The engine under a loaded model, in llama-bench's terms (a benchmark record's columns)."""

    model_type: str  # e.g. "llama 256M Q4_1", as llama-bench prints it
    model_size: int  # bytes of the weights
    model_n_params: int
    n_ctx: int
    n_batch: int  # tokens per evaluation call
    n_ubatch: int  # tokens per micro-batch inside one call
    type_k: str | None  # KV cache types
    type_v: str | None
    n_threads: int
    n_gpu_layers: int
    flash_attn: int
    backends: str  # "CPU", "CUDA", ... (llama-bench's column)
    gpu_offload: bool  # the engine can run layers on a GPU
    engine: str  # the library and its version


class Engine(ABC):
    """A loaded model's engine, driven without sampling: what `pack bench` times and `pack quality` reads.

    Take it with ``Model.engine()`` while no stream is open; it belongs to the calling thread.
    """

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    @property
    @abstractmethod
    def bos(self) -> int | None:
        """The token a prompt starts with, or None when the model adds none."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def eval(self, tokens: Sequence[int]) -> None:
        """Run ``tokens`` after those in the cache, as one batch, and wait until the device is done."""


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for a backend: its token ids, the stop strings its template implies, and how many of its
    leading tokens are the same on every turn and every launch (a chat's system prompt: what a prompt cache keeps)."""

    ids: list[int]
    stops: tuple[str, ...] = ()
    fixed: int = 0
    thinking: Thinking = NOT_THINKING  # how the reply's reasoning is told from its answer
    in_reasoning: bool = False  # the prompt opened a <think> block: the reply starts as reasoning


@dataclass(frozen=True)
class GenOptions:
    """Generation options; the bundle's defaults fill what the caller leaves out.

    ``truncate="left"`` drops the oldest prompt tokens (for chat: the oldest turns,
    never the system message or the last message) so that the prompt leaves room for
    ``min(max_tokens, n_ctx // 2)`` new tokens; without it an over-long prompt raises
    ContextOverflowError.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None
    truncate: str | None = None
    speculative: bool = True  # use the bundle's draft where it has one (greedy output is the same)
    # None: the model's setting (load(..., deterministic=...)). True: the prompt is evaluated as a fresh
    # load would (same tokens whatever came before); False: only what the cache lacks (see Model.chat).
    deterministic: bool | None = None

    @classmethod
    def build(cls, defaults: dict[str, Any], opts: dict[str, Any]) -> "GenOptions":
        names = {f.name for f in fields(cls)}
        unknown = set(opts) - names
        if unknown:
            raise UsageError(f"unknown generation option(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(names))}")
        merged = {k: v for k, v in defaults.items() if k in names} | {k: v for k, v in opts.items() if v is not None}
        if isinstance(merged.get("stop"), str):
            merged["stop"] = (merged["stop"],)
        elif merged.get("stop") is not None:
            merged["stop"] = tuple(merged["stop"])
        o = cls(**merged)
        if not isinstance(o.max_tokens, int) or o.max_tokens < 1:
            raise UsageError(f"max_tokens must be an integer of at least 1, got {o.max_tokens!r}")
        if o.temperature < 0 or not 0 < o.top_p <= 1 or o.top_k < 0 or o.repeat_penalty <= 0:
            raise UsageError("temperature must be >= 0, top_p in (0, 1], top_k >= 0 and repeat_penalty > 0")
        if o.seed is not None and (not isinstance(o.seed, int) or o.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {o.seed!r}")
        if o.truncate not in TRUNCATE:
            raise UsageError(f"truncate must be 'left' or None, got {o.truncate!r}")
        if not isinstance(o.speculative, bool):
            raise UsageError(f"speculative must be True or False, got {o.speculative!r}")
        if o.deterministic is not None and not isinstance(o.deterministic, bool):
            raise UsageError(f"deterministic must be True, False or None (the model's setting), got {o.deterministic!r}")
        if not all(isinstance(s, str) for s in o.stop):
            raise UsageError("stop must be a string or a list of strings")
        return o

    def reserve(self, n_ctx: int) -> int:
        """Tokens a truncated prompt leaves free for the reply."""
        return max(1, min(self.max_tokens, n_ctx // 2))


class Stream(Iterator[str]):
    """Text pieces of one reply as they decode. Iterate it, or ``close()``/``cancel()`` it.

    After it ends: ``finish_reason`` is "stop" (end of text or a stop string), "length"
    (max_tokens or the end of the context), "cancelled" (cancel(), close(), Ctrl-C,
    Model.close()) or "error" (the exception was raised to the reader); ``n_prompt`` and
    ``n_generated`` count tokens (``n_generated`` counts sampled tokens, so it can be
    one more than the text shows when the last one was end-of-text).

    A thinking model's reply: iterating gives the answer's pieces only, ``reasoning`` collects the
    reasoning as it streams, and ``parts()`` yields both in order as ``Part(kind, text)``.
    """

    def __init__(self, model: "Model", prepare: Callable[[GenOptions], Prompt], opts: GenOptions) -> None:
        self._model = model
        self._prepare = prepare
        self._opts = opts
        self._gen: Iterator[str] | None = None
        self._started = False
        self._running = False
        self._owner: int | None = None
        self._cancelled = False
        self._end: str | None = None
        self.finish_reason: str | None = None
        self.n_prompt = 0
        self.n_generated = 0
        self.reasoning = ""

    # -- control, from any thread ------------------------------------------------
    def cancel(self) -> None:
        """Stop decoding before the next token; the stream then ends ("cancelled")."""
        self._cancelled = True
        with self._model._cond:  # a stream still waiting for the model stops waiting
            self._model._cond.notify_all()

    def close(self) -> None:
        """End the stream now (from the thread reading it) or at its next token (from another)."""
        self._cancelled = True
        with self._model._cond:
            if not self._running:
                self._finish("cancelled")

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- iteration ------------------------------------------------------------------
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        while True:
            part = self._next_part()
            if part.kind == "answer":
                return part.text

    def parts(self) -> Iterator[Part]:
        """Every piece of the reply in order, reasoning and answer, as ``Part(kind, text)``."""
        while True:
            try:
                yield self._next_part()
            except StopIteration:
                return

    def _next_part(self) -> Part:
        m = self._model
        me = threading.get_ident()
        with m._cond:
            if self.finish_reason is not None:
                raise StopIteration
            if self._running:
                raise UsageError("this stream is being read by another thread; read a stream from one thread at a time")
            if not self._started:
                m._queue.append(self)
                try:
                    while not m._closed and not self._cancelled and (m._active is not None or m._queue[0] is not self):
                        if m._active is not None and m._active._owner == me:
                            raise UsageError("another stream of this model is still open in this thread; "
                                             "read it to the end or close() it first")
                        m._cond.wait()
                finally:
                    m._queue.remove(self)
                    m._cond.notify_all()  # the next in line may go
                if m._closed or self._cancelled:
                    self._finish("cancelled")
                    raise StopIteration
                m._active_ref = weakref.ref(self)
                self._started = True
            elif m._closed or self._cancelled:
                self._finish("cancelled")
                raise StopIteration
            self._running = True
            self._owner = me
            m._busy += 1
        reason = None
        try:
            if self._gen is None:
                self._gen = _run(m, self._prepare, self._opts, weakref.ref(self))
            part = next(self._gen)
            if part.kind == "reasoning":
                self.reasoning += part.text
            return part
        except StopIteration:
            reason = "cancelled" if self._cancelled else (self._end or "stop")
            raise
        except KeyboardInterrupt:  # Ctrl-C: this reply is over, the model stays usable
            reason = "cancelled"
            raise
        except BaseException:
            reason = "cancelled" if self._cancelled else "error"
            raise
        finally:
            with m._cond:
                self._running = False
                m._busy -= 1
                if reason is not None:
                    self._finish(reason)
                m._cond.notify_all()

    def _tick(self) -> bool:
        """Called by the backend once per sampled token: False means stop now."""
        self.n_generated += 1
        return not (self._cancelled or self._model._closed)

    def _finish(self, reason: str) -> None:
        """End the stream (model._cond held, stream not running in another thread)."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        if self._gen is not None:
            self._gen.close()
        m = self._model
        if m._active_ref is not None and m._active_ref() in (self, None):
            m._active_ref = None
            m._cond.notify_all()

    def __del__(self) -> None:  # an abandoned stream must not hold the model forever
        try:
            if self.finish_reason is None and not self._running:
                with self._model._cond:
                    self._finish("cancelled")
        except Exception:
            pass


def _run(m: "Model", prepare: Callable[[GenOptions], Prompt], opts: GenOptions,
         ref: "weakref.ref[Stream]") -> Iterator[Part]:
    """The body of a Stream: prompt, backend pieces, stop strings, reasoning told from the answer. Holds the
    stream only weakly."""
    prompt = prepare(opts)
    ids = prompt.ids

    def tick() -> bool:
        s = ref()
        return s._tick() if s is not None else False

    s = ref()
    if s is not None:
        s.n_prompt = len(ids)
    del s
    stops = StopFilter(opts.stop + prompt.stops)
    th = prompt.thinking
    split = ThinkSplitter(in_reasoning=prompt.in_reasoning, open_tag=th.open_tag, close_tag=th.close_tag) \
        if th.thinks else None

    def parts(text: str, last: bool = False) -> list[Part]:
        if split is None:
            return [Part("answer", text)] if text else []
        return split.feed(text) + (split.finish() if last else [])

    backend = m._generate(ids, opts, tick, fixed=prompt.fixed)
    try:
        while True:
            try:
                piece = next(backend)
            except StopIteration as stop:
                end = stop.value or "stop"
                yield from parts(stops.flush(), last=True)
                break
            text, hit = stops.feed(piece)
            yield from parts(text, last=hit)
            if hit:
                end = "stop"
                break
    finally:
        backend.close()  # a generator closed early stops decoding here
    s = ref()
    if s is not None:
        s._end = end


class Model(ABC):
    """A loaded bundle: generate, stream, chat, tokenize. Thread-safe (see the module doc)."""

    n_ctx: int
    n_vocab: int | None = None  # set by a backend that knows it: token-id prompts are checked against it
    defaults: dict[str, Any]
    deterministic: bool = False  # every prompt evaluated as on a fresh load (GenOptions.deterministic)
    prompt_cache: Any = None  # where a backend keeps fixed prefixes across loads, or None

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._active_ref: weakref.ref[Stream] | None = None  # the stream that owns the context
        self._queue: deque[Stream] = deque()  # streams waiting for the context, first come first served
        self._busy = 0  # calls executing inside the backend right now
        self._closed = False
        self.defaults = {}
        self._fixed: dict[tuple[Any, ...], list[int]] = {}  # leading system messages -> their rendered tokens
        self._thinking: Thinking | None = None
        self._opens: dict[tuple[Any, ...], bool] = {}

    # -- backend hooks ---------------------------------------------------------------
    @abstractmethod
    def _encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS where the model's tokenizer does."""

    @abstractmethod
    def _decode_ids(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _chat_prompt(self, messages: list[Message], **context: Any) -> tuple[list[int], tuple[str, ...]]:
        """The conversation rendered with the bundle's chat template (generation prompt added, ``context``:
        extra template variables such as enable_thinking), as token ids, and any stop strings it implies."""

    @abstractmethod
    def _chat_text(self, messages: list[Message], **context: Any) -> str:
        """The conversation rendered with the bundle's chat template, as text."""

    @abstractmethod
    def _template(self) -> str | None:
        """The bundle's chat template (None: it has none)."""

    @abstractmethod
    def _generate(self, ids: list[int], opts: GenOptions, tick: Callable[[], bool], *, fixed: int = 0) -> Iterator[str]:
        """Yield text pieces decoded after ``ids`` (which fit the context). Call ``tick()`` once
        per sampled token and stop at once when it returns False. Stop strings are handled
        by the caller. Return "stop" (end of text) or "length" (max_tokens, end of context).
        The first ``fixed`` ids are a prefix worth keeping across loads (``Prompt.fixed``)."""

    @abstractmethod
    def _free(self) -> None:
        """Release the engine; no call is running."""

    @abstractmethod
    def _engine(self) -> Engine:
        """The engine for measuring (see :class:`Engine`)."""

    # -- public API --------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], **opts: Any) -> Stream:
        """Yield text pieces of the completion of ``prompt`` (raw text or token ids) as they decode."""
        o = self._options(opts)
        if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt)):
            raise UsageError("prompt must be a string or a list of token ids")

        if not isinstance(prompt, str) and self.n_vocab is not None:
            bad = [t for t in prompt if not 0 <= t < self.n_vocab]
            if bad:  # llama.cpp would fail mid-decode on it
                raise UsageError(f"token id {bad[0]} is not in the vocabulary (0..{self.n_vocab - 1})")

        def prepare(o: GenOptions) -> Prompt:
            ids = self._encode(prompt, add_special=True) if isinstance(prompt, str) else list(prompt)
            if not ids:  # nothing to continue from: the backend has no logits to sample
                raise UsageError("the prompt is empty: give some text or token ids")
            return Prompt(self._fit(ids, o))

        return Stream(self, prepare, o)

    def generate(self, prompt: str | Sequence[int], **opts: Any) -> str:
        """The whole completion of ``prompt`` as one string."""
        return self._whole(self.stream(prompt, **opts))

    def chat(self, messages: list[Message], *, stream: bool = False, think: bool | None = None,
             **opts: Any) -> str | Stream:
        """The assistant's reply to ``messages`` ([{"role": ..., "content": ...}, ...]), rendered
        with the bundle's chat template; ``stream=True`` returns a Stream of pieces.

        ``think`` sets a thinking model's switch (True: reason first, False: answer at once; None: the
        template's default). The reply (or the stream's pieces) is the answer; a stream's ``reasoning``
        and ``parts()`` give the reasoning.
        """
        pieces = self.chat_stream(messages, think=think, **opts)
        return pieces if stream else self._whole(pieces)

    def chat_stream(self, messages: list[Message], *, think: bool | None = None, **opts: Any) -> Stream:
        """Same as ``chat(messages, stream=True)``."""
        o = self._options(opts)
        if think is not None and not isinstance(think, bool):
            raise UsageError(f"think must be True, False or None (the template's default), got {think!r}")
        thinking = self.thinking
        context = thinking.context(think)  # a template without the switch: one line, before anything runs
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise UsageError('messages must be a non-empty list of {"role": str, "content": str} dicts')
        msgs = [dict(m) for m in messages]  # the caller may edit its list while we stream

        def prepare(o: GenOptions) -> Prompt:
            ids, stops = self._fit_chat(msgs, o, context)
            fixed = self._fixed_prefix(msgs, ids, context) if self.prompt_cache is not None else 0
            return Prompt(ids, stops, fixed, thinking, thinking.thinks and self._opens_reasoning(context))

        return Stream(self, prepare, o)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS where the model adds one, unless ``add_special=False``)."""
        with self._using():
            return self._encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        with self._using():
            return self._decode_ids(list(ids))

    def engine(self) -> Engine:
        """The engine under this model, for measuring: evaluate tokens without sampling (see :class:`Engine`).

        It shares the model's context: use it from one thread, while no stream is open.
        """
        with self._cond:
            if self._closed:
                raise ModelClosedError("this model is closed; load the bundle again")
            if self._active is not None or self._queue:
                raise UsageError("a stream is open on this model; finish or close it before measuring")
        return self._engine()

    def close(self) -> None:
        """Free the model: cancels a stream in progress (at its next token) and waits for it."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._active._cancelled = True
            while self._busy:
                self._cond.wait()
            if self._active is not None:
                self._active._finish("cancelled")
            self._free()
            self._cond.notify_all()  # streams waiting for the model end now ("cancelled")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------
    def _whole(self, s: Stream) -> str:
        text = "".join(s)
        if s.finish_reason == "cancelled":  # only close() can cancel a stream nobody else holds
            raise ModelClosedError("the model was closed while this call was generating; load the bundle again")
        return text

    @property
    def _active(self) -> Stream | None:
        return self._active_ref() if self._active_ref is not None else None

    def _options(self, opts: dict[str, Any]) -> GenOptions:
        if self._closed:
            raise ModelClosedError("this model is closed; load the bundle again")
        return GenOptions.build(self.defaults, opts)

    def _using(self):
        model = self

        class _Use:
            def __enter__(self) -> None:
                with model._cond:
                    if model._closed:
                        raise ModelClosedError("this model is closed; load the bundle again")
                    model._busy += 1

            def __exit__(self, *exc: object) -> None:
                with model._cond:
                    model._busy -= 1
                    model._cond.notify_all()

        return _Use()

    def _overflow(self, n_prompt: int, what: str = "the prompt") -> ContextOverflowError:
        return ContextOverflowError(
            f"{what} has {n_prompt} tokens but the context holds {self.n_ctx}; shorten it, "
            f"pass truncate='left', or load with a larger n_ctx"
        )

    def _fit(self, ids: list[int], o: GenOptions) -> list[int]:
        """The prompt ids, cut on the left only when asked; a prompt that leaves no room raises."""
        if o.truncate == "left" and len(ids) + o.reserve(self.n_ctx) > self.n_ctx:
            keep = self.n_ctx - o.reserve(self.n_ctx)
            bos = self._encode("", add_special=True)[:1]  # keep a leading BOS: the model expects it
            if bos and ids[:1] == bos:
                return bos + ids[len(ids) - keep + 1:]
            return ids[len(ids) - keep:]
        if len(ids) >= self.n_ctx:
            raise self._overflow(len(ids))
        return ids

    def _fit_chat(self, msgs: list[Message], o: GenOptions,
                  context: dict[str, Any] | None = None) -> tuple[list[int], tuple[str, ...]]:
        """Render the conversation; with truncate='left', drop the oldest turns until it fits."""
        while True:
            ids, stops = self._chat_prompt(msgs, **(context or {}))
            room = o.reserve(self.n_ctx) if o.truncate == "left" else 1
            if len(ids) + room <= self.n_ctx:
                return ids, stops
            droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
            if o.truncate != "left" or not droppable:
                what = "the conversation" if o.truncate != "left" else "the last message (with the system prompt)"
                raise self._overflow(len(ids), what)
            del msgs[droppable[0]]

    def _is_deterministic(self, o: GenOptions) -> bool:
        return self.deterministic if o.deterministic is None else o.deterministic

    @property
    def thinking(self) -> Thinking:
        """Whether and how the model reasons in ``<think>`` blocks: the manifest's record, else its template's."""
        if self._thinking is None:
            bundle = getattr(self, "bundle", None)
            recorded = (bundle.meta.extras or {}).get("thinking") if bundle is not None else None
            if recorded:
                self._thinking = Thinking.from_manifest(recorded)
            else:  # a bundle packed before the manifest said: read it from the template, once
                try:
                    self._thinking = thinking_of(self._template(), bos_token="", eos_token="")
                except Exception:  # a template that refuses the probe chat is read as not thinking
                    self._thinking = NOT_THINKING
        return self._thinking

    def _opens_reasoning(self, context: dict[str, Any]) -> bool:
        """Whether the generation prompt, with ``context``, leaves a <think> block open (the R1 distills)."""
        key = tuple(sorted(context.items()))
        if key not in self._opens:
            try:
                text = self._chat_text([{"role": "user", "content": "A"}], **context)
            except Exception:
                text = ""
            self._opens[key] = starts_in_reasoning(text, self.thinking)
        return self._opens[key]

    def _fixed_prefix(self, msgs: list[Message], ids: list[int], context: dict[str, Any] | None = None) -> int:
        """How many leading ``ids`` are the conversation's fixed beginning: what the template renders before the
        first user message, whatever that message says (two probe messages tell it apart), with the system prompt."""
        lead = []
        for m in msgs:
            if m["role"] != "system":
                break
            lead.append(m)
        context = context or {}
        key = tuple(m["content"] for m in lead) + tuple(sorted(context.items()))
        if key not in self._fixed:
            try:
                a, _ = self._chat_prompt(lead + [{"role": "user", "content": "A"}], **context)
                b, _ = self._chat_prompt(lead + [{"role": "user", "content": "B"}], **context)
            except Exception:  # a template that refuses a lone user message: nothing is fixed
                a, b = [], []
            self._fixed[key] = a[:common_prefix(a, b)]
            if len(self._fixed) > 64:  # many system prompts: keep the newest
                self._fixed.pop(next(iter(self._fixed)))
        return common_prefix(self._fixed[key], ids)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
