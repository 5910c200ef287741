"""Target profiles and the planner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from packager.errors import DoesNotFit, ProfileError, UnknownTargetError, UsageError
from packager.plan.planner import Overrides, plan
from packager.plan.targets import list_targets, load_target, parse_size
from packager.spec.model import ModelSpec, spec_from_config

QWEN25_3B = {  # Qwen2.5-3B-Instruct's config.json (the fields the planner reads)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
    "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 2,
    "num_hidden_layers": 36, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}


def test_builtin_targets_and_alias():
    names = {t.name for t in list_targets()}
    assert {"laptop", "android-midrange"} <= names
    assert load_target("android").name == "android-midrange"


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownTargetError, match="known targets: .*laptop"):
        load_target("toaster")


@pytest.mark.parametrize("text,expected", [("8GiB", 8 << 30), ("6GB", 6 * 10**9), ("512M", 512 * 10**6), (1024, 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_malformed_profile_names_file_key_and_type(tmp_path):
    src = load_target("laptop").path
    text = open(src).read().replace("cpu_threads = 4", 'cpu_threads = "four"')
    p = tmp_path / "phone.toml"
    p.write_text(text)
    with pytest.raises(ProfileError, match=r"phone.toml: cpu_threads must be an integer, got str"):
        load_target(str(p))


def test_user_profile_by_path(tmp_path):
    p = tmp_path / "my-phone.toml"
    p.write_text(open(load_target("android").path).read().replace('name = "android-midrange"', 'name = "my-phone"'))
    assert load_target(str(p)).name == "my-phone"


def test_spec_parameter_count_of_qwen25_3b():
    spec = spec_from_config(QWEN25_3B)
    assert 3.0e9 < spec.n_params < 3.2e9  # Qwen reports 3.09B


def test_plan_fits_3b_on_a_midrange_phone():
    p = plan(spec_from_config(QWEN25_3B), load_target("android"))
    assert p.quant == "Q4_0" and p.memory.total <= p.budget_bytes


def test_plan_shrinks_context_before_giving_up():
    from packager.plan.planner import memory
    from packager.quants import get_quant

    spec, target = spec_from_config(QWEN25_3B), load_target("android")
    # RAM for which the target's first quant fits only with 1024 tokens of context.
    need = memory(spec, get_quant(target.quant_ladder[0]), 1024, target.kv_cache_type).total
    p = plan(spec, target, Overrides(ram_bytes=int(need / target.usable_ram_fraction) + 1))
    assert (p.quant, p.n_ctx) == (target.quant_ladder[0], 1024)
    assert any("context shrunk from 4096 to 1024" in n for n in p.notes)


def test_does_not_fit_says_the_numbers():
    with pytest.raises(DoesNotFit, match=r"needs \d+\.\d+ GB at .* allows \d+\.\d+ GB"):
        plan(spec_from_config(QWEN25_3B), load_target("android"), Overrides(ram_bytes=parse_size("2GB")))


def test_absurd_overrides_are_usage_errors():
    with pytest.raises(UsageError):
        Overrides(n_ctx=-5)
    with pytest.raises(UsageError):
        Overrides(ram_bytes=-1)


def test_bad_config_is_a_clear_error():
    from packager.errors import SourceError

    with pytest.raises(SourceError, match="missing 'num_hidden_layers'"):
        spec_from_config({k: v for k, v in QWEN25_3B.items() if k != "num_hidden_layers"})
    assert isinstance(spec_from_config(QWEN25_3B), ModelSpec)


# -- every profile number names its source; the survival limits are data the plan reports ----------

_NUMBER = re.compile(r'^(\w+)\s*=\s*"?(\d+(?:\.\d+)?)\s*[KMGT]?i?B?"?\s*(#.*)?$')


@pytest.mark.parametrize("target", [t.name for t in list_targets()])
def test_every_profile_number_names_its_source(target):
    lines = Path(load_target(target).path).read_text().splitlines()
    for i, line in enumerate(lines):
        m = _NUMBER.match(line)
        if not m or m.group(3) or float(m.group(2)) == 0:  # inline comment, or 0 ("none")
            continue
        j = i - 1
        while j >= 0 and lines[j].strip() and not lines[j].startswith("#"):  # keys sharing one comment
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"{target}: {line!r} has no source comment"


def test_survival_limits_are_profile_data():
    ios, web = load_target("iphone"), load_target("web")
    assert ios.limits.app_memory_bytes < ios.limits.app_memory_entitled_bytes < ios.ram_bytes
    assert ios.limits.memory_entitlement == "com.apple.developer.kernel.increased-memory-limit"
    for name in ("android-entry", "android-midrange", "android-flagship"):
        t = load_target(name)
        assert 0 < t.limits.lmk_headroom_bytes < t.ram_bytes and t.distribution.part_bytes == 1500 * 10**6  # Play AI packs
    assert web.limits.gpu_max_binding_bytes == 128 << 20 and web.limits.gpu_max_buffer_bytes == 256 << 20
    assert ios.distribution.download_cap_bytes == 200 * 10**6


def test_plan_says_which_entitlement_and_how_it_ships():
    spec = spec_from_config(QWEN25_3B)
    small = plan(spec, load_target("ios"))  # Q4_K_M, ~2.3 GB: under jetsam's default limit
    assert not any("increased-memory-limit" in r for r in small.requirements)
    big = plan(spec, load_target("ios"), Overrides(quant="Q8_0"))  # ~3.7 GB: needs the entitlement
    assert any(r.startswith("com.apple.developer.kernel.increased-memory-limit") for r in big.requirements)
    assert big.shipping.parts == -(-big.memory.weights // (512 * 10**6)) > 1 and big.shipping.over_download_cap
    assert any("ENABLE_ON_DEMAND_RESOURCES" in r for r in big.requirements)
    phone = plan(spec, load_target("android"))
    assert phone.shipping.channel == "play" and phone.shipping.parts > 1
    assert any("fast-follow" in r for r in phone.requirements)


def test_web_plan_names_the_webgpu_limits_it_needs():
    p = plan(spec_from_config(QWEN25_3B), load_target("web"))
    assert p.format == "onnx"
    assert any("maxStorageBufferBindingSize" in r for r in p.requirements)
    assert any("128 MiB storage-buffer binding" in n for n in p.notes)  # 3B's lm_head is bigger than that


def test_gpu_shrinks_context_before_offloading_layers():
    spec, gpu = spec_from_config(QWEN25_3B), load_target("gpu-4gb")
    full = plan(spec, gpu)
    assert full.n_gpu_layers == spec.n_layers + 1 and full.n_ctx == gpu.max_context
    tight = plan(spec, gpu, Overrides(vram_bytes=parse_size("2GB")))
    assert tight.n_ctx == 2048 and tight.n_gpu_layers < spec.n_layers + 1
    assert "context shrunk from 8192 to 2048 first" in tight.notes[0] and "run on the CPU" in tight.notes[1]


# -- `pack plan` and `pack targets` end to end ------------------------------------------------------


def _pack(*args, env=None):
    return subprocess.run([sys.executable, "-m", "packager.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "EDGEPACK_NO_PROGRESS": "1", **(env or {})}, timeout=300)


def _hub_cache(root: Path, repo: str, config: dict, tensors: list[str]) -> dict:
    """A local HF cache holding only a repo's config.json and safetensors index, and an offline env."""
    rev = "0" * 40
    d = root / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(rev)
    (snap / "config.json").write_text(json.dumps(config))
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {t: "model-00001-of-00002.safetensors" for t in tensors}}))
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def _qwen_index(n_layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(n_layers):
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.weight",
                  "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                  "self_attn.v_proj.weight", "self_attn.v_proj.bias"):
            names.append(f"model.layers.{i}.{n}")
    return names


def test_pack_plan_hub_id_reads_only_config_and_index(tmp_path):
    env = _hub_cache(tmp_path / "hf", "Qwen/Qwen2.5-3B-Instruct", QWEN25_3B, _qwen_index(36))
    r = _pack("plan", "Qwen/Qwen2.5-3B-Instruct", "--target", "android", "--explain", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Qwen2.5-3B-Instruct on android-midrange: gguf Q4_0, 4096 context")
    assert "config.json + model.safetensors.index.json" in r.stdout and "KV cache: 2 x 36 layers x 2 kv heads" in r.stdout
    j = _pack("plan", "Qwen/Qwen2.5-3B-Instruct", "--target", "gpu-4gb", "--json", env=env)
    assert j.returncode == 0, j.stderr
    p = json.loads(j.stdout)["plan"]
    assert p["n_gpu_layers"] == 37 and p["vram"]["total"] <= p["vram_budget_bytes"]


def test_pack_plan_nothing_fits_says_the_numbers(tmp_path):
    env = _hub_cache(tmp_path / "hf", "Qwen/Qwen2.5-3B-Instruct", QWEN25_3B, _qwen_index(36))
    r = _pack("plan", "Qwen/Qwen2.5-3B-Instruct", "--target", "android-entry", env=env)
    assert r.returncode == 1 and not r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(
        r"error: Qwen2.5-3B-Instruct needs \d\.\d\d GB at \w+ with \d+ context; android-entry allows \d\.\d\d GB .*Try ",
        lines[0]), r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--target", "toaster"], "known targets: android,"),
    (["--ctx", "-5"], "--ctx -5 is out of range"),
    (["--ram", "12 parsecs"], "--ram"),
    (["--ram", "1MB"], "not a plausible size"),
    (["--threads", "0"], "--threads 0 is out of range"),
])
def test_pack_plan_bad_input_is_one_line_exit_2(args, needle, tiny_qwen2):
    r = _pack("plan", tiny_qwen2, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and not r.stdout, r.stderr


def test_pack_plan_config_without_layers_is_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in QWEN25_3B.items() if k != "num_hidden_layers"}))
    r = _pack("plan", tmp_path)
    assert r.returncode == 2 and "missing 'num_hidden_layers'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pack_targets_table_and_json():
    r = _pack("targets")
    assert r.returncode == 0 and "android-midrange  android" in r.stdout
    j = json.loads(_pack("targets", "--json").stdout)
    ios = next(t for t in j if t["name"] == "ios")
    assert ios["limits"]["memory_entitlement"] and ios["distribution"]["part_bytes"] == 512 * 10**6


# -- calibrated against measurement (the full table: benchmarks/plan_calibration.py) ----------------


def test_predicted_peak_rss_of_smollm2_within_10_percent(smollm2_gguf):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from plan_calibration import run_child

    from packager.plan.planner import memory
    from packager.plan.inputs import plan_input
    from packager.quants import get_quant

    inp = plan_input(smollm2_gguf)
    n_ctx, n_prompt = 2048, 64
    measured = run_child(smollm2_gguf, n_ctx, 2, n_prompt, 4)["peak_rss_bytes"]
    predicted = memory(inp.spec, get_quant(inp.source_quant), n_ctx, "f16", tensors=inp.tensors, arch="x86_64",
                       exact_types=inp.source_types, n_kv=n_prompt, n_tokens=n_prompt).rss
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_host_profile_is_probed_and_plans():
    from packager.plan.host_probe import DECODE_FRACTION
    from packager.plan.targets import host_target

    host = load_target("host")
    assert host is host_target() and host.memory_bandwidth_gbps > 0 and host.decode_layer_overhead_us > 0
    assert 0 < DECODE_FRACTION <= 1
    p = plan(spec_from_config(QWEN25_3B), host, Overrides(quant="Q4_K_M", n_ctx=512))
    # The fixed per-layer cost caps decode however fast the memory is.
    assert p.predicted_decode_tps < 1e6 / (36 * host.decode_layer_overhead_us)
