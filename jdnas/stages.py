"""The one source of truth for stage commands, inputs and outputs.

The Snakefile's rules and `dvc.yaml` are both derived from `STAGES`: Snakemake rules read it
at parse time; `jdnas dvc-yaml` renders dvc.yaml from it (a test checks the committed file
is up to date). Paths are relative to the workflow's working directory.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Iterable

import yaml

from jdnas.config import section

DATA = "data/prepared"
BASE = "runs/base"
# per target device; `${latency.device}` is filled from the params (DVC templating; `resolved` for Snakemake)
LATENCY = "runs/latency/${latency.device}"
POOL = "runs/teacher_pool"
SEARCH = "runs/search"
TABLE = f"{LATENCY}/table.csv"
# inputs every search step reads; the Snakemake search rules add their round's files
SEARCH_INPUTS = (DATA, f"{POOL}/supernet.pt", TABLE, f"{BASE}/model.pt")
SEARCH_ARGS = f"--data {DATA} --supernet {POOL}/supernet.pt --latency-table {TABLE} --base {BASE}/model.pt"
SEARCH_PARAMS = ("seed", "device", "eval", "search", "search_space", "train_student", "teacher_pool.eval")
SEARCH_CODE = ("jdnas/search.py", "jdnas/student.py", "jdnas/morphism.py", "jdnas/distill.py", "jdnas/engine.py")


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
        params=("seed", "device", "model", "train_base", "eval"),
        code=("jdnas/models", "jdnas/engine.py", "jdnas/base_detector.py"),
    ),
    StageDef(
        "profile_latency", f"jdnas profile-latency --data {DATA} --out {LATENCY}",
        deps=(DATA,), outs=(f"{LATENCY}/table.csv", f"{LATENCY}/validation.png"),
        metrics=(f"{LATENCY}/validation.json",),
        params=("seed", "model", "latency"), code=("jdnas/latency", "jdnas/models"),
    ),
    StageDef(
        "train_teacher_pool", f"jdnas train-teacher-pool --data {DATA} --base {BASE}/model.pt --out {POOL}",
        # the base model is read only when teacher_pool.init is base (a static dependency either way)
        deps=(DATA, f"{BASE}/model.pt"), outs=(f"{POOL}/supernet.pt",),
        params=("seed", "device", "model", "teacher_pool.init", "teacher_pool.space", "teacher_pool.train"),
        code=("jdnas/models", "jdnas/engine.py", "jdnas/dist.py", "jdnas/teacher_pool.py"),
    ),
    StageDef(
        "eval_teacher_pool",
        f"jdnas eval-teacher-pool --data {DATA} --supernet {POOL}/supernet.pt --out {POOL}/pool.csv",
        deps=(DATA, f"{POOL}/supernet.pt"), outs=(f"{POOL}/pool.csv",),
        params=("seed", "device", "teacher_pool.eval", "eval"),
        code=("jdnas/models", "jdnas/engine.py", "jdnas/teacher_pool.py"),
    ),
    # Snakemake runs the search as rounds of jobs (workflow/rules/search.smk, `jdnas search-step`);
    # DVC cannot unroll that DAG, so its stage runs every round in one process, resuming.
    StageDef(
        "search", f"jdnas search {SEARCH_ARGS}", deps=SEARCH_INPUTS, dir_outs=(SEARCH,),
        params=SEARCH_PARAMS, code=SEARCH_CODE, dvc_only=True,
    ),
    StageDef(
        "evaluate_final",
        f"jdnas evaluate-final --data {DATA} --state {SEARCH}/round_${{search.rounds}}/state.json "
        f"--base {BASE}/model.pt --out runs/final",
        deps=(DATA, f"{SEARCH}/round_${{search.rounds}}/state.json", f"{BASE}/model.pt"),
        outs=("runs/final/model.pt",), metrics=("runs/final/metrics.json",),
        params=("seed", "device", "eval", "teacher_pool.eval", "search.rounds"),
        code=("jdnas/search.py", "jdnas/engine.py"),
    ),
]}


def search_step(step: str, r: int | str = "", k: int | str = "") -> str:
    """The `jdnas search-step` command line of one search job (Snakemake wildcards may fill r, k)."""
    where = (f" --round {r}" if r != "" else "") + (f" --index {k}" if k != "" else "")
    return f"jdnas search-step {step}{where} {SEARCH_ARGS}"


def dvc_yaml(param_file: str = "params.yaml") -> str:
    """dvc.yaml rendered from STAGES."""
    stages = {}
    for s in STAGES.values():
        entry: dict = {"cmd": s.shell([param_file])}
        deps = list(s.deps) + list(s.code)
        if deps:
            entry["deps"] = deps
        entry["params"] = list(s.params)
        entry["outs"] = list(s.dir_outs) + list(s.outs)
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        stages[s.name] = entry
    header = "# Generated by `jdnas dvc-yaml > dvc.yaml` from jdnas/stages.py: edit that, not this.\n"
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False)
