"""The real workflow: Snakemake and DVC over the smoke config, and resume after a kill."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from jdnas.stages import STAGES, dvc_yaml
from conftest import BIN, REPO, cli_env, write_yaml

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


def test_dvc_yaml_declares_the_users_coco_files(smoke_params):
    import yaml
    from conftest import with_overrides
    coco = {"train_images": "/d/tr", "train_annotations": "/d/tr.json", "val_images": "/d/va",
            "val_annotations": "/d/va.json"}
    stages = yaml.safe_load(dvc_yaml(params=with_overrides(smoke_params, {"data": {"source": "coco", "coco": coco}})))
    assert set(coco.values()) <= set(stages["stages"]["prepare_data"]["deps"])
    assert not set(coco.values()) & set(yaml.safe_load(dvc_yaml(params=smoke_params))["stages"]["prepare_data"]["deps"])


def test_snakemake_dry_run_lists_every_stage(tmp_path):
    ws = workspace(tmp_path)
    out = run(["snakemake", "-n", "--profile", "workflow/profiles/local"], ws).stdout
    for name, stage in STAGES.items():
        if not stage.dvc_only:
            assert f"rule {name}:" in out
    for rule in ("search_propose", "search_candidate", "search_select"):
        assert f"rule {rule}:" in out


def test_a_checkpoint_base_is_train_bases_input_in_both_runners(tmp_path, base_ckpt, smoke_params):
    """model.base: PATH plans train_base on that file (Snakemake input, DVC dep)."""
    import yaml
    from jdnas.config import load_params
    ws = workspace(tmp_path)
    write_yaml(ws / "start.yaml", {"model": {"base": str(base_ckpt)}})
    out = run(["snakemake", "-n", "train_base", "--configfile", "config/smoke.yaml", "start.yaml"], ws).stdout
    assert "rule train_base:" in out and str(base_ckpt) in out
    params = load_params([ws / "params.yaml", ws / "config/smoke.yaml", ws / "start.yaml"])
    assert str(base_ckpt) in yaml.safe_load(dvc_yaml(params=params))["stages"]["train_base"]["deps"]


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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The whole smoke DAG, with two fake GPUs so candidate jobs lease distinct devices. Snakemake
    is called by its path with the venv off PATH, as the README's `.venv/bin/snakemake` in a fresh
    shell: the rules must still find the venv's `jdnas`."""
    ws = workspace(tmp_path_factory.mktemp("smoke"))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    env = {**cli_env(), "PATH": path, "JDNAS_GPUS": "0,1", "JDNAS_GPU_LOCK_DIR": str(ws / "gpu-locks")}
    r = subprocess.run([str(BIN / "snakemake"), "--cores", "4", "--resources", "gpu=2", "--configfile", "config/smoke.yaml"],
                       cwd=ws, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ws


def decisions(ws: Path) -> list[dict]:
    """history.csv without the timing column: what the search decided and measured."""
    import pandas as pd
    history = pd.read_csv(ws / "runs/search/history.csv").drop(columns=["seconds", "cpu_seconds"])
    # NaN (a composed move's screen AP) never equals itself
    return history.astype(object).where(history.notna(), "").to_dict("records")


@pytest.mark.slow
def test_smoke_workflow_runs_the_whole_dag(smoke_run):
    ws = smoke_run
    for path in ["data/prepared/manifest.json", "runs/base/model.pt", "runs/base/metrics.json",
                 "runs/teacher_pool/pool.csv", "runs/latency/cpu/table.csv", "runs/search/round_0/state.json",
                 "runs/search/round_2/state.json", "runs/search/finish/state.json", "runs/search/history.csv",
                 "runs/final/model.pt",
                 "runs/final/metrics.json", "logs/prepare_data.log", "logs/train_base.log"]:
        assert (ws / path).is_file(), path
    import json
    final = json.loads((ws / "runs/final/metrics.json").read_text())
    assert set(final) == {"final", "base"}
    for m in final.values():
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "latency_ms", "params", "flops"} <= set(m)
    from jdnas.models.detector import load_detector
    assert str(load_detector(ws / "runs/final/model.pt").arch) == final["final"]["arch"]
    history = decisions(ws)
    assert history and all(1 <= h["round"] <= 2 for h in history)
    # above the target every finalist is a cut (a control could not win there)
    states = {r: json.loads((ws / f"runs/search/round_{r}/state.json").read_text()) for r in (0, 1)}
    assert all(not h["control"] for h in history if not states[h["round"] - 1]["meets_target"])
    assert isinstance(final["final"]["meets_target"], bool) and final["final"]["predicted_breakdown_ms"]["total"] > 0
    assert "## Search steps" in (ws / "reports/report.md").read_text()
    # the naive pipeline: four steps on the search's target, with iterations of its own, its compute measured
    search = json.loads((ws / "runs/search/summary.json").read_text())
    finish = json.loads((ws / "runs/search/finish/state.json").read_text())
    assert finish["it"] == 12 and search["final_iters"] > 0 and search["compute_split"]["lineage"] > 0
    naive = json.loads((ws / "runs/baseline/metrics.json").read_text())
    assert [s["step"] for s in naive["steps"]] == ["nas", "retrain", "prune", "kd"]
    assert naive["compute_unit"] == search["compute_unit"] and naive["spent"] > 0
    assert naive["iters"] == {"nas": 2 * 3, "retrain": 8, "prune": 2, "kd": 3}  # config/smoke.yaml
    assert naive["spent"] == pytest.approx(sum(s["compute"] for s in naive["steps"]))
    assert naive["latency_target_ms"] == pytest.approx(search["target_ms"], abs=1e-4)
    assert load_detector(ws / "runs/baseline/steps/kd/model.pt").arch == load_detector(
        ws / "runs/baseline/steps/prune/model.pt").arch
    # the report puts them side by side
    import pandas as pd
    rows = pd.read_csv(ws / "reports/summary.csv")
    assert list(rows["model"]) == ["base", "control", "prune_kd", "naive/nas", "naive/retrain", "naive/prune",
                                   "naive/kd", "joint/final"]
    assert rows.set_index("model").loc["joint/final", "AP"] == pytest.approx(final["final"]["AP"])
    assert rows["latency_source"].eq("measured (one interleaved run)").all()
    # the matched baselines: the joint search's total (pool + search jobs) as budget, prune_kd charged the pool
    control = json.loads((ws / "runs/control/summary.json").read_text())
    prune_kd = json.loads((ws / "runs/prune_kd/summary.json").read_text())
    assert control["joint_compute"] == prune_kd["joint_compute"] > search["compute"]
    assert control["budget"] == control["joint_compute"] and control["charged_pool"] == 0
    # the control's stable step (stage control_stable, beside the search) had the pool's compute
    assert [s["step"] for s in control["steps"]] == ["stable", "decay"]
    assert control["steps"][0]["share"] == pytest.approx(prune_kd["charged_pool"], abs=0.02)
    assert prune_kd["budget"] == pytest.approx(prune_kd["joint_compute"] - prune_kd["charged_pool"], abs=0.02)
    assert [s["step"] for s in prune_kd["steps"]] == ["prune", "kd"] and prune_kd["steps"][0]["plan"]
    assert prune_kd["compute"] == pytest.approx(prune_kd["charged_pool"] + sum(s["compute"] for s in prune_kd["steps"]),
                                                abs=0.05)
    md = (ws / "reports/report.md").read_text().splitlines()
    assert md[2].startswith("The final student ") and "the base" in md[2]
    assert md[4].startswith("At the same latency target, the joint search vs pruning + KD: val AP")
    from PIL import Image
    from jdnas.stages import REPORT_PLOTS
    for name in REPORT_PLOTS:
        assert Image.open(ws / "reports" / name).size[0] > 300
    again = run(["snakemake", "--cores", "2", "--configfile", "config/smoke.yaml"], ws)
    assert "Nothing to be done" in again.stdout + again.stderr
    # `snakemake --report` bundles the report's table and plots
    run(["snakemake", "--report", "report.html", "--configfile", "config/smoke.yaml"], ws)
    html = (ws / "report.html").read_text()
    for name in ("report.md", "summary.csv") + REPORT_PLOTS:
        assert name in html, name


@pytest.mark.slow
def test_concurrent_candidates_lease_distinct_gpus(smoke_run):
    """Candidate jobs that ran at the same time held distinct fake GPUs. Whether two smoke jobs
    overlap at all is the scheduler's timing (on a quiet machine one can end before the next
    starts: it failed 1 run in 3), so overlap is not required here; test_gpu.py pins the leasing
    under forced concurrency. A slot with no finalist trains nothing and leases no GPU."""
    import json
    import re
    leases = {}
    for log in (smoke_run / "logs/search").glob("round_*/cand_*.log"):
        result = smoke_run / "runs/search" / log.parent.name / log.stem / "result.json"
        x = json.loads(result.read_text())
        m = re.search(r"gpu lease: CUDA_VISIBLE_DEVICES=(\d+) at ([\d.]+)", log.read_text())
        assert (m is None) == x["skipped"], log
        if m:
            leases[log] = (m.group(1), float(m.group(2)), x.get("finished", float(m.group(2))))
    assert len(leases) >= 2 and all(dev in ("0", "1") for dev, _, _ in leases.values())
    overlapping = [(a, b) for a in leases for b in leases if a < b
                   and leases[a][1] < leases[b][2] and leases[b][1] < leases[a][2]]
    for a, b in overlapping:
        assert leases[a][0] != leases[b][0], f"{a} and {b} ran at once on one device"


def _upstream_copy(src: Path, tmp: Path) -> Path:
    """A workspace holding src's finished upstream stages (same latency table), without the search."""
    ws = tmp / "ws2"
    shutil.copytree(src, ws, symlinks=True, ignore=shutil.ignore_patterns("gpu-locks"))
    for d in ["runs/search", "runs/final", "runs/baseline", "reports", "logs/search"]:
        shutil.rmtree(ws / d, ignore_errors=True)
    return ws


@pytest.mark.slow
def test_search_resumes_after_kill_with_identical_decisions(smoke_run, tmp_path):
    ws = _upstream_copy(smoke_run, tmp_path)
    args = ["--cores", "2", "--configfile", "config/smoke.yaml"]
    proc = subprocess.Popen(["snakemake", *args], cwd=ws, env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = ws / "runs/search/round_1/state.json"
    # round 2's proposal exists only once Snakemake has booked round 1 as finished
    second = ws / "runs/search/round_2/proposals.json"
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (ws / "runs/search/round_2/state.json").exists()
    done_at = first.stat().st_mtime
    run(["snakemake", "--unlock", *args], ws)
    run(["snakemake", "--rerun-incomplete", *args], ws)
    assert first.stat().st_mtime == done_at, "a finished round was recomputed"
    assert decisions(ws) == decisions(smoke_run)
    import json
    a = json.loads((ws / "runs/final/metrics.json").read_text())
    b = json.loads((smoke_run / "runs/final/metrics.json").read_text())
    assert a["final"]["arch"] == b["final"]["arch"] and a["final"]["AP"] == b["final"]["AP"]


@pytest.mark.slow
def test_dvc_search_stage_makes_the_same_decisions(smoke_run, tmp_path):
    """`jdnas search` (the DVC stage) runs the same library calls as the Snakemake rounds."""
    ws = _upstream_copy(smoke_run, tmp_path)
    # DVC reads params.yaml only: make it the smoke run's params
    from jdnas.config import load_params
    write_yaml(ws / "params.yaml", load_params([ws / "params.yaml", ws / "config/smoke.yaml"]))
    run(["jdnas", "search", "--params", "params.yaml", "--threads", "1"], ws)
    assert decisions(ws) == decisions(smoke_run)


def ran(dvc_output: str) -> set[str]:
    import re
    return set(re.findall(r"Running stage '(\w+)'", dvc_output))


@pytest.mark.slow
def test_dvc_repro_runs_once_then_reruns_only_what_a_param_touches(tmp_path):
    ws = dvc_workspace(workspace(tmp_path))
    from jdnas.config import load_params
    params = load_params([ws / "params.yaml", ws / "config/smoke.yaml"])
    write_yaml(ws / "params.yaml", params)  # DVC reads params.yaml only: make it the smoke params
    assert ran(run(["dvc", "repro"], ws).stdout) == set(STAGES)
    assert ran(run(["dvc", "repro"], ws).stdout) == set()  # the second run is a no-op
    params["search"]["penalty"] += 10.0
    write_yaml(ws / "params.yaml", params)
    again = ran(run(["dvc", "repro"], ws).stdout)
    upstream = {"prepare_data", "train_base", "profile_latency", "train_teacher_pool", "eval_teacher_pool"}
    assert {"search", "baseline_naive", "report"} <= again <= set(STAGES) - upstream
    metrics = run(["dvc", "metrics", "show"], ws).stdout
    assert "runs/final/metrics.json" in metrics and "runs/baseline/metrics.json" in metrics
    run(["dvc", "plots", "show", "-o", "dvc_plots"], ws)
    html = (ws / "dvc_plots" / "index.html").read_text()
    assert "history.csv" in html or "search_score_per_round" in html


@pytest.mark.slow
def test_train_base_resumes_after_kill(tmp_path):
    ws = workspace(tmp_path)
    write_yaml(ws / "long.yaml", {"train_base": {"iters": 80, "checkpoint_every": 5}})
    args = ["--cores", "2", "--configfile", "config/smoke.yaml", "long.yaml"]
    run(["snakemake", "prepare_data", *args], ws)
    proc = subprocess.Popen(["snakemake", "train_base", *args], cwd=ws, env=cli_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    run(["snakemake", "train_base", "--rerun-incomplete", *args], ws)
    log = (ws / "logs/train_base.log").read_text()
    assert "resuming from runs/base/train_state.pt at iteration" in log
    resumed_at = int(log.split("at iteration ")[1].split("/")[0])
    assert resumed_at >= killed_at
    # the resumed model equals one trained without interruption (same thread count as the rule)
    run(["jdnas", "train-base", "--out", "runs/ref", "--threads", "1", "--params", "params.yaml",
         "--params", "config/smoke.yaml", "--params", "long.yaml"], ws)
    a = torch.load(ws / "runs/base/model.pt", weights_only=True)["state_dict"]
    b = torch.load(ws / "runs/ref/model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


@pytest.mark.slow
def test_a_configfile_added_after_a_run_reruns_only_the_stages_whose_params_it_changes(tmp_path):
    """Search params in a new --configfile leave prepare_data and train_base done (the param files
    are on every rule's shell line: Snakemake's `code` trigger would rerun the whole DAG)."""
    ws = workspace(tmp_path)
    args = ["--configfile", "config/smoke.yaml", "--profile", "workflow/profiles/local"]
    run([str(BIN / "snakemake"), *args, "train_base"], ws)
    write_yaml(ws / "search.yaml", {"search": {"trial_iters": 1}})
    out = run([str(BIN / "snakemake"), "-n", *args[:2], "search.yaml", *args[2:], "train_base", "search_init"],
              ws).stdout
    assert "rule search_init:" in out
    assert "rule prepare_data:" not in out and "rule train_base:" not in out
    write_yaml(ws / "base.yaml", {"train_base": {"lr": 0.03}})
    out = run([str(BIN / "snakemake"), "-n", *args[:2], "base.yaml", *args[2:], "train_base"], ws).stdout
    assert "rule train_base:" in out and "rule prepare_data:" not in out


@pytest.mark.slow
def test_editing_the_users_data_in_place_reruns_prepare_data(tmp_path):
    """prepare_data declares the user's annotation files and image folders: an annotation edited
    in place, or an image rewritten, reruns it (and so everything downstream)."""
    import json
    from PIL import Image
    ws = workspace(tmp_path)
    (ws / "img").mkdir()
    images, anns = [], []
    for i in range(1, 5):
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(ws / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20]})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (ws / "ann.json").write_text(json.dumps(coco))
    write_yaml(ws / "mine.yaml", {"data": {"source": "coco", "minival_fraction": 0.25, "coco": {
        "train_images": "img", "train_annotations": "ann.json", "val_images": "img", "val_annotations": "ann.json"}}})
    args = ["--configfile", "config/smoke.yaml", "mine.yaml", "--profile", "workflow/profiles/local", "train_base"]
    run([str(BIN / "snakemake"), *args], ws)

    def planned() -> set[str]:
        out = run([str(BIN / "snakemake"), "-n", *args], ws).stdout
        return {name for name in ("prepare_data", "train_base") if f"rule {name}:" in out}

    assert not planned()
    coco["annotations"][0]["bbox"] = [5, 5, 20, 20]
    (ws / "ann.json").write_text(json.dumps(coco))
    assert planned() == {"prepare_data", "train_base"}  # and what depends on it
    run([str(BIN / "snakemake"), *args], ws)
    assert not planned()
    Image.new("RGB", (64, 48), (0, 200, 0)).save(ws / "img" / "3.png")
    os.utime(ws / "img" / "3.png", ns=(time.time_ns() + 10**9,) * 2)  # a new modification time, whatever the clock
    assert planned() == {"prepare_data", "train_base"}
