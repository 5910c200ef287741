"""Chat templates, rendered in a sandbox with limits: the one renderer edgepack uses.

A chat template is Jinja code written by a model's author and carried in the
model's files (tokenizer_config.json, chat_template.jinja, or a GGUF's
``tokenizer.chat_template``). transformers and llama-cpp-python both render it
in Jinja's ImmutableSandboxedEnvironment, which stops ``{{ ''.__class__.__mro__ }}``
and friends but not a template that loops for hours or builds a gigabyte string.
Here the same sandbox is bounded as well:

- every call from the template (functions, methods, macros) and every filter is
  checked: integer arguments at most MAX_INT_ARG, strings at most MAX_STRING;
  ``*``, ``**``, ``%`` and ``+`` are checked before they allocate, and so is
  ``namespace`` assignment (the only mutable state a template has);
- the output is cut at MAX_OUTPUT characters;
- rendering runs in a worker thread and is stopped after ``time_limit`` seconds
  (an exception is raised inside the worker at its next bytecode).

An attempt on Python internals, or a limit hit, is an UnsafeChatTemplateError;
the template's own ``raise_exception`` and Jinja errors are a ChatTemplateError.
Neither ever runs code from outside the sandbox.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from packager.errors import ChatTemplateError, UnsafeChatTemplateError
from packager.source.gguf_check import check_layout

TIME_LIMIT = 5.0  # seconds; real templates render in milliseconds
MAX_OUTPUT = 8 << 20  # characters of rendered prompt (a full 128k-token context is ~0.5M)
MAX_STRING = 8 << 20  # characters of any intermediate string or list
MAX_INT_ARG = 100_000  # what Jinja's sandbox allows range() (MAX_RANGE)
# Big-integer arithmetic runs in C holding the GIL: one ``a ** b`` of a million digits freezes
# every thread of the app (the time limit's watchdog included) for minutes. Bounding each
# operation's result keeps every step short, so the time limit can stop the loop around them.
MAX_INT_BITS = 4096
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)")


class _Limit(Exception):
    """Raised inside the template when it goes past a limit."""


class _Timeout(BaseException):
    """Injected into the render thread when time runs out (BaseException: templates cannot catch it)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_ARG:
            raise _Limit(f"an argument of {v} is above the limit of {MAX_INT_ARG}")
        if _size(v) > MAX_STRING:
            raise _Limit(f"an argument of {_size(v)} items is above the limit of {MAX_STRING}")


def _check_result(value: Any) -> Any:
    if _size(value) > MAX_STRING:
        raise _Limit(f"a value of {_size(value)} characters is above the limit of {MAX_STRING}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"an integer of {value.bit_length()} bits is above the limit of {MAX_INT_BITS}")
    return value


def _check_int_op(operator: str, left: Any, right: Any) -> None:
    """Refuse integer arithmetic whose result would exceed MAX_INT_BITS before C computes it."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if operator == "*" and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise _Limit(f"a product of {left.bit_length() + right.bit_length()} bits is above the limit of {MAX_INT_BITS}")
    if operator == "**" and right > 0 and abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
        raise _Limit(f"a power of about {(abs(left).bit_length() - 1) * right} bits is above the limit of {MAX_INT_BITS}")


def _check_replace(s: Any, old: Any, new: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        worst = len(s) + (len(s) // max(len(old), 1) + 1) * len(new)
        if worst > MAX_STRING:
            raise _Limit(f"replace() could build {worst} characters, above the limit of {MAX_STRING}")


def _bounded_filter(fn):
    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context / pass_environment) for Jinja
    def wrapper(*args, **kwargs):
        plain = [a for a in args if not _is_jinja_internal(a)]
        _check_args(plain[1:], kwargs)  # the filtered value itself may be long
        if fn.__name__ == "do_replace" and len(plain) >= 3:
            _check_replace(*plain[:3])
        if fn.__name__ == "do_format" and plain and isinstance(plain[0], str):
            _check_format(plain[0])
        return _check_result(fn(*args, **kwargs))

    return wrapper


def _is_jinja_internal(a: Any) -> bool:
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(a, (Environment, EvalContext, Context))


def _check_format(fmt: str) -> None:
    for m in _FORMAT_WIDTH.finditer(fmt):
        for g in m.groups():
            if g and int(g) > MAX_INT_ARG:
                raise _Limit(f"a format width of {g} is above the limit of {MAX_INT_ARG}")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            super().__setitem__(name, _check_result(value))

    class GenerationTag(jinja2.ext.Extension):
        """transformers' ``{% generation %}`` marker: rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class RefusingUndefined(jinja2.Undefined):
        """The sandbox answers an unsafe attribute (``''|attr('__class__')``) with an Undefined that
        renders as nothing; here that attempt is refused like a direct one."""

        __slots__ = ()

        def __init__(self, hint=None, obj=jinja2.utils.missing, name=None, exc=jinja2.exceptions.UndefinedError):
            if exc is jinja2.exceptions.SecurityError:
                raise jinja2.exceptions.SecurityError(hint or "unsafe access")
            super().__init__(hint, obj, name, exc)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            _check_args(args, kwargs)
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format at attribute access
            owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
            if isinstance(owner, str) and name == "replace":
                _check_replace(owner, *args[:2])
            if isinstance(owner, str) and name in ("format", "format_map"):
                _check_format(owner)
            return _check_result(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            _check_int_op(operator, left, right)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_STRING:
                        raise _Limit(f"repeating {_size(seq)} items {n} times is above the limit of {MAX_STRING}")
            elif operator == "**":
                if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
                    raise _Limit(f"{left} ** {right} is above the limit")
            elif operator == "%" and isinstance(left, str):
                _check_format(left)
            elif operator == "+" and _size(left) + _size(right) > MAX_STRING:
                raise _Limit(f"joining {_size(left) + _size(right)} items is above the limit of {MAX_STRING}")
            return _check_result(super().call_binop(context, operator, left, right))

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols],
                             undefined=RefusingUndefined)
    env.filters = {name: _bounded_filter(fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _bounded_filter(_tojson)
    env.globals["namespace"] = BoundedNamespace
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:100])
    return env


class _Raised(Exception):
    """The template called raise_exception (it refuses these messages)."""


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # As transformers renders it (Jinja's own tojson escapes HTML characters).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compiled(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
        raise ChatTemplateError(f"the chat template does not compile ({_one_line(exc)}); fix or remove it in "
                                "tokenizer_config.json") from None


def check_compiles(template: str) -> None:
    """Raise ChatTemplateError when ``template`` is not valid Jinja."""
    _compiled(template)


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           time_limit: float = TIME_LIMIT, **context: Any) -> str:
    """``template`` rendered for ``messages`` (extra context: bos_token, eos_token, tools, ...)."""
    tmpl = _compiled(template)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            out, n = [], 0
            for piece in tmpl.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
                n += len(piece)
                if n > MAX_OUTPUT:
                    raise _Limit(f"the rendered prompt is longer than {MAX_OUTPUT} characters")
                out.append(piece)
            result["text"] = "".join(out)
        except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
            result["error"] = exc

    worker = threading.Thread(target=work, name="edgepack-chat-template", daemon=True)
    worker.start()
    worker.join(time_limit)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_Timeout))
        worker.join(1.0)  # stops at its next bytecode; a C call in progress finishes first
        raise UnsafeChatTemplateError(
            f"the chat template ran for more than {time_limit:g} s and was stopped (a runaway loop); "
            "the model's chat template is broken or hostile: fix it, or use generate() with your own prompt"
        )
    exc = result.get("error")
    if exc is None:
        return result["text"]
    _raise_for(exc)
    raise AssertionError("unreachable")


def _raise_for(exc: BaseException) -> None:
    import jinja2
    from jinja2.exceptions import SecurityError

    if isinstance(exc, SecurityError):
        raise UnsafeChatTemplateError(
            f"the chat template tried to reach outside its sandbox ({_one_line(exc)}) and was refused; "
            "the model's chat template is hostile: do not use this model's files"
        ) from None
    if isinstance(exc, (_Limit, MemoryError, RecursionError, OverflowError)):
        raise UnsafeChatTemplateError(
            f"the chat template went past a limit ({_one_line(exc) or type(exc).__name__}) and was stopped; "
            "the model's chat template is broken or hostile: fix it, or use generate() with your own prompt"
        ) from None
    if isinstance(exc, _Raised):
        raise ChatTemplateError(f"the chat template refused these messages: {_one_line(exc)}") from None
    if isinstance(exc, (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                        ZeroDivisionError)):
        raise ChatTemplateError(f"the chat template failed on these messages ({type(exc).__name__}: "
                                f"{_one_line(exc)})") from None
    raise exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- llama-cpp-python ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FormatterResponse:
    """What llama-cpp-python's chat formatters return (the fields edgepack's runtime reads)."""

    prompt: str
    stop: list[str]
    added_special: bool = True  # the template wrote BOS itself when it wanted one


class ChatFormatter:
    """A drop-in for llama-cpp-python's Jinja2ChatFormatter that renders through :func:`render`."""

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True) -> None:
        check_compiles(template)
        self.template, self.eos_token, self.bos_token = template, eos_token, bos_token
        self.add_generation_prompt = add_generation_prompt

    def __call__(self, *, messages: list[dict[str, Any]], **kwargs: Any) -> FormatterResponse:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        prompt = render(self.template, messages, add_generation_prompt=self.add_generation_prompt,
                        eos_token=self.eos_token, bos_token=self.bos_token, **kwargs)
        return FormatterResponse(prompt=prompt, stop=[self.eos_token] if self.eos_token else [])


SAMPLE_CHAT = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
)


def token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def source_template(tok_config: Mapping[str, Any], model_dir: Path) -> str | None:
    """An HF checkpoint's (or ONNX bundle's) chat template: tokenizer_config.json's (its default one
    when it names several), else chat_template.jinja beside it."""
    t = tok_config.get("chat_template")
    if not t and (model_dir / "chat_template.jinja").is_file():
        t = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(t, list):  # the named-templates form: take the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def check_template(template: str | None, where: str, **context: Any) -> None:
    """Refuse a template that does not compile, or that is hostile or runs away on a sample chat.

    A template that merely refuses the sample (no system turn, say) passes: that is its right.
    """
    if not template:
        return
    try:
        check_compiles(template)
        for messages in (list(SAMPLE_CHAT), list(SAMPLE_CHAT[1:])):
            try:
                render(template, messages, **context)
                return
            except UnsafeChatTemplateError:
                raise
            except ChatTemplateError:
                continue
    except ChatTemplateError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def check_gguf_template(path: Any) -> None:
    """The GGUF's tokenizer.chat_template through :func:`check_template` (a GGUF source, before packing)."""
    template = check_layout(path, want=frozenset({"tokenizer.chat_template"})).strings.get("tokenizer.chat_template")
    check_template(template, str(path), bos_token="", eos_token="")
