"""Files in a local folder or in cloud storage, and atomic writes.

A *location* is a local path or a URI (``s3://bucket/key``, ``gs://bucket/key``): what a config
names. Local files are written to a temporary file renamed into place, so a reader, or a run killed
mid-write, sees the old file or the new one, never half. To a URI the whole payload is built in memory
first (text encoded, a Parquet file written into a buffer) and then sent in one upload, so an error
while building it creates no object at all. An upload that fails leaves the old object (or none): an
object store makes an object visible only when its upload completes, and an object a failing upload
did create (pyarrow's output streams commit what they hold when closed) is deleted again.
URIs go through ``pyarrow.fs.FileSystem.from_uri``, which takes credentials from the standard places
(``AWS_*`` environment variables, ``~/.aws``, an instance profile; ``GOOGLE_APPLICATION_CREDENTIALS``
or the VM's service account for GCS).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``: a URI stays a URI, a local path stays a local path."""
    location = str(location)
    if is_uri(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds ``location`` and the path inside it."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(
            f"{location}: not a storage URI pyarrow can open ({e}); use s3://bucket/path, "
            "gs://bucket/path or a local path"
        ) from None


def read_failure(location: str | os.PathLike, error: OSError) -> str:
    """Why ``location`` could not be read, for an error message: the OS's reason, plus where credentials
    come from when it is a URI (no credentials, no such bucket or no network look alike there)."""
    message = f"cannot read {location} ({error})"
    if is_uri(location):
        message += (
            "; check the URI and the credentials (the AWS_* environment variables, ~/.aws or an "
            "instance profile; for gs:// a service account)"
        )
    return message


def is_file(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_text(location: str | os.PathLike) -> str:
    """The file's text (UTF-8); ``FileNotFoundError`` if it does not exist."""
    if not is_uri(location):
        return Path(location).read_text(encoding="utf-8")
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_bytes(location: str | os.PathLike) -> bytes:
    """The file's bytes; ``FileNotFoundError`` if it does not exist."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8), whole or not at all: see :func:`write_bytes`. Text that cannot be
    encoded raises before anything is written."""
    write_bytes(location, text.encode("utf-8"))


def write_bytes(location: str | os.PathLike, data: bytes | pa.Buffer) -> None:
    """Write ``data``: locally to a temporary file renamed into place; to a URI as one upload.

    A failing upload leaves the old object, the whole new one, or none. pyarrow has no way to abort an
    output stream (closing one, which its ``with`` block does even on an exception, commits what it
    holds), so after a failure the object is checked: one that changed and is not the payload's size
    (a partial commit) is deleted; one of the payload's size is the payload (the one ``write`` call had
    completed) and is kept, as is an unchanged one (the store never committed). The check compares
    modification time and size, and object stores' times have one-second resolution: a partial commit
    of exactly the old size within the old object's second would be kept (none of vallex's writes
    rewrite a key within a second).
    """
    if not is_uri(location):
        _replace_local(location, data)
        return
    fs, path = filesystem(location)
    try:
        before = _object_version(fs, path)
    except OSError:  # no permission to read metadata: never delete after a failure
        before = "unknown"
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(Exception):
            after = _object_version(fs, path)
            if before != "unknown" and after not in (None, before) and after[1] != len(data):
                fs.delete_file(path)
        raise


def _object_version(fs: pafs.FileSystem, path: str) -> tuple | None:
    """(modification time, size) of the object at ``path``; None if there is none."""
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else (info.mtime_ns, info.size)


def list_names(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Names (not paths) of the entries directly in ``folder`` that match the glob ``pattern``, sorted;
    empty when the folder does not exist."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if fnmatch.fnmatchcase(info.base_name, pattern))


def remove(location: str | os.PathLike) -> None:
    """Delete a file; one that is already gone is fine."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def _replace_local(path: str | os.PathLike, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to a unique temporary file beside the local ``path``, fsync it, then rename it
    into place: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Render a matplotlib figure as PNG, write it whole or not at all (:func:`write_bytes`), close it:
    the one way vallex writes a plot, so a reader never sees half a PNG."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    _replace_local(path, buf.getvalue())
