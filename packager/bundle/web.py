"""The static chat page a `web` target's ONNX bundle carries (issue 19).

    <bundle>/web/index.html, app.js, tokenizer.js, style.css   packager/data/web/, as they are
    <bundle>/web/edgepack-web.json                              this model's facts, written here

Serve the bundle folder over HTTP and open ``web/``: the page loads ``../model/`` with onnxruntime-web
(WebGPU where the browser offers an adapter, WASM otherwise), tokenizes with its own byte-level BPE
(tokenizer.js reads the bundle's tokenizer.json) and streams a greedy reply. No build step and no npm at
pack time: onnxruntime-web comes from a pinned jsDelivr URL, which ``?ort=<base url>`` (or the config's
``ort.base_url``) replaces for offline hosting.

The page cannot run Jinja, so the chat template is rendered here for one user message around a
placeholder and cut into the text before and after it. Rendering belongs to packager.spec, which the
bundle stage must not import (tests/test_layering.py): the caller hands :func:`chat_prompt_parts` a
``render`` callable, e.g. packager.spec.chat_template.render bound to the template and the bos/eos
tokens exactly as packager/runtime/onnx.py renders a chat, so that the page and ``packager.load`` see
the same prompt.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any, Callable

from packager.errors import BundleError, ChatTemplateError
from packager.formats.onnx import PROMPT_CHUNK, WASM_GRAPH

WEB_DIR = "web"
CONFIG_NAME = "edgepack-web.json"
CONFIG_SCHEMA = 1
PAGE_FILES = ("index.html", "app.js", "tokenizer.js", "style.css")
# Pinned: the page's JavaScript is tested against this release (tests/test_web_page.py fetches the same
# version from npm). The .mjs bundles and their .wasm files are loaded from this base URL.
ORT_WEB_VERSION = "1.31.1"
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
# No whitespace (templates trim content), no markup, nothing a template would rewrite.
MESSAGE_PLACEHOLDER = "EDGEPACKUSERMESSAGE7F3A9C"
# ONNX element types of the KV cache by the manifest's kv_type.
KV_DTYPES = {"f32": "float32", "f16": "float16"}

Renderer = Callable[[list[dict[str, str]]], str]


def chat_prompt_parts(render: Renderer) -> tuple[str, str]:
    """The prompt of a one-message chat as (prefix, suffix): prefix + message + suffix is what
    ``render([{"role": "user", "content": message}])`` (generation prompt added) returns."""
    text = render([{"role": "user", "content": MESSAGE_PLACEHOLDER}])
    if text.count(MESSAGE_PLACEHOLDER) != 1:
        raise ChatTemplateError("the chat template does not write a user message verbatim exactly once, so the "
                                "web page cannot build its prompt; pack without the web page or fix the template")
    prefix, suffix = text.split(MESSAGE_PLACEHOLDER)
    return prefix, suffix


def web_page_files(model_dir: Path, *, name: str, prompt: tuple[str, str], n_ctx: int | None = None,
                   kv_type: str = "f32", model_rel: str = "model", max_new_tokens: int = 256) -> dict[str, bytes]:
    """The page's files for the ONNX model in ``model_dir`` (the bundle's ``model_rel`` folder, holding
    model.onnx, its external data, genai_config.json and tokenizer.json), keyed by their path in the bundle.

    ``prompt``: :func:`chat_prompt_parts`'s (prefix, suffix). ``n_ctx``: the bundle's planned context
    (default: the model's). ``kv_type``: the manifest's runtime.kv_type. Raises BundleError when the
    model folder lacks what the page reads.
    """
    model_dir = Path(model_dir)
    config = page_config(model_dir, name=name, prompt=prompt, n_ctx=n_ctx, kv_type=kv_type, model_rel=model_rel,
                         max_new_tokens=max_new_tokens)
    assets = importlib.resources.files("packager") / "data" / "web"
    files = {f"{WEB_DIR}/{f}": (assets / f).read_bytes() for f in PAGE_FILES}
    files[f"{WEB_DIR}/{CONFIG_NAME}"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def page_config(model_dir: Path, *, name: str, prompt: tuple[str, str], n_ctx: int | None = None,
                kv_type: str = "f32", model_rel: str = "model", max_new_tokens: int = 256) -> dict[str, Any]:
    """edgepack-web.json: everything the page knows about the model (see the schema in web/app.js)."""
    try:
        genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]
        decoder = genai["decoder"]
        graph_file = str(decoder.get("filename") or "model.onnx")
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        eos = genai.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        n_layers = int(decoder["num_hidden_layers"])
        n_kv_heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
        head_dim = int(decoder.get("head_size") or int(decoder["hidden_size"]) // int(decoder["num_attention_heads"]))
        context_length = int(genai["context_length"])
        vocab_size = int(genai["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{model_dir}: genai_config.json does not describe the model the web page needs "
                          f"({type(exc).__name__}: {exc}); repack the bundle") from None
    if not (model_dir / graph_file).is_file() or not (model_dir / "tokenizer.json").is_file():
        raise BundleError(f"{model_dir}: the web page needs {graph_file} and tokenizer.json beside genai_config.json")
    if kv_type not in KV_DTYPES:
        raise BundleError(f"the web page runs a KV cache of {', '.join(KV_DTYPES)}, not {kv_type}")
    if not eos_ids:
        raise BundleError(f"{model_dir}: genai_config.json names no eos_token_id; the page would never stop")
    # The graph's external data files, by the names the graph refers to them with (written beside it,
    # named after it: model.onnx.data, model.onnx_data, ...), as genai and OnnxEngine find them.
    data = sorted(f.name for f in model_dir.iterdir() if f.is_file() and f.name.startswith(graph_file)
                  and f.name != graph_file)
    base = f"../{model_rel.strip('/')}/"
    return {
        "schema": CONFIG_SCHEMA,
        "name": name,
        "model": {
            "graph": base + graph_file,
            # the WASM backend's graph (same external data, int4 unpacked to f32 at load), null: WASM runs `graph`
            "wasm_graph": base + WASM_GRAPH if (model_dir / WASM_GRAPH).is_file() else None,
            # path: the name inside the graph; url: where the page fetches it, relative to the page
            "external_data": [{"path": d, "url": base + d} for d in data],
            "tokenizer": base + "tokenizer.json",
            "bytes": sum((model_dir / f).stat().st_size for f in (graph_file, *data)),
        },
        "io": {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs.get("attention_mask"),
            "position_ids": inputs.get("position_ids"),
            "past_key": inputs["past_key_names"],  # %d: the layer
            "past_value": inputs["past_value_names"],
            "logits": outputs["logits"],
            "present_key": outputs["present_key_names"],
            "present_value": outputs["present_value_names"],
        },
        "kv": {"n_layers": n_layers, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "dtype": KV_DTYPES[kv_type]},
        "vocab_size": vocab_size,
        "context_length": min(int(n_ctx or context_length), context_length),
        "eos_token_ids": eos_ids,
        "chat": {"prefix": prompt[0], "suffix": prompt[1]},
        "generation": {"max_new_tokens": int(max_new_tokens)},
        # packager.load's chunk, which the plan sizes the logits' memory for
        "prefill_chunk": PROMPT_CHUNK,
        "ort": {"version": ORT_WEB_VERSION, "base_url": ORT_WEB_CDN},
    }


def web_card_section(config: dict[str, Any], wasm: dict[str, Any]) -> str:
    """The model card's lines about the page: what each backend downloads and holds (``wasm``: the manifest's
    onnx.web_wasm, what packager/convert/onnx/wasm_graph.py decided)."""
    model = config["model"]
    lines = ["", "## Web page", "",
             "Serve the bundle folder and open `web/` (`pack serve .` does, with the headers WASM threads need).",
             "", "| backend | graph | download | weights in memory |", "|---|---|---|---|",
             f"| WebGPU | `{model['graph'][3:]}` (int4 MatMulNBits) | {model['bytes'] / 1e6:.1f} MB | int4, "
             "in GPU buffers |"]
    if model.get("wasm_graph"):
        lines.append(f"| WASM | `{model['wasm_graph'][3:]}` (the same int4 bytes, unpacked to f32 at load) | "
                     f"the same files | {wasm['f32_bytes'] / 1e6:.0f} MB f32 in the WASM heap |")
    else:
        lines.append(f"| WASM | `{model['graph'][3:]}` | the same files | int4 ({wasm.get('why', 'no WASM graph')}) |")
    lines += ["", "The page shows its backend, WASM threads and tokens/s; benchmarks/web_page.py in edgepack's "
              "repository measures them against native ONNX Runtime."]
    return "\n".join(lines) + "\n"
