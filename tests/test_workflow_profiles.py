"""Snakemake profiles: the SLURM profile plans the whole DAG (no SLURM needed) and asks for GPUs
exactly where a rule runs on CUDA."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_env, write_yaml
from test_workflow import workspace

SLURM = "workflow/profiles/slurm"
# a dry run must never submit or cancel (the plugin may query sinfo/sacct/scontrol for its defaults)
SLURM_COMMANDS = ("sbatch", "srun", "salloc", "scancel")
# every rule of the workflow, by where it runs with `device: cuda`; a new rule must be added here
GPU_RULES = {"train_base", "profile_latency", "train_teacher_pool", "eval_teacher_pool", "search_init",
             "search_propose", "search_candidate", "search_select", "search_finish", "evaluate_final", "baseline_nas", "baseline_naive", "control_stable", "control",
             "prune_kd", "report"}
CPU_RULES = {"prepare_data", "search_history", "all"}


def planned_resources(dry_run: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the `resources:` of each of its jobs, as printed by `snakemake -n`."""
    jobs: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", dry_run):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and res:
            jobs.setdefault(rule.group(1), []).append(dict(kv.split("=", 1) for kv in res.group(1).split(", ")))
    return jobs


def gpus(resources: dict[str, str]) -> int:
    """GPUs a job asks for: the plugin submits `gpu=N` as --gpus=N, and nothing for 0 or unset."""
    return int(resources.get("gpu", 0))


def dry_run(ws: Path, *configfiles: str) -> dict[str, list[dict[str, str]]]:
    """`snakemake -n` with the SLURM profile, where every SLURM command would leave a trace."""
    env = {**cli_env(), "PATH": f"{ws / 'slurm-bin'}{os.pathsep}{cli_env()['PATH']}"}
    args = ["--configfile", *configfiles] if configfiles else []
    r = subprocess.run(["snakemake", "-n", "--profile", SLURM, *args], cwd=ws, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (ws / "slurm-called").exists(), "a dry run called " + (ws / "slurm-called").read_text()
    return planned_resources(r.stdout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workflow copy with stand-ins for SLURM's commands that record being called and fail."""
    ws = workspace(tmp_path_factory.mktemp("profiles"))
    (ws / "slurm-bin").mkdir()
    for cmd in SLURM_COMMANDS:
        trap = ws / "slurm-bin" / cmd
        trap.write_text(f"#!/bin/sh\necho {cmd} >> '{ws / 'slurm-called'}'\nexit 1\n")
        trap.chmod(0o755)
    # prepare_data declares the user's COCO files as inputs: stand-ins so the paper's config plans
    coco = {}
    for split in ("train", "val"):
        (ws / "coco" / split).mkdir(parents=True)
        (ws / "coco" / f"{split}.json").write_text("{}")
        coco.update({f"{split}_images": f"coco/{split}", f"{split}_annotations": f"coco/{split}.json"})
    write_yaml(ws / "coco_here.yaml", {"data": {"coco": coco}})
    return ws


def test_slurm_profile_requests_gpus_for_gpu_rules_only(ws):
    jobs = dry_run(ws, "config/gpu.yaml")
    unknown = set(jobs) - GPU_RULES - CPU_RULES
    assert not unknown, f"add {unknown} to GPU_RULES or CPU_RULES"
    assert GPU_RULES - {"baseline_nas", "baseline_naive"} <= set(jobs) and len(jobs["search_candidate"]) > 1
    for rule, resources in jobs.items():
        for r in resources:
            if rule in GPU_RULES:
                assert gpus(r) == 1 and "cpus_per_gpu" in r, (rule, r)
                assert int(r["runtime"]) > 60, (rule, r)  # the profile's per-rule runtime reached the job
            else:
                assert gpus(r) == 0 and "cpus_per_gpu" not in r, (rule, r)


def test_slurm_profile_ddp_job_gets_all_its_gpus_on_one_node(ws):
    jobs = dry_run(ws, "config/coco_r101.yaml", "config/gpu.yaml", "coco_here.yaml")
    for rule in ("train_base", "train_teacher_pool"):
        (job,) = jobs[rule]
        assert gpus(job) == 8 and job["nodes"] == "1", rule


def test_paper_config_plans_gpu_latency_and_gpu_resources_on_8_gpus(ws):
    """`snakemake --cores all --resources gpu=8` with the paper's config: the latency table is timed
    on cuda, every job that touches a GPU asks for its GPUs (the DDP jobs for all 8), and each
    search round has a candidate per GPU besides the control."""
    r = subprocess.run(["snakemake", "-n", "--cores", "all", "--resources", "gpu=8", "--configfile",
                        "config/coco_r101.yaml", "coco_here.yaml"], cwd=ws, env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = planned_resources(r.stdout)
    assert "runs/latency/cuda/table.csv" in r.stdout and "runs/latency/cpu" not in r.stdout
    for rule, resources in jobs.items():
        want = 8 if rule in ("train_base", "train_teacher_pool") else int(rule in GPU_RULES)
        assert all(gpus(x) == want for x in resources), (rule, resources)
    assert len(jobs["search_candidate"]) >= 9  # round 0: 8 candidates + the control


def test_slurm_profile_on_cpu_requests_no_gpu(ws):
    for rule, resources in dry_run(ws).items():
        assert all(gpus(r) == 0 for r in resources), rule


def test_slurm_profile_keeps_local_settings():
    local = yaml.safe_load((REPO / "workflow/profiles/local/config.yaml").read_text())
    slurm = yaml.safe_load((REPO / SLURM / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert slurm["rerun-triggers"] == local["rerun-triggers"]
    # a non-dry run has no default --cores: the profile must name them
    assert isinstance(slurm["cores"], int)
