"""Paths that may be local or in a bucket (``gs://...``), through etils.epath (the layer orbax uses; on
GCS it goes through gcsfs). Everything that names a file or directory a user passes (workdirs, data,
model directories) goes through here, so ``gs://`` works wherever a local path does.

Some readers only take local directories (transformers' ``from_pretrained`` for tokenizers and
processors): ``local_dir`` copies a remote directory once per process into a temporary folder;
``upload_dir`` copies a folder written locally to its remote destination.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

from etils import epath

from mllm_jax.errors import ConfigError

SCHEMES = ("gs://",)


def is_remote(path: str) -> bool:
    return str(path).startswith(SCHEMES)


def _remote_scheme(path: str) -> bool:
    return "://" in str(path)


def check(path: str, what: str) -> str:
    """A path that names a storage we cannot read is an error in words, not a local dir named ``gs:``."""
    if _remote_scheme(path) and not is_remote(path):
        raise ConfigError(f"{what}={path!r}: only local paths and {', '.join(SCHEMES)} are supported")
    return path


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def resolve(path: str) -> str:
    """Absolute for local paths (orbax wants them), unchanged for remote ones."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    if not is_remote(path):  # buckets have no directories: writing an object creates its "folders"
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return sorted(p.name for p in epath.Path(path).iterdir())
    return sorted(os.listdir(path))


def open_file(path: str, mode: str = "r"):
    """``open`` for local paths, a file object on the bucket for remote ones (no append mode there)."""
    if is_remote(path):
        if "a" in mode:
            raise ValueError(f"{path}: appending is not possible on {path.split('://')[0]}://")
        return epath.Path(path).open(mode)
    return open(path, mode)  # noqa: SIM115 - the caller closes it


def read_text(path: str) -> str:
    with open_file(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Atomic: a reader sees the old or the new file, never a partial one (a bucket object is written
    whole; a local file is written beside and renamed)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def glob(directory: str, pattern: str) -> list[str]:
    return sorted(str(p) for p in epath.Path(directory).glob(pattern))


@functools.lru_cache(maxsize=32)
def local_dir(path: str) -> str:
    """``path`` itself when local; else a local copy of the remote directory (made once per process)."""
    if not is_remote(path):
        return path
    root = tempfile.mkdtemp(prefix="mllm_jax_remote_")
    _download(epath.Path(path), root)
    return root


def _download(src: epath.Path, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            _download(child, os.path.join(dst, child.name))
        else:
            with child.open("rb") as f, open(os.path.join(dst, child.name), "wb") as out:
                shutil.copyfileobj(f, out)


def upload_dir(local: str, remote: str) -> None:
    """Copy a local folder's files (recursively) to ``remote``."""
    for name in sorted(os.listdir(local)):
        src = os.path.join(local, name)
        if os.path.isdir(src):
            upload_dir(src, join(remote, name))
        else:
            with open(src, "rb") as f, epath.Path(join(remote, name)).open("wb") as out:
                shutil.copyfileobj(f, out)


class Staged:
    """``with Staged(out) as d:`` write into ``d``; on success it lands in ``out`` (a local ``out`` is
    written in place; a remote one is written to a temporary folder and uploaded)."""

    def __init__(self, out: str):
        self.out = out
        self._tmp = tempfile.mkdtemp(prefix="mllm_jax_out_") if is_remote(out) else None

    def __enter__(self) -> str:
        return self._tmp or self.out

    def __exit__(self, kind, value, tb):
        if self._tmp is None:
            return
        try:
            if kind is None:
                upload_dir(self._tmp, self.out)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
