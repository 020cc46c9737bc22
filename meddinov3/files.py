"""Files: atomic writing (a reader, or a crash, never sees a half-written file), JSON, and paths kept as the user
named them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffix (e.g. `.nii.gz`) so writers that choose a format from the
    file name still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the permissions a plain open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it onto `path` only if the block succeeds.

    An existing `path` is replaced only with `overwrite` (swapped out, then removed), so readers see either the
    old folder or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp creates 0700
        for file in tmp.rglob("*"):  # some writers (safetensors) create 0600: the permissions a plain open() gives
            if file.is_file():
                os.chmod(file, 0o666 & ~mask)
        if not path.exists():
            os.replace(tmp, path)
        elif not overwrite:
            raise FileExistsError(f"{path}: already exists")
        else:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file (or link) replaced by the folder
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (status files are polled by other processes while being rewritten)."""
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike):
    """The JSON in `path` (UTF-8 whatever the locale: names and descriptions may hold any character)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_new_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Any output file: an existing file is the user's unless `overwrite` (FileExistsError), and its folder must
    accept a new file (ValueError)."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path}: output already exists (pass --overwrite to replace it)")
    check_writable(path)


def check_writable(path: str | os.PathLike) -> None:
    """Fail before a long inference, not after it: the output's folder (or, as missing folders are created, its
    nearest existing parent) must accept a new file. Tried for real: permission bits say nothing for root or
    read-only file systems."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: cannot write there ({folder} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".meddinov3-write-test-", dir=folder)
    except OSError as e:
        raise ValueError(f"{path}: cannot create a file in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def read_json_or(path: str | os.PathLike, default=None):
    """The JSON in `path`, or `default` where there is none (missing, unreadable, not JSON): for files that are
    listed or polled (model folders, job folders read every second), where a bad file must never raise."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default


def absolute_path(path: str | os.PathLike) -> Path:
    """`path` absolute, `~` and `..` resolved, symbolic links kept (what the user named)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def absolute_paths(options: dict, paths: tuple[str, ...], paths_if_existing: tuple[str, ...] = ()) -> dict:
    """`options` with the values under `paths` (strings or lists of them) made absolute, and those under
    `paths_if_existing` when they name an existing file or folder (else they are model names): config.json then
    works from any working directory (`--resume`, `--config`)."""

    def absolute(value):
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return str(absolute_path(value)) if isinstance(value, str) and value else value

    out = dict(options)
    for key in set(paths) & set(out):
        out[key] = absolute(out[key])
    for key in set(paths_if_existing) & set(out):
        if isinstance(out[key], str) and Path(out[key]).expanduser().exists():
            out[key] = absolute(out[key])
    return out
