"""What the planner needs to know about a model, from as little of it as possible.

- a local checkpoint directory: config.json and the safetensors headers (the exact
  tensor list the GGUF converter will write; no weights are read);
- a .gguf file: its metadata and tensor table (the file's own types, exact bytes);
- a hub id: config.json and, when the repository has one, model.safetensors.index.json
  (which tensors exist: biases, a separate lm_head), fetched through huggingface_hub's
  cache. Never the weights: "will it fit" is answered before a download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.archs import arch_for
from packager.errors import (GatedSourceError, IncompleteConfigError, SourceError, SourceNotFoundError,
                             UnsupportedArchitectureError)
from packager.formats.gguf import gguf_tensors, layer_kind_mismatch
from packager.formats.weights import Tensor
from packager.quants import get_quant
from packager.source.resolver import HUB_ID, _gguf_name
from packager.source.safetensors import Checkpoint
from packager.spec.gguf import open_gguf, spec_from_gguf
from packager.spec.model import ModelSpec, spec_from_config
from packager.spec.tensors import plan_tensors

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlanInput:
    """A model as the planner sees it."""

    name: str
    spec: ModelSpec
    tensors: tuple[Tensor, ...] | None  # GGUF names and numpy-order shapes; None: implied by the config
    origin: str  # what was read, for --explain
    source_quant: str | None = None  # a GGUF source's file type
    source_types: dict[str, int] | None = None  # and its tensors' ggml types


def plan_input(model: str | os.PathLike[str], *, revision: str | None = None, token: str | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> PlanInput:
    """Read what planning needs from a local directory, a .gguf file or a hub id."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{path} is a file but not a .gguf; pass a checkpoint directory, a .gguf file or a hub id")
        return _from_gguf(path)
    if path.is_dir():
        return _from_dir(path)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise SourceNotFoundError(f"{text}: no such file or directory; pass a local checkpoint directory, a .gguf "
                                  f"file, or a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    return _from_hub(text, revision, token, cache_dir)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); re-download it") from None


def _spec(config: Any, where: str) -> ModelSpec:
    """The planner's view of a config; one that lacks what planning needs is bad input (exit 2)."""
    try:
        return spec_from_config(config, where=where)
    except SourceError as exc:
        raise IncompleteConfigError(str(exc)) from None


def _from_dir(path: Path) -> PlanInput:
    config = path / "config.json"
    if not config.is_file():
        raise SourceError(f"{path} has no config.json; pass the directory of a Hugging Face checkpoint")
    cfg = _read_json(config)
    spec = _spec(cfg, str(config))
    if not any(path.glob("*.safetensors")):
        return PlanInput(path.name, spec, None, "config.json (no safetensors: tensor list implied by the config)")
    try:
        arch = arch_for(spec.architecture)
    except UnsupportedArchitectureError:
        return PlanInput(path.name, spec, None, "config.json (architecture without a GGUF converter)")
    ckpt = Checkpoint.open(path)  # headers only
    try:
        jobs, _ = plan_tensors(ckpt, cfg, arch, get_quant("Q8_0"))
    finally:
        ckpt.close()
    tensors = tuple((j.name, tuple(j.shape)) for j in jobs)
    wrong_kind = layer_kind_mismatch(tensors, spec)  # a hybrid's layer_types against its weights: plan and pack alike
    if wrong_kind:
        raise IncompleteConfigError(f"{path.name}: {wrong_kind}; fix config.json's layer_types or re-download the "
                                    "checkpoint")
    return PlanInput(path.name, spec, tensors, "config.json + safetensors headers (exact tensor list)")


def _from_gguf(path: Path) -> PlanInput:
    reader = open_gguf(path)
    spec, quant = spec_from_gguf(path, reader)
    tensors = tuple((t.name, tuple(reversed(t.shape))) for t in reader.tensors)
    types = {t.name: t.type for t in reader.tensors}
    return PlanInput(_gguf_name(path), spec, tensors, "GGUF metadata and tensor table", quant, types)


def _from_hub(repo: str, revision: str | None, token: str | None, cache_dir) -> PlanInput:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo, filename, revision=revision, token=token, cache_dir=cache_dir))

    try:
        config = fetch("config.json")
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise GatedSourceError(f"{repo} is gated: accept its terms on the hub, then log in or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"{repo} has no revision {revision!r}; check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(f"{repo} was not found on the hub (or is private); check the id, or set HF_TOKEN") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise SourceNotFoundError(f"{repo}'s config.json is not in the local HF cache and the hub cannot be reached; "
                                  "go online once, or pass a local directory") from None
    except EntryNotFoundError:
        raise SourceError(f"{repo} has no config.json; it is not a Hugging Face transformers checkpoint") from None
    spec = _spec(_read_json(config), f"{repo}/config.json")
    try:
        index = _read_json(fetch(INDEX))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return PlanInput(repo.split("/")[-1], spec, None, f"{repo}/config.json")
    names = set((index or {}).get("weight_map", {}))
    if not names:
        raise SourceError(f"{repo}/{INDEX} has no weight_map; re-download it")
    tensors = gguf_tensors(spec, has_bias=any(n.endswith("q_proj.bias") for n in names),
                           tied="lm_head.weight" not in names)
    return PlanInput(repo.split("/")[-1], spec, tuple(tensors), f"{repo}/config.json + {INDEX} (which tensors exist)")
