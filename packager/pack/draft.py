"""`pack model --draft`: a draft in the bundle, checked before any conversion, measured before it ships.

    lookup        prompt n-gram lookup: no second model
    self:QUANT    the same checkpoint at a lower-bit GGUF type (self:Q4_0)
    PATH.gguf     a smaller model with the same tokenizer (Qwen2.5-0.5B-Instruct for Qwen2.5-3B-Instruct)
    DIR, HUB ID   such a model's checkpoint, converted in the same pack at the bundle's type

The draft is measured on the staged bundle (greedy, with and without, on the evaluation text:
measure/speculative.py), and the planner turns the acceptance into a predicted speed-up on the
target (plan/draft.py). It ships, enabled, only where the output stayed identical and the plan says
it pays off there; otherwise the manifest says why and a model draft's file is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from packager.bundle.manifest import Manifest
from packager.bundle.verify import Bundle
from packager.bundle.writer import BundleWriter
from packager.errors import UsageError
from packager.measure.speculative import DraftMeasure, measure_draft
from packager.plan.draft import DraftPlan, plan_on
from packager.plan.planner import Plan, memory, scheme
from packager.plan.targets import Target
from packager.progress import say
from packager.quants import QuantType, get_quant
from packager.runtime.llama import check_draft
from packager.source.gguf_check import check_layout, tokenizer_difference
from packager.source.resolver import HUB_ID
from packager.spec.gguf import spec_from_gguf
from packager.spec.model import ModelSpec

__all__ = ["DRAFT_HELP", "DraftRequest", "add_draft", "card_section", "check_pairing", "check_self", "check_self_type",
           "check_tokenizers", "draft_file", "parse_draft"]

DRAFT_HELP = ("use lookup, self:QUANT (e.g. self:Q4_0), or a smaller model with the same tokenizer: its .gguf, its "
              "checkpoint directory or its hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct)")
SELF_K = 4  # drafts per step the plan assumes for a model draft (the runtime adapts it)
SELF_SUGGESTIONS = ("Q4_0", "Q3_K_S", "Q2_K")  # self: types that need no imatrix, largest first
MIN_BEST = 1.1  # a self: draft that could not reach this even with every draft kept is refused


@dataclass(frozen=True)
class DraftRequest:
    kind: str  # "lookup", "self", "gguf" or "hf"
    quant: QuantType | None = None  # self: the draft's type; hf: the bundle's, once planned
    path: Path | None = None  # gguf: the draft model's file
    ref: str | None = None  # hf: the checkpoint directory or hub id, as typed
    name: str | None = None  # hf: the resolved checkpoint's name ("Qwen2.5-0.5B-Instruct")

    @property
    def label(self) -> str:
        return {"lookup": "lookup", "self": f"self:{self.quant.name if self.quant else ''}",
                "hf": self.ref or ""}.get(self.kind, str(self.path))


def draft_file(req: DraftRequest, name: str) -> str:
    """Where a model draft lives in the bundle."""
    if req.kind == "gguf":
        return f"model/draft-{req.path.name}"
    return f"model/draft-{name if req.kind == 'self' else req.name}-{req.quant.name}.gguf"


def parse_draft(value: str) -> DraftRequest:
    """--draft's value, or a one-line UsageError."""
    if value == "lookup":
        return DraftRequest("lookup")
    if value.startswith("self:"):
        try:
            return DraftRequest("self", quant=get_quant(value[5:]))
        except UsageError as exc:
            raise UsageError(f"--draft {value}: {exc}") from None
    path = Path(value).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--draft {value}: no such file")
        return DraftRequest("gguf", path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--draft {value}: a directory without config.json; {DRAFT_HELP}")
        return DraftRequest("hf", ref=str(path))
    if HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        return DraftRequest("hf", ref=value)  # downloaded (or found in the HF cache) before any conversion
    raise UsageError(f"--draft {value}: {DRAFT_HELP}")


def check_tokenizers(req: DraftRequest, target_tokenizer: dict[str, str], target_name: str,
                     target_bytes: int) -> None:
    """A GGUF draft shares the target's tokenizer and is smaller than its planned weights: checked before any
    conversion."""
    if req.kind != "gguf" or req.path is None:
        return
    layout = check_layout(req.path)
    check_pairing(req.path.name, layout.tokenizer, sum(t.nbytes for t in layout.tensors), target_tokenizer,
                  target_name, target_bytes)


def check_pairing(label: str, tokenizer: dict[str, str], draft_bytes: float, target_tokenizer: dict[str, str],
                  target_name: str, target_bytes: int) -> None:
    """The same tokenizer fields (``Layout.tokenizer``) and fewer weight bytes than the target, or a one-line
    UsageError naming the first field that differs or both sizes."""
    key = tokenizer_difference(tokenizer, target_tokenizer)
    if key is not None:
        raise UsageError(f"--draft {label} has another tokenizer than {target_name} ({key} differs); a draft "
                         f"must share the target's vocabulary, merges and special tokens")
    if draft_bytes >= target_bytes:
        raise UsageError(f"--draft {label} ({draft_bytes / 1e6:.0f} MB of weights) is not smaller than "
                         f"{target_name} as planned ({target_bytes / 1e6:.0f} MB): it cannot pay off; pick a smaller "
                         f"model or a lower-bit quant")


def check_self_type(req: DraftRequest, quant: QuantType) -> None:
    """self:QUANT below the bundle's own type (``quant``), or a one-line UsageError."""
    if req.kind == "self" and req.quant is not None and req.quant.base_bits_per_weight >= quant.base_bits_per_weight:
        lower = [q for q in SELF_SUGGESTIONS if get_quant(q).base_bits_per_weight < quant.base_bits_per_weight]
        raise UsageError(f"--draft self:{req.quant.name} is not smaller than the bundle's {quant.name}: it cannot pay "
                         f"off; " + (f"pick a lower-bit type (e.g. self:{' or self:'.join(lower[:2])})" if lower
                                     else "nothing lower drafts well, use --draft lookup"))


def check_self(req: DraftRequest, quant: QuantType, spec: ModelSpec, tgt: Target, p: Plan, name: str, *,
               from_gguf: bool) -> None:
    """self:QUANT below the bundle's own type, and able to pay off on the target at all; else exit 2."""
    if req.kind != "self" or req.quant is None:
        return
    if from_gguf and req.quant.needs_imatrix:
        raise UsageError(f"--draft self:{req.quant.name} needs an importance matrix, which a GGUF source cannot give; "
                         f"pick a type without one (e.g. self:Q4_0) or pack from the HF checkpoint")
    check_self_type(req, quant)
    d = plan_on(tgt, p, spec.n_layers, "model", k=SELF_K, draft_layers=spec.n_layers,
                draft_bytes=p.memory.weights * req.quant.base_bits_per_weight / quant.base_bits_per_weight)
    if d.best_speedup < MIN_BEST:
        raise UsageError(f"{name} at {quant.name} is too small for --draft self:{req.quant.name} to pay off on "
                         f"{tgt.name}: even with every draft kept it would decode at {d.best_speedup:.2f}x "
                         f"(a step's fixed cost is most of it); use --draft lookup")


def add_draft(bw: BundleWriter, manifest: Manifest, req: DraftRequest, *, tgt: Target, p: Plan, spec: ModelSpec,
              model_rel: str, write: Callable[[Path], dict[str, Any] | None], n_threads: int | None, quiet: bool,
              warnings: list[str]) -> Manifest:
    """Write (model drafts), measure and plan the draft; the manifest with its record, enabled or not and why.

    ``write`` puts a model draft's file at the path it is given and returns what the record should
    say of where it came from (a checkpoint's source), if anything.
    """
    draft_rel, origin = None, None
    if req.kind != "lookup":
        draft_rel = draft_file(req, manifest.name)
        origin = write(bw.path(draft_rel))
        check_draft(bw.path(draft_rel), bw.path(model_rel))  # the same tokenizer, and smaller
    say(f"measuring {req.label} drafting (greedy, with and without, on the evaluation text)", quiet=quiet)
    staged = Bundle(bw.tmp, {**manifest.as_json(), "files": []})
    m = measure_draft(staged, draft=bw.path(draft_rel) if draft_rel else "lookup", n_threads=n_threads)
    d = _plan(m, bw.path(draft_rel) if draft_rel else None, tgt, p, spec)
    enabled = m.identical and m.max_batch >= 2 and d.pays_off
    why = (d.why if m.identical and m.max_batch >= 2 else
           "this machine's llama.cpp gives a batch of tokens other logits than one at a time, so drafts could "
           "change greedy output" if m.max_batch < 2 else "drafting changed the greedy output on the evaluation text")
    record: dict[str, Any] = {"kind": "lookup" if req.kind == "lookup" else "model", "request": req.label,
                              "enabled": enabled, "why": why, "measured": m.as_manifest(), "plan": d.as_dict(),
                              **({"source": origin} if origin else {})}
    if enabled:
        say(f"{req.label} drafting: {m.speedup:.2f}x decode speed here ({m.tokens_per_step:.2f} tokens per step, "
            f"{100 * m.acceptance:.0f}% of drafts kept); {why}", quiet=quiet)
        if draft_rel:
            record["file"] = draft_rel
    else:
        warnings.append(f"--draft {req.label}: {why}; packed without it")
        say(warnings[-1], quiet=quiet)
        if draft_rel:
            bw.path(draft_rel).unlink()  # a draft that does not ship is not carried either
    card = bw.path("README.md")
    if card.is_file():
        card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + card_section(record, tgt.name),
                        encoding="utf-8")
    return replace(manifest, warnings=list(warnings), extras={**manifest.extras, "draft": record})


def card_section(record: dict[str, Any], device: str) -> str:
    """The model card's account of the draft: what it is, what was measured, and whether it ships."""
    m, d = record["measured"], record["plan"]
    even = ("never pays off there" if d["break_even"] is None else
            f"pays off above {100 * d['break_even']:.0f}% acceptance")
    state = ("on by default; `packager.load(\".\", draft=False)`, or `speculative=False` per call, turns it off"
             if record["enabled"] else "not shipped")
    return f"""## Speculative decoding

Draft: `{record['request']}` ({'prompt n-gram lookup' if record['kind'] == 'lookup' else 'a draft model'}), {state}.

| | |
|---|---|
| measured at pack time | {m['speedup']:.2f}x decode speed on the packing machine, {100 * m['acceptance']:.0f}% of drafts kept, {m['tokens_per_step']:.2f} tokens per step ({m['n_tokens']} greedy tokens over {m['n_prompts']} summaries of the evaluation text) |
| output | {'identical' if m['identical'] else 'NOT identical'} with and without drafts |
| predicted on {device} | {_x(d['predicted_speedup'])}; {even} |

{record['why'][0].upper() + record['why'][1:]}.
"""


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _plan(m: DraftMeasure, draft_path: Path | None, tgt: Target, p: Plan, spec: ModelSpec) -> DraftPlan:
    if draft_path is None:
        return plan_on(tgt, p, spec.n_layers, "lookup", k=max(1, round(m.drafted_per_step)),
                       acceptance=m.acceptance, tokens_per_step=m.tokens_per_step)
    dspec, dquant = spec_from_gguf(draft_path)
    tensors = check_layout(draft_path).tensors
    mem = memory(dspec, scheme("gguf", dquant) if dquant else None, p.n_ctx, p.kv_type,
                 exact_types={t.name: t.type for t in tensors}).total
    return plan_on(tgt, p, spec.n_layers, "model", k=max(1, round(m.drafted_per_step)),
                   draft_bytes=float(sum(t.nbytes for t in tensors)), draft_layers=dspec.n_layers, memory_bytes=mem,
                   acceptance=m.acceptance, tokens_per_step=m.tokens_per_step)
