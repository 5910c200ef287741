"""Mutation fuzzing of every reader of outside files (see fuzzkit for the property).

Targets: the GGUF source reader (spec_from_gguf, which walks the layout first),
the safetensors header reader (Checkpoint, then every tensor read through its
memory map), config.json -> ModelSpec (and a plan from it), target profiles
(and a plan with them), manifest.json -> bundle verification.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import fuzzkit  # noqa: E402
from fuzzkit import Counter, fuzz_settings  # noqa: E402

from packager.errors import EdgepackError  # noqa: E402

COUNTERS: dict[str, Counter] = {}


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    for c in COUNTERS.values():
        c.record()
        print(f"fuzzed {c.target}: {c.total} inputs, {c.ok} accepted, errors {c.errors}")


def counter(name: str) -> Counter:
    return COUNTERS.setdefault(name, Counter(name))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- GGUF -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_seed(work):
    data = fuzzkit.tiny_model_gguf(work / "seed.gguf").read_bytes()
    return data, fuzzkit.int_slots(data), fuzzkit.header_end(data)


def test_seed_gguf_reads(gguf_seed, work):
    from packager.spec.gguf import spec_from_gguf

    spec, quant = spec_from_gguf(work / "seed.gguf")
    assert spec.n_layers == 1 and spec.hidden_size == 32 and spec.vocab_size == 32 and quant == "Q8_0"
    assert len(gguf_seed[1]) > 50  # the structure-aware mutator sees the header's integers


@fuzz_settings("gguf")
@given(data=st.data())
def test_fuzz_gguf_source(gguf_seed, work, data):
    from packager.spec.gguf import spec_from_gguf

    seed, slots, head = gguf_seed
    blob = data.draw(fuzzkit.gguf_mutations(seed, slots, head))
    path = work / "in.gguf"
    path.write_bytes(blob)
    counter("gguf")(lambda: spec_from_gguf(path))


# -- safetensors -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_seed(work):
    return fuzzkit.tiny_safetensors(work / "seed.safetensors").read_bytes()


def _read_all(path: Path) -> None:
    from packager.source.safetensors import Checkpoint

    ckpt = Checkpoint([path])
    try:
        for name in ckpt.refs:
            ckpt.f32(name)
    finally:
        ckpt.close()


@fuzz_settings("safetensors")
@given(data=st.data())
def test_fuzz_safetensors_header(st_seed, work, data):
    import struct

    (n,) = struct.unpack_from("<Q", st_seed)
    if data.draw(st.booleans()):
        blob = data.draw(fuzzkit.byte_mutations(st_seed, hot=8 + n))
    else:  # rewrite the JSON header, keep the data
        header = data.draw(fuzzkit.json_mutations(json.loads(st_seed[8:8 + n]), ["dtype", "shape", "data_offsets"]))
        text = json.dumps(header).encode()
        blob = struct.pack("<Q", len(text)) + text + st_seed[8 + n:]
    path = work / "in.safetensors"
    path.write_bytes(blob)
    counter("safetensors")(lambda: _read_all(path))


# -- config.json -> ModelSpec -> plan -----------------------------------------------------------

CONFIG_KEYS = ["architectures", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings",
               "tie_word_embeddings", "model_type", "text_config", "attention_bias"]


@pytest.fixture(scope="module")
def config_seed(tiny_qwen2):
    return json.loads((tiny_qwen2 / "config.json").read_text())


def _spec_and_plan(model_dir: Path) -> None:
    from packager.plan.planner import plan
    from packager.plan.targets import load_target
    from packager.spec.model import load_spec

    spec = load_spec(model_dir)
    plan(spec, load_target("laptop"))


@fuzz_settings("config")
@given(data=st.data())
def test_fuzz_config_to_spec(config_seed, work, data):
    d = work / "ckpt"
    d.mkdir(exist_ok=True)
    if data.draw(st.integers(0, 4)):
        cfg = data.draw(fuzzkit.json_mutations(config_seed, CONFIG_KEYS))
        # Focus: a known size key set to a hostile value.
        if data.draw(st.booleans()):
            cfg = dict(cfg) if isinstance(cfg, dict) else {}
            cfg[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(fuzzkit.JSON)
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        (d / "config.json").write_bytes(data.draw(fuzzkit.byte_mutations(json.dumps(config_seed).encode())))
    counter("config")(lambda: _spec_and_plan(d))


# -- target profiles (-> plan) ------------------------------------------------------------------

TOML_VALUES = st.sampled_from([
    "0", "-1", "1", "4", "1e400", "inf", "-inf", "nan", "0.0", "1.5", "-0.5", "9223372036854775807",
    "-9223372036854775808", "true", "false", '""', '"x"', '"16GiB"', '"0"', '"-1GB"', '"1e99T"', '"99999999999TiB"',
    '"Q4_K_M"', '"nope"', "[]", '["cpu"]', "[1, 2]", '["Q4_K_M", "NOPE"]', "[[]]", "{}", '{a = 1}',
    "1979-05-27T07:32:00Z", "07:32:00", '"f16"', '"q4_0"', "[" * 50 + "]" * 50,
]) | st.integers().map(str) | st.floats().map(lambda f: repr(f).replace("nan", "nan").replace("inf", "inf"))


@pytest.fixture(scope="module")
def profile_seed():
    from packager.plan.targets import _builtin

    return _builtin()["laptop"].read_text()


def _profile_and_plan(path: Path) -> None:
    from packager.plan.planner import plan
    from packager.plan.targets import load_target
    from packager.spec.model import ModelSpec

    t = load_target(path)
    spec = ModelSpec("Qwen2ForCausalLM", "qwen2", 24, 896, 4864, 14, 2, 64, 151936, 32768, True, 494_032_768, True)
    plan(spec, t)


@fuzz_settings("profile")
@given(data=st.data())
def test_fuzz_target_profile(profile_seed, work, data):
    lines = profile_seed.splitlines()
    keys = [i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    if data.draw(st.integers(0, 3)):
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.sampled_from(keys))
            key = lines[i].split("=", 1)[0].strip()
            action = data.draw(st.sampled_from(["value", "value", "value", "drop", "rename"]))
            if action == "value":
                lines[i] = f"{key} = {data.draw(TOML_VALUES)}"
            elif action == "drop":
                lines[i] = ""
            else:
                lines[i] = f"{data.draw(st.text('abcdefghijklmnopqrstuvwxyz_', min_size=1, max_size=12))} = 1"
        text = "\n".join(lines).encode()
    else:
        text = data.draw(fuzzkit.byte_mutations(profile_seed.encode()))
    path = work / "target.toml"
    path.write_bytes(text)
    counter("profile")(lambda: _profile_and_plan(path))


# -- manifest.json -> bundle verification ---------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_seed(work):
    from packager.bundle.writer import BundleWriter

    with BundleWriter(work / "seed-bundle") as bw:
        bw.path("model/m.gguf").write_bytes(os.urandom(4096))
        bw.add_text("README.md", "hello\n")
        bw.commit({"name": "m", "format": "gguf", "model_file": "model/m.gguf", "runtime": {"n_ctx": 512}}, quiet=True)
    return work / "seed-bundle"


def _verify(path: Path) -> None:
    from packager.bundle.verify import read_bundle, verify

    verify(path)
    b = read_bundle(path)
    b.model_file  # noqa: B018  (must resolve, or raise our error)


@fuzz_settings("manifest")
@given(data=st.data())
def test_fuzz_manifest_verification(bundle_seed, data):
    man = bundle_seed / "manifest.json"
    original = man.read_bytes()
    try:
        if data.draw(st.integers(0, 3)):
            doc = data.draw(fuzzkit.json_mutations(json.loads(original), ["files", "model_file", "schema_version",
                                                                          "path", "bytes", "sha256"]))
            man.write_text(json.dumps(doc))
        else:
            man.write_bytes(data.draw(fuzzkit.byte_mutations(original)))
        counter("manifest")(lambda: _verify(bundle_seed))
    finally:
        man.write_bytes(original)


@settings(max_examples=100, derandomize=True, database=None)
@given(values=st.lists(fuzzkit.HOSTILE, min_size=30, max_size=30))
def test_hostile_values_are_fresh_objects(values):
    """Regression (long run, seed 1004): sampled_from handed out one shared [] and {}; a safetensors
    header mutation appended a list to itself and the harness crashed on [[...], 2] instead of fuzzing."""
    containers = [v for v in values if isinstance(v, (list, dict))]
    assert len({id(v) for v in containers}) == len(containers)


def test_every_fuzz_target_ran():
    """Runs last in this module: each target saw inputs, and some were accepted (the seeds are valid)."""
    for name in ("gguf", "safetensors", "config", "profile", "manifest"):
        c = COUNTERS.get(name)
        assert c is not None and c.total >= min(20, fuzzkit.examples(name)), (name, c and c.total)
    assert isinstance(EdgepackError, type)
