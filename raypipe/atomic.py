"""Writing a directory all at once: into a temporary sibling, then renamed into place.

Temporary files and folders here are made with the process's umask (not `tempfile`'s 0600 /
0700): a checkpoint or a prepared dataset on a shared mount stays readable by the other users
the umask admits (a KubeRay pod, say, running as another uid).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory in `parent`, created with the umask's mode."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mode 0o777 & ~umask
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def honour_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give a file made by `tempfile.mkstemp` (0600) the mode an ordinary `open` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `directory`; on success it replaces `directory`
    (readers never see a half-written one), on error it is removed and `directory` is kept.
    The old `directory` is moved aside, not deleted, until the new one is in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, f".{directory.name}.")
    try:
        yield tmp
        _replace(directory, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(directory: Path, new: Path) -> None:
    if not directory.exists():
        os.replace(new, directory)
        return
    old = temp_dir(directory.parent, f".{directory.name}.old.")
    os.replace(directory, old / "content")
    try:
        os.replace(new, directory)
    except BaseException:
        os.replace(old / "content", directory)  # the old one back where it was
        old.rmdir()
        raise
    shutil.rmtree(old)
