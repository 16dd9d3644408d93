"""Atomic writes: a crash at any moment leaves either the previous file (or folder) or
the new one, complete, never a mix.

Data is written to a temporary name beside the target, flushed to disk
(`fsync`), renamed over the target, and the rename made durable by syncing
the folder. Files get the permissions a plain `open(path, "w")` would give
(`0o666` less the umask), not the `0o600` of a temporary file.

>>> write_json("metrics.json", {"accuracy": 0.9})
>>> with atomic_path("model.npz") as tmp:
...     numpy.savez(tmp, w=w)
>>> with atomic_directory("adapter") as tmp:        # all of a folder at once
...     write_files_into(tmp)
"""

import contextlib
import ctypes
import json
import os
import shutil
import tempfile

RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path):
    """Flushes a file's or a folder's contents to disk (folders: where the OS allows)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def _sync_tree(path):
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success moves it over `path` durably.

    >>> with atomic_path("metrics.json") as tmp:
    ...     write_something(tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    """Writes `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")


def _exchange(a, b):
    """Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this file system
        return False
    raise OSError(error, os.strerror(error), a)


def _carry_over(old, new):
    """Links (or copies) into `new` what `old` holds and `new` does not (a user's own files)."""
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(target):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True)
            continue
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, target, follow_symlinks=False)


@contextlib.contextmanager
def atomic_directory(path):
    """Yields a new empty folder beside `path`; on success it replaces `path` in one step.

    Files of an existing `path` that the new folder does not write are kept.
    On Linux the two folders are swapped with `renameat2(RENAME_EXCHANGE)`, so
    `path` always holds the complete old or the complete new contents. Where
    that is not available, the old folder is renamed aside first, and a crash
    between the two renames leaves it at `.<name>.old-*` beside `path`.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.new-")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for root, _, files in os.walk(tmp):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~_umask())
        if os.path.isdir(path):
            _carry_over(path, tmp)
        _sync_tree(tmp)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            aside = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
            os.rmdir(aside)
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
