"""Atomic artifact writes: write to a temporary name in the same folder, then rename.

A killed job therefore never leaves a half-written output that looks finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from jdnas.errors import JdnasError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path, required: Iterable[str] = ()) -> Any:
    """A JSON artifact a stage wrote, read back; a `JdnasError` naming the file when it is missing,
    is not JSON or lacks one of the `required` keys (a damaged or hand-edited artifact)."""
    path = Path(path)
    if not path.is_file():
        raise JdnasError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JdnasError(f"{path}: not valid JSON ({e})") from None
    for key in required:
        if not isinstance(obj, dict) or key not in obj:
            raise JdnasError(f"{path}: missing key '{key}' (a damaged artifact: rerun the stage that wrote it)")
    return obj


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically. A write that fails on a full disk is an OSError(ENOSPC) naming the
    file (torch reports it as a RuntimeError that does not say why)."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if "write" not in str(e).lower() or shutil.disk_usage(Path(tmp).parent).free > (64 << 20):
                raise
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resume_dir(folder: str | Path, fingerprint: str) -> bool:
    """Make `folder` hold results for `fingerprint` (a hash of what produced them): if it holds
    another run's results, empty it. Returns True when earlier results of this run were kept.

    For stages that resume from the files they already wrote (DVC `persist` outputs): a changed
    param or input must not resume from stale files.
    """
    folder = Path(folder)
    stamp = folder / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return True
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(fingerprint + "\n")
    return False
