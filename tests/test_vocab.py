"""packager.convert.gguf.vocab against llama.cpp: its converter's metadata and its tokenizer test vectors.

- The tokenizer.* metadata we write equals what convert_hf_to_gguf.py writes, key by
  key, for the three fixtures and for a tiny Llama with a freshly trained
  SentencePiece model.
- llama.cpp's test vectors (models/ggml-vocab-*.gguf.inp/.out, produced by the HF
  tokenizers themselves) come out identical through our vocab-only GGUFs.
- Every entry of the pre-tokenizer table is checked against those vectors twice: the
  tokenizer.json structure reproduces them in HF ``tokenizers``, and the llama.cpp
  name we map it to reproduces them in llama.cpp.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import pytest

import ggufview
import models
import oracle
from packager.convert.gguf.vocab import PRE_TOKENIZERS, detect_pre_tokenizer, load_vocab
from packager.errors import SourceError
from packager.convert.gguf.tokenizer_gate import _llama_vocab

Json = dict[str, Any]
VOCABS = models.vocab_dir()


# -- helpers shared with test_tokcheck.py ------------------------------------------------

_OUT = Path(tempfile.mkdtemp(prefix="edgepack-test-vocab-"))
atexit.register(shutil.rmtree, _OUT, True)


def write_vocab_gguf(model_dir: Path, out: Path, vocab: Any = None) -> Path:
    """A vocab-only GGUF: general.architecture is all llama.cpp needs besides tokenizer.*."""
    vocab = vocab if vocab is not None else load_vocab(model_dir)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return out


@functools.lru_cache(maxsize=None)
def vocab_gguf(model_dir: Path) -> Path:
    """Our vocab-only GGUF of a checkpoint, written once per test session."""
    return write_vocab_gguf(model_dir, _OUT / f"{model_dir.name}.gguf")


@functools.lru_cache(maxsize=None)
def tokenizer_fields(path: Path) -> dict[str, Any]:
    """Every tokenizer.* key of a GGUF (decoding 150k tokens and their merges takes a second: cached)."""
    return {k: v for k, v in ggufview.fields(path).items() if k.startswith("tokenizer.")}


def vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for ggml-vocab-<name>.gguf."""
    texts = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    lines = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def llama_cpp_ids(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's ids, without added specials and without parsing specials (as the vectors were made)."""
    with _llama_vocab(gguf_path) as lv:
        out = []
        for text in texts:
            data = text.encode("utf-8")
            buf = (lv._lib.llama_token * (len(data) + 8))()
            n = lv._lib.llama_tokenize(lv._vocab, data, len(data), buf, len(data) + 8, False, False)
            out.append(list(buf[:n]))
        return out


# -- a tiny Llama with a real (freshly trained) SentencePiece model ------------------------

SPM_RECIPE = "2"  # bump when the recipe below changes: the fixture and its reference are cached by name
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_spm_llama() -> Path:
    """A random 1-layer Llama whose tokenizer is a real Llama-2-style SentencePiece BPE model."""

    def build(tmp: Path) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        models.train_spm(
            tmp, models.spm_corpus(4000), vocab_size=1000, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        )
        proto = pb.ModelProto()
        proto.ParseFromString((tmp / "tokenizer.model").read_bytes())
        n = len(proto.pieces)
        # Llama 2's layout: tokenizer.model + a legacy tokenizer.json (prepend ▁, spaces to ▁), as
        # LlamaTokenizerFast(legacy=True, add_prefix_space=True) of transformers 4.57 wrote it, with two special
        # tokens and two user-defined ones (one with SentencePiece spaces).
        im = ["<|im_start|>", "<|im_end|>"]
        added = [models._added_token(i, t) for i, t in enumerate(["<unk>", "<s>", "</s>"] + im)]
        added[3:] = [models._added_token(n + i, t) for i, t in enumerate(im)]
        added += [dict(models._added_token(n + 2 + i, t, special=False), normalized=True)
                  for i, t in enumerate(["<tool>", "\u2581hello\u2581world"])]
        models._write_spm_tokenizer(
            tmp, added=added,
            normalizer={"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
            post_processor=models._bos_template("<s>", 1),
            decoder={"type": "Sequence", "decoders": models._SPM_DECODER + [
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            config={"add_bos_token": True, "add_eos_token": False, "additional_special_tokens": im,
                    "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
                    "extra_special_tokens": {}, "legacy": True,
                    "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
                    "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
                    "unk_token": "<unk>", "use_default_system_prompt": False},
            special_map={"additional_special_tokens": [models._special_map_entry(t) for t in im],
                         "bos_token": models._special_map_entry("<s>"), "eos_token": models._special_map_entry("</s>"),
                         "unk_token": models._special_map_entry("<unk>")},
            chat_template=CHATML,
        )
        config = dict(  # config.json as transformers 4.57 wrote it (models._save_random writes it as it is)
            models._LLAMA_LIKE, architectures=["LlamaForCausalLM"], model_type="llama",
            vocab_size=n + 4 + 5,  # padded embedding rows, as many checkpoints have
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=512, mlp_bias=False, pretraining_tp=1,
            rms_norm_eps=1e-06, rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2,
        )
        models._save_random(config, tmp, seed=2)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, n + 1]}))

    return models._atomic_build(models.CACHE / f"tiny-spm-llama-v{models.FIXTURE_VERSION}.{SPM_RECIPE}", build)


@pytest.fixture(scope="session")
def spm_llama() -> Path:
    return tiny_spm_llama()


# -- (a) metadata equal to llama.cpp's converter --------------------------------------------

def _assert_same_tokenizer_keys(ours: Path, reference: Path) -> None:
    a, b = tokenizer_fields(ours), tokenizer_fields(reference)
    assert sorted(a) == sorted(b)
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], list) and isinstance(b[key], list) and len(a[key]) == len(b[key]):
                first = next(i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y)
                pytest.fail(f"{key}[{first}]: ours {a[key][first]!r}, llama.cpp's {b[key][first]!r}")
            pytest.fail(f"{key}: ours {str(a[key])[:200]}, llama.cpp's {str(b[key])[:200]}")


@pytest.mark.slow  # reading two 130k-150k-token GGUFs with gguf-py takes ~7 s each
@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama", "smollm2_hf"])
def test_metadata_equals_reference_converter(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    _assert_same_tokenizer_keys(vocab_gguf(model_dir), oracle.reference_gguf(model_dir, "f16"))


def test_sentencepiece_metadata_equals_reference_converter(spm_llama: Path) -> None:
    vocab = load_vocab(spm_llama)
    assert (vocab.model, vocab.pre, vocab.add_space_prefix) == ("llama", "default", None)
    assert vocab.tokens[-1] == f"[PAD{vocab.n_vocab - 1}]" and vocab.scores is not None
    assert vocab.token_types[vocab.tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL
    assert vocab.token_types[vocab.tokens.index(" hello world")] == gguf.TokenType.USER_DEFINED
    _assert_same_tokenizer_keys(vocab_gguf(spm_llama), oracle.reference_gguf(spm_llama, "f16"))


def test_bpe_vocabulary_shape(tiny_qwen2: Path) -> None:
    vocab = load_vocab(tiny_qwen2)
    assert (vocab.model, vocab.pre, vocab.scores) == ("gpt2", "qwen2", None)
    assert vocab.n_vocab == 151936 and vocab.token_types[151644] == gguf.TokenType.CONTROL
    assert vocab.special_ids["eos"] == 151645 and vocab.add_special == {"bos": False, "eos": False}
    assert "<|im_start|>" in (vocab.chat_template or "")


# -- (b) llama.cpp's own test vectors through our GGUFs ---------------------------------------

@pytest.mark.parametrize(("name", "fixture"), [("qwen2", "tiny_qwen2"), ("llama-bpe", "tiny_llama")])
def test_llama_cpp_vectors_through_our_gguf(name: str, fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    cases = vectors(name)
    got = llama_cpp_ids(vocab_gguf(model_dir), [text for text, _ in cases])
    bad = [text for (text, want), ids in zip(cases, got) if ids != want]
    assert not bad, f"{len(bad)}/{len(cases)} vectors differ, first {bad[0]!r}"


# -- the pre-tokenizer table against the vectors ---------------------------------------------

BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split(regex: str) -> Json:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# Structures as the hub's tokenizer.json files spell them (written here, not taken from packager).
HUB_PRE: dict[str, Json] = {
    "gpt-2": GPT2,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2]},
    "qwen35": {"type": "Sequence", "pretokenizers": [_split(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"), BYTES]},
}


def _tokenizer_json_from_vocab_gguf(name: str) -> Json:
    """A byte-level BPE tokenizer.json with the vocabulary of llama.cpp's ggml-vocab-<name>.gguf."""
    fields = tokenizer_fields(VOCABS / f"ggml-vocab-{name}.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == gguf.TokenType.NORMAL}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == gguf.TokenType.CONTROL]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in fields["tokenizer.ggml.merges"]]},
    }


@pytest.mark.parametrize(("name", "vocab_file"), [("gpt-2", "gpt-2"), ("smollm", "starcoder"), ("qwen35", "qwen35")])
def test_table_entry_against_vectors(name: str, vocab_file: str, tiny_qwen2: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    if vocab_file == "qwen35":  # its test vocabulary is Qwen2's; reading that JSON is 10x faster than the GGUF
        tj = json.loads((tiny_qwen2 / "tokenizer.json").read_text(encoding="utf-8"))
        tj["normalizer"] = None  # Qwen3.5 dropped NFC: its vectors keep decomposed accents apart
    else:
        tj = _tokenizer_json_from_vocab_gguf(vocab_file)
    tj["pre_tokenizer"] = HUB_PRE[name]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cases = vectors(vocab_file)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf_bad = [t for t, want in cases if hf.encode(t, add_special_tokens=False).ids != want]
    assert not hf_bad, f"the test's tokenizer.json is not {vocab_file}'s: {hf_bad[0]!r} differs"

    assert detect_pre_tokenizer(tj, tmp_path) == name
    got = llama_cpp_ids(write_vocab_gguf(tmp_path, tmp_path / "v.gguf"), [t for t, _ in cases])
    bad = [t for (t, want), ids in zip(cases, got) if ids != want]
    assert not bad, f"llama.cpp's {name!r} differs on {len(bad)}/{len(cases)} vectors, first {bad[0]!r}"


# -- detection details and errors ------------------------------------------------------------

def test_every_table_entry_is_detected_from_its_own_structure() -> None:
    for entry in PRE_TOKENIZERS:
        steps = []
        for step in entry.steps:
            if step[0] == "Split":
                steps.append(_split(step[1]))
            elif step[0] == "ByteLevel":
                steps.append({"type": "ByteLevel", "add_prefix_space": step[1], "trim_offsets": True,
                              "use_regex": step[2]})
            else:
                steps.append({"type": "Digits", "individual_digits": step[1]})
        pre = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
        assert detect_pre_tokenizer({"pre_tokenizer": pre}, Path("t")) == entry.name
    assert len({p.name for p in PRE_TOKENIZERS}) == len({p.steps for p in PRE_TOKENIZERS}) == len(PRE_TOKENIZERS)


def test_llama_cpp_spelling_of_contractions_is_the_same_regex() -> None:
    llama3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tj = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [_split(llama3), BYTES]}}
    assert detect_pre_tokenizer(tj, Path("t")) == "llama-bpe"


@pytest.mark.parametrize("pre", [
    {"type": "Sequence", "pretokenizers": [_split(r"\p{L}+|\p{N}+"), BYTES]},  # a regex nobody ships
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},  # prefix space
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, GPT2]},
    {"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"}, GPT2]},
])
def test_unknown_pre_tokenizer_is_an_error(pre: Json) -> None:
    with pytest.raises(SourceError, match="not recognised.*--skip-tokenizer-check would not make it right"):
        detect_pre_tokenizer({"pre_tokenizer": pre}, Path("tokenizer.json"))


def test_normalizer_llama_cpp_does_not_apply_is_an_error() -> None:
    tj = {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
          "pre_tokenizer": GPT2}
    with pytest.raises(SourceError, match="normalizer Lowercase"):
        detect_pre_tokenizer(tj, Path("tokenizer.json"))
    assert detect_pre_tokenizer({"normalizer": {"type": "NFC"}, "pre_tokenizer": GPT2}, Path("t")) == "gpt-2"


def test_unsupported_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no tokenizer.json or tokenizer.model"):
        load_vocab(tmp_path)
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece))
    with pytest.raises(SourceError, match="WordPiece tokenizer .* not supported"):
        load_vocab(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        load_vocab(tmp_path)


def test_vocab_size_smaller_than_tokenizer_is_an_error(tmp_path: Path) -> None:
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
          "pre_tokenizer": GPT2, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 2}))
    with pytest.raises(SourceError, match="token id 2 does not fit config.json's vocab_size 2"):
        load_vocab(tmp_path)
