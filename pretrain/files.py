"""Files and folders that are never seen half-written: the one atomic write of the project.

A file: written to a temporary sibling (a unique name, created exclusively, so two writers never share one), flushed,
fsynced, renamed over the target with `os.replace`, and the folder fsynced so that the rename itself survives a
crash. On any failure (an exception, KeyboardInterrupt) the temporary file is removed and the old file is left as
it was. A reader, or a crash at any point, sees the old file or the new one, never a mix.

    atomic_write(path, data)                  bytes or str (UTF-8), in one call
    with atomic_writer(path, "wb") as f:      a writer that streams (torch.save(obj, f), fig.savefig(f), json.dump)
    with atomic_folder(path) as tmp:          a folder of files, renamed into place once all are written
    publish_folder(tmp, path)                 the same rename, for a folder built elsewhere (by several ranks)

The temporary file is created with mode 0o666 and a folder with 0o777, both through the process umask, as
`open(path, "w")` and `os.mkdir` would (0644 and 0755 under umask 022): outputs on a shared cluster stay readable
by colleagues. (`tempfile.mkstemp`/`mkdtemp` would give 0600/0700.)

Why here, at the bottom of `pretrain` (beside `errors`), and only the standard library: every layer of `pretrain`
writes such files, `launch/` reaches it through `pretrain.runs`, and `scripts/gpu_kit.py` imports it before
torch or anything installed. `models/` may import nothing of `pretrain` (it is model math only), so
`models.hf.save_hf` only writes an HF folder's files into the folder it is given, and whoever publishes an export
(`pretrain export-hf`) wraps it in `atomic_folder`: all-or-nothing is a property of how an output is published,
which is this module's job, not of the Hugging Face file format.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from typing import IO, Iterator

_TRIES = 100  # exclusive creation of a random name: a clash is astronomically rare, a hundred in a row impossible


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` by `data` (str: UTF-8) atomically and durably."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open temporary file ("wb", or "w": UTF-8 text) that replaces `path` when the block ends without an
    exception; when it raises, `path` is untouched and the temporary file removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer writes a whole new file: mode 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp_file(parent, os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_folder(parent)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
    """A new temporary folder beside `path`, for the block to fill; then `publish_folder(tmp, path, replace)`.
    When the block raises, the temporary folder is removed and `path` is untouched."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = _create_temp_folder(parent, os.path.basename(path), "tmp")
    try:
        yield tmp
        publish_folder(tmp, path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(src: str | os.PathLike, dst: str | os.PathLike, *, replace: bool = False) -> None:
    """Make the finished folder `src` durable (every file and folder in it fsynced) and rename it to `dst`, a sibling.

    Without `replace`, an existing `dst` other than an empty folder is a FileExistsError (the rename itself refuses
    it: no check-then-write race; `src` is left for the caller); with it, `dst` is swapped out first, put back if the
    rename fails, and removed only once `src` is in place.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    _fsync_tree(src)
    if replace and os.path.lexists(dst):
        old = _create_temp_folder(parent, os.path.basename(dst), "old")
        os.rename(dst, os.path.join(old, "previous"))
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(os.path.join(old, "previous"), dst)
            os.rmdir(old)
            raise
        fsync_folder(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "already exists (and is not an empty folder)", dst) from None
        raise
    fsync_folder(parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a crash; a no-op on filesystems that cannot
    fsync a folder (they say EINVAL)."""
    fd = os.open(os.fspath(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _create_temp_file(parent: str, name: str) -> tuple[int, str]:
    """An exclusively created, empty `.NAME.RANDOM.tmp` in `parent`: (fd, path); its mode 0o666 through the umask."""
    for _ in range(_TRIES):
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {name} in {parent}")


def _create_temp_folder(parent: str, name: str, kind: str) -> str:
    """A new, empty `.NAME.KIND-RANDOM` folder in `parent`; its mode 0o777 through the umask."""
    for _ in range(_TRIES):
        tmp = os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(6)}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {name} in {parent}")


def _fsync_tree(folder: str) -> None:
    for base, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(base)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
