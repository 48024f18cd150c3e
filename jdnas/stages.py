"""The one source of truth for stage commands, inputs and outputs.

The Snakefile's rules and `dvc.yaml` are both derived from `STAGES`: Snakemake rules read it
at parse time; `jdnas dvc-yaml` renders dvc.yaml from it (a test checks the committed file
is up to date). Paths are relative to the workflow's working directory.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Iterable

import yaml

from jdnas.config import section, user_data
from jdnas.io import file_sha256, fingerprint
from jdnas.paths import BASE, BASELINE, DATA, FINAL, LATENCY, POOL, REPORT, REPORT_PLOTS, SEARCH

TABLE = f"{LATENCY}/table.csv"
NAIVE_NAS = f"{BASELINE}/steps/retrain/metrics.json"  # stage baseline_nas is done
# baselines matched to the search's compute: their steps once the search is done. The control's
# first step (stable) needs only the pool's compute: stage control_stable runs it beside the search
MATCHED = {"control": ("decay",), "prune_kd": ("prune", "kd")}
CONTROL_STABLE = "runs/control/stable/metrics.json"  # stage control_stable is done
MATCHED_CODE = ("jdnas/baselines/matched.py", "jdnas/baselines/naive.py", "jdnas/joint/student.py",
                "jdnas/engine/loop.py")
# inputs every search step reads; the Snakemake search rules add their round's files
SEARCH_INPUTS = (DATA, f"{POOL}/supernet.pt", TABLE, f"{BASE}/model.pt")
SEARCH_ARGS = f"--data {DATA} --supernet {POOL}/supernet.pt --latency-table {TABLE} --base {BASE}/model.pt"
SEARCH_PARAMS = ("seed", "device", "eval", "search", "search_space", "train_student", "teacher_pool.eval")
SEARCH_CODE = ("jdnas/joint/search.py", "jdnas/joint/rounds.py", "jdnas/joint/lineage.py", "jdnas/joint/screen.py",
               "jdnas/joint/bootstrap.py", "jdnas/models/morphism.py", "jdnas/joint/distill.py", "jdnas/engine/loop.py")


def fill(text: str, params: dict) -> str:
    """Replace every `${dotted.key}` (DVC's templating syntax) by the params' value."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(section(params, m.group(1))), text)


@dataclass(frozen=True)
class StageDef:
    """A workflow stage: the `jdnas` command that runs it and what it reads and writes."""

    name: str
    command: str                      # the jdnas command line, without --params/--threads
    deps: tuple[str, ...] = ()        # data inputs (Snakemake inputs, DVC deps)
    outs: tuple[str, ...] = ()        # outputs (Snakemake outputs, DVC outs)
    metrics: tuple[str, ...] = ()     # metric files (Snakemake outputs, DVC metrics)
    params: tuple[str, ...] = ()      # params keys read (DVC params; Snakemake rerun trigger)
    code: tuple[str, ...] = field(default=())  # source paths (DVC deps only: Snakemake tracks code itself)
    dir_outs: tuple[str, ...] = ()    # outputs that are folders (Snakemake `directory()`)
    dvc_only: bool = False            # Snakemake runs it as several finer rules instead
    persist: bool = False             # DVC keeps its outputs before a rerun (the stage resumes from them)
    # torch threads of its job (--threads), in dvc.yaml and the Snakemake rule alike: results on CPU
    # depend on it, so both runners train the same models (1: on a shared 2-core machine, two
    # threads per job ran 3-7x slower). None: its params say (profile_latency: latency.threads).
    threads: int | None = 1

    def shell(self, param_files: Iterable[str], threads: str | None = None) -> str:
        """The command line with its params files (later ones override earlier ones)."""
        cmd = self.command + "".join(f" --params {f}" for f in param_files)
        return cmd + (f" --threads {threads}" if threads else "")

    def resolved(self, params: dict) -> "StageDef":
        """A copy with every `${dotted.key}` in its command and paths replaced by the params' value."""
        return replace(self, command=fill(self.command, params),
                       **{f: tuple(fill(x, params) for x in getattr(self, f))
                          for f in ("deps", "outs", "metrics", "dir_outs")})

    def params_hash(self, params: dict) -> str:
        """Hash of the params this stage reads: a rule param, so Snakemake reruns when they change."""
        chosen = {k: section(params, k) for k in self.params}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


STAGES: dict[str, StageDef] = {s.name: s for s in [
    StageDef(
        "prepare_data", f"jdnas prepare-data --out {DATA}",
        dir_outs=(DATA,), params=("seed", "data"), code=("jdnas/data",),
    ),
    StageDef(
        "train_base", f"jdnas train-base --data {DATA} --out {BASE}",
        deps=(DATA,), outs=(f"{BASE}/model.pt",), metrics=(f"{BASE}/metrics.json",),
        params=("seed", "device", "model", "train_base", "eval", "teacher_pool.eval", "latency.clock"),
        code=("jdnas/models", "jdnas/engine/loop.py", "jdnas/baselines/base.py"),
    ),
    StageDef(
        "profile_latency", f"jdnas profile-latency --data {DATA} --out {LATENCY}",
        deps=(DATA,), outs=(f"{LATENCY}/table.csv", f"{LATENCY}/validation.png"),
        metrics=(f"{LATENCY}/validation.json",),
        # the table's grid is derived from the search space's bounds
        params=("seed", "model", "latency", "search_space"), code=("jdnas/latency", "jdnas/models"),
        # it holds the cores it times with (latency.threads), not every core: timings keep the
        # fastest call, which a training job beside them barely moves (docs/results.md)
        threads=None,
    ),
    StageDef(
        "train_teacher_pool", f"jdnas train-teacher-pool --data {DATA} --base {BASE}/model.pt --out {POOL}",
        # the base model is read only when teacher_pool.init is base (a static dependency either way)
        deps=(DATA, f"{BASE}/model.pt"), outs=(f"{POOL}/supernet.pt",),
        params=("seed", "device", "model", "teacher_pool.init", "teacher_pool.space", "teacher_pool.train"),
        code=("jdnas/models", "jdnas/engine/loop.py", "jdnas/engine/dist.py", "jdnas/joint/teacher_pool.py"),
    ),
    StageDef(
        "eval_teacher_pool",
        f"jdnas eval-teacher-pool --data {DATA} --supernet {POOL}/supernet.pt --out {POOL}/pool.csv",
        deps=(DATA, f"{POOL}/supernet.pt"), outs=(f"{POOL}/pool.csv",),
        params=("seed", "device", "teacher_pool.eval", "eval", "latency.clock"),
        code=("jdnas/models", "jdnas/engine/loop.py", "jdnas/joint/teacher_pool.py", "jdnas/latency/measure.py"),
    ),
    # Snakemake runs the search as rounds of jobs (workflow/rules/search.smk, `jdnas search-step`);
    # DVC cannot unroll that DAG, so its stage runs every round in one process, resuming.
    StageDef(
        "search", f"jdnas search {SEARCH_ARGS}", deps=SEARCH_INPUTS, dir_outs=(SEARCH,),
        params=SEARCH_PARAMS, code=SEARCH_CODE, dvc_only=True, persist=True,
    ),
    StageDef(
        "evaluate_final",
        f"jdnas evaluate-final --data {DATA} --state {SEARCH}/finish/state.json "
        f"--base {BASE}/model.pt --latency-table {TABLE} --out {FINAL}",
        deps=(DATA, f"{SEARCH}/finish/state.json", f"{BASE}/model.pt", TABLE),
        outs=(f"{FINAL}/model.pt", f"{FINAL}/model.onnx"), metrics=(f"{FINAL}/metrics.json",),
        params=("seed", "device", "eval", "teacher_pool.eval", "latency.clock", "search.latency_target",
                "search.ap_tolerance"),
        code=("jdnas/evaluation/final.py", "jdnas/engine/loop.py", "jdnas/latency", "jdnas/models/export.py"),
    ),
    # the naive pipeline: a budget of its own (params baseline), so it needs nothing from the search.
    # Its NAS and retraining need no teacher and no base weights either: they run from the start,
    # beside train_base and the pool; prune and KD follow once the pool is trained
    StageDef(
        "baseline_nas",
        f"jdnas baseline --until retrain --data {DATA} --latency-table {TABLE} --out {BASELINE}",
        deps=(DATA, TABLE), dir_outs=tuple(f"{BASELINE}/steps/{s}" for s in ("nas", "retrain")), persist=True,
        params=("seed", "device", "model", "eval", "baseline", "search.latency_target", "search.latency_margin",
                "search.penalty", "search.rounds", "search_space", "train_base", "teacher_pool.eval", "latency.clock"),
        code=("jdnas/baselines/naive.py", "jdnas/models", "jdnas/engine/loop.py", "jdnas/latency/measure.py"),
    ),
    StageDef(
        "baseline_naive",
        f"jdnas baseline --data {DATA} --latency-table {TABLE} --supernet {POOL}/supernet.pt --out {BASELINE}",
        deps=(DATA, TABLE, NAIVE_NAS, f"{POOL}/supernet.pt"),
        dir_outs=tuple(f"{BASELINE}/steps/{s}" for s in ("prune", "kd")), metrics=(f"{BASELINE}/metrics.json",),
        persist=True,
        params=("seed", "device", "model", "eval", "baseline", "search.latency_target", "search.latency_margin",
                "search_space", "train_student", "teacher_pool.eval", "latency.clock"),
        code=("jdnas/baselines/naive.py", "jdnas/joint/student.py", "jdnas/models/morphism.py", "jdnas/joint/distill.py",
              "jdnas/engine/loop.py", "jdnas/latency/measure.py"),
    ),
    # the competitors matched to the joint search's compute (jdnas/baselines/matched.py)
    StageDef(
        "control_stable",
        f"jdnas baseline --pipeline control --until stable --data {DATA} --latency-table {TABLE} "
        f"--base {BASE}/model.pt --supernet {POOL}/supernet.pt --out runs/control",
        deps=(DATA, TABLE, f"{BASE}/model.pt", f"{POOL}/supernet.pt"), dir_outs=("runs/control/stable",),
        persist=True, params=("seed", "device", "eval", "baseline.min_iters", "train_student", "teacher_pool.eval"),
        code=MATCHED_CODE,
    ),
    *(StageDef(
        name,
        f"jdnas baseline --pipeline {name} --data {DATA} --latency-table {TABLE} --base {BASE}/model.pt "
        f"--supernet {POOL}/supernet.pt --search-summary {SEARCH}/summary.json --out runs/{name}",
        deps=(DATA, TABLE, f"{BASE}/model.pt", f"{POOL}/supernet.pt", f"{SEARCH}/summary.json")
        + ((CONTROL_STABLE,) if name == "control" else ()),
        dir_outs=tuple(f"runs/{name}/{step}" for step in steps), metrics=(f"runs/{name}/summary.json",), persist=True,
        params=("seed", "device", "eval", "baseline.min_iters", "search", "search_space", "train_student",
                "teacher_pool.eval"),
        code=MATCHED_CODE + ("jdnas/models/morphism.py", "jdnas/joint/distill.py"),
    ) for name, steps in MATCHED.items()),
    StageDef(
        "report", f"jdnas report --runs runs --data {DATA} --out {REPORT}",
        deps=(DATA, f"{LATENCY}/validation.json", f"{BASE}/metrics.json", f"{FINAL}/metrics.json",
              f"{SEARCH}/history.csv", f"{SEARCH}/summary.json", f"{POOL}/pool.csv", f"{BASELINE}/metrics.json", "runs/control/summary.json",
              "runs/prune_kd/summary.json"),
        outs=(f"{REPORT}/report.md", f"{REPORT}/summary.csv") + tuple(f"{REPORT}/{p}" for p in REPORT_PLOTS),
        # it times every row's model in one interleaved measurement
        params=("device", "search.rounds", "search.latency_target", "latency.clock", "latency.device",
                "teacher_pool.eval"),
        code=("jdnas/evaluation/report.py",),
    ),
]}


def search_step(step: str, r: int | str = "", k: int | str = "") -> str:
    """The `jdnas search-step` command line of one search job (Snakemake wildcards may fill r, k)."""
    where = (f" --round {r}" if r != "" else "") + (f" --index {k}" if k != "" else "")
    return f"jdnas search-step {step}{where} {SEARCH_ARGS}"


def dvc_yaml(param_file: str = "params.yaml", params: dict | None = None) -> str:
    """dvc.yaml rendered from STAGES. Given the params (DVC reads params.yaml only), a COCO source's
    annotation files and image folders become deps of prepare_data, and `model.checkpoint` one of
    train_base: DVC hashes their content, so editing them in place reruns what depends on them."""
    stages = {}
    for s in STAGES.values():
        entry: dict = {"cmd": s.shell([param_file], s.threads and str(s.threads))}
        deps = list(s.deps) + list(s.code)
        if s.name == "prepare_data" and params is not None:
            deps += [str(p) for p in user_data(params)]
        if s.name == "train_base" and params is not None and params["model"]["checkpoint"]:
            deps.append(params["model"]["checkpoint"])  # the detector it adopts
        if deps:
            entry["deps"] = deps
        entry["params"] = list(s.params)
        entry["outs"] = [{o: {"persist": True}} if s.persist else o for o in list(s.dir_outs) + list(s.outs)]
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        stages[s.name] = entry
    header = "# Generated by `jdnas dvc-yaml > dvc.yaml` from jdnas/stages.py: edit that, not this.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": DVC_PLOTS}, sort_keys=False)


# `dvc plots show`: every search candidate from history.csv, and the report's figures
DVC_PLOTS = [
    {"search_score_per_round": {"template": "scatter", "x": "round", "y": {f"{SEARCH}/history.csv": "score"},
                                "title": "Joint search: candidate score per round"}},
    {"search_ap_vs_latency": {"template": "scatter", "x": "latency_ms", "y": {f"{SEARCH}/history.csv": "ap"},
                              "title": "Joint search candidates: minival AP vs predicted latency (ms)"}},
    *(f"{REPORT}/{p}" for p in REPORT_PLOTS),
]


def inputs_fingerprint(stage: str, params: dict, inputs: list[Path]) -> str:
    """A hash of what a stage's resumable files belong to: the params it reads, its input files
    and its code (as DVC sees them: a change to any of them reruns the stage)."""
    s = STAGES[stage]
    root = Path(__file__).resolve().parent.parent
    code = sorted(p for c in s.code for p in ([root / c] if (root / c).is_file() else (root / c).rglob("*.py")))
    return fingerprint({k: section(params, k) for k in s.params}, [file_sha256(p) for p in inputs],
                       [file_sha256(p) for p in code])
