"""Joint search (DESIGN §8): hill climbing over (student, teacher) pairs, in checkpointed rounds.

Files, under `runs/search/`:
  round_0/state.json, student.pt         the base detector, scored on minival
  round_r/proposals.json                 K distinct (student action, teacher) candidates
  round_r/cand_k/result.json, model.pt   a candidate trained with weight inheritance + KD
  round_r/state.json, student.pt         after selection (the best candidate, or the old state)
  history.csv                            every candidate of every round

Each file is one Snakemake job's output, so the DAG is static (R rounds x K candidates) and an
interrupted search resumes from the last finished job; `run_search` does the same rounds in
one process for `dvc repro`, skipping the files that exist. Randomness comes from the params
seed plus the round and candidate index: the same params give the same search.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from jdnas.io import atomic_path, resume_dir, write_json
from jdnas.latency import LatencyTable
from jdnas.models.arch import Arch
from jdnas.models.elastic import PoolSpace
from jdnas.morphism import legal_actions

SEARCH = Path("runs/search")
HISTORY_COLUMNS = ["round", "index", "action", "teacher", "teacher_arch", "student_arch", "ap", "ap50", "latency_ms",
                   "score", "accepted", "seconds", "cpu_seconds", "student_params", "student_flops", "teacher_params",
                   "teacher_flops"]


# --- values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Teacher:
    """A pool member as a genome: depth and mid-width ratio per stage (stable under mutation)."""

    depths: tuple[int, ...]
    ratios: tuple[float, ...]

    def arch(self, space: PoolSpace) -> Arch:
        return space.member(self.depths, list(self.ratios))

    def __str__(self) -> str:
        return "d" + ",".join(map(str, self.depths)) + "/w" + ",".join(f"{r:g}" for r in self.ratios)

    @classmethod
    def parse(cls, text: str) -> "Teacher":
        d, w = text[1:].split("/w")
        return cls(tuple(int(x) for x in d.split(",")), tuple(float(x) for x in w.split(",")))


def largest_teacher(space: PoolSpace) -> Teacher:
    return Teacher(space.max_arch.depths, (1.0,) * len(space.max_arch.stages))


def sample_teacher(space: PoolSpace, rng: random.Random) -> Teacher:
    n = len(space.max_arch.stages)
    return Teacher(tuple(rng.choice(space.depth_choices(s)) for s in range(n)),
                   tuple(rng.choice(space.width_choices()) for _ in range(n)))


def mutate_teacher(t: Teacher, space: PoolSpace, rng: random.Random) -> Teacher:
    """Change one dimension (one stage's depth or mid-width ratio) to another allowed value."""
    options = []
    for s in range(len(t.depths)):
        options += [("depth", s, d) for d in space.depth_choices(s) if d != t.depths[s]]
        options += [("ratio", s, r) for r in space.width_choices() if r != t.ratios[s]]
    if not options:
        return t
    kind, s, value = rng.choice(options)
    depths, ratios = list(t.depths), list(t.ratios)
    (depths if kind == "depth" else ratios)[s] = value
    return Teacher(tuple(depths), tuple(ratios))


@dataclass(frozen=True)
class Candidate:
    round: int
    index: int
    action: str
    teacher: str
    seed: int


@dataclass
class State:
    """The search's state after a round."""

    round: int
    student_arch: str
    teacher: str
    ap: float
    ap50: float
    latency_ms: float
    score: float
    stale: int = 0          # rounds since the last improvement
    stopped: bool = False
    accepted: str | None = None   # "cand_k" when this round's best candidate was taken


def score(ap: float, latency_ms: float, target_ms: float, penalty: float) -> float:
    """AP minus `penalty` per unit of relative latency overshoot beyond the target."""
    return ap - penalty * max(0.0, latency_ms / target_ms - 1.0)


def round_dir(r: int, root: Path = SEARCH) -> Path:
    return root / f"round_{r}"


def read_state(r: int, root: Path = SEARCH) -> State:
    return State(**json.loads((round_dir(r, root) / "state.json").read_text()))


def _write_state(state: State, student_src: Path, root: Path) -> None:
    d = round_dir(state.round, root)
    d.mkdir(parents=True, exist_ok=True)
    if student_src.resolve() != (d / "student.pt").resolve():
        with atomic_path(d / "student.pt") as tmp:
            shutil.copyfile(student_src, tmp)
    write_json(d / "state.json", asdict(state))  # written last: its presence means the round is done


# --- steps -------------------------------------------------------------------------------------
class Context:
    """What every step needs: params, data, pool space and latency table, target latency."""

    def __init__(self, params: dict, data_dir: str | Path, supernet: str | Path, latency_table: str | Path,
                 base: str | Path, root: str | Path = SEARCH) -> None:
        from jdnas.teacher_pool import load_supernet
        self.params, self.cfg = params, params["search"]
        self.data_dir, self.root = Path(data_dir), Path(root)
        self.base = Path(base)
        self.inputs = [self.data_dir / "manifest.json", Path(supernet), Path(latency_table), self.base]
        self.supernet = load_supernet(supernet)
        self.space: PoolSpace = self.supernet.space
        self.table = LatencyTable.load(latency_table)
        from jdnas.models.detector import read_checkpoint
        self.base_arch = Arch.from_json(read_checkpoint(base)["arch"])
        self.target_ms = self.cfg["latency_target"] * self.table.predict(self.base_arch)

    def latency(self, arch: Arch) -> float:
        return self.table.predict(arch)

    def score(self, ap: float, latency_ms: float) -> float:
        return score(ap, latency_ms, self.target_ms, self.cfg["penalty"])


def init_search(ctx: Context) -> State:
    """Round 0: the base detector on minival, with the pool's largest member as teacher."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.detector import load_detector
    device = resolve_device(ctx.params["device"])
    metrics = evaluate(load_detector(ctx.base, device), ctx.data_dir / "minival.json",
                       ctx.params["eval"]["batch_size"], device)
    lat = ctx.latency(ctx.base_arch)
    state = State(0, str(ctx.base_arch), str(largest_teacher(ctx.space)), metrics["AP"], metrics["AP50"], lat,
                  ctx.score(metrics["AP"], lat))
    _write_state(state, ctx.base, ctx.root)
    return state


def propose(state: State, r: int, params: dict, space: PoolSpace) -> list[Candidate]:
    """Up to K distinct (action, teacher) pairs for round r, seeded by (seed, r); none once stopped."""
    cfg = params["search"]
    if state.stopped:
        return []
    rng = random.Random(params["seed"] * 1_000_003 + r)
    arch = Arch.parse(state.student_arch)
    actions = legal_actions(arch, params["search_space"])
    if not actions:
        return []
    current = Teacher.parse(state.teacher)
    moves = ("keep", "mutate", "resample")
    weights = [cfg["teacher_keep"], cfg["teacher_mutate"], cfg["teacher_resample"]]
    seen: set[tuple[str, str]] = set()
    out: list[Candidate] = []
    for _ in range(50 * cfg["candidates"]):
        if len(out) == cfg["candidates"]:
            break
        action = rng.choice(actions)
        move = rng.choices(moves, weights)[0]
        teacher = (current if move == "keep" else mutate_teacher(current, space, rng) if move == "mutate"
                   else sample_teacher(space, rng))
        key = (str(action), str(teacher))
        if key not in seen:
            seen.add(key)
            out.append(Candidate(r, len(out), str(action), str(teacher), params["seed"] * 1_000_003 + r * 101 + len(out)))
    return out


def write_proposals(ctx: Context, r: int) -> list[Candidate]:
    cands = propose(read_state(r - 1, ctx.root), r, ctx.params, ctx.space)
    write_json(round_dir(r, ctx.root) / "proposals.json", [asdict(c) for c in cands])
    return cands


def run_candidate(ctx: Context, r: int, k: int) -> dict[str, Any]:
    """Train candidate k of round r (inherit weights, KD from its teacher), score it on minival."""
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import save_detector
    from jdnas.student import train_student
    from jdnas.teacher_pool import TeacherPool
    out = round_dir(r, ctx.root) / f"cand_{k}"
    cands = json.loads((round_dir(r, ctx.root) / "proposals.json").read_text())
    if k >= len(cands):  # early stop, or fewer distinct candidates than K
        result = {"round": r, "index": k, "skipped": True}
        write_json(out / "result.json", result)
        return result
    c = Candidate(**cands[k])
    t0, cpu0 = time.time(), time.process_time()
    teacher_arch = Teacher.parse(c.teacher).arch(ctx.space)
    pool = TeacherPool.load(ctx.supernet, ctx.data_dir, ctx.params)
    teacher = pool.teacher(teacher_arch).cpu()
    save_detector(out / "teacher.pt", teacher, stage="search", teacher=c.teacher)
    metrics = train_student(ctx.params, ctx.data_dir, out, round_dir(r - 1, ctx.root) / "student.pt",
                            c.action, out / "teacher.pt", eval_split="minival", seed=c.seed)
    arch = Arch.parse(metrics["arch"])
    lat = ctx.latency(arch)
    result = {"round": r, "index": k, "skipped": False, "action": c.action, "teacher": c.teacher,
              "teacher_arch": str(teacher_arch), "student_arch": str(arch), "ap": metrics["AP"],
              "ap50": metrics["AP50"], "latency_ms": round(lat, 4), "score": round(ctx.score(metrics["AP"], lat), 4),
              "student_params": metrics["params"], "student_flops": metrics["flops"],
              "teacher_params": count_params(teacher), "teacher_flops": count_flops(teacher),
              "seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
              "started": t0, "finished": time.time()}
    (out / "teacher.pt").unlink()  # rebuilt from the pool on demand; not worth the disk
    write_json(out / "result.json", result)
    return result


def select(ctx: Context, r: int) -> State:
    """Accept the best candidate of round r if it beats the current score; stop on R or patience."""
    prev = read_state(r - 1, ctx.root)
    results = [json.loads(p.read_text()) for p in sorted(round_dir(r, ctx.root).glob("cand_*/result.json"))]
    done = [x for x in results if not x.get("skipped")]
    best = max(done, key=lambda x: (x["score"], -x["index"]), default=None)
    if best is not None and best["score"] > prev.score:
        state = State(r, best["student_arch"], best["teacher"], best["ap"], best["ap50"], best["latency_ms"],
                      best["score"], 0, False, f"cand_{best['index']}")
        src = round_dir(r, ctx.root) / f"cand_{best['index']}" / "model.pt"
    else:
        state = State(**{**asdict(prev), "round": r, "stale": prev.stale + (not prev.stopped), "accepted": None})
        src = round_dir(r - 1, ctx.root) / "student.pt"
    state.stopped = prev.stopped or state.stale >= ctx.cfg["patience"] or r >= ctx.cfg["rounds"] or not done
    _write_state(state, src, ctx.root)
    return state


def compute_spent(cpu_seconds: float, seconds: float, device: str) -> tuple[float, str]:
    """The compute a job spent, in the unit pipelines are matched on: CPU-seconds on CPU (robust
    to other jobs sharing the cores), GPU-seconds (wall time of its one GPU) on CUDA."""
    return (cpu_seconds, "cpu_seconds") if device == "cpu" else (seconds, "gpu_seconds")


def write_history(root: Path, params: dict, out: Path | None = None) -> pd.DataFrame:
    """history.csv: one row per trained candidate, with whether its round accepted it; and
    summary.json: the latency target and the compute all candidate jobs spent."""
    rounds = params["search"]["rounds"]
    rows = []
    for r in range(1, rounds + 1):
        accepted = read_state(r, root).accepted
        for p in sorted(round_dir(r, root).glob("cand_*/result.json")):
            x = json.loads(p.read_text())
            if not x.get("skipped"):
                rows.append({**{k: x[k] for k in HISTORY_COLUMNS if k in x},
                             "accepted": accepted == f"cand_{x['index']}"})
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values(["round", "index"])
    with atomic_path(out or root / "history.csv") as tmp:
        df.to_csv(tmp, index=False)
    cpu, wall = float(df["cpu_seconds"].fillna(0).sum()), float(df["seconds"].fillna(0).sum())
    compute, unit = compute_spent(cpu, wall, params["device"])
    write_json(root / "summary.json", {
        "rounds": rounds, "candidates_trained": len(df), "accepted": int(df["accepted"].sum()),
        "target_ms": params["search"]["latency_target"] * read_state(0, root).latency_ms,
        "penalty": params["search"]["penalty"], "cpu_seconds": round(cpu, 2), "seconds": round(wall, 2),
        "compute": round(compute, 2), "compute_unit": unit})
    return df


def inputs_fingerprint(stage: str, params: dict, inputs: list[Path]) -> str:
    """A hash of what a stage's resumable files belong to: the params it reads, its input files
    and its code (as DVC sees them: a change to any of them reruns the stage)."""
    import jdnas
    from jdnas.base_detector import fingerprint
    from jdnas.config import section
    from jdnas.io import file_sha256
    from jdnas.stages import STAGES
    s = STAGES[stage]
    root = Path(jdnas.__file__).parent.parent
    code = sorted(p for c in s.code for p in ([root / c] if (root / c).is_file() else (root / c).rglob("*.py")))
    return fingerprint({k: section(params, k) for k in s.params}, [file_sha256(p) for p in inputs],
                       [file_sha256(p) for p in code])


def run_search(ctx: Context) -> State:
    """Every round in one process (the DVC stage), resuming from the files already written by the
    same params and inputs (other files are cleared first)."""
    resume_dir(ctx.root, inputs_fingerprint("search", ctx.params, ctx.inputs))
    if not (round_dir(0, ctx.root) / "state.json").is_file():
        init_search(ctx)
    rounds, k = ctx.cfg["rounds"], ctx.cfg["candidates"]
    for r in range(1, rounds + 1):
        if (round_dir(r, ctx.root) / "state.json").is_file():
            continue
        if not (round_dir(r, ctx.root) / "proposals.json").is_file():
            write_proposals(ctx, r)
        for i in range(k):
            if not (round_dir(r, ctx.root) / f"cand_{i}" / "result.json").is_file():
                run_candidate(ctx, r, i)
        select(ctx, r)
    write_history(ctx.root, ctx.params)
    return read_state(rounds, ctx.root)


def evaluate_final(params: dict, data_dir: str | Path, state_path: str | Path, base: str | Path,
                   out_dir: str | Path) -> dict[str, Any]:
    """The final student and the base detector on val: AP, measured latency, params, FLOPs."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import load_detector, save_detector
    from jdnas.latency.measure import latency_images, measure_latency
    device = resolve_device(params["device"])
    state = json.loads(Path(state_path).read_text())
    ev = params["teacher_pool"]["eval"]
    models = {"final": load_detector(Path(state_path).parent / "student.pt", device),
              "base": load_detector(base, device)}
    images = latency_images(Path(data_dir) / "val.json", models["base"].head_cfg["max_size"])
    # both timed in the same interleaved rounds: what differs between them is the models
    latency = measure_latency(models, images, ev["latency_runs"] * 4, ev["latency_threads"], device,
                              params["latency"]["clock"])
    summary: dict[str, Any] = {}
    for name, model in models.items():
        m = evaluate(model, Path(data_dir) / "val.json", params["eval"]["batch_size"], device)
        m.update({"arch": str(model.arch), "params": count_params(model), "flops": count_flops(model),
                  "latency_ms": latency[name]})
        summary[name] = m
    save_detector(Path(out_dir) / "model.pt", models["final"].cpu(), stage="evaluate_final", metrics=summary["final"],
                  teacher=state["teacher"], search_round=state["round"])
    write_json(Path(out_dir) / "metrics.json", summary)
    return summary
