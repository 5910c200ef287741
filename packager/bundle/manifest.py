"""The bundle manifest as one typed record: `pack` writes it once, everything else reads its fields.

On disk it is manifest.json (see DESIGN.md's bundle layout): the fields below at the top level,
next to ``schema_version`` and ``files`` (the writer's), and to sections that only some bundles
have (``onnx``, ``imatrix``, ``tokenizer_check``, ``quality``, ...), which stay in ``extras``.
Reading checks every typed field and names the one that is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from packager.errors import VerificationError


@dataclass(frozen=True)
class Runtime:
    """How the bundle is loaded: what the plan chose, and the generation defaults of the source."""

    n_ctx: int
    n_threads: int
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    generation: dict[str, Any] = field(default_factory=dict)
    execution_provider: str | None = None  # ONNX: the onnxruntime-genai provider the plan targets
    chat_template: str | None = None  # overrides the model's own, when set


@dataclass(frozen=True)
class Manifest:
    """What a bundle is: the model, for which device, in which format, and how to run it."""

    name: str
    format: str  # "gguf" or "onnx"
    quant: str  # a GGUF type name or an ONNX int4 scheme (formats/onnx.py)
    model_file: str  # what the runtime loads, relative to the bundle
    runtime: Runtime
    source: dict[str, Any] = field(default_factory=dict)  # repo, revision, sha256s
    target: dict[str, Any] = field(default_factory=dict)  # name + the profile values used
    spec: dict[str, Any] | None = None  # the ModelSpec's fields; bundles packed before they were recorded lack it
    plan: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    edgepack_version: str = ""
    extras: dict[str, Any] = field(default_factory=dict)  # the sections only some bundles have

    def as_json(self) -> dict[str, Any]:
        """The manifest.json object (without the writer's schema_version and files)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        out["runtime"] = {k: v for k, v in asdict(self.runtime).items() if v is not None}
        if out["spec"] is None:
            del out["spec"]
        return {**out, **self.extras}

    @property
    def target_name(self) -> str:
        return str(self.target.get("name") or "")

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "Manifest":
        """Parse a manifest.json object; a wrong or missing field is a VerificationError naming it."""
        def need(obj: dict[str, Any], key: str, types: type | tuple[type, ...], path: str, default: Any = ...) -> Any:
            value = obj.get(key, default)
            kinds = types if isinstance(types, tuple) else (types,)
            # bool is an int to isinstance; a manifest's true is no context length
            if value is ... or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise VerificationError(f"{where}: {path}{key} is missing or not a {_names(kinds)}; pack the bundle again")
            return value

        rt = need(data, "runtime", dict, "", {})
        runtime = Runtime(
            n_ctx=need(rt, "n_ctx", int, "runtime.", 2048), n_threads=need(rt, "n_threads", int, "runtime.", 0),
            n_gpu_layers=need(rt, "n_gpu_layers", int, "runtime.", 0), kv_type=need(rt, "kv_type", str, "runtime.", "f16"),
            generation=need(rt, "generation", dict, "runtime.", {}),
            execution_provider=need(rt, "execution_provider", (str, type(None)), "runtime.", None),
            chat_template=need(rt, "chat_template", (str, type(None)), "runtime.", None))
        typed = {f.name for f in fields(cls)} - {"extras"}
        return cls(
            name=need(data, "name", str, "", ""), format=need(data, "format", str, ""),
            quant=need(data, "quant", str, "", ""), model_file=need(data, "model_file", str, ""), runtime=runtime,
            source=need(data, "source", dict, "", {}), target=need(data, "target", dict, "", {}),
            spec=need(data, "spec", (dict, type(None)), "", None), plan=need(data, "plan", dict, "", {}),
            predicted=need(data, "predicted", dict, "", {}), warnings=need(data, "warnings", list, "", []),
            edgepack_version=need(data, "edgepack_version", str, "", ""),
            extras={k: v for k, v in data.items() if k not in typed and k not in ("schema_version", "files")})


def _names(kinds: tuple[type, ...]) -> str:
    names = {"str": "string", "int": "integer", "dict": "table", "list": "list", "NoneType": "null"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in kinds)
