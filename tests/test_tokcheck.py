"""The tokenizer gate on real tokenizers: passes on faithful GGUFs, names the text when one is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from packager.convert.gguf.vocab import load_vocab
from packager.errors import TokenizerMismatchError
from packager.convert.gguf.tokenizer_gate import BUILTIN_TEXTS, check_tokenizer
from test_vocab import spm_llama, vocab_gguf, write_vocab_gguf  # noqa: F401 (spm_llama is a fixture)


def _copy_with(model_dir: Path, dest: Path, **files: object) -> Path:
    """``model_dir`` linked file by file into ``dest``, with some JSON files replaced."""
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name not in files and not f.name.startswith("."):
            (dest / f.name).symlink_to(f.resolve())
    for name, content in files.items():
        (dest / name).write_text(json.dumps(content))
    return dest


def _llama3_eos_fixture_is_inconsistent(model_dir: Path) -> bool:
    """tests/models.py's tiny_llama pairs Llama 3.0's vocabulary (128008 is a reserved token)
    with Llama 3.2's generation_config.json (128008 is <|eom_id|> there)."""
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    added = json.loads((model_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return 128008 in eos and added["128008"]["content"].startswith("<|reserved_special_token")


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama", "smollm2_hf", "spm_llama"])
def test_passes_on_a_faithful_gguf(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    gguf_path = vocab_gguf(model_dir)
    if fixture == "tiny_llama" and _llama3_eos_fixture_is_inconsistent(model_dir):
        with pytest.raises(TokenizerMismatchError, match=r"128008 \('<\|reserved_special_token_4\|>'\) would not end"):
            check_tokenizer(gguf_path, model_dir)
        pytest.xfail("tiny_llama's generation_config.json lists 128008, a reserved token in its Llama 3.0 vocab")
    report = check_tokenizer(gguf_path, model_dir)
    vocab = load_vocab(model_dir)
    n_added = len(json.loads((model_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"])
    assert (report.n_texts, report.n_special, report.chat_checked) == (len(BUILTIN_TEXTS), n_added, True)
    assert report.n_tokens > 300 and report.pre == vocab.pre
    assert report.add_bos == vocab.add_special.get("bos", False)
    assert report.eos_id == vocab.special_ids["eos"] and report.eos_id in report.eog_ids


def test_wrong_pre_tokenizer_names_the_text(tiny_qwen2: Path, tmp_path: Path) -> None:
    wrong = dataclasses.replace(load_vocab(tiny_qwen2), pre="gpt-2")
    gguf_path = write_vocab_gguf(tiny_qwen2, tmp_path / "wrong-pre.gguf", wrong)
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizer(gguf_path, tiny_qwen2)
    msg = str(err.value)
    assert "\n" not in msg and "tokenizer.ggml.pre is 'gpt-2'" in msg and "--skip-tokenizer-check" in msg
    # GPT-2's contractions are case-sensitive, Qwen2's are not: the first built-in text that splits
    # differently, shown as a truncated repr, then where and how.
    contractions = next(t for t in BUILTIN_TEXTS if t.startswith("I've been"))
    assert msg.startswith(f"the GGUF tokenizes {contractions[:60]!r}... differently"), msg
    assert "from token" in msg and "HF gives" in msg and "but the GGUF gives" in msg


def test_wrong_bos_flag_is_a_mismatch(smollm2_hf: Path, tmp_path: Path) -> None:
    # llama.cpp would prepend BOS to every prompt while the model's tokenizer does not.
    vocab = load_vocab(smollm2_hf)
    wrong = dataclasses.replace(vocab, add_special={**vocab.add_special, "bos": True})
    gguf_path = write_vocab_gguf(smollm2_hf, tmp_path / "bos.gguf", wrong)
    with pytest.raises(TokenizerMismatchError, match=r"tokenizes '' .*from token 0, HF gives nothing .* GGUF gives 1 "):
        check_tokenizer(gguf_path, smollm2_hf)


def test_wrong_eos_id_is_a_mismatch(smollm2_hf: Path, tmp_path: Path) -> None:
    vocab = load_vocab(smollm2_hf)
    wrong = dataclasses.replace(vocab, special_ids={**vocab.special_ids, "eos": 1})  # <|im_start|>
    gguf_path = write_vocab_gguf(smollm2_hf, tmp_path / "eos.gguf", wrong)
    with pytest.raises(TokenizerMismatchError, match=r"eos token 1 \('<\|im_start\|>'\) is not one of .*\[2\]"):
        check_tokenizer(gguf_path, smollm2_hf)


def test_generation_eos_that_llama_cpp_would_not_stop_at(smollm2_hf: Path, tmp_path: Path) -> None:
    model_dir = _copy_with(smollm2_hf, tmp_path / "m", **{"generation_config.json": {"eos_token_id": [2, 5]}})
    text = json.loads((smollm2_hf / "tokenizer_config.json").read_text())["added_tokens_decoder"]["5"]["content"]
    with pytest.raises(TokenizerMismatchError, match=rf"ends generation at \[2, 5\], but 5 \({text!r}\) would not"):
        check_tokenizer(vocab_gguf(smollm2_hf), model_dir)


def test_custom_texts_and_config_eos_fallback(smollm2_hf: Path, tmp_path: Path) -> None:
    model_dir = _copy_with(smollm2_hf, tmp_path / "m", **{"generation_config.json": {}})
    report = check_tokenizer(vocab_gguf(smollm2_hf), model_dir, texts=["abc 123", "x\ny"])
    assert report.n_texts == 2 and report.eog_ids == [2]  # config.json's eos_token_id


def test_unreadable_gguf_and_tokenizer(smollm2_hf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(TokenizerMismatchError, match="llama.cpp cannot load the GGUF's vocabulary"):
        check_tokenizer(bad, smollm2_hf)
    unknown_class = {"tokenizer_config.json": {"tokenizer_class": "NoSuchTokenizer"}}
    model_dir = _copy_with(smollm2_hf, tmp_path / "m", **unknown_class)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(TokenizerMismatchError, match="transformers cannot load the source tokenizer"):
        check_tokenizer(vocab_gguf(smollm2_hf), model_dir)
