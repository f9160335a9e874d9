"""Outputs that are whole or absent: one lifecycle for every command that writes, one writer
per output, atomic files and directories, and no temp data left behind by a run that was
killed.

- `claim(out, overwrite=...)`: the lifecycle of every command that writes (embed,
  dataset-embeddings, eval, train, convert): process 0 locks OUT, an existing OUT is refused
  (`OutputExistsError`, one message) unless the command may replace it, every process
  learns the outcome before any work, and all wait for each other at the end.

- `output_lock(out)`: an OS lock (`flock`) on `OUT.lock` beside the output for the whole
  run, so a second run on the same output fails at once naming the first one's pid. The
  kernel drops the lock when its process dies, even by SIGKILL, so a killed run's lock is
  taken over by the next run; a clean exit removes the lock file.
- `atomic_dir(out)` / `atomic_file(out)`: write under a hidden temp name beside `out`
  (`.OUT.tmp-<pid>-<host>-<random>`) and rename on success. The name carries its owner, so
  the next atomic write in the same directory removes the temps of processes that are gone
  (never a live process's, nor one from another host).
- Creating anything in a directory that cannot be written (read-only, not a directory) is a
  `UserError` naming that directory, not a raw `OSError`; inside `claim`, so is any write
  that fails for want of room or rights (a full disk, a quota, a read-only file system):
  one line naming the file and the cause, whichever library wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import distributed, storage
from .validation import UserError

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# `.NAME.tmp-PID-HOST-RANDOM` (or `.old-`): tempfile's random part has no "-".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-(?P<host>.+)-[a-z0-9_]+$")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NOT_A_DIR = (errno.ENOTDIR, errno.EEXIST)  # mkdir over a file: EEXIST, or ENOTDIR below it
# A write that fails for want of room or rights: a full disk, a quota, a read-only file
# system, a file-size limit.
_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# The errno in the message of a library that raises no OSError: tensorstore's ValueError
# (also under orbax; "[os_error_code='28']", and the path it wrote) and safetensors'
# SafetensorError (Rust's io::Error: "File too large (os error 27)"). Read in one place,
# `_foreign_os_error`; tests/test_hardening.py makes both libraries fail for real and fails
# loudly if an upgrade changes the text.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")
_PATH_IN_TEXT = re.compile(r'local file "([^"]+)"|at path "([^"]+)"')


@contextlib.contextmanager
def _creating_in(directory: Path, out: Path):
    """Turns the OSError of creating an entry in `directory` (for `out`) into one line
    naming the directory at fault."""
    try:
        yield
    except OSError as e:
        # The directory the failed entry was to be created in.
        where = Path(e.filename).parent if e.filename else directory
        if e.errno in _NOT_WRITABLE:
            raise UserError(f"cannot write {out}: {where} is not writable ({e.strerror})") \
                from None
        if e.errno in _NOT_A_DIR:
            blocker = next((p for p in (directory, *directory.parents)
                            if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise UserError(f"cannot write {out}: {blocker} is a file, not a directory") \
                    from None
        raise


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, one in its chain of causes, or the one a library
    that raises no OSError (tensorstore, safetensors) describes in its message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error
        if isinstance(error, _message_only_errors()) and (found := _foreign_os_error(error)):
            return found
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


@functools.cache
def _message_only_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose libraries put an errno only in the message: tensorstore's
    (ValueError, for any failed status) and safetensors' SafetensorError."""
    from safetensors import SafetensorError

    return ValueError, SafetensorError


def _foreign_os_error(error: BaseException) -> OSError | None:
    """The one place that reads an errno (and path) out of a message (`_ERRNO_IN_TEXT`)."""
    found = _ERRNO_IN_TEXT.search(str(error))
    if found is None:
        return None
    code = int(found[1] or found[2])
    path = _PATH_IN_TEXT.search(str(error))
    return OSError(code, os.strerror(code), path and (path[1] or path[2]))


@contextlib.contextmanager
def _writing(out: str):
    """A write under `out` that fails for want of room or rights becomes one line naming
    the file and the cause, whoever wrote (Python, tensorstore, orbax, safetensors). Every
    output is committed atomically, so nothing left behind claims to be complete, and the
    same command, run again, resumes what it can."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if storage.is_url(out) and (failure := storage.store_failure(e)):
            raise UserError(f"cannot write {out}: the store failed ({failure}); nothing was "
                            "marked complete: run the same command again once it is back") \
                from None
        error = os_error(e)
        if error is None or error.errno not in _CANNOT_WRITE:
            raise
        where = Path(error.filename) if error.filename else Path(out)
        if temp := _TEMP_NAME.match(where.name):  # a temp file: the output it was to become
            where = where.with_name(temp["name"])
        raise UserError(f"cannot write {where}: {error.strerror} (nothing was marked "
                        "complete; run the same command again once it can write)") from None


class OutputExistsError(UserError):
    """The output is there and this run may not replace it."""

    def __init__(self, out, remedy: str = "pass --overwrite to replace it"):
        super().__init__(f"{out} already exists ({remedy})")


@contextlib.contextmanager
def claim(out: str | Path, *, overwrite: bool = False,
          exists: Callable[[str], bool] | None = None, remedy: str | None = None,
          alone: bool = False):
    """The block owns `out` on every process of the run.

    Process 0 holds `output_lock(out)` throughout (a remote path has no local lock), so a
    second run on the same output stops here, at once, naming the first one's pid. Unless
    `overwrite`, an output for which `exists(out)` is refused with `OutputExistsError`
    (`remedy` says what to do instead); with `overwrite` the old output stays until the
    block replaces it, so that a run that fails on its input loses nothing. Every process
    raises if any did, and all meet at a barrier when the block ends. A write that fails for
    want of room or rights is a one-line `UserError` (`_writing`). `alone`: this
    process's own output (a conversion into its host's cache), claimed without the others."""
    out = str(out)
    exists = exists or (storage.exists if storage.is_url(out) else os.path.exists)
    with contextlib.ExitStack() as stack:
        def check():
            if not (alone or distributed.is_main()):
                return
            if storage.is_url(out):
                storage.check_bucket(out)  # a missing bucket or refused credentials: now
                stack.enter_context(remote_lock(out))
            else:
                with _writing(out):  # the lock file holds the pid: a full disk fails here
                    stack.enter_context(output_lock(out))
            if not overwrite and exists(out):
                raise OutputExistsError(out, *(() if remedy is None else (remedy,)))
        if alone:
            check()
            with _writing(out):
                yield
            return
        distributed.all_succeed(check, "claiming the output")
        with _writing(out):
            yield
        distributed.barrier(f"finished {out}")


def _make_parents(out: Path) -> list[Path]:
    """Creates `out`'s missing parent directories; returns them, deepest first."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    with _creating_in(out.parent, out):
        out.parent.mkdir(parents=True, exist_ok=True)
    return made


def _temp_prefix(out: Path, kind: str = "tmp") -> str:
    return f".{out.name}.{kind}-{os.getpid()}-{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(directory: str | Path) -> list[Path]:
    """Removes the temp files and dirs in `directory` that atomic writes of processes of this
    host that are gone left behind (killed mid-write); returns what it removed."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if not match or match["host"] != _HOST or _alive(int(match["pid"])):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(out: str | Path):
    """Holds an exclusive OS lock on `OUT.lock` (beside `out`) while the block runs.

    Another run holding it: `UserError("OUT is being written by another run (pid N)")`, at
    once. A lock left by a killed run is free again (the kernel released it) and is taken
    over. The lock file holds the owner's pid and is removed when the block ends. Not
    reentrant: a process locks each output once.
    """
    out = Path(out).absolute()
    lock = out.parent / f"{out.name}.lock"
    made = _make_parents(out)
    while True:
        with _creating_in(out.parent, out):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(f"{out} is being written by another run "
                            f"(pid {holder or 'unknown'})") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous owner may have removed the file between our open and flock: then
        # this lock guards nothing; start again on the path's current file.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked: no one can hold a lock on this file
        os.close(fd)
        for parent in made:  # directories made only for this output, if it left none
            with contextlib.suppress(OSError):
                parent.rmdir()


LEASE_SECONDS = 60.0  # a remote lock not renewed for this long belongs to a dead run


@contextlib.contextmanager
def remote_lock(out: str):
    """`output_lock` on an object store: the object `OUT.lock`, created only if absent (the
    store's conditional create: GCS ifGenerationMatch=0, S3 If-None-Match: *), holding the
    owner's host, pid and lease expiry, renewed every LEASE_SECONDS / 4 while the block runs
    and deleted when it ends. A lock whose owner is gone (a dead pid on this host, or a lease
    past its expiry) is taken over: a killed run's output resumes as a local one does."""
    lock = out.rstrip("/") + ".lock"
    done = threading.Event()

    def record() -> bytes:
        return json.dumps({"host": _HOST, "pid": os.getpid(),
                           "expires": time.time() + LEASE_SECONDS}).encode()

    if not storage.create(lock, record()):
        found = json.loads(storage.read(lock) or b"{}")
        if _stale(found):
            storage.delete(lock)
        if not (_stale(found) and storage.create(lock, record())):
            raise UserError(f"{out} is being written by another run (pid "
                            f"{found.get('pid', 'unknown')} on {found.get('host', '?')})")

    def renew():
        while not done.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(Exception):  # the run's own writes report the store
                storage.write(lock, record())

    threading.Thread(target=renew, daemon=True, name="cde-jax lock lease").start()
    try:
        yield lock
    finally:
        done.set()
        with contextlib.suppress(Exception):
            storage.delete(lock)


def _stale(found: dict) -> bool:
    if found.get("host") == _HOST and isinstance(found.get("pid"), int):
        return not _alive(found["pid"])
    return float(found.get("expires", 0)) < time.time()


def _read_pid(fd: int) -> str:
    """The pid in a lock file another process holds (it writes it right after locking)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return ""


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False):
    """Yields a temp dir beside `out`; renamed to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out, "pass overwrite=True to replace it")
    _make_parents(out)
    remove_orphans(out.parent)
    with _creating_in(out.parent, out):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@functools.cache
def _umask() -> int:
    """The process umask, read once: from /proc (Linux), else by setting it and back, under
    a lock, the first time (a later flip could race with threads creating files)."""
    with _UMASK_LOCK:
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_file(out: str | Path, mode: str = "wb"):
    """Yields a file object on a temp name beside `out`; fsynced and renamed on success. A
    gs:// or s3:// `out`: a buffer, written in one PUT (whole or absent) on success."""
    if storage.is_url(out):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        storage.write(str(out), data if isinstance(data, bytes) else data.encode())
        return
    out = Path(out)
    _make_parents(out)
    remove_orphans(out.parent)
    with _creating_in(out.parent, out):
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
