"""Target profiles and the planner."""

from __future__ import annotations

import pytest

from packager.errors import DoesNotFit, ProfileError, UnknownTargetError, UsageError
from packager.plan import Overrides, plan
from packager.profiles import list_targets, load_target, parse_size
from packager.spec import ModelSpec, spec_from_config

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
    from packager.plan import memory
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
