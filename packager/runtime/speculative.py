"""Speculative decoding: guess a few tokens cheaply, check them all in one step of the real model.

Decoding a model on a phone or laptop CPU reads every weight once per token, so it runs at the
memory's bandwidth. A step that evaluates k+1 tokens reads the weights once too, and costs little
more than a step of one. A *drafter* proposes k tokens; the model evaluates the last token and the
k drafts as one batch; the drafts are kept up to the first one the model would not have chosen, and
the model's own choice at that position comes free. Greedy output is the model's own, token for
token, because every kept token is the model's argmax given exactly the tokens before it.

That holds only where the engine computes a position's logits the same whether it is evaluated
alone or in a batch. llama.cpp's CPU backend does, bit for bit, with flash attention on and for the
weight types whose batched kernels sum in the same order as the single-token ones; not without
flash attention, not for F16 weights, and not for every k-quant beyond a few tokens per batch. So
the largest batch that is bit-identical is measured (:func:`invariant_batch`), and drafts are
never longer than it. One more case: with several threads and 256 tokens or more in the cache,
llama.cpp splits a lone token's attention across threads, so a drafted model runs a lone token
there on one thread (no split) or, where that costs more, pads the step with a filler draft
(runtime/llama.py), and ``speculative=False`` on it decodes the same way: the same tokens with
and without drafts. The bundle loaded without a
draft (llama.cpp's own loop) can differ from both at a near-tie.

This module holds the parts that do not touch the engine: the drafters, the adaptive draft length
and the invariance search; the acceptance rules are numeric kernels (kernels/speculative.py), the
runtime's loop lives in runtime/llama.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from packager.kernels.speculative import expected_tokens

__all__ = ["AdaptiveLength", "DraftStats", "LookupDrafter", "invariant_batch"]


@dataclass
class DraftStats:
    """What drafting did during one reply (or a benchmark): target steps, drafted and kept tokens."""

    steps: int = 0  # target evaluations during decoding (one per verification or plain step)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by those steps

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the model kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def add(self, other: "DraftStats") -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last n-gram.

    Free (no second model), and right exactly where a reply repeats its input: code rewritten or
    annotated, a passage summarised, a document quoted. The longest suffix of ``max_ngram`` down to
    ``min_ngram`` tokens that occurred before wins. An index of every n-gram's latest end position
    is kept as tokens arrive, so a proposal costs O(max_ngram), whatever the context's length.
    """

    free = True  # proposing costs nothing: propose the most, then keep what pays
    match = 0  # the length of the n-gram the last proposal matched (0: none)

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> end index (exclusive) of its latest occurrence

    def reset(self, tokens: Sequence[int]) -> None:
        self._tokens, self._latest = [], {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        toks, latest = self._tokens, self._latest
        for t in tokens:
            toks.append(int(t))
            end = len(toks)
            # The n-grams ending here are indexed one token late: a proposal looks for the suffix's
            # *earlier* occurrence, so the suffix itself must not be in the index yet.
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - 1 >= n:
                    latest[tuple(toks[end - 1 - n:end - 1])] = end - 1

    def propose(self, k: int) -> list[int]:
        toks = self._tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            end = self._latest.get(tuple(toks[len(toks) - n:]))
            if end is not None:
                self.match = n
                return toks[end:end + k]
        self.match = 0
        return []


class AdaptiveLength:
    """Draft length for the most tokens per second at the running acceptance, none where none pays.

    ``step_seconds[n]`` is what a step of n tokens costs on this machine (measured when the model
    loads, then followed as steps run), ``draft_seconds`` one draft token (0 for lookup; a running
    mean for a draft model). A step that drafts k tokens hands out E(a, k) = (1 - a^(k+1)) / (1 - a)
    of them at per-token acceptance a, so k maximises E / (step_seconds[k + 1] + k * draft_seconds),
    and k = 0 (a plain step, 1 / step_seconds[1]) wins where no draft would pay: a small model on
    a few cores computes each extra token of a batch at most of a step's cost, so only drafts that
    are usually right pay there; where a step is bound by memory bandwidth, extra slots are nearly
    free and the longest draft wins.

    The acceptance is kept / (kept + rejections) with older steps decayed, kept apart per ``key``
    (the length of the n-gram a lookup matched: a three-token match is right far more often than a
    one-token one). While a key is not drafted its estimate drifts back to the optimistic prior,
    so that it is tried again when the text changes.
    """

    def __init__(self, k_max: int, step_seconds: Sequence[float] | None = None, *, prior: float = 0.8,
                 decay: float = 0.9, recover: float = 0.05) -> None:
        self.k_max = max(1, int(k_max))
        self.step_seconds = list(step_seconds) if step_seconds else [1.0] * (self.k_max + 2)
        if len(self.step_seconds) < self.k_max + 2:
            raise ValueError(f"step_seconds needs an entry for every step of 0..{self.k_max + 1} tokens")
        self.draft_seconds = 0.0
        self._prior, self._decay, self._recover = prior, decay, recover
        self._counts: dict[int, list[float]] = {}

    def _of(self, key: int) -> list[float]:
        return self._counts.setdefault(key, [2 * self._prior, 2 * (1 - self._prior)])

    def acceptance(self, key: int = 0) -> float:
        kept, missed = self._of(key)
        return kept / (kept + missed)

    def length(self, key: int = 0) -> int:
        """Drafts to verify next step (0: a plain step)."""
        a = self.acceptance(key)
        best, rate = 0, 1.0 / self.step_seconds[1]
        for k in range(1, self.k_max + 1):
            r = expected_tokens(a, k) / (self.step_seconds[k + 1] + k * self.draft_seconds)
            if r > rate:
                best, rate = k, r
        return best

    def update(self, drafted: int, accepted: int, draft_seconds: float | None = None, key: int = 0) -> None:
        """After a step: how many were drafted and kept, and what drafting them took (model drafts)."""
        if drafted == 0:
            return
        c = self._of(key)
        c[0] = c[0] * self._decay + accepted
        c[1] = c[1] * self._decay + (1 if accepted < drafted else 0)
        if draft_seconds is not None:
            per = draft_seconds / drafted
            self.draft_seconds = per if not self.draft_seconds else 0.8 * self.draft_seconds + 0.2 * per

    def skipped(self, key: int = 0) -> None:
        """A step that could have drafted under ``key`` and did not: its estimate drifts to the prior."""
        c, r = self._of(key), self._recover
        c[0] = (1 - r) * c[0] + r * 2 * self._prior
        c[1] = (1 - r) * c[1] + r * 2 * (1 - self._prior)

    def observe_step(self, n_tokens: int, seconds: float) -> None:
        """A step of ``n_tokens`` just took ``seconds``: the cost table follows what steps take now."""
        if 0 < n_tokens < len(self.step_seconds):
            self.step_seconds[n_tokens] = 0.8 * self.step_seconds[n_tokens] + 0.2 * seconds


def invariant_batch(logits_of: Callable[[Sequence[int], int], np.ndarray], tokens: Sequence[int], *,
                    prefix: int = 8, sizes: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9)) -> int:
    """The largest batch whose logits equal, bit for bit, the same tokens evaluated one at a time.

    ``logits_of(tokens, batch)`` evaluates ``tokens`` from an empty cache, the first ``prefix`` as
    one batch (a prompt), the rest in batches of ``batch``, and returns the logits of every token
    after the prefix. Sizes are tried in increasing order; the first that differs ends the search
    (kernels switch at thresholds, so a larger batch does not come back). Returns 1 where even two
    tokens differ: speculative decoding then cannot keep greedy output identical.
    """
    if len(tokens) < prefix + 2 * max(sizes):
        raise ValueError(f"need at least {prefix + 2 * max(sizes)} tokens to compare batches of up to {max(sizes)}")
    single = logits_of(tokens, 1)
    best = 1
    for size in sorted(sizes):
        if not np.array_equal(logits_of(tokens, size), single):
            break
        best = size
    return best
