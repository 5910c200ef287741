"""A bundle is published only after its own runtime decoded a token with it (runtime/first_token.py).

Real engines on real files: a GGUF llama.cpp loads but computes NaN with, an ONNX graph ONNX Runtime
loads but rejects at the first token (GroupQueryAttention's cos cache checked only when it runs).
Each is refused in one line, and `pack` publishes nothing.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from packager.errors import ConversionError

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

from packager.convert.onnx.converter import convert  # noqa: E402
from packager.pack.options import PackOptions, ReadyFile  # noqa: E402
from packager.pack.pipeline import pack_model  # noqa: E402
from packager.runtime.llama import check_loads as gguf_check  # noqa: E402
from packager.runtime.onnx import check_loads as onnx_check  # noqa: E402
from packager.source.resolver import resolve  # noqa: E402


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_anon_growth(fn) -> int:
    """The largest RssAnon growth while ``fn`` runs (sampled every 2 ms)."""
    base, peak, done = _rss_anon(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, peak[0] - base)


@pytest.fixture(scope="module")
def onnx_model(tiny_qwen2, tmp_path_factory):
    """tiny_qwen2 converted to an ONNX int4 folder, and the converter's result (for a ReadyFile)."""
    out = tmp_path_factory.mktemp("onnx") / "model"
    result = convert(resolve(tiny_qwen2, hash_weights=False, quiet=True), out, n_ctx=512, quiet=True)
    return out, result


def _narrow_rotary_caches(model_dir: Path, dst: Path, width: int = 12) -> Path:
    """The same model with its cos/sin caches cut to ``width`` columns: ONNX Runtime builds the session,
    and GroupQueryAttention refuses the caches when it first runs (a multiple of 8 is required)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(model_dir, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    for i, t in enumerate(model.graph.initializer):
        if t.name in ("cos_cache", "sin_cache"):
            info = {e.key: e.value for e in t.external_data}
            raw = (dst / info["location"]).read_bytes()[int(info["offset"]):][:int(info["length"])]
            values = np.frombuffer(raw, dtype=np.float32).reshape(tuple(t.dims))
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[:, :width].copy(), t.name))
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def test_onnx_check_decodes_without_the_lm_head_f32_copy(onnx_model):
    """Unpacked MatMulNBits dequantizes its weight at every call: the full lm_head (151936 x 256) alone
    would add 155 MB; the check's sliced lm_head keeps the growth to what the layers need."""
    model_dir, _ = onnx_model
    grown = _peak_anon_growth(lambda: onnx_check(model_dir))
    assert grown < 100 << 20, f"the load check grew RssAnon by {grown >> 20} MB"


def test_onnx_graph_rejected_at_the_first_token_is_refused_in_one_line(onnx_model, tmp_path):
    model_dir, _ = onnx_model
    bad = _narrow_rotary_caches(model_dir, tmp_path / "model")
    with pytest.raises(ConversionError) as e:
        onnx_check(bad)
    msg = str(e.value)
    assert "\n" not in msg and "cannot decode a token" in msg and "cos_cache" in msg, msg
    assert "nothing was published" in msg


def test_pack_publishes_nothing_when_the_runtime_cannot_decode(onnx_model, tiny_qwen2, tmp_path, capfd):
    """Through pack: the folder bundled as --quant auto hands over its measured candidate."""
    model_dir, result = onnx_model
    bad = _narrow_rotary_caches(model_dir, tmp_path / "bad")
    out = tmp_path / "dist"
    opts = PackOptions(format="onnx", output=out, quiet=True,
                       ready=ReadyFile(bad, result.source_sha256, details=result.details))
    with pytest.raises(ConversionError, match="cannot decode a token"):
        pack_model(tiny_qwen2, opts)
    assert not out.exists() or list(out.iterdir()) == []  # no bundle, no partial directory, no lock file
    assert "onnxruntime" not in capfd.readouterr().err  # ONNX Runtime's own log does not repeat the error


def test_gguf_whose_logits_are_nan_is_refused(smollm2_gguf, tmp_path):
    """llama.cpp maps a GGUF without looking at its values: a NaN output norm loads, and only a decoded
    token shows it."""
    import gguf

    bad = tmp_path / "nan.gguf"
    shutil.copyfile(smollm2_gguf, bad)
    gguf_check(bad)  # loads and decodes as shipped
    reader = gguf.GGUFReader(bad, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[:] = np.nan
    reader.data.flush()
    del reader, norm
    with pytest.raises(ConversionError) as e:
        gguf_check(bad)
    msg = str(e.value)
    assert "\n" not in msg and "cannot decode a token" in msg and "NaN" in msg, msg


def test_gguf_check_stays_in_mapped_memory(smollm2_gguf):
    """Weights read in place from the mapped file, a context of 256 cells: a few MB of anonymous memory."""
    grown = _peak_anon_growth(lambda: gguf_check(smollm2_gguf))
    assert grown < 64 << 20, f"the load check grew RssAnon by {grown >> 20} MB"
