"""ONNX bundles through onnxruntime-genai.

The bundle's model/ folder is what onnxruntime-genai reads: model.onnx, its external
data, genai_config.json and the tokenizer files. Tokens are driven by genai's own
Generator (its KV cache shares one buffer between steps) and decoded to text by its
TokenizerStream, one piece per token. One Generator is kept between calls (genai's chat
mode): a call rewinds it to the longest prefix it shares with the new prompt and appends
the rest, so a chat's later turns read only their new message. Prompts are encoded with the tokenizer.json
through the ``tokenizers`` library, which (unlike genai's encoder) can leave out the
special tokens a chat template has already written.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from packager.bundle.verify import Bundle
from packager.errors import BackendMissingError, BundleError, ConversionError, UsageError, missing_backend
from packager.formats.onnx import PROMPT_CHUNK
from packager.host import default_threads
from packager.runtime.first_token import onnx_decodes
from packager.runtime.model import Engine, EngineInfo, GenOptions, Message, Model, common_prefix
from packager.runtime.prompt_cache import PromptCacheWarning
from packager.spec.chat_template import render, source_template, token_text


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise missing_backend("onnxruntime-genai", "onnx") from None
    return og


def tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """The model folder's tokenizer_config.json ({} where it is missing or not a JSON object)."""
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def chat_renderer(tok_config: dict[str, Any], model_dir: Path,
                  override: str | None = None) -> Callable[..., str] | None:
    """How a chat is rendered for this ONNX model (its template, its bos/eos text); None without a template.

    One function for packager.load and for the web page's prompt (pack/onnx.py), so both see the same text.
    """
    template = override or source_template(tok_config, model_dir)
    if not template:
        return None
    bos, eos = token_text(tok_config.get("bos_token")), token_text(tok_config.get("eos_token"))
    return lambda messages, **context: render(template, messages, add_generation_prompt=True, eos_token=eos,
                                              bos_token=bos, **context)


def check_loads(model_dir: Path) -> None:
    """Open a written ONNX model as its runtime would, decode a token with it (runtime/first_token.py),
    and free it: `pack` publishes no bundle its own runtime cannot open or run. onnxruntime-genai
    parses genai_config.json; ONNX Runtime builds a CPU session over the graph (every node's kernel
    resolved, every initializer mapped from the data file) without packing the weights: genai's own
    load would add ~40% of the weights as anonymous memory, where this stays at the size of the graph
    (a 3B pack keeps its ~0.3 GB peak)."""
    og = _genai()
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_backend("onnxruntime", "onnx") from None
    try:
        og.Config(str(model_dir))
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error
        reason = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{model_dir.name}: ONNX Runtime cannot load the model just written ({reason}); "
                              f"nothing was published") from None
    del session
    onnx_decodes(model_dir, opts)  # and runs a token: GroupQueryAttention checks some shapes only then


class OnnxEngine(Engine):
    """onnxruntime-genai's Generator over the loaded model, fed tokens with ``append_tokens`` (one
    forward pass per call, no sampling): the graph, session and threads the app's generation uses."""

    def __init__(self, model: "OnnxModel") -> None:
        self._m = model
        self._gen: Any = None
        self.reset()

    @property
    def info(self) -> EngineInfo:
        m = self._m
        data = [f for f in m.model_dir.iterdir() if f.name.startswith("model.onnx")]
        spec = m.bundle.meta.spec or {}
        n_params = int(spec.get("n_params") or 0)
        label = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
        ep = m.execution_provider
        return EngineInfo(
            model_type=f"{m.genai_type} {label} {m.bundle.meta.quant}",
            model_size=sum(f.stat().st_size for f in data), model_n_params=n_params, n_ctx=m.n_ctx,
            # genai runs a prompt as one batch: one graph call over all of its tokens
            n_batch=m.n_ctx, n_ubatch=m.n_ctx, type_k=m.kv_type, type_v=m.kv_type, n_threads=m.n_threads,
            n_gpu_layers=0 if ep == "cpu" else m.n_layers, flash_attn=0,
            backends=ep.upper(), gpu_offload=ep != "cpu",
            engine=f"onnxruntime-genai {getattr(m._og, '__version__', '?')}")

    @property
    def n_vocab(self) -> int:
        return self._m._vocab

    @property
    def bos(self) -> int | None:
        return self._m.bos_token_id

    def reset(self) -> None:
        og, m = self._m._og, self._m
        params = og.GeneratorParams(m._model)
        params.set_search_options(max_length=m.n_ctx, do_sample=False, top_k=1)
        self._gen = None  # the old generator's KV buffers go before the new one allocates its own
        self._gen = og.Generator(m._model, params)

    def eval(self, tokens: Sequence[int]) -> None:
        self._gen.append_tokens(list(tokens))


@dataclass
class _Kept:
    """The Generator kept between calls, the search options it was made with, and the tokens in its KV cache."""

    gen: Any
    key: tuple[Any, ...]
    tokens: list[int] = field(default_factory=list)
    snapshot: int = 0  # tokens read when a recurrent state was last snapshotted: the one length it rewinds to


class OnnxModel(Model):
    """An ONNX int4 bundle loaded into onnxruntime-genai."""

    ENGINE = "onnxruntime_genai"  # the module that runs it (pack bench times its import apart from the load)

    def __init__(self, bundle: Bundle, *, n_ctx: int | None = None, n_threads: int | None = None,
                 seed: int | None = None, execution_provider: str | None = None, deterministic: bool = False,
                 prompt_cache: Any = None) -> None:
        super().__init__()
        if not isinstance(deterministic, bool):
            raise UsageError(f"deterministic must be True or False, got {deterministic!r}")
        self.deterministic = deterministic
        if prompt_cache is not None:
            # genai (0.18) has no call that saves a Generator's KV state or restores one into a new Generator
            # (its snapshot_state() marks the in-memory state to rewind a recurrent layer to): said once, the load
            # goes on.
            warnings.warn("prompt_cache: onnxruntime-genai cannot save a generator's state, so an ONNX bundle reads "
                          "its system prompt once per load (GGUF bundles restore it from disk)", PromptCacheWarning,
                          stacklevel=3)
        self._kept: _Kept | None = None
        og = _genai()
        from tokenizers import Tokenizer

        runtime = bundle.meta.runtime
        self.bundle = bundle
        self.model_dir = bundle.model_file.parent  # model/model.onnx: genai reads the whole folder
        genai_cfg = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        max_ctx = int(genai_cfg["model"]["context_length"])
        self.n_ctx = int(n_ctx or runtime.n_ctx or 2048)
        self.n_threads = int(n_threads or default_threads())
        if self.n_ctx < 16 or self.n_threads < 1:
            raise UsageError(f"n_ctx must be >= 16 and n_threads >= 1, got n_ctx={self.n_ctx}, n_threads={self.n_threads}")
        if self.n_ctx > max_ctx:
            raise UsageError(f"n_ctx {self.n_ctx} is beyond the model's {max_ctx} positions; load with n_ctx <= {max_ctx}")
        self.defaults = dict(runtime.generation)
        self._seeds = random.Random(seed)
        eos = genai_cfg["model"].get("eos_token_id")
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._vocab = int(genai_cfg["model"]["vocab_size"])
        bos = genai_cfg["model"].get("bos_token_id")
        self.bos_token_id = int(bos) if isinstance(bos, int) and bos >= 0 else None
        self.genai_type = str(genai_cfg["model"].get("type", "onnx"))
        self.n_layers = int(genai_cfg["model"].get("decoder", {}).get("num_hidden_layers") or 0)
        # How the kept Generator goes back to a prefix another call shares. "any": a KV cache, to any length.
        # "snapshot": a recurrent state (Qwen3.5's delta-net layers), only to where snapshot_state() was taken
        # (genai 0.18: "Recurrent states cannot be partially rewound"); each call snapshots its prompt, so a chat's
        # next turn reads the previous answer and the new message, not the history. "none": LFM2's conv
        # layers (genai 0.18's LFM2 runner refuses rewind_to): every call reads its prompt in a new Generator.
        names = genai_cfg["model"].get("decoder", {}).get("inputs", {})
        self._rewind = ("snapshot" if "past_recurrent_names" in names else
                        "none" if "past_conv_names" in names else "any")
        self.kv_type = runtime.kv_type or "f32"
        config = og.Config(str(self.model_dir))
        ep = execution_provider or runtime.execution_provider or "cpu"
        self.execution_provider = ep
        if ep != (runtime.execution_provider or "cpu"):  # another provider than the bundle's genai_config names
            config.clear_providers()  # CPU is genai's default
            if ep != "cpu":
                config.append_provider(ep)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.n_threads, "inter_op_num_threads": 1}}}}))
        try:
            self._model = og.Model(config)
        except Exception as exc:  # onnxruntime's own error: a damaged or mismatched bundle, or a missing EP
            reason = " ".join(str(exc).split())[:300]
            if ep != "cpu" and "not supported in this build" in reason:
                raise BackendMissingError(f"{bundle.path} is built for the {ep} execution provider, which the "
                                          f"installed onnxruntime-genai lacks ({reason}); load it with "
                                          f"execution_provider='cpu' or install a build with {ep}") from None
            raise BundleError(f"{self.model_dir}: onnxruntime-genai cannot load it ({reason}); "
                              f"run `pack verify {bundle.path}`") from None
        self._og = og
        self._genai_tok = og.Tokenizer(self._model)
        self._tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._tok_config = tokenizer_config(self.model_dir)

    # -- tokens -------------------------------------------------------------------------
    def _encode(self, text: str, *, add_special: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special).ids)

    def _decode_ids(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _chat_text(self, messages: list[Message], **context: Any) -> str:
        renderer = chat_renderer(self._tok_config, self.model_dir, self.bundle.meta.runtime.chat_template)
        if renderer is None:
            raise UsageError(f"{self.bundle.path}: the model has no chat template; use generate() or stream() "
                             f"with a raw prompt")
        return renderer(messages, **context)

    def _template(self) -> str | None:
        return self.bundle.meta.runtime.chat_template or source_template(self._tok_config, self.model_dir)

    def _chat_prompt(self, messages: list[Message], **context: Any) -> tuple[list[int], tuple[str, ...]]:
        eos = token_text(self._tok_config.get("eos_token"))
        # The template writes every special token itself, as transformers' apply_chat_template assumes.
        return self._encode(self._chat_text(messages, **context), add_special=False), ((eos,) if eos else ())

    # -- generation -----------------------------------------------------------------------
    def _generator(self, ids: list[int], opts: GenOptions) -> tuple[_Kept, int]:
        """The Generator for this call and how many of ``ids`` its cache keeps.

        The kept one, rewound to the prefix it shares with ``ids`` (at least the last token is read again for
        its logits), where its search options are this call's and the call allows it; else a new one. A new one
        is made for deterministic calls (the prompt read as on a fresh load) and for seeded sampling (genai seeds
        a Generator once, when it is made: the same seed then gives the same tokens whatever came before).
        """
        search: dict[str, Any] = {"repetition_penalty": float(opts.repeat_penalty)}
        if opts.temperature > 0:
            search.update(do_sample=True, temperature=float(opts.temperature), top_p=float(opts.top_p),
                          top_k=int(opts.top_k or self._vocab))
        else:
            search.update(do_sample=False, top_k=1)
        key = tuple(sorted(search.items()))
        kept = self._kept
        fresh = self._is_deterministic(opts) or (opts.temperature > 0 and opts.seed is not None)
        if kept is not None and kept.key == key and not fresh and self._rewind != "none":
            keep = min(common_prefix(kept.tokens, ids), len(ids) - 1)
            if self._rewind == "snapshot":
                keep = kept.snapshot if kept.snapshot <= keep else 0
            if keep > 0:
                kept.gen.rewind_to(keep)
                del kept.tokens[keep:]
                return kept, keep
        self._kept = None  # the old generator's KV buffers go before the new one allocates its own
        kept = None
        if opts.temperature > 0:
            search["random_seed"] = int(opts.seed if opts.seed is not None else self._seeds.randrange(2**31))
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=self.n_ctx, **search)
        self._kept = _Kept(self._og.Generator(self._model, params), key)
        return self._kept, 0

    def _generate(self, ids: list[int], opts: GenOptions, tick: Callable[[], bool], *, fixed: int = 0) -> Iterator[str]:
        max_new = min(opts.max_tokens, self.n_ctx - len(ids))
        kept, keep = self._generator(ids, opts)
        gen = kept.gen
        try:
            # The prompt, a chunk at a time: the graph returns every position's logits, so one pass over
            # a long prompt would hold prompt x vocabulary floats (a 4k prompt: 2.5 GB for Qwen's vocab).
            for i in range(keep, len(ids), PROMPT_CHUNK):
                gen.append_tokens(ids[i:i + PROMPT_CHUNK])
                kept.tokens.extend(ids[i:i + PROMPT_CHUNK])
            if self._rewind == "snapshot":
                # The whole prompt, read as one: a snapshot before its last token would read that token apart,
                # a single-token step whose int4 numerics differ from the prompt pass's (enough to flip a near-tie
                # of a random model's greedy pick). A call that shares more than this prompt rewinds here.
                gen.snapshot_state()
                kept.snapshot = len(kept.tokens)
            stream = self._genai_tok.create_stream()
            n, token = 0, None
            while True:
                if not tick():
                    return "cancelled"
                gen.generate_next_token()  # reads the last token handed out (now in the cache), samples the next
                if token is not None:
                    kept.tokens.append(token)
                token = int(gen.get_next_tokens()[0])
                if token in self._eos:
                    return "stop"
                n += 1
                piece = stream.decode(token)
                if piece:
                    yield piece
                if n >= max_new or gen.is_done():
                    return "length"
        except (Exception, KeyboardInterrupt):  # not GeneratorExit: a stream closed between tokens leaves it whole
            self._kept = None  # a generator left mid-step is not trusted again
            raise

    def _engine(self) -> OnnxEngine:
        self._kept = None  # measuring makes its own generators; two KV buffers would double the memory measured
        return OnnxEngine(self)

    def _free(self) -> None:
        self._kept = None
        self._genai_tok = None
        self._model = None
