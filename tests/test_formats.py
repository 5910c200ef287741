"""One Format object per bundle format: every stage has its side of each, and the planner has no
per-format branch (a format it has never heard of plans as soon as it is declared)."""

from __future__ import annotations

import dataclasses

import click
import pytest

from packager import formats
from packager.cli.app import cli as cli_main
from packager.errors import UsageError
from packager.formats.base import Format, Memory, kv_bytes
from packager.formats.weights import WeightLayout
from packager.measure import quality
from packager.pack.pipeline import PACKERS
from packager.plan import planner, targets
from packager.plan.planner import Overrides, plan
from packager.plan.targets import load_target
from packager.runtime import BACKENDS
from packager.spec.model import ModelSpec


def _spec() -> ModelSpec:
    return ModelSpec(architecture="Qwen2ForCausalLM", model_type="qwen2", n_layers=4, hidden_size=256, n_heads=4,
                     n_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=1000, context_length=4096,
                     tied_embeddings=True, n_params=5_000_000)


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_every_format_has_every_stage(name):
    f = formats.FORMATS[name]
    assert f.name == name
    assert name in PACKERS, f"pack/pipeline.PACKERS has no packer for {name}"
    assert name in BACKENDS, f"runtime.BACKENDS has no runtime for {name}"
    assert name in quality.LOGITS and name in quality.INFO, f"measure.quality has no logits source for {name}"
    assert formats.format_of_file(f"model/x{f.model_suffix}") is f
    for scheme in f.schemes:
        assert f.scheme(scheme.lower()).name == scheme  # case-insensitive, by its own name
        assert formats.format_of_scheme(scheme) is f, f"{scheme} is claimed by two formats"
    with pytest.raises(UsageError, match=f.noun.split()[-1]):
        f.scheme("NOT_A_SCHEME")


def test_the_command_line_and_profiles_offer_exactly_the_declared_formats():
    group = cli_main if isinstance(cli_main, click.Group) else None
    assert group is not None
    for cmd in ("model", "plan"):
        opt = next(p for p in group.commands[cmd].params if p.name == "fmt")
        assert list(opt.type.choices) == list(formats.FORMATS)
    assert targets.FORMATS is formats.FORMATS  # profiles are checked against the declared formats
    with pytest.raises(UsageError, match="unknown format 'mlc'; use one of gguf, onnx"):
        formats.get_format("mlc")


def test_a_new_format_plans_once_declared(monkeypatch):
    """The planner asks the Format for schemes, sizes and memory: a toy format with 1 byte per
    parameter and a fixed 10 MB runtime needs no edit of the planner."""
    spec = _spec()

    @dataclasses.dataclass(frozen=True)
    class Toy:
        name: str
        bytes_per_param: float

    schemes = {"TOY8": Toy("TOY8", 1.0), "TOY4": Toy("TOY4", 0.5)}

    def scheme(name: str) -> Toy:
        try:
            return schemes[name.upper()]
        except KeyError:
            raise UsageError(f"{name!r} is not a toy scheme") from None

    def layout(spec, s, tensors, arch, exact):
        per_layer = int(spec.n_params * s.bytes_per_param / spec.n_layers)
        return WeightLayout("toy", (per_layer,) * spec.n_layers, 0, 0, 0, per_layer * spec.n_layers, per_layer)

    def memory(spec, layout, n_ctx, kv_type, n_kv, n_tokens, cpu):
        return Memory(layout.total, kv_bytes(spec, n_ctx, kv_type), 1 << 20, 10_000_000)

    toy = Format(name="toy", engine="toy-rt", noun="a toy scheme", model_suffix=".toy", scheme=scheme,
                 schemes=tuple(schemes), default_ladder=("TOY8", "TOY4"), auto_ladder=("TOY4",),
                 weight_layout=layout, memory=memory, explain=lambda *a: ["toy arithmetic"], kv_type="f16")
    monkeypatch.setitem(formats.FORMATS, "toy", toy)
    tgt = dataclasses.replace(load_target("laptop"), formats=("toy",), ram_bytes=64 << 20, usable_ram_fraction=1.0,
                              limits=load_target("laptop").limits)
    p = plan(spec, tgt)
    assert (p.format, p.quant) == ("toy", "TOY8")
    assert p.memory.weights == 5_000_000 and p.memory.overhead == 10_000_000
    assert "toy arithmetic" in p.explain
    # 26 MB of RAM: TOY8's 5 MB weights + 10 MB runtime + KV no longer fit at full context, so the
    # planner walks the toy ladder and shrinks the context as it does for GGUF.
    small = plan(spec, dataclasses.replace(tgt, ram_bytes=16_500_000))
    assert small.format == "toy" and (small.quant, small.n_ctx) != (p.quant, p.n_ctx)
    assert planner.memory(spec, toy.scheme("toy4"), 512, "f16", fmt="toy").weights == 2_500_000
    with pytest.raises(UsageError, match="not a toy scheme"):
        plan(spec, tgt, Overrides(quant="Q4_K_M"))
