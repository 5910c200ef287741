"""Whether a draft pays off on a device, before anything is measured there (pure functions).

Speculative decoding (runtime/speculative.py) trades a verification step of k+1 tokens, plus k
draft tokens, for 1..k+1 tokens of output. On the planner's roofline a single decode step costs
the weights' bytes over the bandwidth plus a fixed per-layer cost; a step of k+1 tokens reads the
weights once too, but its arithmetic, (k+1) tokens at the prefill rate, can exceed the read time:

    t_1       = bytes / bandwidth + fixed
    t_verify  = max(bytes / bandwidth, (k + 1) / prefill_tps) + fixed
    t_draft   = the draft model's own t_1 (0 for prompt lookup)

With each draft token kept independently with probability a, a step hands out
E = (1 - a^(k+1)) / (1 - a) tokens, so the speed-up is E * t_1 / (k * t_draft + t_verify). The
break-even acceptance is where that is 1. benchmarks/speculative_cost.py measures t_verify / t_1
for the 3B config on this host against this formula.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from packager.kernels.speculative import expected_tokens
from packager.plan.planner import Plan
from packager.plan.targets import Target

__all__ = ["DraftPlan", "break_even", "plan_draft", "plan_on", "speedup", "step_seconds"]


def step_seconds(weight_bytes: float, bandwidth_gbps: float, fixed_s: float, prefill_tps: float, n_tokens: int = 1) -> float:
    """One decode step of ``n_tokens`` on the roofline: the weights read once, the arithmetic at the prefill rate."""
    read = weight_bytes / (bandwidth_gbps * 1e9)
    compute = n_tokens / prefill_tps if prefill_tps > 0 and n_tokens > 1 else 0.0
    return max(read, compute) + fixed_s


def speedup(acceptance: float, k: int, draft_ratio: float, verify_ratio: float) -> float:
    """Decode speed with drafts over without; ratios are to one single-token target step."""
    return expected_tokens(acceptance, k) / (k * draft_ratio + verify_ratio)


def break_even(k: int, draft_ratio: float, verify_ratio: float) -> float:
    """The acceptance at which drafting neither gains nor loses (above 1: it never pays off)."""
    if speedup(1.0, k, draft_ratio, verify_ratio) < 1.0:
        return float("inf")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if speedup(mid, k, draft_ratio, verify_ratio) >= 1.0 else (mid, hi)
    return hi


@dataclass(frozen=True)
class DraftPlan:
    kind: str  # "lookup" or "model"
    k: int  # drafts per step the plan assumes
    memory_bytes: int  # the draft model's weights, KV cache and buffers (0 for lookup)
    fits: bool  # target and draft together within the device's budget
    draft_ratio: float  # one draft token's time over one target step
    verify_ratio: float  # a step of k+1 tokens over a single-token step
    best_speedup: float  # were every draft kept
    break_even: float | None  # per-token acceptance where it pays off (None: never)
    predicted_speedup: float | None  # at the acceptance measured at pack time
    pays_off: bool
    why: str  # one line: the figures, and the verdict

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_draft(kind: str, *, k: int, target_bytes: float, draft_bytes: float, bandwidth_gbps: float, fixed_s: float,
               draft_fixed_s: float, prefill_tps: float, memory_bytes: int, used_bytes: int, budget_bytes: int,
               acceptance: float | None = None, tokens_per_step: float | None = None,
               device: str = "the target") -> DraftPlan:
    """Predict a draft's speed-up on a device from its profile, and say whether it pays off there.

    ``tokens_per_step`` (measured) replaces the independent-acceptance estimate of a step's output
    where given: prompt lookup drafts in bursts, with many steps that find nothing to draft.
    """
    t1 = step_seconds(target_bytes, bandwidth_gbps, fixed_s, prefill_tps)
    verify = step_seconds(target_bytes, bandwidth_gbps, fixed_s, prefill_tps, k + 1) / t1
    draft = 0.0 if kind == "lookup" else step_seconds(draft_bytes, bandwidth_gbps, draft_fixed_s, prefill_tps) / t1
    best = speedup(1.0, k, draft, verify)
    even = break_even(k, draft, verify)
    predicted = (tokens_per_step / (k * draft + verify) if tokens_per_step is not None
                 else speedup(acceptance, k, draft, verify) if acceptance is not None else None)
    fits = used_bytes + memory_bytes <= budget_bytes
    figures = (f"a step of {k + 1} tokens costs {verify:.2f}x one" + (f", a draft token {draft:.2f}x" if draft else "")
               + f"; it pays off above {even:.0%} acceptance" if even <= 1 else
               f"; even with every draft kept it would run at {best:.2f}x")
    if not fits:
        why = (f"the draft needs {memory_bytes / 1e9:.2f} GB more and {device} has {max(0, budget_bytes - used_bytes) / 1e9:.2f} "
               f"GB left")
    elif even > 1:
        why = f"it cannot pay off on {device}: {figures}"
    elif predicted is not None and predicted <= 1.0:
        why = f"at the acceptance measured it would run at {predicted:.2f}x on {device}: {figures}"
    else:
        why = (f"predicted {predicted:.2f}x on {device}" if predicted is not None else f"up to {best:.2f}x on {device}") + \
              f": {figures}"
    pays = fits and even <= 1 and (predicted is None or predicted > 1.0)
    return DraftPlan(kind, k, int(memory_bytes), fits, round(draft, 4), round(verify, 4), round(best, 3),
                     round(even, 4) if even <= 1 else None,
                     round(predicted, 3) if predicted is not None else None, pays, why)


def plan_on(tgt: Target, p: Plan, n_layers: int, kind: str, *, k: int, draft_bytes: float = 0.0, draft_layers: int = 0,
            memory_bytes: int = 0, acceptance: float | None = None,
            tokens_per_step: float | None = None) -> DraftPlan:
    """:func:`plan_draft` for a model planned as ``p`` on ``tgt`` (``n_layers``: the target model's): the
    profile's bandwidth, prefill rate and per-layer step cost, the plan's weights and memory."""
    per_layer = tgt.decode_layer_overhead_us * 1e-6
    return plan_draft(kind, k=k, target_bytes=p.memory.weights, draft_bytes=draft_bytes,
                      bandwidth_gbps=tgt.memory_bandwidth_gbps, fixed_s=n_layers * per_layer,
                      draft_fixed_s=draft_layers * per_layer, prefill_tps=p.predicted_prefill_tps,
                      memory_bytes=memory_bytes, used_bytes=p.memory.total, budget_bytes=p.budget_bytes,
                      acceptance=acceptance, tokens_per_step=tokens_per_step, device=tgt.name)
