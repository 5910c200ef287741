"""What a bundle's draft buys on this machine: acceptance, tokens per target step, decode speed-up.

    record = measure_draft(bundle, n_threads=2)

Each prompt asks for a summary of a passage of the shipped evaluation text, so the reply is grounded
in its input (where prompt lookup can pay). Each is decoded greedily by the bundle loaded without a
draft (llama.cpp's own loop) and with it, alternating which goes first, and once more with drafts
turned off, which must give the drafted reply's tokens. The speed-up is the ratio of the decode
tokens/s over all the prompts, after each one's first token. It is this machine's figure: a device
with another balance of bandwidth and compute gets another one (plan/draft.py predicts it).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from packager.bundle.verify import Bundle
from packager.measure.quality import default_evaluation_text
from packager.runtime.llama import LlamaModel
from packager.runtime.speculative import DraftStats

__all__ = ["DraftMeasure", "measure_draft", "passages", "timed_reply"]

PROMPT = "Summarise this passage in a few sentences, keeping its own words where you can:\n\n{passage}"


@dataclass(frozen=True)
class DraftMeasure:
    kind: str  # "lookup" or "model"
    max_batch: int  # the largest verification batch bit-identical to single steps here
    acceptance: float
    tokens_per_step: float
    drafted_per_step: float
    speedup: float  # decode tokens/s drafting wherever a draft is found / the bundle loaded without one, here
    identical: bool  # every prompt gave the same tokens with and without drafts (speculative=False)
    identical_to_plain: bool  # ... and the same as the bundle loaded without a draft
    n_prompts: int
    n_tokens: int  # generated per pass
    text_sha256: str

    def as_manifest(self) -> dict[str, Any]:
        return asdict(self)


def passages(text: str, n: int, words: int = 120) -> list[str]:
    """``n`` passages of about ``words`` words from the start of ``text``'s paragraphs."""
    paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 40]
    return [" ".join(p.split()[:words]) for p in paras[:n]]


def timed_reply(model: LlamaModel, prompt: str, **kw: Any) -> tuple[str, float, int]:
    """A greedy reply: its text, the seconds from its first token to its end, and the tokens in them."""
    # deterministic: every reply read from the state a fresh load has, so replies compare whatever came before
    kw = dict(temperature=0.0, repeat_penalty=1.0, deterministic=True, **kw)
    stream = (model.chat([{"role": "user", "content": prompt}], stream=True, **kw) if model.has_chat_template
              else model.stream(prompt, **kw))
    pieces = [next(stream, "")]  # the prompt and the first token: the same work either way
    t0 = time.perf_counter()
    pieces += list(stream)
    return "".join(pieces), time.perf_counter() - t0, max(0, stream.n_generated - 1)


def measure_draft(bundle: Bundle, *, draft: str | os.PathLike[str] = "lookup", n_threads: int | None = None,
                  n_prompts: int = 3, max_tokens: int = 96) -> DraftMeasure:
    """Greedy replies with the draft against the same bundle loaded without one (llama.cpp's own loop).

    ``identical`` compares the drafted model's replies with and without drafts (the runtime's
    promise); ``identical_to_plain`` compares them with the undrafted bundle, whose single-token
    steps sum attention in another order (runtime/llama.py's _drafting): a near-tie can differ.
    """
    text = default_evaluation_text()
    prompts = [PROMPT.format(passage=p) for p in passages(text, n_prompts)]
    # Every draft found is verified (draft_min=1): the acceptance is the draft's, not this machine's
    # choice of when to draft, and the plan predicts the target's speed from it.
    model = LlamaModel(bundle, n_threads=n_threads, draft=draft, draft_min=1)
    plain = None
    try:
        plain = LlamaModel(bundle, n_threads=n_threads, draft=False)
        seconds = {False: 0.0, True: 0.0}
        tokens = {False: 0, True: 0}
        stats, identical, same_as_plain = DraftStats(), True, True
        for i, prompt in enumerate(prompts):
            out = {}
            for spec in ((False, True) if i % 2 == 0 else (True, False)):  # alternate: neither always goes first
                text_, sec, n = timed_reply(model if spec else plain, prompt, max_tokens=max_tokens)
                out[spec] = text_
                seconds[spec] += sec
                tokens[spec] += n
                if spec:
                    stats.add(model.draft_stats)
            undrafted, _, _ = timed_reply(model, prompt, max_tokens=max_tokens, speculative=False)
            identical = identical and undrafted == out[True]
            same_as_plain = same_as_plain and out[False] == out[True]
        tps = {s: tokens[s] / seconds[s] if seconds[s] else 0.0 for s in seconds}
        return DraftMeasure(kind=model.draft or "none", max_batch=model.draft_batch,
                            acceptance=round(stats.acceptance, 4), tokens_per_step=round(stats.tokens_per_step, 3),
                            drafted_per_step=round(stats.drafted / stats.steps, 3) if stats.steps else 0.0,
                            speedup=round(tps[True] / tps[False], 3) if tps[False] else 0.0, identical=identical,
                            identical_to_plain=same_as_plain, n_prompts=len(prompts), n_tokens=tokens[False],
                            text_sha256=hashlib.sha256(text.encode()).hexdigest())
    finally:
        model.close()
        if plain is not None:
            plain.close()
