"""DDP jobs under torchrun on CPU (gloo), as a multi-GPU job runs them: the parent leases the
job's devices once and every rank inherits all of them; only rank 0 writes."""
import re
import subprocess

import pytest
import torch

from jdnas.joint.teacher_pool import load_supernet
from jdnas.models.detector import load_detector
from conftest import REPO, cli_env, write_yaml


def _run(tmp_path, cmd: list[str], override: dict) -> subprocess.CompletedProcess:
    params = ["--params", str(REPO / "params.yaml"), "--params", str(REPO / "config" / "smoke.yaml"),
              "--params", str(write_yaml(tmp_path / "ddp.yaml", override))]
    env = {**cli_env(), "JDNAS_GPUS": "0,1", "JDNAS_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["jdnas", *cmd, "--threads", "1", *params], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_two_process_pool_job_leases_both_devices_once(tmp_path, prepared, base_ckpt):
    r = _run(tmp_path, ["train-teacher-pool", "--data", str(prepared), "--base", str(base_ckpt),
                        "--out", str(tmp_path / "pool")], {"teacher_pool": {"train": {"gpus": 2}}})
    assert r.returncode == 0, r.stderr[-3000:]
    leases = re.findall(r"gpu lease: CUDA_VISIBLE_DEVICES=(\S+)( inherited by rank (\d))?", r.stderr)
    assert [x[0] for x in leases] == ["0,1"] * 3  # the parent's lease, then both ranks see both ids
    assert sorted(x[2] for x in leases if x[1]) == ["0", "1"]
    assert load_supernet(tmp_path / "pool" / "supernet.pt").meta["world_size"] == 2


@pytest.mark.slow
def test_train_base_with_ddp_over_two_processes(tmp_path, prepared):
    """train_base.gpus 2: each rank trains on half of every batch with DDP (SyncBN on CPU is not
    available, so it stays off); rank 0 evaluates and writes one model and one summary."""
    r = _run(tmp_path, ["train-base", "--data", str(prepared), "--out", str(tmp_path / "base")],
             {"train_base": {"gpus": 2, "eval_every": 0}})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"train_iters": 8') == 1  # one summary: rank 0's
    assert r.stderr.count("inherited by rank") == 2
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["metrics.json", "model.pt", "tb"]
    model = load_detector(tmp_path / "base" / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
