"""Quality arithmetic: log-softmax, per-token KL divergence, perplexity, top-1 agreement.

What llama.cpp's ``llama-perplexity --kl-divergence`` computes
(tools/perplexity/perplexity.cpp: ``log_softmax``, ``process_logits``,
``kl_divergence``), done with numpy on blocks of rows:

- every log-softmax is taken in float64 after subtracting the row's maximum, so
  exp() never overflows and a 150k-token vocabulary sums without float32's
  rounding (llama.cpp sums in double too);
- the reference's log-probabilities are kept as float32 (on disk, one chunk at a
  time) and the candidate's are rounded the same way before they are compared, so
  a model compared with itself gives a KL divergence of exactly 0;
- KLD(token) = sum_v p_ref(v) * (log p_ref(v) - log p_q(v)), the divergence of the
  candidate's distribution from the reference's; llama.cpp keeps the reference
  as 16-bit codes over its top 16 nats and skips p_ref < e^-16, we keep it whole;
- perplexity = exp(mean negative log-likelihood of the next token);
- top-1 agreement = share of tokens whose argmax is the same for both models;
- percentiles interpolate linearly between sorted values, as llama.cpp's do.

Nothing here knows about llama.cpp; packager/measure/quality.py feeds it logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BlockScores", "QualityStats", "Summary", "log_softmax", "score_block"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (rows, vocab) logits, in float64, max-subtracted for stability."""
    # One float64 copy worked on in place: the same operations (and bits) as out-of-place code, without
    # two more rows x vocab temporaries to allocate and fault in for every block.
    z = np.array(logits, dtype=np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def stored(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities at the precision the reference is kept in (float32)."""
    return np.asarray(logp, dtype=np.float32)


@dataclass(frozen=True)
class BlockScores:
    """Per-token figures for one block of rows."""

    nll: np.ndarray  # float64: -log p_q(next token)
    nll_ref: np.ndarray  # float64: -log p_ref(next token)
    kld: np.ndarray  # float64: KL(p_ref || p_q) per token, >= 0
    same_top: np.ndarray  # bool: argmax agrees


def score_block(logits: np.ndarray, logp_ref: np.ndarray, top_ref: np.ndarray, targets: np.ndarray) -> BlockScores:
    """Compare a candidate's raw logits (rows, vocab) with the reference's stored log-probabilities.

    ``targets[i]`` is the token that follows row i; ``top_ref[i]`` the reference's argmax
    (taken from its raw logits, first index on ties, as llama.cpp does).
    """
    logits = np.asarray(logits)
    if logits.shape != logp_ref.shape or logits.shape[0] != len(targets) or len(top_ref) != len(targets):
        raise ValueError(f"shapes disagree: logits {logits.shape}, reference {logp_ref.shape}, "
                         f"{len(targets)} targets, {len(top_ref)} reference argmaxes")
    lq = stored(log_softmax(logits))  # float32, like the reference's
    lr = np.array(logp_ref, dtype=np.float64)  # a copy: it becomes p_ref in place below
    rows = np.arange(len(targets))
    nll, nll_ref = -lq[rows, targets].astype(np.float64), -lr[rows, targets]
    diff = lr - lq  # float64 difference of float32 values: exact, so identical models give exactly 0
    p_ref = np.exp(lr, out=lr)
    # Rounding can push a KLD of ~0 a hair below zero; the true value never is.
    kld = np.maximum(np.einsum("ij,ij->i", p_ref, diff), 0.0)
    return BlockScores(nll=nll, nll_ref=nll_ref, kld=kld, same_top=np.argmax(logits, axis=-1) == np.asarray(top_ref))


@dataclass(frozen=True)
class Summary:
    """The figures of one comparison (what goes into a manifest's ``quality``)."""

    n_tokens: int
    ppl: float
    ppl_ref: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1: float

    def as_dict(self) -> dict[str, float | int]:
        return {"n_tokens": self.n_tokens, "ppl": self.ppl, "ppl_ref": self.ppl_ref, "kld_mean": self.kld_mean,
                "kld_p99": self.kld_p99, "kld_max": self.kld_max, "top1": self.top1}


@dataclass
class QualityStats:
    """Running sums over blocks; per-token KLDs are kept (one float each) for the percentiles."""

    sum_nll: float = 0.0
    sum_nll_ref: float = 0.0
    n_same_top: int = 0
    klds: list[np.ndarray] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(k) for k in self.klds)

    def add(self, s: BlockScores) -> None:
        self.sum_nll += float(s.nll.sum())
        self.sum_nll_ref += float(s.nll_ref.sum())
        self.n_same_top += int(s.same_top.sum())
        self.klds.append(s.kld.astype(np.float64))

    def summary(self) -> Summary:
        n = self.count
        if n == 0:
            raise ValueError("no tokens were scored")
        kld = np.concatenate(self.klds)
        return Summary(
            n_tokens=n,
            ppl=float(np.exp(self.sum_nll / n)),
            ppl_ref=float(np.exp(self.sum_nll_ref / n)),
            kld_mean=float(kld.mean()),
            kld_p99=float(np.percentile(kld, 99.0)),  # linear interpolation, like llama.cpp's percentile()
            kld_max=float(kld.max()),
            top1=self.n_same_top / n,
        )
