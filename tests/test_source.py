"""Source resolution: local dirs, .gguf files, and hub ids through a local HF cache (no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from packager.errors import PickleRefusedError, SourceError, SourceNotFoundError
from packager.source.resolver import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo: str, model_dir: Path) -> None:
    """Lay out ``model_dir`` as huggingface_hub's cache does: blobs named by sha256, snapshot links."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("."):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, root / "blobs" / digest)
            (snap / f.name).symlink_to(Path("../../blobs") / digest)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_from_local_cache_with_revision_and_hashes(tmp_path, tiny_qwen2, offline):
    make_hub_cache(tmp_path, "edgepack-test/tiny-qwen2", tiny_qwen2)
    src = resolve("edgepack-test/tiny-qwen2", cache_dir=tmp_path, quiet=True)
    assert src.kind == "hf" and src.repo == "edgepack-test/tiny-qwen2" and src.revision == COMMIT
    assert src.name == "tiny-qwen2"
    weights = next(f for f in src.files if f.path == "model.safetensors")
    assert weights.sha256 == hashlib.sha256((tiny_qwen2 / "model.safetensors").read_bytes()).hexdigest()


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path, offline):
    with pytest.raises(SourceNotFoundError, match="not in the local HF cache"):
        resolve("edgepack-test/absent", cache_dir=tmp_path, quiet=True)


def test_local_dir_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="no config.json"):
        resolve(tmp_path, quiet=True)


def test_pickle_only_checkpoint_is_refused_without_allow_pickle(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        resolve(tmp_path, quiet=True)


def test_gguf_file_source(smollm2_gguf):
    src = resolve(smollm2_gguf, hash_files=False, quiet=True)
    assert src.kind == "gguf" and src.name == "SmolLM2-135M-Instruct"


def test_nonexistent_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no such file or directory"):
        resolve(str(tmp_path / "nope"), quiet=True)


@pytest.mark.parametrize("quiet, env, silenced", [(True, None, True), (False, "1", True), (False, None, False)])
def test_quiet_silences_the_hub_download_bars_too(tmp_path, tiny_qwen2, offline, monkeypatch, quiet, env, silenced):
    """--quiet and EDGEPACK_NO_PROGRESS=1 used to leave huggingface_hub's own bars on stderr."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    make_hub_cache(tmp_path, "edgepack-test/tiny-qwen2", tiny_qwen2)
    seen = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    if env is None:
        monkeypatch.delenv("EDGEPACK_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("EDGEPACK_NO_PROGRESS", env)
    before = are_progress_bars_disabled()
    resolve("edgepack-test/tiny-qwen2", cache_dir=tmp_path, quiet=quiet)
    assert seen == [silenced or before]
    assert are_progress_bars_disabled() == before  # restored for the host application
