"""Bundles are complete and verified, or absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from packager.bundle.verify import read_bundle, verified, verify
from packager.bundle.writer import BundleWriter
from packager.errors import BundleError, BundleExistsError, VerificationError


def _write(out: Path, **kw) -> Path:
    with BundleWriter(out, **kw) as bw:
        bw.path("model/m.gguf").write_bytes(b"GGUF" + os.urandom(1000))
        bw.add_text("README.md", "card")
        return bw.commit({"format": "gguf", "model_file": "model/m.gguf"}, quiet=True)


def test_commit_writes_manifest_with_hashes_and_verifies(tmp_path):
    b = _write(tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    assert man["schema_version"] == 1
    assert {f["path"] for f in man["files"]} == {"model/m.gguf", "README.md"}
    assert all(len(f["sha256"]) == 64 for f in man["files"])
    assert verify(b) == []
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_exception_leaves_nothing_that_looks_like_a_bundle(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b") as bw:
            bw.path("model/m.gguf").write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_existing_output_needs_force(tmp_path):
    b = _write(tmp_path / "b")
    with pytest.raises(BundleExistsError, match="--force"):
        _write(tmp_path / "b")
    before = (b / "manifest.json").read_text()
    _write(tmp_path / "b", force=True)
    assert (b / "manifest.json").read_text() != before
    assert verify(b) == []


def test_ctrl_c_while_the_old_bundle_is_removed_still_finishes_the_swap(tmp_path, monkeypatch):
    """Regression (CI, test_interrupted): Ctrl-C while --force removed the replaced bundle left it
    behind in the run's own partial directory. Now the signal waits until the swap is done."""
    old = _write(tmp_path / "b")
    before = (old / "manifest.json").read_text()
    real_rmtree = shutil.rmtree
    sent = []

    def rmtree_after_ctrl_c(path, *a, **kw):
        if not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", rmtree_after_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # delivered, after the swap
        _write(tmp_path / "b", force=True)
    monkeypatch.undo()
    assert sent, "the old bundle was not removed through shutil.rmtree"
    assert (old / "manifest.json").read_text() != before and verify(old) == []
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["b"]


def test_second_writer_on_same_output_fails_clearly(tmp_path):
    with BundleWriter(tmp_path / "b"):
        with pytest.raises(BundleError, match="another edgepack run"):
            BundleWriter(tmp_path / "b")


def test_stale_partial_of_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / ".b.partial-999999999-abcd"
    (stale / "model").mkdir(parents=True)
    _write(tmp_path / "b")
    assert not stale.exists()


def test_verify_names_changed_added_and_missing_files(tmp_path):
    b = _write(tmp_path / "b")
    (b / "README.md").write_text("edited")
    (b / "extra.bin").write_bytes(b"x")
    (b / "model" / "m.gguf").unlink()
    problems = verify(b)
    assert any(p.startswith("README.md: changed") for p in problems)
    assert any(p.startswith("extra.bin: added") for p in problems)
    assert any(p.startswith("model/m.gguf: missing") for p in problems)
    with pytest.raises(VerificationError, match="README.md"):
        verified(b)


def test_same_size_change_in_weights_caught_only_with_full_verify(tmp_path):
    b = _write(tmp_path / "b")
    data = bytearray((b / "model/m.gguf").read_bytes())
    data[10] ^= 0xFF
    (b / "model/m.gguf").write_bytes(bytes(data))
    assert any("sha256" in p for p in verify(b))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside", "model/../../x", "a\\b", ""])
def test_manifest_paths_that_escape_are_refused(tmp_path, bad):
    b = _write(tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    man["files"].append({"path": bad, "bytes": 1, "sha256": "0" * 64})
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(VerificationError, match="unsafe path"):
        read_bundle(b)


def test_symlink_out_of_bundle_is_refused(tmp_path):
    b = _write(tmp_path / "b")
    secret = tmp_path / "secret"
    secret.write_text("card")
    (b / "README.md").unlink()
    (b / "README.md").symlink_to(secret)
    assert any("link" in p for p in verify(b))


def test_newer_schema_is_refused_with_upgrade_hint(tmp_path):
    b = _write(tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    man["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(VerificationError, match="upgrade edgepack"):
        read_bundle(b)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    with pytest.raises(BundleError, match="cannot create output directory"):
        BundleWriter(blocker / "sub" / "b")
