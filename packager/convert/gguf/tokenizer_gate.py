"""The tokenizer gate: a GGUF must tokenize exactly as the source's HF tokenizer.

A wrong pre-tokenizer name, a missing merge or a wrong BOS flag gives a model that
loads, runs and answers worse, with nothing to show why. So every bundle's GGUF is
loaded by llama.cpp (vocabulary only) and compared with ``transformers`` on a fixed
set of texts: scripts, emoji, code, digit runs, whitespace runs, every added token,
and one conversation rendered by the chat template. The ids must be equal, and the
ids that end generation in generation_config.json must end it in llama.cpp too.

How the two sides are lined up (where llama.cpp and HF differ on purpose):

- Plain texts: HF ``encode(text, add_special_tokens=True)`` against llama.cpp
  ``tokenize(add_special=True)``, which adds BOS/EOS as the GGUF's add_bos/add_eos
  say. That is what an app does with a raw prompt, so a wrong flag is a mismatch.
- The rendered chat: both without added specials. Templates write BOS themselves
  (``{{ bos_token }}``); transformers' apply_chat_template(tokenize=True) does the same.
- Special tokens are parsed on both sides (HF always matches added tokens in text;
  llama.cpp does with parse_special).
- Texts are NFC (composed): llama.cpp applies no Unicode normalizer, Qwen's HF
  tokenizer applies NFC; the two differ on decomposed input only, which is rare.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import gguf

from packager.errors import ChatTemplateError, TokenizerMismatchError, UnsafeChatTemplateError, missing_backend
from packager.progress import quiet_llama_log
from packager.spec.chat_template import render
from packager.spec.eos import EosChoice

SKIP_HINT = "pass --skip-tokenizer-check to pack it anyway"

BUILTIN_TEXTS: tuple[str, ...] = (
    "",
    "Hello world",
    " Hello world",
    "Hello, World! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    # scripts
    "你好，世界！我想在apple工作1314151天～",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "нещо на Български, Россия и Україна",
    "مرحبا بالعالم",
    "नमस्ते दुनिया, कृपया हिंदी में लिखें",
    "Cửa Việt ñandú Ångström façade naïve Äpfel",
    "Mixed: English, 中文, русский, العربية, emoji 🎉, and code `x += 1`.",
    # emoji (ZWJ sequences, skin tones, flags, variation selectors)
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽 🇺🇸 ❤️ 👨\u200d👩\u200d👧",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '<div class="x">a &amp; b</div>\n{"key": [1, 2.5, null], "k2": "v"}',
    # numbers: digit grouping differs between pre-tokenizers
    "3 33 333 3333 33333 333333 3333333 33333333 333333333 3.3 3..3 3...3",
    "1,000,000 3.14159 -42 1e-9 2024-01-15T10:30:00Z 0x1F 0b1010 ١٢٣ ½ 12:30",
    # whitespace
    "   leading and trailing   ",
    "  multiple   internal    spaces  ",
    "\t tabs\t\tand\ttabs",
    "\n",
    "\n\n\n",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "line one\r\nline two\rline three",
    # punctuation runs
    "------======= ''''''```````\"\"\"\"......!!!!!!?????? ...",
)

CHAT: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! What is 12 × 34?"},
    {"role": "assistant", "content": "12 × 34 = 408."},
    {"role": "user", "content": "Thanks 👍 — and in 中文?"},
)


@dataclass
class TokenizerReport:
    """What the gate compared (plain fields: the bundle manifest records them)."""

    n_texts: int  # plain texts, with added specials
    n_special: int  # added/special tokens, each as text
    n_tokens: int  # ids compared, all texts together
    chat_checked: bool  # a chat-template rendering was compared
    pre: str  # the GGUF's tokenizer.ggml.pre
    add_bos: bool  # the GGUF adds BOS (and so does HF)
    eos_id: int
    eog_ids: list[int] = field(default_factory=list)  # generation_config's eos ids, all EOG in llama.cpp


def check_tokenizer(gguf_path: Path, model_dir: Path, *, texts: Sequence[str] | None = None,
                    eos: EosChoice | None = None) -> TokenizerReport:
    """Compare the GGUF's tokenizer with the HF tokenizer in ``model_dir``; raise on the first difference.

    ``texts`` replaces the built-in plain texts; the added tokens, the chat
    rendering and the end-of-generation ids are always checked: ``eos.eog_ids`` (what
    spec/eos.py resolved from every source) or else generation_config.json's.
    """
    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    hf = _hf_tokenizer(model_dir)
    with _llama_vocab(gguf_path) as lv:
        n_tokens = 0
        plain = list(BUILTIN_TEXTS if texts is None else texts)
        for text in plain:
            n_tokens += _compare(text, hf.encode(text, add_special_tokens=True), lv.tokenize(text, True), hf, lv)
        specials = _added_tokens(hf)
        for text in specials:
            n_tokens += _compare(text, hf.encode(text, add_special_tokens=True), lv.tokenize(text, True), hf, lv)
        rendered = _render_chat(hf)
        if rendered is not None:
            n_tokens += _compare(rendered, hf.encode(rendered, add_special_tokens=False),
                                 lv.tokenize(rendered, False), hf, lv)
        eog = _check_eog(model_dir, lv, _generation_header(hf), eos)
        return TokenizerReport(
            n_texts=len(plain), n_special=len(specials), n_tokens=n_tokens, chat_checked=rendered is not None,
            pre=lv.meta(gguf.Keys.Tokenizer.PRE), add_bos=lv.add_bos, eos_id=lv.eos, eog_ids=eog,
        )


# -- the HF side -------------------------------------------------------------------

def _hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        # fix_mistral_regex=False: transformers 4.57.3+ otherwise warns about (and, if
        # asked, rewrites) the pre-tokenizer of any local checkpoint it saved itself.
        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, fix_mistral_regex=False)
    except Exception as exc:  # transformers raises many types here; all mean "cannot compare"
        raise TokenizerMismatchError(
            f"{model_dir}: transformers cannot load the source tokenizer ({type(exc).__name__}: {_short(str(exc))}), "
            f"so the GGUF tokenizer cannot be checked; fix the tokenizer files or {SKIP_HINT}"
        ) from None
    _keep_file_pre_tokenizer(hf, model_dir / "tokenizer.json")
    return hf


def _state(part: Any) -> Any:
    return json.loads(part.__getstate__()) if part is not None else None


def _keep_file_pre_tokenizer(hf: Any, path: Path) -> None:
    """The checkpoint's own normalizer and pre-tokenizer, where transformers built others.

    transformers 5 builds some tokenizer classes' pipelines itself instead of taking tokenizer.json's:
    GPT2Tokenizer sets a plain ByteLevel pre-tokenizer whatever the file says (SmolLM2's digit splitter
    is lost), LlamaTokenizer a Metaspace one in place of a legacy Llama's Prepend normalizer (" Hello"
    loses a space). HF would then tokenize unlike the files the model was trained with, transformers 4
    and the tokenizers library, which llama.cpp matches. The file's two are put back; where transformers
    kept them (all of 4.x) this changes nothing.
    """
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or not path.is_file():  # a slow (SentencePiece-only) tokenizer: nothing rebuilt
        return
    try:  # the usual case, both as the file has them: no second Tokenizer built (it takes a second)
        text = json.loads(path.read_text(encoding="utf-8"))
        if all(text.get(part) == _state(getattr(backend, part)) for part in ("normalizer", "pre_tokenizer")):
            return
    except (ValueError, UnicodeDecodeError, AttributeError):
        pass
    from tokenizers import Tokenizer

    try:
        file = Tokenizer.from_file(str(path))
    except Exception:  # the file does not parse alone (transformers read it some other way): leave it
        return
    for part in ("normalizer", "pre_tokenizer"):
        if _state(getattr(file, part)) != _state(getattr(backend, part)):
            setattr(backend, part, getattr(file, part))


def _added_tokens(hf: Any) -> list[str]:
    """Every added token as a user would type it (specials and user-defined), in id order.

    A "normalized" added token is matched by HF after normalization, so SentencePiece
    tokenizers store its spaces as ▁ (Gemma's whitespace tokens); users type spaces,
    and llama.cpp stores that form (llama.cpp's converter and ours write ▁ as space).
    """
    return [t.content.replace("\u2581", " ") if t.normalized else t.content
            for _, t in sorted(hf.added_tokens_decoder.items())]


def _generation_header(hf: Any) -> set[int]:
    """Token ids the chat template adds to open the assistant's turn (e.g. Phi-3's <|assistant|>).

    Some checkpoints list such a role marker among their eos ids; llama.cpp never
    ends generation on it, and need not: a reply ends with the end-of-turn token
    first, and the marker only ever opens the next turn.
    """
    if not getattr(hf, "chat_template", None):
        return set()
    for messages in (list(CHAT), list(CHAT[1:])):
        try:
            with_prompt = hf.encode(_hf_render(hf, messages, True), add_special_tokens=False)
            without = _hf_render(hf, messages, False)
        except UnsafeChatTemplateError:  # hostile or runaway: never skipped
            raise
        except ChatTemplateError:  # a Jinja error or the template's own raise_exception
            continue
        prefix = hf.encode(without, add_special_tokens=False)
        # Longest common prefix: some templates close a conversation without a prompt
        # differently (Phi-3 appends <|endoftext|>), so plain prefix matching would fail.
        n = 0
        while n < min(len(prefix), len(with_prompt)) and prefix[n] == with_prompt[n]:
            n += 1
        return set(with_prompt[n:])
    return set()


def _render_chat(hf: Any) -> str | None:
    """One conversation through the chat template, or None when there is none that renders."""
    if not getattr(hf, "chat_template", None):
        return None
    # Some templates (Gemma's) refuse a system turn; try without it before giving up.
    for messages in (list(CHAT), list(CHAT[1:])):
        try:
            return _hf_render(hf, messages, True)
        except UnsafeChatTemplateError:  # hostile or runaway: never skipped
            raise
        except ChatTemplateError:  # a Jinja error or the template's own raise_exception
            continue
    return None


def _hf_render(hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """What apply_chat_template(tokenize=False) renders, through edgepack's bounded sandbox
    (packager.spec.chat_template) instead of transformers' unbounded one, with the same context."""
    template = hf.chat_template
    if isinstance(template, dict):  # named templates: transformers uses "default"
        template = template.get("default")
    if not isinstance(template, str):
        raise ChatTemplateError("the tokenizer has no default chat template")
    return render(template, messages, add_generation_prompt=add_generation_prompt, **hf.special_tokens_map)


# -- the llama.cpp side --------------------------------------------------------------

class _LlamaVocab:
    """A vocabulary-only llama.cpp model: tokenize and query special ids."""

    def __init__(self, llama_cpp: Any, model: Any) -> None:
        self._lib = llama_cpp
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8  # never more tokens than bytes, plus BOS/EOS
        for _ in range(2):
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
            if n >= 0:
                return list(buf[:n])
            n_max = -n  # llama.cpp says how many it needs
        raise TokenizerMismatchError(f"llama.cpp could not tokenize {_shown(text)}; {SKIP_HINT}")

    def is_eog(self, token: int) -> bool:
        return 0 <= token < self.n_vocab and bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def text(self, token: int) -> str:
        if not 0 <= token < self.n_vocab:
            return "<out of range>"
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def meta(self, key: str) -> str:
        import ctypes

        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""


@contextmanager
def _llama_vocab(gguf_path: Path) -> Iterator[_LlamaVocab]:
    """The GGUF's vocabulary loaded by llama.cpp, freed on exit; llama.cpp's log kept quiet meanwhile."""
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with quiet_llama_log():
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not model:
            raise TokenizerMismatchError(
                f"{gguf_path}: llama.cpp cannot load the GGUF's vocabulary; the tokenizer metadata is broken, "
                "re-run the conversion and report it if it persists"
            )
        try:
            yield _LlamaVocab(llama_cpp, model)
        finally:
            llama_cpp.llama_model_free(model)


# -- comparing -----------------------------------------------------------------------

def _compare(text: str, hf_ids: list[int], gguf_ids: list[int], hf: Any, lv: _LlamaVocab) -> int:
    if hf_ids == gguf_ids:
        return len(hf_ids)
    pos = next((i for i, (a, b) in enumerate(zip(hf_ids, gguf_ids)) if a != b), min(len(hf_ids), len(gguf_ids)))
    raise TokenizerMismatchError(
        f"the GGUF tokenizes {_shown(text)} differently from the model's tokenizer: from token {pos}, "
        f"HF gives {_pieces(hf_ids[pos:pos + 3], hf)} but the GGUF gives {_pieces(gguf_ids[pos:pos + 3], hf)} "
        f"(tokenizer.ggml.pre is {lv.meta(gguf.Keys.Tokenizer.PRE)!r}); the GGUF's tokenizer metadata is wrong "
        f"for this model, please report it, or {SKIP_HINT}"
    )


def _pieces(ids: list[int], hf: Any) -> str:
    if not ids:
        return "nothing (the text ends)"
    return ", ".join(f"{i} {hf.convert_ids_to_tokens(i)!r}" for i in ids)


def _shown(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _short(message: str, limit: int = 160) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[:limit] + "..."


def _check_eog(model_dir: Path, lv: _LlamaVocab, role_markers: set[int], resolved: EosChoice | None = None) -> list[int]:
    """generation_config's eos ids (or every ``resolved`` one) must all stop llama.cpp (role markers
    that open a turn excepted), and the GGUF's eos must be one of them."""
    source, ids = ("the resolved eos ids", list(resolved.eog_ids)) if resolved else _generation_eos(model_dir)
    if not ids:
        return []
    not_eog = [i for i in ids if not lv.is_eog(i) and i not in role_markers]
    if not_eog and resolved is not None:
        # Named only as a bare id by a config, and ended by nothing else: the config is what is wrong.
        i = not_eog[0]
        files = resolved.named_by(i)
        raise TokenizerMismatchError(
            f"{' and '.join(files)} end generation at {i} ({lv.text(i)!r}), which nothing else ends a turn or a text "
            f"with (the chat template ends a turn with {resolved.eos_text!r}) and llama.cpp would not stop at; remove "
            f"{i} from eos_token_id in {' and '.join(files)}, or {SKIP_HINT}")
    if not_eog:
        named = ", ".join(f"{i} ({lv.text(i)!r})" for i in not_eog)
        raise TokenizerMismatchError(
            f"{source} ends generation at {ids}, but {named} would not end it in the GGUF, so the model would run on "
            f"past its answer; the GGUF's special tokens are wrong, please report it, or {SKIP_HINT}"
        )
    if lv.eos not in ids:
        raise TokenizerMismatchError(
            f"the GGUF's eos token {lv.eos} ({lv.text(lv.eos)!r}) is not one of {source}'s eos ids {ids}; "
            f"the GGUF's special tokens are wrong, please report it, or {SKIP_HINT}"
        )
    return ids


def _generation_eos(model_dir: Path) -> tuple[str, list[int]]:
    """The eos ids generation stops at: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(value, int):
            return name, [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return name, list(value)
    return "", []
