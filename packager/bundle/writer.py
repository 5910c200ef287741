"""Bundles, written atomically (pack/ writes them; bundle/verify.py reads them).

A bundle is a directory with ``manifest.json`` listing every file with its size
and sha256. The writer fills a hidden temporary sibling directory, hashes what
it wrote, writes the manifest last, fsyncs, and renames the directory into
place: Ctrl-C, a full disk or an exception leave nothing that looks like a
bundle. A lock file keeps two runs from writing the same output at once; it is
removed when the run is done, so a finished pack leaves only its bundle.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager

from pathlib import Path
from typing import Any, Iterator

import psutil
from filelock import FileLock, Timeout

from packager.bundle.verify import MANIFEST, SCHEMA_VERSION, Bundle, read_bundle, safe_path, verified
from packager.errors import BundleError, BundleExistsError
from packager.interrupt import raise_pending
from packager.progress import progress_bar
from packager.source.resolver import sha256_file

PARTIAL = ".partial-"  # marks a temporary directory; never a bundle
# Attempts at the lock: a held one refuses every time, one removed by its finishing holder as we
# opened it succeeds on the next (see BundleWriter._lock).
LOCK_TRIES = 3



# A full disk, a file-size limit, a quota (EDQUOT: not on Windows).
_DISK_FULL = {e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None}


class _State(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"


class BundleWriter:
    """Write a bundle into a temporary directory, then move it into place.

    Use as a context manager: leaving the block by an exception (KeyboardInterrupt
    included) removes everything written; ``commit`` must be called to keep it.
    """

    def __init__(self, final: Path, *, force: bool = False) -> None:
        self.final = Path(final).absolute()
        self.force = force
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleError(f"cannot create output directory {parent}: {exc.strerror}; choose another with -o") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BundleError(f"output directory {parent} is not writable; choose another with -o")
        self._remove_lock = False
        self._held = self._lock(parent / f".{self.final.name}.lock")
        if self.final.exists() and not force:
            self._unlock()
            raise BundleExistsError(f"{self.final} already exists; pass --force to replace it")
        _remove_stale_partials(parent, self.final.name)
        # Created in __enter__: a Ctrl-C between this constructor and the with block would
        # otherwise leave a partial directory that no __exit__ removes.
        self.tmp = parent / f".{self.final.name}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
        self._known: dict[str, str] = {}
        self.state = _State.OPEN

    def _lock(self, path: Path) -> FileLock:
        # filelock: flock on POSIX, msvcrt.locking on Windows; released by the OS if the process dies.
        # The holder removes the file before releasing it (_unlock), so a run that opened it an instant
        # before may then lock a file no longer at ``path``: it holds nothing then, and tries again on
        # the file now there. A run that finds the lock really held is refused at once, as before.
        for _ in range(LOCK_TRIES):
            lock = FileLock(path)
            try:
                lock.acquire(timeout=0)
            except Timeout:  # held, or (filelock 4) the file went while we opened it
                continue
            current = _holds_file_at(lock, path)
            if current is False:
                lock.release()
                continue
            # Removed after the publish only where we know we hold the file at ``path`` (Windows:
            # filelock removes its own on release).
            self._remove_lock = current is True and sys.platform != "win32"
            return lock
        raise BundleError(f"another edgepack run is writing {self.final}; wait for it or choose another -o")

    def _unlock(self) -> None:
        if self._held is not None:
            if self._remove_lock:
                # Removed while still held: a run waiting on this file finds it gone and locks anew
                # (_lock), so two runs never hold a lock on the same output at once.
                Path(self._held.lock_file).unlink(missing_ok=True)
            self._held.release()
            self._held = None

    def path(self, rel: str) -> Path:
        """Where to write ``rel`` (a POSIX relative path) inside the bundle being built."""
        self._check_open()
        target = self.tmp / safe_path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, rel: str, src: Path) -> Path:
        """Copy an existing file into the bundle."""
        dst = self.path(rel)
        shutil.copyfile(src, dst)
        return dst

    def record_hash(self, rel: str, sha256: str) -> None:
        """The sha256 of a file the caller hashed as it wrote it: commit will not read it again."""
        self._known[safe_path(rel).as_posix()] = sha256

    def file_sha256(self, rel: str) -> str:
        """The sha256 of a file written into the bundle: recorded, or hashed now and recorded for commit."""
        key = safe_path(rel).as_posix()
        if key not in self._known:
            self._known[key] = sha256_file(self.path(rel))
        return self._known[key]

    def forget_hash(self, rel: str) -> None:
        """A file recorded with record_hash was removed or replaced."""
        self._known.pop(safe_path(rel).as_posix(), None)

    def add_text(self, rel: str, text: str) -> Path:
        dst = self.path(rel)
        dst.write_text(text, encoding="utf-8")
        return dst

    def commit(self, manifest: dict[str, Any], *, quiet: bool = False) -> Path:
        """Hash every file, write manifest.json last, fsync, and rename into place.

        The complete manifest (schema version and file list added) is then ``self.manifest``.
        """
        self._check_open()
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        rels = {p: p.relative_to(self.tmp).as_posix() for p in files}
        total = sum(p.stat().st_size for p in files if rels[p] not in self._known)
        entries = []
        with progress_bar(total=total, desc="hashing bundle", unit="B", quiet=quiet) as bar:
            for p in files:
                digest = self._known.get(rels[p]) or sha256_file(p, bar.update)
                entries.append({"path": rels[p], "bytes": p.stat().st_size, "sha256": digest})
                _fsync_file(p)
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": entries}
        self.manifest = manifest
        man = self.tmp / MANIFEST
        # Written aside and renamed: even the temporary directory never holds half a manifest.
        half = self.tmp / f".{MANIFEST}.writing"
        half.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _fsync_file(half)
        os.rename(half, man)
        for d in {p.parent for p in files} | {self.tmp}:
            _fsync_dir(d)
        raise_pending()  # a Ctrl-C or SIGTERM that landed in a llama.cpp callback: do not publish
        with _signals_deferred():
            self._swap_into_place()
        self._unlock()
        return self.final

    def _swap_into_place(self) -> None:
        # Runs with Ctrl-C deferred: interrupted between the swap and the removal of the old
        # bundle, a run would leave the old bundle behind in its own partial directory.
        trash = None
        if self.final.exists():
            if not self.force:
                raise BundleExistsError(f"{self.final} appeared while packing; pass --force to replace it")
            if _exchange(self.tmp, self.final):
                trash = self.tmp  # the old bundle now sits here; abort() would remove it too
            else:  # two renames: for an instant there is no bundle at self.final
                trash = self.final.parent / f".{self.final.name}{PARTIAL}old-{secrets.token_hex(4)}"
                os.rename(self.final, trash)
                os.rename(self.tmp, self.final)
        else:
            os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        self.state = _State.COMMITTED
        if trash is not None:
            # The old bundle's manifest goes first: killed mid-removal, what is left never looks complete.
            (trash / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(trash, ignore_errors=True)

    def abort(self) -> None:
        if self.state is _State.OPEN:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.state = _State.ABORTED
        self._unlock()

    def _check_open(self) -> None:
        if self.state is not _State.OPEN:
            raise BundleError(f"bundle writer for {self.final} is {self.state.value}")

    def __enter__(self) -> "BundleWriter":
        try:
            self.tmp.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.abort()  # no-op after a commit
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            # A full disk (or a file-size limit) mid-write: the partial bundle is gone already.
            raise BundleError(f"ran out of space writing {self.final} ({exc.strerror}); nothing was left behind: "
                              "free some disk space or choose another output directory with -o") from None


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them.

    Python handlers, not a signal mask: a process-directed signal blocked in this thread
    is delivered through any other thread (llama.cpp's, a thread pool's), and Python
    then raises it here anyway. Handlers can only be set from the main thread; in any
    other thread a signal never interrupts this code, so there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


def _holds_file_at(lock: FileLock, path: Path) -> bool | None:
    """Whether the file ``lock`` holds is the one at ``path`` now (False: it was removed or replaced
    after we opened it); None where filelock does not show its descriptor, and then the lock file is
    left in place, as before."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if not isinstance(fd, int):
        return None
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_stale_partials(parent: Path, name: str) -> None:
    # A run killed with SIGKILL cannot clean up: its partial directory carries its pid.
    for p in parent.glob(f".{name}{PARTIAL}*"):
        pid = p.name.rsplit(PARTIAL, 1)[1].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Replacing a bundle with two renames leaves an instant with no bundle at all: a
    SIGKILL there lost the old one and the new one (the next run removes both as
    stale partials), and a reader saw no manifest (tests/test_interrupted.py).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _fsync_file(path: Path) -> None:
    # Windows' fsync (_commit) needs a descriptor open for writing.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0) if sys.platform == "win32" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def update_bundle(path: str | os.PathLike[str], changes: dict[str, Any], texts: dict[str, str] | None = None,
                  *, quiet: bool = True) -> Bundle:
    """Replace manifest keys and small text files of a verified bundle, atomically.

    The new bundle is built as a BundleWriter does (under the same lock): the
    unchanged files are hard-linked (copied where links are refused) into the
    temporary directory with their known hashes, ``texts`` are written, the
    manifest gets ``changes``, and the directory is renamed into place. A crash
    leaves the old bundle or the new one, never a mix.
    """
    old = verified(path)
    texts = dict(texts or {})
    with BundleWriter(old.path, force=True) as bw:
        for entry in old.files:
            rel = entry["path"]
            if rel in texts:
                continue
            dst = bw.path(rel)
            try:
                os.link(old.file(rel), dst)
            except OSError:
                shutil.copyfile(old.file(rel), dst)
            bw.record_hash(rel, entry["sha256"])
        for rel, text in texts.items():
            bw.add_text(rel, text)
        manifest = {k: v for k, v in old.manifest.items() if k not in ("schema_version", "files")}
        bw.commit({**manifest, **changes}, quiet=quiet)
    return read_bundle(old.path)
