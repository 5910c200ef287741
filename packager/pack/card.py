"""What a bundle carries besides the model: the model card, the source's licence files and the
generation defaults, the same for every format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from packager import __version__
from packager.plan.planner import Plan
from packager.plan.targets import Target
from packager.source.resolver import Source

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
