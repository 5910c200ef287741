"""Quality measurement (pack quality) and --quant auto, on real llama.cpp with the SmolLM2-135M fixture.

The default run uses short chunks (64 tokens, 2 chunks) so it stays quick; the
check against llama.cpp's own llama-perplexity and the --quant auto walks are
marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from packager.bundle.verify import read_bundle, verify
from packager.bundle.writer import BundleWriter, update_bundle
from packager.errors import UsageError, VerificationError
from packager.kernels.quality import QualityStats, log_softmax, score_block, stored

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
CTX, CHUNKS = 64, 2


def pack(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=900)


# -- the maths ---------------------------------------------------------------------------

def test_log_softmax_is_stable_and_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1000)).astype(np.float32) * 5
    x[0, 0] = 1e4  # exp(1e4) overflows without max-subtraction
    lp = log_softmax(x)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-12)
    ref = x[1:].astype(np.float64) - np.log(np.exp(x[1:].astype(np.float64)).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(lp[1:], ref, rtol=1e-12, atol=1e-12)
    assert lp[0, 0] == 0.0


def test_kld_ppl_top1_against_a_direct_computation():
    rng = np.random.default_rng(1)
    ref_logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    q_logits = (ref_logits + rng.normal(size=ref_logits.shape).astype(np.float32) * 0.5).astype(np.float32)
    targets = rng.integers(0, 50, size=6)
    lr = stored(log_softmax(ref_logits))
    s = score_block(q_logits, lr, np.argmax(ref_logits, axis=1), targets)
    p = np.exp(ref_logits.astype(np.float64)); p /= p.sum(1, keepdims=True)
    q = np.exp(q_logits.astype(np.float64)); q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(s.kld, (p * np.log(p / q)).sum(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.nll, -np.log(q[np.arange(6), targets]), rtol=1e-6)
    np.testing.assert_array_equal(s.same_top, p.argmax(1) == q.argmax(1))
    stats = QualityStats()
    stats.add(s)
    summ = stats.summary()
    assert summ.ppl == pytest.approx(np.exp(np.mean(-np.log(q[np.arange(6), targets]))), rel=1e-6)
    assert summ.kld_p99 == pytest.approx(np.percentile((p * np.log(p / q)).sum(1), 99), rel=1e-5)
    # The same logits on both sides: exactly zero, full agreement.
    same = score_block(ref_logits, lr, np.argmax(ref_logits, axis=1), targets)
    assert same.kld.max() == 0.0 and same.same_top.all()


# -- the bundle record -------------------------------------------------------------------

def test_update_bundle_keeps_it_verified_and_replaces_the_card_section(tmp_path):
    from packager.measure.bundle_quality import card_section, with_card_section

    with BundleWriter(tmp_path / "b") as bw:
        bw.add_text("model/m.gguf", "weights")
        bw.add_text("README.md", "# card\n")
        bw.commit({"model_file": "model/m.gguf", "quant": "Q4_0"})
    q = {"reference": "ref.gguf", "text": "t", "n_tokens": 10, "n_chunks": 1, "n_ctx": 16, "ppl": 2.0,
         "ppl_ref": 1.9, "kld_mean": 0.01, "kld_p99": 0.1, "top1": 0.9}
    for ppl in (2.0, 3.0):  # twice: the section is replaced, not appended again
        readme = (tmp_path / "b" / "README.md").read_text()
        update_bundle(tmp_path / "b", {"quality": {**q, "ppl": ppl}},
                      {"README.md": with_card_section(readme, card_section({**q, "ppl": ppl}, "Q4_0"))})
    assert verify(tmp_path / "b") == []
    b = read_bundle(tmp_path / "b")
    assert b.manifest["quality"]["ppl"] == 3.0 and b.manifest["quant"] == "Q4_0"
    card = (tmp_path / "b" / "README.md").read_text()
    assert card.startswith("# card") and card.count("## Quality") == 1 and "3.0000" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b")  and "partial" in p.name]


# -- real models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f16_ref(smollm2_hf) -> Path:
    from oracle import reference_gguf

    return reference_gguf(smollm2_hf)


@pytest.fixture(scope="module")
def measured(f16_ref, tmp_path_factory):
    """F16, Q8_0, Q4_K_M and Q2_K (llama.cpp's quantizer) against the F16 reference."""
    from oracle import reference_quantize

    from packager.measure.quality import RunSettings, build_reference, default_evaluation_text, measure

    s = RunSettings(n_threads=2)
    text = default_evaluation_text()
    ref = build_reference(f16_ref, text, tmp_path_factory.mktemp("ref"), n_ctx=CTX, n_chunks=CHUNKS, settings=s,
                          quiet=True)
    out = {"F16": measure(f16_ref, ref, settings=s, text=text, quiet=True).summary}
    for q in ("Q8_0", "Q4_K_M", "Q2_K"):
        out[q] = measure(reference_quantize(f16_ref, q), ref, settings=s, quiet=True).summary
    return out


def test_f16_against_itself_is_kld_zero_top1_one(measured):
    s = measured["F16"]
    assert s.n_tokens == CHUNKS * (CTX // 2 - 1)
    assert s.kld_mean == 0.0 and s.kld_p99 == 0.0 and s.top1 == 1.0
    assert s.ppl == s.ppl_ref and 1 < s.ppl < 1000


def test_kld_orders_the_quants(measured):
    k = {q: s.kld_mean for q, s in measured.items()}
    assert 0 < k["Q8_0"] < k["Q4_K_M"] < k["Q2_K"], k
    assert measured["Q8_0"].top1 > measured["Q2_K"].top1
    assert measured["Q2_K"].ppl > measured["Q8_0"].ppl
    assert all(s.kld_p99 >= s.kld_mean for s in measured.values())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2_gguf) -> Path:
    """A SmolLM2 bundle of our own (pack quality rewrites it; the shared fixture stays untouched)."""
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    return pack_model(smollm2_gguf, PackOptions(output=tmp_path_factory.mktemp("q-dist"), quiet=True)).path


def test_pack_quality_records_figures_and_stays_verified(bundle, f16_ref):
    r = pack("quality", bundle, "--reference", f16_ref, "--ctx", CTX, "--chunks", CHUNKS, "--json")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["quality"] == q
    assert {"reference", "text_sha256", "ppl", "ppl_ref", "kld_mean", "kld_p99", "top1"} <= set(q)
    assert q["reference"] == f16_ref.name and q["n_tokens"] == CHUNKS * (CTX // 2 - 1)
    assert 0 < q["kld_mean"] < 1 and 0.5 < q["top1"] < 1  # a Q4_1 file against F16
    assert verify(bundle) == []
    card = (bundle / "README.md").read_text()
    assert "## Quality" in card and f"{q['ppl']:.4f}" in card


@pytest.mark.slow
def test_pack_quality_with_the_checkpoint_as_reference(tmp_path, smollm2_gguf, smollm2_hf, f16_ref):
    """A checkpoint directory as the reference: converted to F16 in a temp dir, the same figures as the F16 GGUF."""
    from packager.measure.bundle_quality import assess_bundle
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    b = pack_model(smollm2_gguf, PackOptions(output=tmp_path / "dist", quiet=True)).path
    temps = lambda: set(Path(tempfile.gettempdir()).glob("edgepack-reference-*"))  # noqa: E731
    before = temps()
    q = assess_bundle(b, smollm2_hf, n_ctx=CTX, n_chunks=CHUNKS, quiet=True)
    assert q["reference"].endswith("(checkpoint, converted to F16)")
    by_gguf = assess_bundle(b, f16_ref, n_ctx=CTX, n_chunks=CHUNKS, quiet=True)
    # Two F16 conversions of one checkpoint (ours, llama.cpp's): the same weights, so nearly the same figures.
    assert q["ppl_ref"] == pytest.approx(by_gguf["ppl_ref"], rel=1e-3)
    assert q["kld_mean"] == pytest.approx(by_gguf["kld_mean"], rel=0.02, abs=1e-4)
    assert verify(b) == [] and temps() == before  # the converted reference was removed


# -- ONNX bundles, on the same scale ------------------------------------------------------------

@pytest.mark.slow
def test_onnx_graph_with_unquantized_weights_matches_the_f16_reference(smollm2_hf, f16_ref, tmp_path):
    """ONNX Runtime's logits of an f32 graph against llama.cpp's F16 logits over the same tokens."""
    from packager.convert.onnx.converter import OnnxOptions, convert
    from packager.measure.quality import RunSettings, build_reference, default_evaluation_text, measure
    from packager.source.resolver import resolve

    convert(resolve(smollm2_hf, hash_files=False, quiet=True), tmp_path / "f32", OnnxOptions(int4=False), quiet=True)
    s, text = RunSettings(n_threads=2), default_evaluation_text()
    ref = build_reference(f16_ref, text, tmp_path / "ref", n_ctx=256, n_chunks=2, settings=s, quiet=True)
    got = measure(tmp_path / "f32" / "model.onnx", ref, settings=s, text=text, quiet=True).summary
    assert got.n_tokens == 2 * (256 // 2 - 1)
    assert got.kld_mean < 1e-3 and got.top1 > 0.99, got
    assert abs(got.ppl / got.ppl_ref - 1) < 0.01


@pytest.mark.slow
def test_pack_quality_on_onnx_bundles_hqq_beats_rtn(smollm2_hf, f16_ref, tmp_path):
    kld = {}
    for algorithm in ("rtn", "hqq"):
        out = tmp_path / algorithm
        r = pack("model", smollm2_hf, "--format", "onnx", "--algorithm", algorithm, "-o", out, "-q")
        assert r.returncode == 0, r.stderr
        bundle = next(out.iterdir())
        r = pack("quality", bundle, "--reference", f16_ref, "--ctx", 256, "--chunks", 2, "--json")
        assert r.returncode == 0, r.stderr
        q = json.loads(r.stdout)
        assert json.loads((bundle / "manifest.json").read_text())["quality"] == q and verify(bundle) == []
        assert "## Quality" in (bundle / "README.md").read_text()
        kld[algorithm] = q["kld_mean"]
    assert 0 < kld["hqq"] < kld["rtn"], kld


def test_onnx_bundle_against_another_models_reference_is_refused(tiny_qwen2, f16_ref, tmp_path):
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    bundle = pack_model(tiny_qwen2, PackOptions(format="onnx", output=tmp_path, quiet=True)).path
    r = pack("quality", bundle, "--reference", f16_ref, "--ctx", CTX, "--chunks", 1)
    assert r.returncode == 1 and "is not the same model as the reference" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_reference_of_another_model_is_refused(bundle, tiny_qwen2):
    from oracle import reference_gguf

    r = pack("quality", bundle, "--reference", reference_gguf(tiny_qwen2), "-q")
    _one_line_error(r, 1, "not the same model", "vocabulary")


def test_text_shorter_than_one_chunk_is_refused(bundle, f16_ref, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    r = pack("quality", bundle, "--reference", f16_ref, "--text", short, "-q")
    _one_line_error(r, 2, "short.txt", "shorter than one chunk of 512")


def test_quantized_reference_is_refused(bundle, smollm2_gguf):
    r = pack("quality", bundle, "--reference", smollm2_gguf, "-q")
    _one_line_error(r, 2, "Q4_1", "F16")


def test_bundle_failing_verification_is_refused(tmp_path, smollm2_gguf, f16_ref):
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    b = pack_model(smollm2_gguf, PackOptions(output=tmp_path, quiet=True)).path
    with open(b / "README.md", "a") as f:
        f.write("tampered\n")
    r = pack("quality", b, "--reference", f16_ref, "-q")
    _one_line_error(r, 1, "failed verification", "README.md")
    with pytest.raises(VerificationError):
        from packager.measure.bundle_quality import assess_bundle

        assess_bundle(b, f16_ref, n_ctx=CTX, n_chunks=1, quiet=True)


def test_bad_ctx_and_chunks_are_usage_errors(bundle, f16_ref):
    from packager.measure.bundle_quality import assess_bundle

    with pytest.raises(UsageError, match="--ctx 15"):
        assess_bundle(bundle, f16_ref, n_ctx=15, quiet=True)
    with pytest.raises(UsageError, match="--chunks 0"):
        assess_bundle(bundle, f16_ref, n_ctx=CTX, n_chunks=0, quiet=True)


# -- against llama.cpp's own tool -----------------------------------------------------------

@pytest.mark.slow
def test_matches_llama_perplexity(f16_ref, tmp_path):
    """ppl, KLD and top-1 as llama-perplexity reports them for the same files and text (-c 512 -b 512)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from llama_tools import llama_tool
    from oracle import reference_quantize

    from packager.measure.quality import DEFAULT_TEXT, RunSettings, build_reference, default_evaluation_text, measure

    tool = llama_tool("llama-perplexity")
    q4 = reference_quantize(f16_ref, "Q4_K_M")
    text_file = tmp_path / DEFAULT_TEXT
    text_file.write_text(default_evaluation_text(), encoding="utf-8")
    common = ["-f", text_file, "-c", 512, "-b", 512, "--chunks", 3, "-t", 2, "--kl-divergence-base", tmp_path / "base.kld"]
    base = subprocess.run(list(map(str, [tool, "-m", f16_ref, *common])), capture_output=True, text=True, check=True)
    kl = subprocess.run(list(map(str, [tool, "-m", q4, *common, "--kl-divergence"])), capture_output=True, text=True,
                        check=True)

    def grab(pattern: str, out: str) -> float:
        return float(re.search(pattern, out).group(1))

    ppl_f16 = grab(r"Final estimate: PPL = ([\d.]+)", base.stderr + base.stdout)
    out = kl.stderr + kl.stdout
    ppl_q, kld, kld99, top = (grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out), grab(r"Mean\s+KLD:\s*([\d.]+)", out),
                              grab(r"99\.0%\s+KLD:\s*([\d.]+)", out), grab(r"Same top p:\s*([\d.]+)", out))
    s = RunSettings(n_threads=2)
    ref = build_reference(f16_ref, default_evaluation_text(), tmp_path / "ref", n_ctx=512, n_chunks=3, settings=s,
                          quiet=True)
    ours = measure(q4, ref, settings=s, quiet=True).summary
    print(f"ours: ppl_ref {ours.ppl_ref} ppl {ours.ppl} kld {ours.kld_mean} p99 {ours.kld_p99} top1 {ours.top1}; "
          f"llama-perplexity: ppl_ref {ppl_f16} ppl {ppl_q} kld {kld} p99 {kld99} top1 {top / 100}")
    # Same method, same ggml: the perplexities agree to the digits the tool prints.
    assert ours.ppl_ref == pytest.approx(ppl_f16, rel=1e-3)
    assert ours.ppl == pytest.approx(ppl_q, rel=1e-3)
    # llama.cpp keeps the base as 16-bit codes over 16 nats, so its KLD approximates ours (0.3% apart
    # when this was written); the bar is 1%.
    assert ours.kld_mean == pytest.approx(kld, rel=0.01)
    assert ours.kld_p99 == pytest.approx(kld99, rel=0.01)
    assert 100 * ours.top1 == pytest.approx(top, rel=0.01)


# -- --quant auto --------------------------------------------------------------------------

def _target(tmp_path: Path, ladder: list[str]) -> Path:
    from importlib.resources import files

    text = (files("packager.targets") / "laptop.toml").read_text()
    text = re.sub(r"(?m)^quant_ladder = .*$", f"quant_ladder = {json.dumps(ladder)}", text)
    text = re.sub(r'(?m)^name = "laptop"$', 'name = "test-ladder"', text)
    path = tmp_path / "test-ladder.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def user_imatrix_file(f16_ref, tmp_path_factory) -> Path:
    """A user's own importance matrix: a short pass over a text of their choosing (not the shipped calibration text)."""
    from packager.convert.gguf.imatrix import collect_imatrix, save_imatrix
    from packager.measure.quality import default_evaluation_text

    stats = collect_imatrix(f16_ref, default_evaluation_text(), n_ctx=CTX, n_chunks=CHUNKS, n_threads=2, quiet=True)
    return save_imatrix(stats, tmp_path_factory.mktemp("user-imatrix") / "mine.imatrix.gguf")


@pytest.mark.slow
def test_auto_loose_bar_picks_a_smaller_file_than_a_tight_bar(smollm2_hf, user_imatrix_file, tmp_path):
    """The tight run computes the default importance matrix for Q3_K_S (and records none: it bundles Q8_0);
    the loose run takes the user's --imatrix file instead, so the matrix is computed once, not twice."""
    from packager.pack.autoquant import pack_auto
    from packager.pack.options import PackOptions

    target = _target(tmp_path, ["Q8_0", "Q4_K_M", "Q3_K_S"])
    chosen = {}
    for name, bar, imatrix in (("loose", 5.0, user_imatrix_file), ("tight", 0.02, None)):
        out = tmp_path / name
        res = pack_auto(smollm2_hf, PackOptions(target=str(target), output=out, quiet=True, imatrix=imatrix),
                        max_kld=bar, n_ctx=CTX, n_chunks=CHUNKS)
        assert verify(res.path) == []
        model = res.path / res.manifest["model_file"]
        chosen[name] = (res.manifest["quant"], model.stat().st_size, res.manifest["quality"], res.manifest["imatrix"])
        assert [p.name for p in out.iterdir() if p.name.startswith(".edgepack-auto-")] == []
    (lq, lsize, lqual, _), (tq, tsize, tqual, _) = chosen["loose"], chosen["tight"]
    assert lq == "Q3_K_S" and lsize < tsize, (lq, tq)
    assert tqual["kld_mean"] <= 0.02 < max(r["kld_mean"] for r in tqual["auto"]["table"] if r["kld_mean"] is not None)
    assert lqual["auto"]["table"][0]["verdict"].endswith("(imatrix)")  # Q3_K_S got an importance matrix
    assert chosen["loose"][3]["file"] == user_imatrix_file.name and chosen["tight"][3] is None  # only when used
    # The tight run measured Q3_K_S with the matrix it computed from the shipped calibration text.
    tight_q3 = next(r for r in tqual["auto"]["table"] if r["quant"] == "Q3_K_S")
    assert tight_q3["imatrix"] and tqual["auto"]["imatrix"]["text"] == "edgepack calibration.txt"


@pytest.mark.slow
def test_auto_with_an_impossible_bar_fails_with_the_table_and_leaves_nothing(tiny_qwen2, tmp_path):
    out = tmp_path / "dist"
    target = _target(tmp_path, ["Q8_0", "Q4_0"])
    r = pack("model", tiny_qwen2, "--target", target, "--quant", "auto", "--max-kld", "1e-9", "-o", out)
    assert r.returncode == 1, r.stderr
    assert "no quant on test-ladder's ladder" in r.stderr and "Q8_0" in r.stderr and "Q4_0" in r.stderr
    assert list(out.iterdir()) == [] or all(p.name.endswith(".lock") for p in out.iterdir())


@pytest.mark.slow
def test_auto_walks_gguf_and_onnx_candidates_together_by_size(tiny_qwen2, tmp_path):
    """A target that runs both formats: GGUF types and ONNX schemes in one table, smallest weights first;
    the first under the bar is bundled in its own format, as measured."""
    out = tmp_path / "dist"
    target = _target(tmp_path, ["Q8_0", "Q4_0"])
    r = pack("model", tiny_qwen2, "--target", target, "--quant", "auto", "--max-kld", "50", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    table = m["quality"]["auto"]["table"]
    assert {row["format"] for row in table} == {"gguf", "onnx"}
    assert {row["quant"] for row in table} == {"Q8_0", "Q4_0", "INT4_B32", "INT4_B128_HQQ", "INT4_B64_HQQ", "INT4_B32_HQQ"}
    sizes = [row["predicted_memory"] for row in table]
    chosen = table[0]  # the bar is loose: the smallest candidate qualifies
    assert chosen["verdict"].startswith("chosen") and all(r["verdict"].startswith("not measured") for r in table[1:])
    assert (m["format"], m["quant"]) == (chosen["format"], chosen["quant"])
    assert m["quality"]["kld_mean"] == pytest.approx(chosen["kld_mean"], abs=1e-8)  # the manifest rounds to 8 digits
    assert all(s is not None for s in sizes)
    assert verify(Path(m["path"])) == []


@pytest.mark.slow
def test_auto_onnx_bundles_the_folder_it_measured(tiny_qwen2, tmp_path):
    import packager
    from packager.convert.onnx.converter import OnnxOptions, convert
    from packager.source.resolver import resolve

    r = pack("model", tiny_qwen2, "--format", "onnx", "--quant", "auto", "--max-kld", "50", "-o", tmp_path / "d",
             "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    bundle = Path(m["path"])
    assert m["format"] == "onnx" and m["quant"] == "INT4_B128_HQQ" and m["onnx"]["algorithm"] == "hqq"
    assert m["quality"]["auto"]["table"][0]["quant"] == "INT4_B128_HQQ" and "## Quality" in (bundle / "README.md").read_text()
    # the bytes a plain conversion at that scheme writes: nothing was converted twice or differently
    convert(resolve(tiny_qwen2, hash_files=False, quiet=True), tmp_path / "again",
            OnnxOptions(block_size=128, symmetric=False, algorithm="hqq"), quiet=True)
    assert (bundle / "model" / "model.onnx.data").read_bytes() == (tmp_path / "again" / "model.onnx.data").read_bytes()
    with packager.load(bundle) as model:
        assert model.generate("Hello", max_tokens=4)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["reference-logprobs.npy", "candidate-"])
def test_auto_ctrl_c_removes_its_temporary_files(tiny_qwen2, tmp_path, when):
    """SIGINT while the reference pass writes its log-probabilities, or while a candidate is quantized or
    measured: exit 130, the work directory (F16 file, log-probabilities, candidates) gone, no bundle."""
    import signal
    import time

    out = tmp_path / "dist"
    target = _target(tmp_path, ["Q8_0", "Q4_0"])
    p = subprocess.Popen([sys.executable, "-m", "packager.cli", "model", str(tiny_qwen2), "--target", str(target),
                          "--quant", "auto", "--max-kld", "1e-9", "-o", str(out), "-q"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300

    def appeared() -> bool:
        try:
            return any(f.name.startswith(when) for d in out.glob(".edgepack-auto-*") for f in d.iterdir())
        except FileNotFoundError:  # the run removed its work directory while we listed it
            return False

    seen = False
    while not seen and p.poll() is None and time.monotonic() < deadline:
        seen = appeared()
        time.sleep(0.01)
    assert seen, f"the run ended before {when} appeared: {p.returncode}"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().startswith("interrupted") and "Traceback" not in err, err
    assert [x.name for x in out.iterdir() if not x.name.endswith(".lock")] == []


@pytest.mark.slow
def test_auto_quantizes_with_the_users_imatrix_and_names_it(f16_ref, user_imatrix_file, tmp_path, capsys,
                                                            monkeypatch):
    """--quant auto --imatrix FILE: the low-bit candidate is quantized with that file (the bundled bytes are
    llama.cpp's with it), none is computed, and the table, manifest and quality record name it with its sha256."""
    from packager.pack.autoquant import pack_auto
    from packager.pack.options import PackOptions
    from packager.source.resolver import sha256_file

    monkeypatch.setenv("EDGEPACK_NO_PROGRESS", "1")
    target = _target(tmp_path, ["Q8_0", "Q3_K_S"])
    res = pack_auto(f16_ref, PackOptions(target=str(target), output=tmp_path / "dist", imatrix=user_imatrix_file,
                                         n_threads=2), max_kld=5.0, n_ctx=CTX, n_chunks=CHUNKS)
    err = capsys.readouterr().err
    record = {"file": user_imatrix_file.name, "sha256": sha256_file(user_imatrix_file)}
    m = res.manifest
    assert m["quant"] == "Q3_K_S", m["quality"]["auto"]["table"]
    assert m["imatrix"] == record and m["quality"]["auto"]["imatrix"] == record
    assert m["quality"]["auto"]["table"][0]["verdict"] == "chosen: smallest under the bar (imatrix)"
    assert f"(imatrix: mine.imatrix.gguf (sha256 {record['sha256']}))" in err, err
    assert "computing an importance matrix" not in err, err
    assert verify(res.path) == []
    bundled = sha256_file(res.path / m["model_file"])
    # The oracle: llama.cpp's quantizer called directly with the file, as llama-quantize --imatrix does.
    import oracle

    with_users = oracle.llama_quantize(f16_ref, "Q3_K_S", tmp_path / "with.gguf", imatrix_file=user_imatrix_file)
    without = oracle.llama_quantize(f16_ref, "Q3_K_S", tmp_path / "without.gguf")
    assert bundled == sha256_file(with_users) != sha256_file(without)
    assert [p.name for p in (tmp_path / "dist").iterdir() if p.name.startswith(".edgepack-auto-")] == []


def test_auto_refuses_an_imatrix_made_for_another_model(f16_ref, tmp_path):
    """Checked against the model's tensors before the reference pass: a one-line usage error, no bundle."""
    from packager.convert.gguf.imatrix import save_imatrix
    from packager.kernels.imatrix import ImatrixStats

    other = ImatrixStats(chunk_size=64, chunk_count=1, datasets=["x.txt"])
    other.add_dense("blk.0.attn_q.weight", np.ones((4, 7), dtype=np.float32))  # SmolLM2's has 576 columns
    bad = save_imatrix(other, tmp_path / "other.imatrix.gguf")
    out = tmp_path / "dist"
    r = pack("model", f16_ref, "--target", _target(tmp_path, ["Q3_K_S"]), "--quant", "auto", "--imatrix", bad,
             "-o", out, "-q")
    _one_line_error(r, 2, "--imatrix", "other.imatrix.gguf", "blk.0.attn_q.weight", "another model")
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []
