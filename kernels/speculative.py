"""Speculative decoding's arithmetic: which drafts to keep, and what a step of drafts is worth.

Pure numpy, no engine: the runtime's verifying loop (packager/runtime/llama.py) and the planner's
prediction of a draft's speed-up (packager/plan/draft.py) share it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["accept_greedy", "expected_tokens", "sample_at", "target_probs"]


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification step hands out when each of k drafts is kept with probability ``acceptance``."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def accept_greedy(choices: Sequence[int], drafts: Sequence[int]) -> int:
    """How many leading drafts the model would have chosen itself.

    ``choices[i]`` is the model's argmax after the last committed token and ``drafts[:i]``; the
    kept tokens are ``drafts[:n]`` and ``choices[n]`` is the next token, free.
    """
    n = 0
    for c, d in zip(choices, drafts):
        if c != d:
            break
        n += 1
    return n


def target_probs(logits: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution llama.cpp's sampler chain draws the next token from, over the whole vocabulary.

    The chain llama-cpp-python builds (top-k, typical 1, top-p, min-p 0, temperature, dist), step by
    step: top-k keeps the k largest logits; top-p keeps the fewest of those, most likely first,
    whose softmax (before temperature) reaches ``top_p``; the kept logits are divided by the
    temperature and normalised.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    order = np.argsort(-logits, kind="stable")
    if 0 < top_k < n:
        order = order[:top_k]
    if top_p < 1.0:
        kept = logits[order]
        w = np.exp(kept - kept[0])
        cum = np.cumsum(w / w.sum())
        order = order[:int(np.searchsorted(cum, top_p)) + 1]  # the first index whose running sum reaches top_p
    out = np.zeros(n)
    z = logits[order] / temperature
    w = np.exp(z - z.max())
    out[order] = w / w.sum()
    return out


def sample_at(probs: np.ndarray, seed: int, position: int) -> int:
    """The token at ``position`` of a reply seeded ``seed``, drawn from ``probs`` by the Gumbel-max trick.

    argmax(log p + g) with g standard Gumbel noise is distributed exactly as p. The noise comes from
    a generator keyed by (seed, position), so the token depends on the seed, the position and the
    model's distribution there, and on nothing else: whether the position was drafted, how long the
    draft was, what came before in the process. A draft token is then kept with probability p(d),
    as the speculative-sampling rule keeps a deterministic draft, and a rejected position gets the
    residual's sample for free; and a seeded reply is the same tokens with and without drafts.
    """
    g = np.random.default_rng([seed, position]).gumbel(size=probs.shape[0])
    with np.errstate(divide="ignore"):
        return int(np.argmax(np.log(probs) + g))
