"""Which token ends generation: one answer from the sources a checkpoint gives, which often disagree.

A checkpoint names its end-of-sequence token in up to four files and its chat template: the ids
of generation_config.json (what transformers' ``generate()`` stops on) and config.json, the token
text of tokenizer_config.json and special_tokens_map.json, and the token the template writes
after each assistant message. They disagree in the wild (QwenLM/Qwen3#927; transformers'
``save_pretrained`` after loading a GGUF writes ``<|endoftext|>`` as the tokenizer's eos while
generation_config says ``<|im_end|>``). A model stops where its turn ends, so:

- eos is the template's end-of-turn token when the template has one, else the first of
  generation_config's ids, config.json's, the tokenizer's;
- every eos id any source names ends generation too (GGUF: eos, eot and eom ids beside
  llama.cpp's own list; genai_config: its eos list);
- only an id that is not a token of the vocabulary, or no eos anywhere, is refused, naming the
  file to fix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packager.errors import ChatTemplateError, SourceError
from packager.spec.chat_template import render, source_template, token_text

MARK = "EDGEPACKREPLYMARK7"  # an assistant message no template alters and no tokenizer merges with its end


@dataclass(frozen=True)
class EosChoice:
    """The resolved end of generation, and what each source said."""

    eos_id: int
    eos_text: str
    eog_ids: list[int]  # every id that ends generation, eos first
    sources: dict[str, list[int]] = field(default_factory=dict)  # file (or "chat template") -> its ids
    reason: str = ""

    @property
    def disagreed(self) -> list[str]:
        """The sources that do not name the chosen eos."""
        return [k for k, v in self.sources.items() if self.eos_id not in v]

    def named_by(self, token: int) -> list[str]:
        return [k for k, v in self.sources.items() if token in v]

    @property
    def tokenizer_ids(self) -> list[int]:
        """The ids named as token text (tokenizer files, chat template) besides eos: these end
        generation whatever their text, the bare ids of the configs only if the engine agrees."""
        named = ("tokenizer_config.json", "special_tokens_map.json", "chat template")
        return [i for i in dict.fromkeys(i for k in named for i in self.sources.get(k, [])) if i != self.eos_id]

    def describe(self) -> str:
        said = "; ".join(f"{k}: {v}" for k, v in self.sources.items())
        return f"eos {self.eos_id} ({self.eos_text!r}), which {self.reason}; generation ends at {self.eog_ids} ({said})"

    def as_manifest(self) -> dict[str, Any]:
        return {**asdict(self), "disagreed": self.disagreed}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return []


class _Vocab:
    """Token text <-> id from tokenizer.json (added tokens first: they are what eos names)."""

    def __init__(self, model_dir: Path) -> None:
        tok = _json(model_dir / "tokenizer.json") or {}
        self.by_text: dict[str, int] = {}
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            self.by_text.update({t: i for t, i in vocab.items() if isinstance(i, int)})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            self.by_text.update({p[0]: i for i, p in enumerate(vocab) if isinstance(p, list) and p})
        self.added = {a["content"]: int(a["id"]) for a in tok.get("added_tokens") or []
                      if isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)}
        self.by_text.update(self.added)
        self.by_id = {i: t for t, i in self.by_text.items()}
        self.size = max(self.by_id, default=-1) + 1

    def text(self, i: int) -> str:
        return self.by_id.get(i, "")


def turn_end(template: str, added: dict[str, int], **context: Any) -> int | None:
    """The added token the template writes right after an assistant message (None: none found)."""
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARK}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": MARK}]):
        try:
            text = render(template, messages, add_generation_prompt=False, **context)
        except ChatTemplateError:
            continue
        at = text.find(MARK)
        if at < 0:
            continue
        rest = text[at + len(MARK):].lstrip(" ")
        match = max((t for t in added if t and rest.startswith(t)), key=len, default=None)
        return added[match] if match is not None else None
    return None


def resolve_eos(model_dir: Path) -> EosChoice | None:
    """The checkpoint's end of generation, from every source it has; None when it names none
    (and has no template that ends a turn): the converters' own defaults apply."""
    model_dir = Path(model_dir)
    vocab = _Vocab(model_dir)
    tok_config = _json(model_dir / "tokenizer_config.json") or {}
    sources: dict[str, list[int]] = {}
    for name in ("generation_config.json", "config.json"):
        ids = _ids((_json(model_dir / name) or {}).get("eos_token_id"))
        if ids:
            sources[name] = ids
    for name, data in (("tokenizer_config.json", tok_config), ("special_tokens_map.json",
                                                               _json(model_dir / "special_tokens_map.json") or {})):
        text = token_text(data.get("eos_token")) if isinstance(data, dict) else ""
        if text and text in vocab.by_text:
            sources[name] = [vocab.by_text[text]]
    template = source_template(tok_config, model_dir)
    if template:
        bos = token_text(tok_config.get("bos_token"))
        end = turn_end(template, vocab.added, bos_token=bos, eos_token=token_text(tok_config.get("eos_token")))
        if end is not None:
            sources["chat template"] = [end]
    if not sources:
        return None
    for name, ids in sources.items():
        bad = [i for i in ids if vocab.size and not 0 <= i < vocab.size]
        if bad:
            raise SourceError(f"{model_dir / name if name != 'chat template' else name}: eos id {bad[0]} is not a "
                              f"token of the vocabulary ({vocab.size} tokens in tokenizer.json); fix eos_token_id there")
    if "chat template" in sources:
        eos, reason = sources["chat template"][0], "ends the assistant's turn in the chat template"
    else:
        first = next(iter(sources))
        eos, reason = sources[first][0], f"{first} names first"
    eog = list(dict.fromkeys([eos, *(i for ids in sources.values() for i in ids)]))
    return EosChoice(eos, vocab.text(eos), eog, sources, reason)
