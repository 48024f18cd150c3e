"""GPU slot leasing with fake device ids: concurrent processes get distinct devices."""
import os
import subprocess
import sys
import time

import pytest

from jdnas.engine import gpu
from jdnas.errors import JdnasError
from conftest import cli_env

HOLDER = """
import sys, time
from pathlib import Path
from jdnas.engine.gpu import lease_gpus
dev = lease_gpus(1, Path(sys.argv[1]), timeout_s=float(sys.argv[2]), poll_s=0.05)
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
    # setenv, not delenv: monkeypatch restores only what it recorded, and the lease sets both
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv(gpu.LEASED, "")
    try:
        assert gpu.lease_gpus(1, tmp_path) == "3"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
        holder = _spawn(tmp_path, "3", timeout=0.2, hold=0)
        assert holder.wait(timeout=30) != 0  # no free device: a clear error, non-zero exit
    finally:
        gpu.release_all()


def test_no_device_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JDNAS_GPUS", "")
    with pytest.raises(JdnasError, match="list no device"):
        gpu.lease_gpus(1, tmp_path)


def test_cuda_on_a_machine_without_gpus_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("JDNAS_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(JdnasError, match="no CUDA device .set device: cpu"):
        gpu.lease_gpus(1, tmp_path)


def test_slurm_jobs_do_not_share_lock_files(tmp_path):
    """Two SLURM jobs on one node both see their own GPU as device 0: neither waits for the other."""
    script = "from jdnas.engine.gpu import lease_gpus; print(lease_gpus(1, timeout_s=0.2, poll_s=0.05), flush=True); " \
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


MULTI = """
import sys, time
from pathlib import Path
from jdnas.engine.gpu import lease_gpus
print(lease_gpus(int(sys.argv[2]), Path(sys.argv[1]), timeout_s=float(sys.argv[3]), poll_s=0.05), flush=True)
time.sleep(float(sys.argv[4]))
"""


@pytest.mark.slow
def test_a_multi_gpu_lease_is_all_or_nothing(tmp_path):
    """A job asking for 2 of 3 devices while 2 are held waits without holding the free one (so a
    single-GPU job still gets it), and fails after its timeout; asking for more than exist fails at once."""
    def spawn(n: int, timeout: float, hold: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", MULTI, str(tmp_path), str(n), str(timeout), str(hold)],
                                env={**cli_env(), "JDNAS_GPUS": "0,1,2"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    pair = spawn(2, 10, 30)
    try:
        assert pair.stdout.readline().strip() == "0,1"
        waiter = spawn(2, 1.0, 0)
        single = spawn(1, 10, 0)
        assert single.stdout.readline().strip() == "2"  # the waiter did not keep it
        single.wait(timeout=30)
        _, err = waiter.communicate(timeout=30)
        assert waiter.returncode != 0 and "no 2 free device(s)" in err
        too_many = spawn(4, 10, 0)
        _, err = too_many.communicate(timeout=30)
        assert too_many.returncode != 0 and "needs 4 GPUs but only 3 are visible" in err
    finally:
        pair.kill()
        pair.wait()


def test_only_a_torchrun_child_inherits_a_lease(monkeypatch):
    """A lease marker that leaked into another process's environment is ignored: that process leases."""
    monkeypatch.setenv(gpu.LEASED, "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert gpu.inherited_lease() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gpu.inherited_lease() == "0,1"
