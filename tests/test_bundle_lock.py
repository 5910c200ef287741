"""The bundle writer's lock: two runs never write one output at once, and a finished run leaves only
its bundle (the lock file is removed while still held; a run that opened it an instant before locks
the new one instead of the removed one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from packager.bundle.writer import BundleWriter, _holds_file_at
from packager.errors import BundleError, BundleExistsError


def _write(final: Path, *, force: bool = False) -> None:
    with BundleWriter(final, force=force) as bw:
        bw.add_text("model/m.gguf", "weights")
        bw.commit({"model_file": "model/m.gguf"}, quiet=True)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX lock files (filelock removes its own on Windows)")
def test_a_finished_run_leaves_only_its_bundle(tmp_path):
    _write(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    _write(tmp_path / "b", force=True)  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(BundleExistsError):  # refused: the lock it took is gone too
        BundleWriter(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX lock files")
def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b") as bw:
            bw.add_text("model/m.gguf", "half")
            raise RuntimeError("converter failed")
    assert list(tmp_path.iterdir()) == []


def test_a_held_lock_still_refuses_a_second_run(tmp_path):
    with BundleWriter(tmp_path / "b") as bw:
        with pytest.raises(BundleError, match="another edgepack run is writing"):
            BundleWriter(tmp_path / "b", force=True)
        bw.add_text("model/m.gguf", "weights")
        bw.commit({"model_file": "model/m.gguf"}, quiet=True)
    _write(tmp_path / "b", force=True)  # free again once the first is done


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX lock files")
def test_the_lock_file_of_a_killed_run_is_taken_and_removed(tmp_path):
    (tmp_path / ".b.lock").write_text("")  # a SIGKILLed run's: the OS released its lock
    _write(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX lock files")
def test_a_lock_on_a_removed_or_replaced_file_is_not_the_lock(tmp_path):
    """What _lock checks after locking: the file it holds must be the one at the path now."""
    path = tmp_path / ".b.lock"
    lock = FileLock(path)
    lock.acquire(timeout=0)
    try:
        assert _holds_file_at(lock, path) is True
        path.unlink()  # its holder finished and removed it
        assert _holds_file_at(lock, path) is False
        path.write_text("")  # and the next run created a new one
        assert _holds_file_at(lock, path) is False
    finally:
        lock.release()


RACER = """
import os, sys
from pathlib import Path
from packager.bundle.writer import BundleWriter
from packager.errors import BundleError

final, inside, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
held = overlaps = 0
for _ in range(n):
    try:
        bw = BundleWriter(final, force=True)
    except BundleError:
        continue
    with bw:
        held += 1
        try:  # nobody else may be inside while this run holds the lock
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps += 1
            continue
        os.close(fd)
        os.unlink(inside)
print(held, overlaps)
"""


def test_racing_runs_never_hold_the_lock_together(tmp_path):
    """Runs that take and give back the lock as fast as they can, the file removed at each release:
    never two inside at once."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "b"), str(tmp_path / "inside"), "300"],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [tuple(map(int, p.communicate(timeout=300)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sum(h for h, _ in results) > 0 and sum(o for _, o in results) == 0, results
    assert not (tmp_path / "inside").exists()
