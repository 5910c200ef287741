"""The tokenizer of an HF checkpoint as GGUF metadata (every ``tokenizer.*`` key).

Three tokenizer models are supported, those of the small models edgepack packs:

- ``gpt2``: byte-level BPE from ``tokenizer.json`` (Qwen2/2.5/3, Llama 3.x,
  SmolLM/SmolLM2, Phi-4-mini, ...). llama.cpp re-implements the pre-tokenizer
  (the regex that splits text before BPE) by *name*, so the name must be right:
  it is read from the structure of ``tokenizer.json``'s pre_tokenizer, compared
  exactly against :data:`PRE_TOKENIZERS`. An unknown structure is an error, never
  a guess: a wrong pre-tokenizer tokenizes plausibly and wrongly.
- ``llama``: SentencePiece from ``tokenizer.model`` (Llama 2, Mistral 7B, Gemma,
  Phi-3), plus the added tokens that tokenizer_config.json / tokenizer.json declare.
- ``gemma4``: Gemma 4's SentencePiece-style BPE from ``tokenizer.json`` (spaces as ▁,
  byte fallback, no byte-level map), as llama.cpp's converter writes it (Gemma4Model.set_vocab):
  every id's text, a score of -1000, the tokens transformers calls special as control
  tokens, no ``tokenizer.ggml.pre`` (llama.cpp infers it from the model name).

Special token ids, merges, the chat template and most add-BOS/EOS flags come from
gguf-py's ``SpecialVocab``. The metadata is the same as llama.cpp's
convert_hf_to_gguf.py writes for the same files (tests/test_vocab.py compares them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import gguf

from packager.errors import SourceError

Json = dict[str, Any]

# -- pre-tokenizers ----------------------------------------------------------------

# One step of a tokenizer.json pre_tokenizer, reduced to what changes the split:
# ("Split", regex, behavior, invert), ("ByteLevel", add_prefix_space, use_regex),
# ("Digits", individual_digits). trim_offsets only moves offsets, never ids.
Step = tuple[Any, ...]

# The regexes exactly as tokenizer.json files spell them.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (  # also tiktoken's cl100k_base
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
O200K_REGEX = (  # tiktoken's o200k_base
    _CASED_WORDS.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = _CASED_WORDS.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Some files spell the case-insensitive contractions out, as llama.cpp does.
_CONTRACTIONS = {
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])": "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
}


def _split(regex: str) -> Step:
    return ("Split", regex, "Isolated", False)


_BYTES = ("ByteLevel", False, False)  # byte-level mapping only; a Split before it did the splitting
_GPT2 = ("ByteLevel", False, True)  # byte-level with GPT-2's own regex


@dataclass(frozen=True)
class PreTokenizer:
    """A pre-tokenizer llama.cpp implements, as tokenizer.json describes it."""

    name: str  # tokenizer.ggml.pre
    steps: tuple[Step, ...]
    models: str  # who ships it; for messages and readers
    # Other names llama.cpp's converter gives this same structure (it picks a name by hashing a vocabulary's
    # ids for a test text, not by structure) and that llama.cpp runs identically (llama-vocab.cpp).
    aliases: tuple[str, ...] = ()


# Exact structures, first match wins. Each name is one llama.cpp implements with the
# same regex; where several llama.cpp names share one structure (llama-bpe/falcon3,
# qwen2/deepseek-r1-qwen, smollm/starcoder), the one of the models edgepack targets
# is used: they tokenize identically.
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("qwen2", (_split(QWEN2_REGEX), _BYTES), "Qwen2, Qwen2.5, Qwen3, DeepSeek-R1-Distill-Qwen"),
    PreTokenizer("qwen35", (_split(QWEN35_REGEX), _BYTES), "Qwen3.5"),
    # LFM2/LFM2.5 ship this structure too; llama.cpp's converter names their vocabularies "lfm2", which
    # llama.cpp runs as LLAMA3 with ignore_merges and add_bos, exactly as "llama-bpe" (llama-vocab.cpp).
    PreTokenizer("llama-bpe", (_split(LLAMA3_REGEX), _BYTES), "Llama 3, 3.1, 3.2, Falcon3, LFM2, LFM2.5",
                 aliases=("falcon3", "lfm2")),
    PreTokenizer("gpt-4o", (_split(O200K_REGEX), _BYTES), "Phi-4-mini, Llama 4"),
    PreTokenizer("tekken", (_split(TEKKEN_REGEX), _BYTES), "Mistral NeMo, Ministral"),
    PreTokenizer("smollm", (("Digits", True), _GPT2), "SmolLM, SmolLM2, StarCoder2"),
    PreTokenizer("gpt-2", (_GPT2,), "GPT-2, and checkpoints that keep GPT-2's pre-tokenizer"),
)

# Normalizers llama.cpp's BPE path may ignore: NFC changes nothing in text that is
# already composed (nearly all text is); anything else would change the ids.
_HARMLESS_NORMALIZERS = {"NFC"}


def _steps(pre: Json | None) -> tuple[Step, ...]:
    """A tokenizer.json pre_tokenizer as a flat tuple of steps (nested Sequences unrolled)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        for spelled, short in _CONTRACTIONS.items():
            regex = regex.replace(spelled, short) if isinstance(regex, str) else regex
        return (("Split", regex, pre.get("behavior"), bool(pre.get("invert"))),)
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits"))),)
    return ((kind, json.dumps(pre, sort_keys=True)),)  # unknown: kept whole so it never matches


def _normalizers(norm: Json | None) -> list[str]:
    if not norm:
        return []
    if norm.get("type") == "Sequence":
        return [n for sub in norm.get("normalizers", []) for n in _normalizers(sub)]
    return [str(norm.get("type"))]


def detect_pre_tokenizer(tokenizer_json: Json, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    unknown = [n for n in _normalizers(tokenizer_json.get("normalizer")) if n not in _HARMLESS_NORMALIZERS]
    if unknown:
        raise SourceError(
            f"{where}: normalizer {'+'.join(unknown)} is not one llama.cpp applies to BPE tokenizers; "
            "this tokenizer cannot be converted faithfully (--skip-tokenizer-check would not make it right)"
        )
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    for pre in PRE_TOKENIZERS:
        if steps == pre.steps:
            return pre.name
    known = ", ".join(f"{p.name} ({p.models})" for p in PRE_TOKENIZERS)
    raise SourceError(
        f"{where}: pre_tokenizer is not recognised, so llama.cpp would split text differently from the model's "
        f"tokenizer (--skip-tokenizer-check would not make it right); known: {known}"
    )


# -- the vocabulary ----------------------------------------------------------------

# SpecialVocab's token kinds and gguf-py's writer call for each. SpecialVocab may also
# find a "cls" token, which GGUF has no key for (llama.cpp's converter skips it too).
_ID_WRITERS: dict[str, Callable[[gguf.GGUFWriter, int], None]] = {
    "bos": gguf.GGUFWriter.add_bos_token_id,
    "eos": gguf.GGUFWriter.add_eos_token_id,
    "unk": gguf.GGUFWriter.add_unk_token_id,
    "sep": gguf.GGUFWriter.add_sep_token_id,
    "pad": gguf.GGUFWriter.add_pad_token_id,
    "mask": gguf.GGUFWriter.add_mask_token_id,
    "eot": gguf.GGUFWriter.add_eot_token_id,
    "eom": gguf.GGUFWriter.add_eom_token_id,
}
_FLAG_WRITERS: dict[str, Callable[[gguf.GGUFWriter, bool], None]] = {
    "bos": gguf.GGUFWriter.add_add_bos_token,
    "eos": gguf.GGUFWriter.add_add_eos_token,
    "sep": gguf.GGUFWriter.add_add_sep_token,
}


@dataclass(frozen=True)
class GGUFVocab:
    """Everything llama.cpp needs to tokenize like the source tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece) or "gemma4"
    pre: str | None  # tokenizer.ggml.pre; None where the converter writes none (gemma4)
    tokens: list[str] = field(repr=False)
    token_types: list[int] = field(repr=False)
    scores: list[float] | None = field(default=None, repr=False)  # SentencePiece only
    merges: list[str] = field(default_factory=list, repr=False)  # BPE only
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos", "eos", "unk", "pad", "eot", ...
    add_special: dict[str, bool] = field(default_factory=dict)  # "bos", "eos", "sep"
    chat_template: str | list[dict[str, str]] | None = field(default=None, repr=False)
    add_space_prefix: bool | None = None  # SentencePiece: prefix the text with a space
    # add_bos whatever the tokenizer files say (Gemma 4: its converter sets it last, so a flag the files give
    # keeps its place in the key order and takes this value; without one, it comes last).
    force_add_bos: bool | None = None

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add every tokenizer.* key to ``writer`` (before its KV data is written)."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            _ID_WRITERS[kind](writer, token_id)
        for kind, value in self.add_special.items():
            _FLAG_WRITERS[kind](writer, self.force_add_bos if kind == "bos" and self.force_add_bos is not None else value)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.force_add_bos is not None and "bos" not in self.add_special:
            writer.add_add_bos_token(self.force_add_bos)


def with_eos(vocab: GGUFVocab, eos_id: int, eog_ids: list[int]) -> GGUFVocab:
    """``vocab`` with ``eos_id`` as its eos and the other end-of-generation ids in GGUF's eot and eom
    slots (where the source left them free): llama.cpp ends generation at eos, eot, eom and the
    tokens its own list of end texts names, so this makes up to three chosen ids certain."""
    special = {**vocab.special_ids, "eos": eos_id}
    free = [k for k in ("eot", "eom") if k not in special]
    for i in (i for i in eog_ids if i not in special.values()):
        if not free:
            break
        special[free.pop(0)] = i
    return replace(vocab, special_ids=special)


def load_vocab(model_dir: Path) -> GGUFVocab:
    """Read the tokenizer files of an HF checkpoint directory into GGUF vocabulary metadata."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json") or {}
    tok_json = _read_json(model_dir / "tokenizer.json")
    tok_config = _read_json(model_dir / "tokenizer_config.json") or {}
    spm_file = model_dir / "tokenizer.model"
    n_vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")

    if tok_json is not None and _model_type(config) in GEMMA4_MODEL_TYPES:
        return _load_gemma4(model_dir, tok_json, tok_config)
    if tok_json is not None and _is_byte_level(tok_json):
        # tokenizer.json decides even when a tokenizer.model lies beside it: it is what HF runs.
        return _load_bpe(model_dir, tok_json, tok_config, n_vocab)
    if spm_file.is_file():
        return _load_spm(model_dir, spm_file, tok_json, tok_config, config, n_vocab)
    if tok_json is None:
        raise SourceError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; copy the tokenizer files of the model into it"
        )
    kind = (tok_json.get("model") or {}).get("type")
    raise SourceError(
        f"{model_dir / 'tokenizer.json'}: a {kind} tokenizer without byte-level BPE or a tokenizer.model "
        "is not supported; add the model's tokenizer.model (SentencePiece) if it has one"
    )


def _model_type(config: Json) -> str:
    """config.json's model_type, or its language model's in a multimodal wrapper."""
    inner = config.get("text_config")
    return str((inner.get("model_type") if isinstance(inner, dict) else None) or config.get("model_type", ""))


def _read_json(path: Path) -> Json | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc}); re-download the tokenizer files") from None


def _is_byte_level(tok_json: Json) -> bool:
    model = tok_json.get("model") or {}
    return model.get("type") == "BPE" and any(s[0] == "ByteLevel" for s in _steps(tok_json.get("pre_tokenizer")))


def looks_special(text: str) -> bool:
    """Added tokens that are control tokens whether or not tokenizer files flag them special.

    Some checkpoints leave chat markers (``<|im_start|>``) or Gemma's ``<unusedN>``
    unflagged; llama.cpp must still parse them as control tokens.
    """
    return (
        (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # DeepSeek's fullwidth bars
        or (text.startswith("<unused") and text.endswith(">"))
        or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    )


def _added_type(text: str, special: bool) -> tuple[str, int]:
    """The GGUF text and type of an added token."""
    if special or looks_special(text):
        return text, gguf.TokenType.CONTROL
    # llama.cpp matches user-defined tokens on raw text, where SentencePiece's ▁ is a space.
    return text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED


def _size(n_vocab: Any, highest_id: int, where: Path) -> int:
    """The embedding rows (config vocab_size), which may exceed the tokenizer's ids (padding)."""
    if n_vocab is None:
        return highest_id + 1
    if int(n_vocab) <= highest_id:
        raise SourceError(
            f"{where}: token id {highest_id} does not fit config.json's vocab_size {n_vocab}; "
            "the tokenizer files do not belong to this checkpoint"
        )
    return int(n_vocab)


def _load_bpe(model_dir: Path, tok_json: Json, tok_config: Json, n_vocab: Any) -> GGUFVocab:
    pre = detect_pre_tokenizer(tok_json, model_dir / "tokenizer.json")
    vocab: dict[str, int] = tok_json["model"].get("vocab") or {}
    added: list[Json] = tok_json.get("added_tokens") or []
    ids = list(vocab.values()) + [int(a["id"]) for a in added]
    size = _size(n_vocab, max(ids, default=-1), model_dir)
    tokens = [f"[PAD{i}]" for i in range(size)]  # rows no token uses: unused, never produced
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for a in added:
        text, kind = _added_type(a["content"], bool(a.get("special")))
        tokens[int(a["id"])], types[int(a["id"])] = text, int(kind)
    special = _special_vocab(model_dir, tok_json)
    return GGUFVocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=list(special.merges),
        special_ids=_special_ids(special), add_special=_add_flags(special, tok_json, tok_config),
        chat_template=special.chat_template,
    )


def _special_vocab(model_dir: Path, tok_json: Json) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab of a BPE tokenizer (ids, flags, template), with its merges, which it must have."""
    merges = _pair_merges(tok_json)
    special = gguf.SpecialVocab(model_dir, load_merges=merges is None)
    if merges is not None:
        special.merges = merges
    if not special.merges:
        raise SourceError(
            f"{model_dir / 'tokenizer.json'}: a BPE tokenizer without merges; re-download the tokenizer files"
        )
    return special


def _pair_merges(tok_json: Json) -> list[str] | None:
    """tokenizer.json's merges stored as pairs (transformers >= 4.45), as gguf-py's SpecialVocab writes them.

    SpecialVocab joins each pair one character at a time (a second for 150k merges, on every pack);
    without spaces inside a token, which is what it would re-encode, the join is the same string.
    None where SpecialVocab must read them itself (strings, merges.txt, spaces in a token).
    """
    merges = (tok_json.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges or not all(
            isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str) and
            " " not in m[0] and " " not in m[1] for m in merges):
        return None
    return [f"{a} {b}" for a, b in merges]


def _special_ids(special: gguf.SpecialVocab) -> dict[str, int]:
    return {kind: i for kind, i in special.special_token_ids.items() if kind in _ID_WRITERS}


# Tokenizer classes whose tokenizer_config add_bos_token/add_eos_token rebuild the
# post-processor when transformers loads them: for these the config wins.
_CONFIG_DECIDES_BOS = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                       "GemmaTokenizer", "GemmaTokenizerFast"}


def _add_flags(special: gguf.SpecialVocab, tok_json: Json | None, tok_config: Json) -> dict[str, bool]:
    """Whether BOS/EOS/SEP are added to every encoded text, as transformers does it.

    SpecialVocab (gguf 0.19) lets tokenizer_config.json's add_bos_token override the
    post-processor. transformers does that only for Llama/Gemma tokenizer classes;
    any other fast tokenizer runs tokenizer.json's post-processor as is, so there the
    post-processor alone decides, and add_bos is written even when it adds nothing
    (llama.cpp's default for Llama 3's pre-tokenizer is to add BOS).
    """
    flags = dict(special.add_special_token)
    post = _post_processor_flags((tok_json or {}).get("post_processor"))
    cls = tok_config.get("tokenizer_class")
    if tok_json is not None and cls and cls not in _CONFIG_DECIDES_BOS:
        flags.update(post)
        flags["bos"] = post.get("bos", False)
        if "eos" in flags:
            flags["eos"] = post.get("eos", False)
    else:
        for kind, value in post.items():
            flags.setdefault(kind, value)
    return {kind: value for kind, value in flags.items() if kind in _FLAG_WRITERS}


def _post_processor_flags(post: Json | None) -> dict[str, bool]:
    if not post:
        return {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    flags: dict[str, bool] = {}
    for p in processors:
        if p.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif p.get("type") == "TemplateProcessing":
            # A template speaks only for the ends where it puts a special token (SpecialVocab's rule).
            single = p.get("single") or []
            if len(single) > 1 and "SpecialToken" in single[0]:
                flags["bos"] = True
            if len(single) > 1 and "SpecialToken" in single[-1]:
                flags["eos"] = True
    return flags


# Per-family SentencePiece details, keyed by config.json model_type: Gemma's
# tokenizer never prefixes a space; Llama-family checkpoints may say so in
# tokenizer_config.json (add_prefix_space).
_NO_SPACE_PREFIX = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_CONFIG_SPACE_PREFIX = {"llama", "mistral"}


def _load_spm(model_dir: Path, spm_file: Path, tok_json: Json | None, tok_config: Json, config: Json,
              n_vocab: Any) -> GGUFVocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(spm_file))
    except (OSError, RuntimeError) as exc:
        raise SourceError(f"{spm_file}: not a SentencePiece model ({exc}); re-download tokenizer.model") from None
    size = _size(n_vocab, sp.vocab_size() - 1, model_dir)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), float(sp.GetScore(i)), int(_spm_type(sp, i))

    # Added tokens override the SentencePiece pieces: added_tokens.json (old), then
    # tokenizer_config.json's added_tokens_decoder, then tokenizer.json's list for
    # ids the config does not describe (Phi-3 keeps some only there).
    added: dict[int, tuple[str, int]] = {}
    for text, i in (_read_json(model_dir / "added_tokens.json") or {}).items():
        added[int(i)] = (text, int(gguf.TokenType.USER_DEFINED))
    decoder = tok_config.get("added_tokens_decoder") or {}
    for i, a in decoder.items():
        text, kind = _added_type(a["content"], bool(a.get("special")))
        added[int(i)] = (text, int(kind))
    for a in (tok_json or {}).get("added_tokens") or []:
        if str(a["id"]) not in decoder:
            text, kind = _added_type(a["content"], bool(a.get("special")))
            added[int(a["id"])] = (text, int(kind))
    for i, (text, kind) in sorted(added.items()):
        if i >= size:
            raise SourceError(
                f"{model_dir}: added token {text!r} has id {i}, beyond vocab_size {size}; "
                "the tokenizer files do not belong to this checkpoint"
            )
        tokens[i], scores[i], types[i] = text, -1000.0, kind

    special = gguf.SpecialVocab(model_dir, n_vocab=size)
    model_type = str(config.get("model_type", ""))
    space_prefix: bool | None = None
    if model_type in _NO_SPACE_PREFIX:
        space_prefix = False
    elif model_type in _CONFIG_SPACE_PREFIX and isinstance(tok_config.get("add_prefix_space"), bool):
        space_prefix = tok_config["add_prefix_space"]
    return GGUFVocab(
        model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
        special_ids=_special_ids(special), add_special=_add_flags(special, tok_json, tok_config),
        chat_template=special.chat_template, add_space_prefix=space_prefix,
    )


def _spm_type(sp: Any, i: int) -> gguf.TokenType:
    if sp.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.IsControl(i):
        return gguf.TokenType.CONTROL
    if sp.IsUnused(i):
        return gguf.TokenType.UNUSED
    if sp.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL



# -- Gemma 4 -----------------------------------------------------------------------

GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_text")
# Tokens llama.cpp's converter writes USER_DEFINED although they are special, "so that the chat parser can read
# them" (Gemma4Model.set_vocab): llama.cpp then prints them in a reply.
GEMMA4_VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>')
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The special-token attributes of a transformers tokenizer (all_special_tokens' sources).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as its text or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _special_texts(model_dir: Path, tok_config: Json) -> set[str]:
    """The texts transformers counts in all_special_tokens: the named ones and the extra/additional lists."""
    texts: set[str] = set()
    for source in (tok_config, _read_json(model_dir / "special_tokens_map.json") or {}):
        for key in _NAMED_SPECIALS:
            if (text := _token_text(source.get(key))) is not None:
                texts.add(text)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = source.get(key) or []
            texts.update(t for t in map(_token_text, extra if isinstance(extra, list) else extra.values()) if t)
    return texts


def _load_gemma4(model_dir: Path, tok_json: Json, tok_config: Json) -> GGUFVocab:
    """Gemma 4's tokenizer.json as llama.cpp's converter writes it: LlamaHfVocab's list (the BPE vocabulary by
    id, then added tokens past it), byte tokens BYTE, special tokens CONTROL (the visible ones USER_DEFINED),
    the rest NORMAL, every score -1000; SpecialVocab's merges, ids, flags and template; add_bos forced on."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or (tok_json.get("decoder") or {}).get("type") != "Sequence":
        raise SourceError(f"{model_dir / 'tokenizer.json'}: not Gemma 4's BPE with byte fallback, which llama.cpp's "
                          "gemma4 tokenizer runs; re-download the tokenizer files")
    vocab: dict[str, int] = model.get("vocab") or {}
    by_id = {i: text for text, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise SourceError(f"{model_dir / 'tokenizer.json'}: the vocabulary's ids are not 0..{len(by_id) - 1}; "
                          "re-download the tokenizer files")
    specials = _special_texts(model_dir, tok_config)
    added = sorted(((int(a["id"]), a["content"]) for a in tok_json.get("added_tokens") or [] if int(a["id"]) >= len(by_id)))
    by_id.update(added)
    special_ids = {i for i, text in by_id.items() if text in specials}
    tokens, types = [], []
    for i in range(len(by_id)):
        text = by_id.get(i)
        if text is None:
            raise SourceError(f"{model_dir / 'tokenizer.json'}: no token has id {i}; re-download the tokenizer files")
        if text in GEMMA4_VISIBLE:
            kind = gguf.TokenType.USER_DEFINED
        elif i >= len(vocab):  # an added token past the vocabulary: LlamaHfVocab.added_tokens
            kind = gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind))
    special = _special_vocab(model_dir, tok_json)
    return GGUFVocab(
        model="gemma4", pre=None, tokens=tokens, token_types=types, scores=[-1000.0] * len(tokens),
        merges=list(special.merges), special_ids=_special_ids(special),
        add_special={k: v for k, v in special.add_special_token.items() if k in _FLAG_WRITERS},
        chat_template=special.chat_template, add_space_prefix=False, force_add_bos=True,
    )
