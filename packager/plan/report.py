"""`pack plan`: read a model's shape, plan it for a target, and say what was decided and why."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from packager.errors import DoesNotFit
from packager.plan.draft import DraftPlan, plan_on
from packager.plan.inputs import PlanInput
from packager.plan.planner import Overrides, Plan, memory, plan, scheme
from packager.plan.targets import Target


def plan_for(inp: PlanInput, tgt: Target, overrides: Overrides, *, name: str | None = None) -> Plan:
    """The plan `pack model` packs by: a GGUF source that fits is bundled as it is (no --quant);
    otherwise the target's ladder is walked."""
    kw = dict(name=name or inp.name, tensors=inp.tensors, source_quant=inp.source_quant, source_types=inp.source_types)
    if inp.source_quant and not overrides.quant and (overrides.format or tgt.formats[0]) == "gguf":
        try:
            return plan(inp.spec, tgt, replace(overrides, quant=inp.source_quant), **kw)
        except DoesNotFit:
            pass
    return plan(inp.spec, tgt, overrides, **kw)


def as_json(inp: PlanInput, tgt: Target, p: Plan) -> dict[str, Any]:
    return {"model": inp.name, "read": inp.origin, "target": tgt.name, "plan": p.as_dict()}


OUTLOOK_K = 4  # drafts per step the outlook assumes (the runtime adapts it to what pays)


def draft_outlook(inp: PlanInput, tgt: Target, p: Plan, kind: str, *, self_quant: str | None = None,
                  draft: PlanInput | None = None) -> DraftPlan:
    """Whether a draft could pay off on the target, before anything is measured: the cost of a step of
    OUTLOOK_K+1 tokens and of a draft token on the target's roofline, the break-even acceptance, and
    the draft model's memory beside the plan's. ``kind``: "lookup", "self" (``self_quant``) or
    "model" (``draft``, read as `pack plan` reads a model: headers and config only)."""
    n_layers = inp.spec.n_layers
    if kind == "lookup":
        return plan_on(tgt, p, n_layers, "lookup", k=OUTLOOK_K)
    if kind == "self":
        spec, tensors, quant, exact = inp.spec, inp.tensors, self_quant or "", None
    elif draft is not None:
        spec, tensors, quant, exact = draft.spec, draft.tensors, draft.source_quant or p.quant, draft.source_types
    else:
        raise ValueError("a model draft needs its PlanInput")
    mem = memory(spec, scheme("gguf", quant), p.n_ctx, p.kv_type, tensors=tensors, arch=tgt.arch, exact_types=exact)
    return plan_on(tgt, p, n_layers, "model", k=OUTLOOK_K, draft_bytes=mem.weights, draft_layers=spec.n_layers,
                   memory_bytes=mem.total)


def render_draft(label: str, d: DraftPlan) -> str:
    """The plan's draft line."""
    memory_part = f", {_gb(d.memory_bytes)} more memory{'' if d.fits else ' (does not fit)'}" if d.memory_bytes else ""
    return (f"  draft   {label}, {d.k} drafts a step{memory_part}: {d.why}; pack model --draft {label} measures the "
            f"acceptance and ships it only where it pays")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def render(inp: PlanInput, tgt: Target, p: Plan, explain: bool = False) -> str:
    """The plan for people: what fits, how fast, how it ships, what the app needs."""
    m = p.memory
    lines = [
        f"{inp.name} on {tgt.name}: {p.format} {p.quant}, {p.n_ctx} context, KV cache {p.kv_type}, "
        f"{p.n_threads} threads" + (f", {p.n_gpu_layers}/{p.n_layers} layers on the GPU" if p.n_gpu_layers else ""),
        f"  memory  {_gb(m.total)} of {_gb(p.budget_bytes)}: weights {_gb(m.weights)}, KV {_gb(m.kv_cache)}, "
        + (f"recurrent state {_gb(m.state)}, " if m.state else "")  # hybrids only: other plans read as before
        + f"compute {_gb(m.compute)}, overhead {_gb(m.overhead)}",
    ]
    if p.vram is not None:
        v = p.vram
        lines.append(f"  VRAM    {_gb(v.total)} of {_gb(p.vram_budget_bytes)}: weights {_gb(v.weights)}, "
                     f"KV {_gb(v.kv_cache)}, compute {_gb(v.compute)}")
    lines.append(f"  speed   decode ~{p.predicted_decode_tps:g} tokens/s, prefill ~{p.predicted_prefill_tps:g} tokens/s")
    if p.shipping is not None:
        lines.append(f"  ships   {p.shipping.how}")
    for r in p.requirements:
        lines.append(f"  needs   {r}")
    for n in p.notes:
        lines.append(f"  note    {n}")
    if explain:
        lines.append(f"  read    {inp.origin}")
        lines += [f"  how     {e}" for e in p.explain]
    return "\n".join(lines)
