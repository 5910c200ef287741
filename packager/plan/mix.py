"""Per-tensor quant mixes: which ggml type each tensor gets under a byte budget (pure functions).

Each quantizable tensor has a few candidate types, each with its padded bytes in the file and
its quantization error: the importance-weighted squared error of its weights (sensitivity.py),
scaled by a gain per tensor category that converts it into mean KL divergence (measured by
`--quant mix`'s probes). The allocation is the greedy one over each tensor's lower convex hull
of (bytes, loss): every tensor starts at its smallest type, and the upgrades are taken in order
of loss removed per byte added, for all tensors together. That order is the Lagrangian
solution of "least predicted loss under a byte budget" at every budget on the path; a budget
between two points of the path is filled by the upgrades that still fit. The same path serves
`--max-kld` (its prefixes are the candidate mixes, smallest first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from packager.errors import UsageError

__all__ = ["Mix", "Option", "Step", "TensorOptions", "allocate", "hull", "mix_at", "path_totals", "smallest_bytes",
           "upgrade_path"]


@dataclass(frozen=True)
class Option:
    """One candidate type for one tensor."""

    qtype: str  # ggml type name
    nbytes: int  # bytes in the file, padded to the GGUF alignment
    error: float  # importance-weighted squared error (sum over the tensor's weights)


@dataclass(frozen=True)
class TensorOptions:
    """A quantizable tensor, its role (the gain that scales its error) and its candidate types."""

    name: str
    category: str
    options: tuple[Option, ...]
    power: float = 1.0  # importance-weighted power of the exact weights (sum of imatrix[j] * W[i, j]^2)


@dataclass(frozen=True)
class Step:
    """Move one tensor from one type to a larger one: ``dbytes`` more bytes, ``dloss`` less predicted loss."""

    tensor: int  # index into the tensors
    to: int  # index into that tensor's hull
    dbytes: int
    dloss: float


@dataclass(frozen=True)
class Mix:
    """A type for every quantizable tensor, its bytes and its predicted loss (gain-weighted error)."""

    types: dict[str, str]
    nbytes: int
    predicted: float

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def hull(t: TensorOptions, gain: float) -> list[Option]:
    """The options on the lower convex hull of (bytes, gain * error), smallest first: a type that costs more
    bytes for no less loss, or that a mix of its neighbours beats, is never worth choosing."""
    pts = sorted(t.options, key=lambda o: (o.nbytes, o.error))
    out: list[Option] = []
    for o in pts:
        if out and o.error * gain >= out[-1].error * gain:
            continue  # more bytes, no less loss
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b lies on or above the segment a-o: drop it
            if (b.error - a.error) * (o.nbytes - a.nbytes) >= (o.error - a.error) * (b.nbytes - a.nbytes):
                out.pop()
            else:
                break
        out.append(o)
    return out


def _loss(o: Option, gain: float) -> float:
    return gain * o.error


def upgrade_path(tensors: Sequence[TensorOptions], gains: Mapping[str, float]) -> tuple[list[list[Option]], list[Step]]:
    """Every tensor's hull, and all upgrades in the order the allocation takes them (most loss per byte first)."""
    hulls = [hull(t, gains[t.category]) for t in tensors]
    steps: list[Step] = []
    for i, (t, h) in enumerate(zip(tensors, hulls)):
        g = gains[t.category]
        for j in range(1, len(h)):
            steps.append(Step(i, j, h[j].nbytes - h[j - 1].nbytes, _loss(h[j - 1], g) - _loss(h[j], g)))
    # On a hull the efficiency falls step by step, so this order keeps each tensor's steps in sequence.
    steps.sort(key=lambda s: (-s.dloss / s.dbytes, s.tensor, s.to))
    return hulls, steps


def _mix(tensors: Sequence[TensorOptions], gains: Mapping[str, float], chosen: Sequence[Option]) -> Mix:
    return Mix({t.name: o.qtype for t, o in zip(tensors, chosen)}, sum(o.nbytes for o in chosen),
               sum(_loss(o, gains[t.category]) for t, o in zip(tensors, chosen)))


def smallest_bytes(tensors: Sequence[TensorOptions]) -> int:
    return sum(min(o.nbytes for o in t.options) for t in tensors)


def mix_at(tensors: Sequence[TensorOptions], gains: Mapping[str, float], n_steps: int,
           path: tuple[list[list[Option]], list[Step]] | None = None) -> Mix:
    """The mix after the first ``n_steps`` upgrades of the path (0: every tensor at its smallest type);
    ``path``: upgrade_path's result for these tensors and gains, when the caller has it already."""
    hulls, steps = path or upgrade_path(tensors, gains)
    level = [0] * len(tensors)
    for s in steps[:n_steps]:
        level[s.tensor] = s.to
    return _mix(tensors, gains, [h[lv] for h, lv in zip(hulls, level)])


def path_totals(tensors: Sequence[TensorOptions], gains: Mapping[str, float],
                path: tuple[list[list[Option]], list[Step]]) -> tuple[list[int], list[float]]:
    """Tensor bytes and predicted loss of every prefix of the path: entry k is mix_at(..., k)'s."""
    hulls, steps = path
    nbytes = [sum(h[0].nbytes for h in hulls)]
    loss = [sum(_loss(h[0], gains[t.category]) for t, h in zip(tensors, hulls))]
    for s in steps:
        nbytes.append(nbytes[-1] + s.dbytes)
        loss.append(loss[-1] - s.dloss)
    return nbytes, loss


def allocate(tensors: Sequence[TensorOptions], gains: Mapping[str, float], budget: int) -> Mix:
    """The least predicted loss with the tensors' bytes at most ``budget``.

    Raises UsageError when even the smallest type of every tensor does not fit.
    """
    floor = smallest_bytes(tensors)
    if budget < floor:
        raise UsageError(f"a budget of {budget} bytes for the quantized tensors is below the smallest mix "
                         f"({floor} bytes)")
    hulls, steps = upgrade_path(tensors, gains)
    level = [0] * len(tensors)
    used = sum(h[0].nbytes for h in hulls)
    blocked: set[int] = set()
    for s in steps:
        if s.tensor in blocked:
            continue
        if used + s.dbytes > budget:
            blocked.add(s.tensor)  # its later steps build on this one
            continue
        level[s.tensor] = s.to
        used += s.dbytes
    chosen = [h[lv] for h, lv in zip(hulls, level)]
    # What is left may still buy an option off the hull (e.g. one type up for a tensor whose hull jumps two).
    while True:
        best: tuple[float, int, Option] | None = None
        for i, (t, cur) in enumerate(zip(tensors, chosen)):
            g = gains[t.category]
            for o in t.options:
                extra = o.nbytes - cur.nbytes
                gain = _loss(cur, g) - _loss(o, g)
                if 0 < extra <= budget - used and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, o)
        if best is None:
            break
        _, i, o = best
        used += o.nbytes - chosen[i].nbytes
        chosen[i] = o
    return _mix(tensors, gains, chosen)
