"""What a bundle carries besides the model, the same for every format: its manifest, the model
card, the source's licence files and the generation defaults."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from packager import __version__
from packager.bundle.manifest import Manifest, Runtime
from packager.errors import ChatTemplateError
from packager.measure.bundle_quality import card_section, with_card_section
from packager.plan.planner import Plan
from packager.plan.targets import Target
from packager.source.gguf_check import check_layout
from packager.source.resolver import Source
from packager.spec.chat_template import source_template
from packager.spec.model import ModelSpec
from packager.spec.thinking import thinking_of

LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "NOTICE", "USE_POLICY.md")


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, in llama.cpp's terms."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or not cfg.get("do_sample"):
        return {"temperature": 0.0}
    out = {"temperature": float(cfg.get("temperature", 1.0)), "top_p": float(cfg.get("top_p", 1.0)),
           "top_k": int(cfg.get("top_k", 0))}
    if cfg.get("repetition_penalty"):
        out["repeat_penalty"] = float(cfg["repetition_penalty"])
    return out


def model_card(src: Source, tgt: Target, p: Plan, model_file: str) -> str:
    m = p.memory
    return f"""# {src.name} for {tgt.name}

Packed by edgepack {__version__} from {src.repo or src.name}{f' (revision {src.revision})' if src.revision else ''}.

| | |
|---|---|
| target | {tgt.name}: {tgt.description} |
| format | {p.format}, {p.quant} |
| context | {p.n_ctx} tokens, KV cache {p.kv_type} |
| predicted memory | {m.total / 1e9:.2f} GB (weights {m.weights / 1e9:.2f}, KV {m.kv_cache / 1e9:.2f}, compute {m.compute / 1e9:.2f}, overhead {m.overhead / 1e9:.2f}) of {p.budget_bytes / 1e9:.2f} GB usable |
| predicted speed | decode ~{p.predicted_decode_tps} tokens/s, prefill ~{p.predicted_prefill_tps} tokens/s |

```python
import packager
with packager.load(".") as m:
    print(m.chat([{{"role": "user", "content": "Hello!"}}]))
```

Model file: `{model_file}`. The original model's license applies (see LICENSE where present).
"""


def thinking_section(src: Source) -> dict[str, Any] | None:
    """The manifest's ``thinking`` (spec/thinking.py): whether the model reasons in <think> blocks and
    which template variable switches it, from the chat template the bundle carries; None where the
    template has none or refuses the probe chat (the runtime then reads the model as not thinking)."""
    if src.kind == "gguf":
        template = check_layout(src.path, want=frozenset({"tokenizer.chat_template"})).strings.get(
            "tokenizer.chat_template")
    else:
        try:
            tok_config = json.loads((src.path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tok_config = {}
        template = source_template(tok_config if isinstance(tok_config, dict) else {}, src.path)
    if not template:
        return None
    try:
        return thinking_of(template, bos_token="", eos_token="").as_manifest()
    except ChatTemplateError:
        return None


def _spec_record(spec: ModelSpec) -> dict[str, Any]:
    """The spec as the manifest holds it; ``layers`` only where the model mixes layer kinds (a plain
    transformer's manifest stays as it was: its kinds follow from the other fields)."""
    record = asdict(spec)
    del record["tensors"]  # read from the config where planned; a bundle's tensors are its GGUF's own
    if not spec.layers:
        del record["layers"]
    return record


def bundle_manifest(src: Source, spec: ModelSpec, tgt: Target, p: Plan, *, quant: str, model_file: str,
                    generation: dict[str, Any], warnings: list[str], execution_provider: str | None = None,
                    **extras: Any) -> Manifest:
    """The manifest of a bundle of ``src`` packed as planned; ``extras``: the format's own sections."""
    thinking = thinking_section(src)
    if thinking is not None:
        extras = {"thinking": thinking, **extras}
    return Manifest(
        name=src.name, format=p.format, quant=quant, model_file=model_file,
        runtime=Runtime(n_ctx=p.n_ctx, n_threads=p.n_threads, n_gpu_layers=p.n_gpu_layers, kv_type=p.kv_type,
                        generation=generation, execution_provider=execution_provider),
        source=src.manifest(), target={"name": tgt.name, "profile": tgt.as_dict()},
        spec=_spec_record(spec),  # what bench and quality plan with, without re-reading the weights
        plan=p.as_dict(),
        predicted={"memory_bytes": p.memory.total, "decode_tokens_per_s": p.predicted_decode_tps,
                   "prefill_tokens_per_s": p.predicted_prefill_tps},
        warnings=warnings, edgepack_version=__version__, extras=extras)


def with_quality(card: str, quality: dict[str, Any] | None, quant: str) -> str:
    """The model card with --quant auto's quality section, when there is one."""
    return card if quality is None else with_card_section(card, card_section(quality, quant))
