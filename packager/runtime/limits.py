"""The runtime settings a bundle asks for, checked against the model's own limits and the plan's
memory before an engine allocates anything.

An engine handed an impossible value fails late and blames the wrong thing: llama.cpp given an
n_ctx of 10^9 tries to allocate its KV cache for tens of seconds, reaches tens of GB of RSS,
and the load error reads like damaged weights. Here a value from the manifest that the model
or the plan cannot honour is a VerificationError naming the field, and a load option the
model cannot honour a UsageError naming the option.
"""

from __future__ import annotations

from typing import Any, Callable

from packager.bundle.manifest import Manifest
from packager.errors import UsageError, VerificationError
from packager.formats import FORMATS
from packager.formats.base import KV_BYTES, kv_bytes
from packager.spec.model import ModelSpec

MAX_THREADS = 1024
# The plan's budget is for the worst case; a manifest may ask for a little more context than
# planned (a value rounded by hand) before it is called wrong.
BUDGET_SLACK = 1.10


def _spec(meta: Manifest) -> ModelSpec | None:
    try:
        return ModelSpec(**meta.spec) if meta.spec else None
    except Exception:  # an old or hand-edited spec: the engine's own checks remain
        return None


def check_runtime(meta: Manifest, where: str, overrides: dict[str, Any]) -> None:
    """Raise if the manifest's runtime settings, or the load options replacing them, cannot work."""
    rt, spec = meta.runtime, _spec(meta)
    limit = spec.context_length if spec is not None else None
    for key, value in (("n_ctx", rt.n_ctx), ("n_threads", rt.n_threads), ("n_gpu_layers", rt.n_gpu_layers)):
        _check(key, value, limit, lambda msg, key=key: VerificationError(
            f"{where}/manifest.json: runtime.{key} = {getattr(rt, key)} {msg}; fix it or pack the bundle again"))
    if rt.kv_type not in KV_BYTES:
        raise VerificationError(f"{where}/manifest.json: runtime.kv_type = {rt.kv_type!r} is not one of "
                                f"{', '.join(KV_BYTES)}; fix it or pack the bundle again")
    for key in ("n_ctx", "n_threads", "n_gpu_layers"):
        if overrides.get(key) is not None:
            _check(key, overrides[key], limit, lambda msg, key=key: UsageError(
                f"{key}={overrides[key]} {msg}"))
    if spec is not None and "n_ctx" not in overrides:
        _check_memory(meta, spec, where)


def _check(key: str, value: Any, limit: int | None, error: Callable[[str], Exception]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise error("is not an integer")
    if key == "n_ctx":
        if value < 16:
            raise error("is below 16 tokens")
        if limit is not None and value > limit:
            raise error(f"is over the model's own limit of {limit} tokens (its config's context length)")
        if value > 1 << 24:
            raise error("is not a plausible context length")
    elif key == "n_threads" and not 0 <= value <= MAX_THREADS:
        raise error(f"is outside 0..{MAX_THREADS} (0: the cores this process may use)")
    elif key == "n_gpu_layers" and value < -1:
        raise error("is below -1 (-1: every layer)")


def _check_memory(meta: Manifest, spec: ModelSpec, where: str) -> None:
    """A context larger than planned must still fit the plan's budget (its KV cache grows with it)."""
    mem, budget = meta.plan.get("memory") or {}, meta.plan.get("budget_bytes")
    planned_ctx, kv_type = meta.plan.get("n_ctx"), meta.plan.get("kv_type") or meta.runtime.kv_type
    if not (isinstance(budget, int) and budget > 0 and isinstance(planned_ctx, int) and kv_type in KV_BYTES
            and isinstance(mem.get("total"), int) and isinstance(mem.get("kv_cache"), int)):
        return  # a plan this check cannot read: the engine's own checks remain
    n_ctx = meta.runtime.n_ctx
    if n_ctx <= planned_ctx:
        return
    # The cache as the bundle's engine allocates it, as the plan counted it: llama.cpp's windowed sliding
    # layers (a full-context formula refused Gemma contexts that fit), genai's unpadded n_ctx.
    form = FORMATS.get(meta.format)
    shape = dict(windowed=form.windowed_kv, padded=form.padded_kv) if form else {}
    need = mem["total"] - mem["kv_cache"] + kv_bytes(spec, n_ctx, kv_type, **shape)
    if need > budget * BUDGET_SLACK:
        per_token = kv_bytes(spec, 1 << 16, kv_type, **shape) / (1 << 16)
        fits = int(planned_ctx + (budget - mem["total"]) / per_token) if per_token else planned_ctx
        raise VerificationError(
            f"{where}/manifest.json: runtime.n_ctx = {n_ctx} needs {need / 1e9:.2f} GB (its KV cache grows with it), "
            f"over the {budget / 1e9:.2f} GB its plan allows on {meta.target_name or 'its target'}; "
            f"use at most {max(fits, planned_ctx)} (planned: {planned_ctx}), or pack for a bigger target")
