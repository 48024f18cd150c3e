"""GPU slot leasing with fake device ids: concurrent processes get distinct devices."""
import os
import subprocess
import sys
import time

import pytest

from jdnas import gpu
from jdnas.errors import JdnasError
from conftest import cli_env

HOLDER = """
import sys, time
from pathlib import Path
from jdnas.gpu import lease_gpu
dev = lease_gpu(Path(sys.argv[1]), timeout_s=float(sys.argv[2]), poll_s=0.05)
print(dev, flush=True)
time.sleep(float(sys.argv[3]))
"""


def _spawn(lock_dir, devices, timeout=10.0, hold=3.0):
    env = {**cli_env(), "JDNAS_GPUS": devices}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(timeout), str(hold)],
                            env=env, stdout=subprocess.PIPE, text=True)


def test_concurrent_jobs_get_distinct_devices(tmp_path):
    procs = [_spawn(tmp_path, "0,1,2") for _ in range(3)]
    devs = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.kill()
        p.wait()
    assert sorted(devs) == ["0", "1", "2"]


def test_slot_freed_when_holder_dies(tmp_path):
    first = _spawn(tmp_path, "7", hold=60)
    assert first.stdout.readline().strip() == "7"
    waiter = _spawn(tmp_path, "7", timeout=30, hold=0)
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting: the only slot is taken
    first.kill()  # crash: the kernel drops the lock
    first.wait()
    assert waiter.stdout.readline().strip() == "7"
    waiter.wait(timeout=30)


def test_lease_sets_env_and_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("JDNAS_GPUS", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    try:
        assert gpu.lease_gpu(tmp_path) == "3"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
        holder = _spawn(tmp_path, "3", timeout=0.2, hold=0)
        assert holder.wait(timeout=30) != 0  # no free device: a clear error, non-zero exit
    finally:
        gpu.release_all()


def test_no_device_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JDNAS_GPUS", "")
    with pytest.raises(JdnasError, match="list no device"):
        gpu.lease_gpu(tmp_path)


def test_cuda_on_a_machine_without_gpus_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("JDNAS_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(JdnasError, match="no CUDA device .set device: cpu"):
        gpu.lease_gpu(tmp_path)


def test_slurm_jobs_do_not_share_lock_files(tmp_path):
    """Two SLURM jobs on one node both see their own GPU as device 0: neither waits for the other."""
    script = "from jdnas.gpu import lease_gpu; print(lease_gpu(timeout_s=0.2, poll_s=0.05), flush=True); " \
             "import time; time.sleep(3)"
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**cli_env(), "JDNAS_GPUS": "0", "JDNAS_GPU_LOCK_DIR": str(tmp_path),
                                   "SLURM_JOB_ID": job}) for job in ("101", "102")]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["0", "0"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(d.name for d in tmp_path.iterdir()) == ["slurm-101", "slurm-102"]
