"""The real workflow: Snakemake and DVC over the smoke config, and resume after a kill."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jdnas.stages import STAGES, dvc_yaml
from conftest import REPO, cli_env, write_yaml

WORKFLOW_FILES = ["Snakefile", "workflow", "params.yaml", "config", "envs", "dvc.yaml", ".dvcignore", "jdnas"]


def workspace(tmp: Path) -> Path:
    """A copy of the workflow files and the package source (DVC tracks the code as deps)."""
    ws = tmp / "ws"
    ws.mkdir()
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, ws / name)
    return ws


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def test_dvc_yaml_is_generated_from_stages():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "run `jdnas dvc-yaml > dvc.yaml`"


def test_snakemake_dry_run_lists_every_stage(tmp_path):
    ws = workspace(tmp_path)
    out = run(["snakemake", "-n", "--profile", "workflow/profiles/local"], ws).stdout
    for name in STAGES:
        assert f"rule {name}:" in out


def test_snakemake_rejects_bad_params(tmp_path):
    ws = workspace(tmp_path)
    write_yaml(ws / "bad.yaml", {"train_base": {"iters": 0}})
    r = run(["snakemake", "-n", "--configfile", "bad.yaml"], ws, check=False)
    assert r.returncode != 0
    assert "train_base.iters = 0 is not allowed" in r.stdout + r.stderr


def dvc_workspace(ws: Path) -> Path:
    run(["git", "init", "-q"], ws)
    run(["dvc", "init", "-q"], ws)
    return ws


def test_dvc_dag_lists_every_stage(tmp_path):
    out = run(["dvc", "dag"], dvc_workspace(workspace(tmp_path))).stdout
    for name in STAGES:
        assert name in out


@pytest.mark.slow
def test_smoke_workflow_runs_through_train_base(tmp_path):
    ws = workspace(tmp_path)
    run(["snakemake", "--cores", "2", "--configfile", "config/smoke.yaml"], ws)
    for path in ["data/prepared/manifest.json", "data/prepared/train.json", "data/prepared/minival.json",
                 "data/prepared/val.json", "runs/base/model.pt", "runs/base/metrics.json",
                 "logs/prepare_data.log", "logs/train_base.log"]:
        assert (ws / path).is_file(), path
    import json
    metrics = json.loads((ws / "runs/base/metrics.json").read_text())
    assert metrics["AP"] is not None and metrics["params"] > 0
    again = run(["snakemake", "--cores", "2", "--configfile", "config/smoke.yaml"], ws)
    assert "Nothing to be done" in again.stdout + again.stderr
    # DVC plans the same stages (its --dry needs upstream outputs on disk: dvc#9021)
    out = run(["dvc", "repro", "--dry"], dvc_workspace(ws)).stdout
    for name in STAGES:
        assert f"Running stage '{name}'" in out


@pytest.mark.slow
def test_train_base_resumes_after_kill(tmp_path):
    ws = workspace(tmp_path)
    write_yaml(ws / "long.yaml", {"train_base": {"iters": 80, "checkpoint_every": 5}})
    args = ["--cores", "2", "--configfile", "config/smoke.yaml", "long.yaml"]
    run(["snakemake", "prepare_data", *args], ws)
    proc = subprocess.Popen(["snakemake", *args], cwd=ws, env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = ws / "runs/base/train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies, as on a machine crash
    proc.wait()
    assert state.exists(), "train_base never wrote a checkpoint"
    assert not (ws / "runs/base/model.pt").exists()
    killed_at = torch.load(state, weights_only=True)["iter"]
    assert 0 < killed_at < 80
    run(["snakemake", "--unlock", *args], ws)
    run(["snakemake", "--rerun-incomplete", *args], ws)
    log = (ws / "logs/train_base.log").read_text()
    assert f"resuming from runs/base/train_state.pt at iteration" in log
    resumed_at = int(log.split("at iteration ")[1].split("/")[0])
    assert resumed_at >= killed_at
    # the resumed model equals one trained without interruption
    run(["jdnas", "train-base", "--out", "runs/ref", "--threads", "2", "--params", "params.yaml",
         "--params", "config/smoke.yaml", "--params", "long.yaml"], ws)
    a = torch.load(ws / "runs/base/model.pt", weights_only=True)["state_dict"]
    b = torch.load(ws / "runs/ref/model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
