"""Per-tensor quant mixes (`pack model --quant mix`): the allocation, the mix writer and the whole run,
on real llama.cpp (its quantizer as the oracle of the bytes, its loader and decoder on the result)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest

import ggufview
from packager.errors import QualityError, UsageError
from packager.kernels import ggml
from packager.plan.mix import (Option, TensorOptions, allocate, hull, mix_at, path_totals, smallest_bytes,
                               upgrade_path)

from test_quality import _one_line_error, pack

CTX, CHUNKS = 64, 3


# -- ggml's dequantization ---------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q5_0", "Q8_0", "F16"])
def test_dequantize_rows_is_gguf_pys_dequantization(qtype):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, 512)).astype(np.float32)
    q = gguf.GGMLQuantizationType[qtype]
    data = ggml.quantize_rows(q, rows, n_threads=2)
    back = ggml.dequantize_rows(q, data, 512, n_threads=2)
    np.testing.assert_array_equal(back, gguf.quants.dequantize(data.reshape(8, -1), q).astype(np.float32))
    assert float(np.abs(back - rows).max()) < 1.5  # it is the same weights, give or take the rounding


# -- the allocation (pure) ---------------------------------------------------------------------

def _synthetic(n: int = 40, seed: int = 0) -> list[TensorOptions]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(1, 50)) * 1024
        scale = float(rng.uniform(0.1, 10))
        opts = tuple(Option(q, int(size * bpw / 8) // 32 * 32, scale * 2.0 ** (-1.6 * bpw))
                     for q, bpw in (("Q2_K", 2.6), ("Q3_K", 3.4), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.6),
                                    ("Q8_0", 8.5)))
        out.append(TensorOptions(f"blk.{i}.w", ("ffn_down", "attn_v", "attn_q")[i % 3], opts))
    return out


GAINS = {"ffn_down": 2.0, "attn_v": 3.0, "attn_q": 0.5}


def test_allocation_holds_the_budget_to_the_byte_and_more_bytes_never_predict_worse():
    tensors = _synthetic()
    floor, top = smallest_bytes(tensors), sum(max(o.nbytes for o in t.options) for t in tensors)
    last = None
    for budget in np.linspace(floor, top, 25).astype(int):
        mix = allocate(tensors, GAINS, int(budget))
        exact = sum(next(o.nbytes for o in t.options if o.qtype == mix.types[t.name]) for t in tensors)
        assert mix.nbytes == exact <= budget
        assert last is None or mix.predicted <= last + 1e-12
        last = mix.predicted
    assert allocate(tensors, GAINS, top).counts() == {"Q8_0": len(tensors)}
    with pytest.raises(UsageError, match=str(floor)):
        allocate(tensors, GAINS, floor - 1)


def test_allocation_beats_every_uniform_assignment_of_the_same_size():
    """The greedy over convex hulls is the Lagrangian optimum at its own sizes: no single type for all
    tensors (the crudest mix) predicts less loss within the same bytes."""
    tensors = _synthetic(seed=3)
    for q in ("Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        uniform = [next(o for o in t.options if o.qtype == q) for t in tensors]
        size = sum(o.nbytes for o in uniform)
        loss = sum(GAINS[t.category] * o.error for t, o in zip(tensors, uniform))
        mix = allocate(tensors, GAINS, size)
        assert mix.nbytes <= size and mix.predicted < loss


def test_hull_drops_types_that_cost_more_for_no_less_error():
    t = TensorOptions("w", "attn_q", (Option("A", 100, 10.0), Option("B", 200, 10.0), Option("C", 300, 1.0),
                                      Option("D", 250, 9.5), Option("E", 400, 0.9)))
    assert [o.qtype for o in hull(t, 1.0)] == ["A", "C", "E"]  # B: no better than A; D: above the A-C line


def test_path_prefixes_grow_in_bytes_and_fall_in_predicted_loss():
    tensors = _synthetic(12)
    path = upgrade_path(tensors, GAINS)
    mixes = [mix_at(tensors, GAINS, k) for k in range(0, len(path[1]) + 1, 5)]
    assert all(a.nbytes < b.nbytes and a.predicted > b.predicted for a, b in zip(mixes, mixes[1:]))
    nbytes, predicted = path_totals(tensors, GAINS, path)  # what --max-kld's search reads, without writing
    for k, m in zip(range(0, len(path[1]) + 1, 5), mixes):
        assert nbytes[k] == m.nbytes and predicted[k] == pytest.approx(m.predicted, rel=1e-9)
        assert mix_at(tensors, GAINS, k, path) == m


# -- the mix writer on real llama.cpp -----------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_f16(tiny_qwen2) -> Path:
    from oracle import reference_gguf

    return reference_gguf(tiny_qwen2)


@pytest.fixture(scope="module")
def qwen_imatrix(qwen_f16) -> dict[str, np.ndarray]:
    from packager.convert.gguf.imatrix import compute_imatrix, default_calibration_text

    return compute_imatrix(qwen_f16, default_calibration_text()[:4000], n_threads=2, quiet=True)


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in ggufview.tensors(path).values()}


def _tensor_bytes(path: Path) -> dict[str, str]:
    return {t.name: hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
            for t in ggufview.tensors(path).values()}


def test_mix_of_llama_cpps_own_types_has_llama_cpps_bytes(qwen_f16, qwen_imatrix, tmp_path):
    """Given the types llama-quantize chose for Q4_K_M and the same importance matrix, write_mix writes every
    tensor byte for byte as llama.cpp's quantizer does."""
    from packager.convert.gguf.mixes import open_reference, write_mix
    from packager.convert.gguf.requantize import quantize_gguf
    from packager.quants import get_quant

    ref = tmp_path / "llama.gguf"
    quantize_gguf(qwen_f16, get_quant("Q4_K_M"), ref, imatrix=qwen_imatrix, n_threads=2)
    types = {n: gguf.GGMLQuantizationType[t] for n, t in _types(ref).items()}
    ours = write_mix(open_reference(qwen_f16), types, tmp_path / "ours.gguf", file_type=int(get_quant("Q4_K_M").ftype),
                     imatrix=qwen_imatrix, n_threads=2, quiet=True)
    assert _types(ours.path) == _types(ref)
    assert _tensor_bytes(ours.path) == _tensor_bytes(ref)
    assert ours.sha256 == hashlib.sha256(ours.path.read_bytes()).hexdigest()


def test_mix_types_equal_the_recipe_and_llama_cpp_runs_it(qwen_f16, qwen_imatrix, tmp_path):
    from llama_cpp import Llama

    from packager.convert.gguf.mixes import open_reference, tensor_options, write_mix

    ref = open_reference(qwen_f16)
    options, kept = tensor_options(ref, qwen_imatrix, n_threads=2, quiet=True)
    rng = np.random.default_rng(7)
    recipe = {t.name: t.options[int(rng.integers(len(t.options)))].qtype for t in options}
    assert len(set(recipe.values())) >= 4  # a real mix of types
    out = write_mix(ref, {n: gguf.GGMLQuantizationType[q] for n, q in recipe.items()}, tmp_path / "mix.gguf",
                    file_type=15, imatrix=qwen_imatrix, n_threads=2, quiet=True)
    written = _types(out.path)
    assert {n: written[n] for n in recipe} == recipe
    assert all(written[n] == q.name for n, q in kept.items())  # norms and the rest as they were
    assert out.n_bytes == sum(t.n_bytes for t in ggufview.tensors(out.path).values())
    llm = Llama(str(out.path), n_ctx=128, n_threads=2, verbose=False)
    try:
        ids = llm.tokenize(b"Hello, world", add_bos=False)
        produced = [t for _, t in zip(range(8), llm.generate(ids, temp=0.0))]
        assert len(produced) == 8 and all(0 <= t < llm.n_vocab() for t in produced)
    finally:
        llm.close()


def test_errors_are_weighted_by_the_importance_matrix(qwen_f16, qwen_imatrix):
    """A column the calibration text drives hard costs more when rounded: doubling one tensor's importance
    weights doubles its error and leaves the others' alone."""
    from packager.convert.gguf.mixes import open_reference, tensor_options

    ref = open_reference(qwen_f16)
    base, _ = tensor_options(ref, qwen_imatrix, n_threads=2, quiet=True)
    name = "blk.0.ffn_down.weight"
    doubled = dict(qwen_imatrix, **{name: qwen_imatrix[name] * 2})
    twice, _ = tensor_options(ref, doubled, n_threads=2, quiet=True)
    for a, b in zip(base, twice):
        for oa, ob in zip(a.options, b.options):
            if a.name != name:
                assert oa.error == ob.error
            elif oa.qtype != "Q8_0":  # 2x weights: IQ/K-quants also choose their rounding by them
                assert 1.5 < ob.error / oa.error < 2.5, (oa, ob)
    errors = {o.qtype: o.error for o in next(t for t in base if t.name == name).options}
    assert errors["Q2_K"] > errors["Q4_K"] > errors["Q6_K"] > errors["Q8_0"] > 0


# -- the whole run --------------------------------------------------------------------------------

def _run(source: Path, out: Path, **kw):
    from packager.pack.mixquant import pack_mix
    from packager.pack.options import PackOptions

    return pack_mix(source, PackOptions(target="laptop", output=out, quiet=True), n_ctx=CTX, max_chunks=CHUNKS, **kw)


@pytest.mark.slow
def test_mix_fits_the_budget_to_the_byte_and_ships_its_recipe(tiny_qwen2, tmp_path):
    import packager
    from packager.bundle.verify import verify

    budget = 25_000_000
    res = _run(tiny_qwen2, tmp_path / "dist", max_size=budget)
    assert verify(res.path) == []
    model = res.path / res.manifest["model_file"]
    assert model.stat().st_size <= budget
    mix = res.manifest["quality"]["mix"]
    written = _types(model)
    assert {n: written[n] for n in mix["recipe"]} == mix["recipe"]
    assert sum(mix["counts"].values()) == len(mix["recipe"]) and len(mix["counts"]) >= 2
    assert mix["imatrix"]["text"] == "edgepack calibration.txt"
    assert mix["decision_text"]["name"] == "edgepack decision.txt"
    quality = res.manifest["quality"]
    assert quality["text"] == "edgepack evaluation.txt"  # the reported figures: a third text
    assert {r["text"] for r in mix["table"]} == {"decision", "evaluation"}
    assert any(r["what"].startswith("uniform ") for r in mix["table"])  # the neighbours it is compared with
    assert "## Quality" in (res.path / "README.md").read_text()
    assert [p.name for p in (tmp_path / "dist").iterdir() if p.name.startswith(".edgepack-mix-")] == []
    with packager.load(res.path) as m:
        assert isinstance(m.generate("Hello", max_tokens=4), str)


@pytest.mark.slow
def test_a_looser_kld_bar_gives_a_smaller_mix(tiny_qwen2, tmp_path):
    sizes = {}
    for name, bar in (("loose", 0.5), ("tight", 0.01)):
        res = _run(tiny_qwen2, tmp_path / name, max_kld=bar)
        sizes[name] = (res.path / res.manifest["model_file"]).stat().st_size
        chosen = [r for r in res.manifest["quality"]["mix"]["table"] if r["verdict"].startswith("chosen")]
        assert len(chosen) == 1 and chosen[0]["kld"] <= bar
    assert sizes["loose"] < sizes["tight"], sizes


def test_a_budget_below_the_smallest_mix_is_one_line_before_any_work(tiny_qwen2, tmp_path):
    out = tmp_path / "dist"
    r = pack("model", tiny_qwen2, "--quant", "mix", "--max-size", "1MB", "-o", out)
    line = _one_line_error(r, 2, "--max-size", "smallest mix of this model")
    assert "MB" in line.split("smallest mix of this model")[1]
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []


def test_max_size_without_mix_is_a_usage_error(tiny_qwen2, tmp_path):
    r = pack("model", tiny_qwen2, "--max-size", "1GB", "-o", tmp_path)
    assert r.returncode == 2 and "--max-size applies to --quant mix only" in r.stderr


@pytest.mark.slow
def test_an_unreachable_size_and_bar_fail_with_the_table_and_no_bundle(tiny_qwen2, tmp_path):
    out = tmp_path / "dist"
    with pytest.raises(QualityError) as e:
        _run(tiny_qwen2, out, max_size=45_000_000, max_kld=1e-9)
    assert "raise --max-kld or --max-size" in str(e.value) and "probe ffn_down" in str(e.value)
    assert [p.name for p in out.iterdir()] == []


def test_an_imatrix_of_another_model_is_refused(tiny_qwen2, tmp_path):
    from packager.convert.gguf.imatrix import save_imatrix
    from packager.kernels.imatrix import ImatrixStats

    other = ImatrixStats(chunk_size=64, chunk_count=1, datasets=["x.txt"])
    other.add_dense("blk.0.attn_q.weight", np.ones((4, 7), dtype=np.float32))  # this model's has 256 columns
    bad = save_imatrix(other, tmp_path / "other.imatrix.gguf")
    out = tmp_path / "dist"
    r = pack("model", tiny_qwen2, "--quant", "mix", "--imatrix", bad, "-o", out, "-q")
    _one_line_error(r, 2, "--imatrix", "other.imatrix.gguf", "blk.0.attn_q.weight", "another model")
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []
