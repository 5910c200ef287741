"""The store glue a bundle carries: parsed by a parser for each format, every path it names in the bundle.

Kotlin and Gradle Kotlin scripts go through tree-sitter's Kotlin grammar, Swift through its Swift
grammar, plists through plistlib, the web parts manifest through its JSON schema.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import plistlib
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tree_sitter
import tree_sitter_kotlin
import tree_sitter_swift

from packager.bundle.verify import verify

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
ROOT = Path(__file__).resolve().parents[1]
KOTLIN = tree_sitter.Parser(tree_sitter.Language(tree_sitter_kotlin.language()))
SWIFT = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))


def packed(*args: object) -> Path:
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", *map(str, args), "--json"], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    return Path(json.loads(r.stdout)["path"])


def parses(parser: tree_sitter.Parser, path: Path) -> None:
    tree = parser.parse(path.read_bytes())
    assert not tree.root_node.has_error, f"{path.name} does not parse:\n{path.read_text()}"


def named_paths(text: str) -> set[str]:
    """Bundle paths a text names in `backticks` (model/..., ship/...; placeholders like <pack> and the
    app project's own paths, such as src/main/assets/, aside)."""
    return {m for m in re.findall(r"`([^`\s<>]+/[^`\s<>]+)`", text) if m.startswith(("model/", "ship/"))}


def model_parts(bundle: Path) -> list[str]:
    return sorted(f"model/{p.name}" for p in (bundle / "model").iterdir())


@pytest.fixture(scope="module")
def android(tiny_qwen2, tmp_path_factory) -> Path:
    # 48 MB parts: the token embedding and the metadata in the first, the layers in the second.
    return packed(tiny_qwen2, "--target", "android-flagship", "--quant", "Q8_0", "--part-size", "48MB",
                  "-o", tmp_path_factory.mktemp("android"))


def test_android_glue_parses_and_names_every_part(android):
    ship = android / "ship" / "android"
    parts = model_parts(android)
    assert len(parts) == 2
    modules = sorted(p.parent.name for p in ship.glob("*/build.gradle.kts"))
    assert len(modules) == 2 and all(re.fullmatch(r"[a-z][a-z0-9_]*", m) for m in modules)  # Play's pack names
    for f in [*ship.glob("*.kts"), *ship.glob("*/*.kts"), *ship.glob("*.kt")]:
        parses(KOTLIN, f)
    for m in modules:
        gradle = (ship / m / "build.gradle.kts").read_text()
        assert f'packName.set("{m}")' in gradle and 'deliveryType.set("fast-follow")' in gradle
        assert 'id("com.android.ai-pack")' in gradle
    settings = (ship / "settings.gradle.kts").read_text()
    assert sorted(re.findall(r'include\(":([a-z0-9_]+)"\)', settings)) == modules
    kotlin = next(ship.glob("*.kt")).read_text()
    files = re.search(r"val files: List<String> = listOf\((.*)\)", kotlin).group(1)
    assert [f"model/{n}" for n in json.loads(f"[{files}]")] == parts
    sizes = re.search(r"val sizes: List<Long> = listOf\((.*)\)", kotlin).group(1)
    assert [int(s.rstrip("L")) for s in sizes.split(", ")] == [(android / p).stat().st_size for p in parts]
    md = (android / "SHIPPING.md").read_text()
    assert named_paths(md) and all((android / p).exists() for p in named_paths(md)), named_paths(md)
    assert verify(android) == []  # the glue is hashed in the manifest like every other file


def test_ios_glue_parses_and_carries_the_entitlement_the_plan_needs(tiny_qwen2, tmp_path):
    # An iPhone whose per-app limit this tiny model exceeds: the plan needs the increased-memory-limit entitlement.
    profile = (ROOT / "targets" / "ios.toml").read_text().replace('app_memory = "3.3GB"', 'app_memory = "100MB"')
    assert 'app_memory = "100MB"' in profile
    (tmp_path / "small-iphone.toml").write_text(profile.replace('name = "ios"', 'name = "small-iphone"'))
    bundle = packed(tiny_qwen2, "--target", tmp_path / "small-iphone.toml", "--quant", "Q8_0", "--part-size", "48MB",
                    "-o", tmp_path / "out")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert any(r.startswith("com.apple.developer.kernel.increased-memory-limit") for r in manifest["plan"]["requirements"])
    ship = bundle / "ship" / "ios"
    assert plistlib.loads((ship / "Model.entitlements").read_bytes()) == {
        "com.apple.developer.kernel.increased-memory-limit": True}
    tags = plistlib.loads((ship / "ODRTags.plist").read_bytes())["NSBundleResourceRequestTags"]
    assert sorted(f for t in tags.values() for f in t["files"]) == model_parts(bundle)
    swift = next(ship.glob("*.swift"))
    parses(SWIFT, swift)
    assert all(json.dumps(t) in swift.read_text() for t in tags)
    md = (bundle / "SHIPPING.md").read_text()
    assert "ENABLE_ON_DEMAND_RESOURCES = YES" in md and all((bundle / p).exists() for p in named_paths(md))


def test_web_parts_manifest_matches_its_schema_and_the_files(tiny_qwen2, tmp_path):
    bundle = packed(tiny_qwen2, "--target", "web", "-o", tmp_path)
    ship = bundle / "ship" / "web"
    parts = json.loads((ship / "parts.json").read_text())
    jsonschema.validate(parts, json.loads((ship / "parts.schema.json").read_text()))
    assert parts["format"] == "onnx" and parts["model_file"] == "model/model.onnx"
    assert sorted(p["path"] for p in parts["parts"]) == model_parts(bundle)
    for p in parts["parts"]:
        data = (bundle / p["path"]).read_bytes()
        digest = hashlib.sha256(data).digest()
        assert len(data) == p["bytes"] and p["integrity"] == "sha256-" + base64.b64encode(digest).decode()
    with pytest.raises(jsonschema.ValidationError):  # the schema does check: a bad integrity value is refused
        jsonschema.validate({**parts, "parts": [{**parts["parts"][0], "integrity": "md5-x"}]},
                            json.loads((ship / "parts.schema.json").read_text()))
    md = (bundle / "SHIPPING.md").read_text()
    assert all((bundle / p).exists() for p in named_paths(md))
    # the headers WASM threads need, and how to try them locally
    assert "Cross-Origin-Opener-Policy: same-origin" in md and "Cross-Origin-Embedder-Policy: require-corp" in md
    assert "pack serve" in md


def test_direct_targets_get_shipping_md_only(tiny_qwen2, tmp_path):
    bundle = packed(tiny_qwen2, "--quant", "Q8_0", "-o", tmp_path)
    assert (bundle / "SHIPPING.md").is_file() and not (bundle / "ship").exists()
    assert f"`{json.loads((bundle / 'manifest.json').read_text())['model_file']}`" in (bundle / "SHIPPING.md").read_text()


def test_targets_explain_shows_store_limits_with_sources():
    r = subprocess.run([sys.executable, "-m", "packager.cli", "targets", "--explain"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    android = r.stdout.split("android-flagship (play)")[1].split("\n\n")[0]
    assert re.search(r"part_size\s+1,500 MB\n\s+source: .*on-device-ai", android)
    assert re.search(r"total_cap\s+4,000 MB\n\s+source: ", android)
    ios = r.stdout.split("ios (app-store)")[1].split("\n\n")[0]
    assert re.search(r"download_cap\s+200 MB\n\s+source: .*200 MB", ios)
