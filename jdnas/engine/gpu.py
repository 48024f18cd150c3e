"""Race-free GPU slot leasing for concurrent jobs.

Snakemake counts GPUs (`--resources gpu=N`) but never says which device a job may use. A job
therefore takes a device itself: it holds an exclusive `flock` on `<lock_dir>/gpu<i>.lock` for
the first free i and exports CUDA_VISIBLE_DEVICES=i before CUDA initialises. The kernel drops
the lock when the process ends, crashed or not, so a slot is never leaked. Inside a SLURM job,
which SLURM has already given its devices, the locks live in a folder of that job.

The device ids come from JDNAS_GPUS (e.g. "0,1", also how tests fake devices on CPU), else
from CUDA_VISIBLE_DEVICES, else from torch.cuda.device_count().

A multi-GPU job (DDP under torchrun) leases its N devices once, in the parent process, and the
torchrun children inherit CUDA_VISIBLE_DEVICES with all N of them (`JDNAS_GPU_LEASED` tells a
child not to lease again).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

from jdnas.errors import JdnasError

DEFAULT_LOCK_DIR = Path(os.environ.get("JDNAS_GPU_LOCK_DIR", "/tmp/jdnas-gpu-locks"))
_held: list[IO] = []  # open lock files of this process: closing them frees the slots


def visible_devices() -> list[str]:
    """The device ids this machine offers to jobs."""
    for var in ("JDNAS_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def default_lock_dir() -> Path:
    """The lock folder: one per SLURM job inside a SLURM job, else the machine-wide one.

    SLURM has already given a job its devices, and with device cgroups every job on a node sees
    them as 0..n-1: jobs sharing a node must not compete for lock files named by those ids. The
    jobs Snakemake runs inside one allocation (salloc + local executor) still share a folder.
    """
    job = os.environ.get("SLURM_JOB_ID")
    return DEFAULT_LOCK_DIR / f"slurm-{job}" if job else DEFAULT_LOCK_DIR


LEASED = "JDNAS_GPU_LEASED"  # set by a process that leased devices: its children use them as they are


def inherited_lease() -> str | None:
    """The devices the parent leased for this process if it is a torchrun child, else None (a
    variable that leaked into another process's environment is ignored)."""
    if os.environ.get(LEASED) and "WORLD_SIZE" in os.environ:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    return None


def lease_gpus(n: int = 1, lock_dir: Path | None = None, timeout_s: float = 3600.0, poll_s: float = 0.5) -> str:
    """Take `n` free device ids, hold them for the life of this process (and of its children),
    and export them in CUDA_VISIBLE_DEVICES; returns them ("2" or "0,1,2,3").

    All or nothing: a job that finds fewer than `n` free lets go of what it took and waits, so two
    multi-GPU jobs never hold half each. Waits up to `timeout_s` (another workflow may share the
    machine). `lock_dir` defaults to `default_lock_dir()`.
    """
    lock_dir = default_lock_dir() if lock_dir is None else lock_dir
    devices = visible_devices()
    if not devices:
        if any(os.environ.get(v) is not None for v in ("JDNAS_GPUS", "CUDA_VISIBLE_DEVICES")):
            raise JdnasError("gpu: a GPU job was started but JDNAS_GPUS / CUDA_VISIBLE_DEVICES list no device")
        raise JdnasError("params: device asks for CUDA but this machine has no CUDA device (set device: cpu)")
    if n > len(devices):
        raise JdnasError(f"gpu: the job needs {n} GPUs but only {len(devices)} are visible ({','.join(devices)})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        taken: list[tuple[str, IO]] = []
        for dev in devices:
            f = open(lock_dir / f"gpu{dev}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            taken.append((dev, f))
            if len(taken) == n:
                break
        if len(taken) == n:
            for _, f in taken:
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
                _held.append(f)
            ids = ",".join(dev for dev, _ in taken)
            os.environ["CUDA_VISIBLE_DEVICES"] = ids
            os.environ[LEASED] = ids
            return ids
        for _, f in taken:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        if time.monotonic() > deadline:
            raise JdnasError(f"gpu: no {n} free device(s) among {','.join(devices)} after {timeout_s:.0f}s "
                             f"({lock_dir})")
        time.sleep(poll_s)


def release_all() -> None:
    """Free every slot this process holds (normally left to process exit)."""
    while _held:
        f = _held.pop()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
