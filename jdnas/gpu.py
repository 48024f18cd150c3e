"""Race-free GPU slot leasing for concurrent jobs.

Snakemake counts GPUs (`--resources gpu=N`) but never says which device a job may use. A job
therefore takes a device itself: it holds an exclusive `flock` on `<lock_dir>/gpu<i>.lock` for
the first free i and exports CUDA_VISIBLE_DEVICES=i before CUDA initialises. The kernel drops
the lock when the process ends, crashed or not, so a slot is never leaked. Inside a SLURM job,
which SLURM has already given its devices, the locks live in a folder of that job.

The device ids come from JDNAS_GPUS (e.g. "0,1", also how tests fake devices on CPU), else
from CUDA_VISIBLE_DEVICES, else from torch.cuda.device_count().
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


def lease_gpu(lock_dir: Path | None = None, timeout_s: float = 3600.0, poll_s: float = 0.5) -> str:
    """Take the first free device id, hold it for the life of this process, and export it.

    Waits up to `timeout_s` when every device is taken (another workflow may share the machine).
    `lock_dir` defaults to `default_lock_dir()`.
    """
    lock_dir = default_lock_dir() if lock_dir is None else lock_dir
    devices = visible_devices()
    if not devices:
        if any(os.environ.get(v) is not None for v in ("JDNAS_GPUS", "CUDA_VISIBLE_DEVICES")):
            raise JdnasError("gpu: a GPU job was started but JDNAS_GPUS / CUDA_VISIBLE_DEVICES list no device")
        raise JdnasError("params: device asks for CUDA but this machine has no CUDA device (set device: cpu)")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for dev in devices:
            f = open(lock_dir / f"gpu{dev}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _held.append(f)
            os.environ["CUDA_VISIBLE_DEVICES"] = dev
            return dev
        if time.monotonic() > deadline:
            raise JdnasError(f"gpu: no free device among {','.join(devices)} after {timeout_s:.0f}s ({lock_dir})")
        time.sleep(poll_s)


def release_all() -> None:
    """Free every slot this process holds (normally left to process exit)."""
    while _held:
        f = _held.pop()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
