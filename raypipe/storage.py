"""Where runs and data live: a local path, a shared mount, or an object store (`s3://…`, `gs://…`).

Local paths and URIs are plain strings everywhere; this module reads and writes both through
pyarrow filesystems, the same ones Ray Data and Ray Train use, so a URI that works here works in
every Ray task and worker. Credentials and endpoints come from the environment the way pyarrow
reads them (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …): they never appear in a config or a log.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from raypipe.atomic import honour_umask


def is_remote(location: str) -> bool:
    """True for an object-store URI (`s3://bucket/key`); False for a path or `file://`."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme not in ("", "file")


def _scheme(location: str) -> str:
    return str(location).partition("://")[0]


@lru_cache(maxsize=16)
def _remote_fs(scheme: str, bucket: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths come back absolute."""
    location = str(location)
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    scheme, _, rest = location.partition("://")
    bucket = rest.split("/", 1)[0]
    return _remote_fs(scheme, bucket), rest.rstrip("/")


def normalize(location: str) -> str:
    """A local path made absolute (workers run in other directories); URIs unchanged."""
    location = str(location)
    return location.rstrip("/") if is_remote(location) else resolve(location)[1]


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return os.path.join(location, *parts)


def qualify(path: str, *, like: str) -> str:
    """A path Ray reports for a file in the store of `like` (Ray drops the scheme) as a URI."""
    path = str(path)
    if is_remote(like) and not is_remote(path):
        return f"{_scheme(like)}://{path.lstrip('/')}"
    return path


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    """A directory, or in an object store a key prefix (pyarrow reports those as directories)."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Readers never see half a file: local writes go through a renamed temp file, and an object
    store's PUT is atomic."""
    if is_remote(location):
        fs, path = resolve(location)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(resolve(location)[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        honour_umask(tmp)  # mkstemp's 0600 would hide the file from the umask's other readers
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def delete_file(location: str) -> None:
    fs, path = resolve(location)
    fs.delete_file(path)


def delete_dir(location: str) -> None:
    """Remove a directory (or an object store's key prefix) and everything under it."""
    fs, path = resolve(location)
    fs.delete_dir(path)


def upload_dir(local: str | os.PathLike, location: str, *, last: str | None = None) -> None:
    """Copy a local directory's files into `location`, file `last` after the others: a reader
    that finds `last` finds the whole directory."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: `last` moves to the end
    for p in files:
        write_bytes(join(location, *p.relative_to(local).parts), p.read_bytes())


def _uri(location: str, path: str) -> str:
    return f"{_scheme(location)}://{path}" if is_remote(location) else path


def list_files(location: str, pattern: str | None = None) -> list[str]:
    """Files under a directory (recursively), sorted, as paths or URIs like `location`;
    `pattern` filters by file name (fnmatch)."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = [
        _uri(location, i.path)
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and (pattern is None or fnmatch.fnmatch(i.base_name, pattern))
    ]
    return sorted(out)


def glob_remote(pattern: str) -> list[str]:
    """Object-store keys matching a glob, as URIs (`*` may cross `/` here: keys are flat)."""
    fs, path = resolve(pattern)
    parts = path.split("/")
    fixed = []
    for part in parts:
        if set("*?[") & set(part):
            break
        fixed.append(part)
    base = "/".join(fixed) or "/"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    matcher = re.compile(fnmatch.translate(path.replace("**/", "*").replace("**", "*")))
    return sorted(
        _uri(pattern, i.path)
        for i in infos
        if i.type == pafs.FileType.File and matcher.match(i.path)
    )


def file_stamp(location: str) -> str:
    """Size and modification time: a cheap identity of a file's content."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size}\0{mtime}"


def open_input_file(location: str):
    fs, path = resolve(location)
    return fs.open_input_file(path)
