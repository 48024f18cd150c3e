"""Atomic artifact writes: write to a temporary name in the same folder, then rename.

A killed job therefore never leaves a half-written output that looks finished.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from jdnas.errors import JdnasError

if TYPE_CHECKING:  # torch is imported where it is used: a job that only moves files need not load it
    import torch


OUTPUT_MARKER = ".jdnas-output"  # in every folder atomic_dir made: a later run may replace it
TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    """Hidden temporaries of `path` are named `.NAME.PID.RANDOM.tmp` (PID: the writing process)."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def clean_stale_tmp(path: str | Path, max_age_s: float = 6 * 3600) -> list[Path]:
    """Remove the hidden temporaries a killed writer of `path` left beside it (`.NAME.PID.*.tmp`
    whose PID no longer runs; older unnamed ones `.NAME.*.tmp` after `max_age_s`). A live writer's
    temporary (a concurrent run) is left alone. Returns what was removed."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.glob(f".{glob_escape(path.name)}.*{TMP_SUFFIX}"))
    except OSError:
        return removed
    for tmp in siblings:
        middle = tmp.name[len(path.name) + 2: -len(TMP_SUFFIX)].split(".")
        try:
            if middle[0].isdigit() and len(middle) == 2:
                stale = not _alive(int(middle[0])) and int(middle[0]) != os.getpid()
            else:
                stale = time.time() - tmp.lstat().st_mtime > max_age_s
            if not stale:
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue  # vanished meanwhile, or not ours to remove
    return removed


def glob_escape(name: str) -> str:
    return glob.escape(name)


def _make_parent(path: Path) -> None:
    """Create `path`'s folder; a JdnasError when a part of it is a file."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise JdnasError(f"{path}: {parent} is a file, not a folder: choose another path")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    Temporaries a killed earlier writer of `path` left are removed first."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    _make_parent(path)
    clean_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_own_output(path: str | Path, legacy: Iterable[str] = ()) -> bool:
    """Whether the folder `path` is one a jdnas command made (its marker file, or every one of the
    `legacy` files that such a folder held before markers existed), or an empty folder."""
    path = Path(path)
    if (path / OUTPUT_MARKER).is_file():
        return True
    legacy = tuple(legacy)
    if legacy and all((path / name).is_file() for name in legacy):
        return True
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_dir(path: str | Path, command: str = "jdnas", legacy: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    The folder gets a marker file (`OUTPUT_MARKER`, naming `command`); an existing `path` is
    replaced only if it carries one (or the `legacy` files, or is empty): a folder jdnas did not
    make, e.g. the user's images, is never deleted. Temporaries of killed earlier runs are removed."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise JdnasError(f"{path}: exists and is not a folder jdnas made ({'a link' if path.is_symlink() else 'a file'}): "
                             "choose another --out or remove it yourself")
        if not is_own_output(path, legacy):
            raise JdnasError(f"{path}: exists and was not made by {command} (no {OUTPUT_MARKER} in it): refusing to "
                             "replace it; choose another --out (e.g. a new folder) or remove it yourself")
    _make_parent(path)
    clean_stale_tmp(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent))
    try:
        (tmp / OUTPUT_MARKER).write_text(f"{command}\n")
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent))
            os.replace(path, old / "old")  # out of the way first: the new folder takes its name at once
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _resolved(p: str | Path) -> Path:
    try:
        return Path(os.path.realpath(os.path.expanduser(str(p))))
    except (OSError, ValueError, RuntimeError):
        return Path(os.path.abspath(str(p)))


def check_outputs(command: str, outputs: dict[str, Any], inputs: Any) -> None:
    """Refuse, before any work, an output that is, contains or lies inside one of the inputs:
    `outputs` and `inputs` map a label (`--out`, `data.coco.train_images`...) to a path (None:
    not given); `inputs` may also be a list of (label, path) pairs. Links are followed (a
    symlink or hard link to an input is that input)."""
    pairs = inputs.items() if isinstance(inputs, dict) else inputs
    ins = [(k, v, _resolved(v)) for k, v in pairs if v is not None and str(v) != ""]
    for out_label, out in outputs.items():
        if out is None or str(out) == "":
            continue
        o = _resolved(out)
        for in_label, given, i in ins:
            same = o == i
            if not same and os.path.exists(o) and os.path.exists(i):
                try:
                    same = os.path.samefile(o, i)
                except OSError:
                    same = False
            if same:
                how = "is"
            elif i in o.parents:
                how = "lies inside"
            elif o in i.parents:
                how = "contains"
            else:
                continue
            raise JdnasError(f"{command}: {out_label} {out} {how} the input {in_label} {given}: refusing to write "
                             "there (it could overwrite or delete the input); choose an output path outside the "
                             "inputs")


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
    import torch
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if "write" not in str(e).lower() or shutil.disk_usage(Path(tmp).parent).free > (64 << 20):
                raise
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (what a resumable state was written for)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_sha256(module: torch.nn.Module) -> str:
    """Hex SHA-256 of a module's state (names, dtypes, shapes and bytes): what a file's hash is
    for a checkpoint, for weights held in memory."""
    import torch
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        if not folder.is_dir() or (any(folder.iterdir()) and not stamp.is_file()
                                   and not (folder / OUTPUT_MARKER).is_file()):
            raise JdnasError(f"{folder}: exists and holds files no jdnas stage wrote (no {stamp.name}): refusing "
                             "to empty it; choose another output folder or remove it yourself")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(fingerprint + "\n")
    return False
