"""One owner per folder: one preparation per prepared corpus, one training run per ``run.name``.

Two preparations writing one folder would interleave shards of different symbol tables, and two runs
of one name would interleave their metrics, checkpoints and reports, silently. :func:`hold_lock` takes
the folder for the length of a ``with`` block, or refuses with an error naming the other owner.

The lock is the file ``<folder>/.vallex.lock``, holding the owner's record (host, pid, start time, what
it is doing, its command line with credentials masked) as JSON. It is removed when the block ends.

- **A local (or mounted) folder**: the file is created and held under ``fcntl.flock`` for the whole
  block. The kernel drops a flock when its process dies, however it dies, so a lock a killed run left
  is free at once; its record, naming a dead process on this host, is taken over with a log line.
  The record of a process on *another host* cannot be checked from here: it is refused, and the
  message says to delete the file if that run is gone (Linux NFS clients turn a flock into an NFS
  lock the server arbitrates across hosts; on a mount with ``nolock``/``local_lock`` the record is
  the only guard).
- **A URI** (``s3://``, ``gs://``): pyarrow 26 cannot make a conditional write ("create only if
  absent", apache/arrow#44281), so the lock is best effort: the record is written when none is there
  and read back after a pause to check that it is still ours. Two starts within that pause can both
  proceed; a crash leaves the record, taken over only when it names a dead process on this host.

``wait=True`` waits for the owner instead of refusing (local folders only): how several workers that
each want the demo corpus share it, one generating and the others then finding it done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from vallex.files import filesystem, is_uri, join

log = logging.getLogger("vallex.locks")

LOCK_NAME = ".vallex.lock"
URI_SETTLE_S = 1.0  # how long a URI lock waits before reading its record back
_HELD: set[str] = set()  # lock files this process holds (a second acquire here is refused clearly)


class LockError(RuntimeError):
    """The folder is held by another owner (the message names it and what to do)."""


_SECRET = re.compile(
    r"(://[^/:@\s]+:)[^@\s]+@|((?:token|secret|password|passwd|key)[^=\s]*=)\S+", re.IGNORECASE
)


def _command() -> str:
    """This process's command line, shortened, with credentials (``user:pass@`` in a URI, the value of
    an argument named like a token/secret/password/key) masked: the record sits in shared storage."""
    text = " ".join(sys.argv) or sys.executable
    text = _SECRET.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", text)
    return text if len(text) <= 300 else text[:297] + "..."


def _record(purpose: str, token: str) -> dict:
    return {
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_unix": time.time(),
        "command": _command(),
        "token": token,
    }


def holder_summary(record: dict | None) -> str:
    """An owner record for a message: what, where, since when, and how it was started."""
    if not record:
        return "an owner that left no record"
    return (
        f"{record.get('purpose', '?')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
        f"started {record.get('started', '?')}, command: {record.get('command', '?')})"
    )


def _process_gone(record: dict) -> bool:
    """Whether the record's process, on this host, is gone: no such pid, or the pid now belongs to a
    process started after the lock was taken (a reused pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        pass
    try:
        import psutil

        return psutil.Process(pid).create_time() > float(record.get("started_unix", 0)) + 1.0
    except ImportError:
        return False
    except Exception:  # psutil.NoSuchProcess and the like: gone between the two checks
        return True


def _parse(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _refusal(path: str, record: dict | None, why: str) -> LockError:
    return LockError(
        f"{path} is held by {holder_summary(record)}: {why}. Two writers would interleave their files. Wait for "
        f"it to finish or stop it, or use another folder (another run.name / run.prepared_dir); if that "
        f"process is gone for good, delete {path}"
    )


@contextlib.contextmanager
def hold_lock(folder: str | os.PathLike, purpose: str, *, wait: bool = False) -> Iterator[dict]:
    """Own ``folder`` (a local path or a URI) for the ``with`` block; yields this owner's record.

    Raises :class:`LockError` naming the other owner when the folder is held (``wait=False``).
    """
    if is_uri(folder):
        if wait:
            raise ValueError(f"{folder}: waiting for a lock is supported on local folders only")
        with _hold_uri(join(folder, LOCK_NAME), purpose) as record:
            yield record
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, LOCK_NAME))
    if path in _HELD and not wait:  # (waiters, e.g. threads, queue on the flock instead)
        raise LockError(f"{path} is already held by this process: one {purpose} per folder at a time")
    fd = _acquire_local(path, purpose, wait)
    record = _record(purpose, uuid.uuid4().hex)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record, indent=1) + "\n").encode(), 0)
        os.fsync(fd)
        if not wait:
            _HELD.add(path)
        yield record
    finally:
        if not wait:
            _HELD.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)  # unlinked before the flock is dropped: see _acquire_local
        os.close(fd)


def _acquire_local(path: str, purpose: str, wait: bool) -> int:
    """An fd of ``path`` under our exclusive flock, whose stale record (if any) may be overwritten."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                record = _parse(Path(path).read_text(errors="replace")) if os.path.exists(path) else None
                raise _refusal(path, record, "it is running now") from None
            # The owner before us unlinks the file before dropping its flock: if the name now points
            # at another file (or none), our flock is on a dead file; start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            if record and not wait:
                if record.get("host") != socket.gethostname():
                    raise _refusal(path, record, "its host's processes cannot be checked from here")
                if not _process_gone(record):
                    raise _refusal(path, record, "that process is alive")
                log.warning("%s: taking over the lock of %s, which is gone", path, holder_summary(record))
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


@contextlib.contextmanager
def _hold_uri(location: str, purpose: str) -> Iterator[dict]:
    fs, path = filesystem(location)

    def read() -> dict | None:
        try:
            with fs.open_input_stream(path) as f:
                return _parse(f.read().decode("utf-8", "replace"))
        except FileNotFoundError:
            return None

    theirs = read()
    if theirs is not None:
        if theirs.get("host") != socket.gethostname():
            raise _refusal(location, theirs, "its host's processes cannot be checked from here")
        if not _process_gone(theirs):
            raise _refusal(location, theirs, "that process is alive")
        log.warning("%s: taking over the lock of %s, which is gone", location, holder_summary(theirs))
    record = _record(purpose, uuid.uuid4().hex)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record, indent=1).encode())
    time.sleep(URI_SETTLE_S)  # a writer that started at the same moment has overwritten it by now
    now = read()
    if not now or now.get("token") != record["token"]:
        raise _refusal(location, now, "it started at the same moment as this one")
    try:
        yield record
    finally:
        with contextlib.suppress(OSError):
            if (read() or {}).get("token") == record["token"]:
                fs.delete_file(path)


def locked(folder_of: Callable[..., str | os.PathLike], purpose_of: Callable[..., str]):
    """Decorate a function to run under :func:`hold_lock`; ``folder_of`` / ``purpose_of`` get the call's
    arguments. (How the training driver takes its run's folder without re-indenting its body.)"""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with hold_lock(folder_of(*args, **kwargs), purpose_of(*args, **kwargs)):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
