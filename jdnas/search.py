"""Joint search (DESIGN §8): hill climbing over (student, teacher) pairs, in checkpointed rounds.

Files, under `runs/search/`:
  round_0/state.json, student.pt         the base detector, scored on minival
  round_r/proposals.json                 the control (cand_0: the current student, no action, same
                                         fine-tune and teacher) + K distinct (action, teacher) candidates
  round_r/cand_k/result.json, model.pt   a candidate trained with weight inheritance + KD
  round_r/state.json, student.pt         after selection (the best candidate, or the old state)
  history.csv                            every candidate of every round

Each file is one Snakemake job's output, so the DAG is static (R rounds x K candidates) and an
interrupted search resumes from the last finished job; `run_search` does the same rounds in
one process for `dvc repro`, skipping the files that exist. Randomness comes from the params
seed plus the round and candidate index: the same params give the same search.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from jdnas.io import atomic_path, load_json, resume_dir, write_json
from jdnas.latency import LatencyTable, NotCovered
from jdnas.models.arch import Arch, Head
from jdnas.models.elastic import PoolSpace
from jdnas.morphism import child, legal_actions

SEARCH = Path("runs/search")
HISTORY_COLUMNS = ["round", "index", "control", "action", "teacher", "teacher_arch", "teacher_ap", "student_arch",
                   "student_head", "ap", "ap50", "latency_ms", "meets_target", "score", "accepted", "seconds",
                   "cpu_seconds", "student_params", "student_flops", "teacher_params", "teacher_flops"]
CONTROL = "none"  # the control candidate's action


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
    student_head: str
    teacher: str
    ap: float
    ap50: float
    latency_ms: float       # predicted by the latency table
    target_ms: float
    score: float
    stale: int = 0          # rounds since the architecture last changed
    stopped: bool = False
    accepted: str | None = None   # "cand_k" taken this round (cand_0: the control, no architecture change)

    @property
    def meets_target(self) -> bool:
        return self.latency_ms <= self.target_ms


def score(ap: float, latency_ms: float, target_ms: float, penalty: float) -> float:
    """AP minus `penalty` per unit of relative latency overshoot beyond the target; -inf when the
    latency is not a finite number (a NaN overshoot must never look like none)."""
    if not math.isfinite(latency_ms):
        return -math.inf
    return ap - penalty * max(0.0, latency_ms / target_ms - 1.0)


def round_dir(r: int, root: Path = SEARCH) -> Path:
    return root / f"round_{r}"


def read_state(r: int, root: Path = SEARCH) -> State:
    return load_state(round_dir(r, root) / "state.json")


def load_state(path: Path) -> State:
    names = [f.name for f in fields(State)]
    obj = load_json(path, [f.name for f in fields(State) if f.default is MISSING])
    return State(**{k: v for k, v in obj.items() if k in names})


def finish_dir(root: Path = SEARCH) -> Path:
    """The search's last step: its winner fine-tuned on (see `finish`)."""
    return root / "finish"


def _write_state(state: State, student_src: Path, root: Path, d: Path | None = None) -> None:
    d = d or round_dir(state.round, root)
    d.mkdir(parents=True, exist_ok=True)
    if student_src.resolve() != (d / "student.pt").resolve():
        with atomic_path(d / "student.pt") as tmp:
            shutil.copyfile(student_src, tmp)
    # written last: its presence means the round is done
    write_json(d / "state.json", {**asdict(state), "meets_target": state.meets_target})


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
        ckpt = read_checkpoint(base)
        self.base_arch, self.base_head = Arch.from_json(ckpt["arch"]), Head.of(ckpt["head"])
        self.target_ms = self.cfg["latency_target"] * self.latency(self.base_arch, self.base_head)

    def latency(self, arch: Arch, head: Head) -> float:
        return self.table.predict(arch, head)

    def score(self, ap: float, latency_ms: float) -> float:
        return score(ap, latency_ms, self.target_ms, self.cfg["penalty"])

    def actions(self, state: State) -> list[str]:
        return candidate_actions(state, self.params, self.table, self.base_head)


def candidate_actions(state: State, params: dict, table: LatencyTable, base_head: Head) -> list[str]:
    """The legal actions of the state's student whose child the table predicts. Above the target:
    those that bring the predicted latency down by more than `search.latency_tolerance` (if none
    does, those that bring it down at all); under it: those whose child stays under it."""
    arch, head = Arch.parse(state.student_arch), Head.parse(state.student_head)
    lat = {}
    for a in legal_actions(arch, params["search_space"], head, base_head):
        try:
            lat[str(a)] = table.predict(*child(a, arch, head))
        except NotCovered:
            continue
    if state.latency_ms > state.target_ms:
        cut = state.latency_ms * (1 - params["search"]["latency_tolerance"])
        return [a for a, ms in lat.items() if ms < cut] or [a for a, ms in lat.items() if ms < state.latency_ms]
    return [a for a, ms in lat.items() if ms <= state.target_ms]


def init_search(ctx: Context) -> State:
    """Round 0: the base detector on minival, with the pool's largest member as teacher."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.detector import load_detector
    device = resolve_device(ctx.params["device"])
    metrics = evaluate(load_detector(ctx.base, device), ctx.data_dir / "minival.json",
                       ctx.params["eval"]["batch_size"], device)
    lat = ctx.latency(ctx.base_arch, ctx.base_head)
    state = State(0, str(ctx.base_arch), str(ctx.base_head), str(largest_teacher(ctx.space)), metrics["AP"],
                  metrics["AP50"], lat, ctx.target_ms, ctx.score(metrics["AP"], lat))
    _write_state(state, ctx.base, ctx.root)
    return state


def propose(state: State, r: int, params: dict, space: PoolSpace, actions: list[str]) -> list[Candidate]:
    """The control (index 0: no action, the current teacher) and up to K distinct (action, teacher)
    pairs drawn from `actions` for round r, seeded by (seed, r); none once stopped. Actions are
    drawn without replacement while some are left, so a round tries K different actions."""
    cfg = params["search"]
    if state.stopped:
        return []
    rng = random.Random(params["seed"] * 1_000_003 + r)
    current = Teacher.parse(state.teacher)
    out = [Candidate(r, 0, CONTROL, str(current), params["seed"] * 1_000_003 + r * 101)]
    if not actions:
        return out
    moves = ("keep", "mutate", "resample")
    weights = [cfg["teacher_keep"], cfg["teacher_mutate"], cfg["teacher_resample"]]
    seen: set[tuple[str, str]] = set()
    unused = list(actions)
    for _ in range(50 * cfg["candidates"]):
        if len(out) == cfg["candidates"] + 1:
            break
        action = unused.pop(rng.randrange(len(unused))) if unused else rng.choice(actions)
        move = rng.choices(moves, weights)[0]
        teacher = (current if move == "keep" else mutate_teacher(current, space, rng) if move == "mutate"
                   else sample_teacher(space, rng))
        key = (str(action), str(teacher))
        if key not in seen:
            seen.add(key)
            out.append(Candidate(r, len(out), str(action), str(teacher), params["seed"] * 1_000_003 + r * 101 + len(out)))
    return out


def write_proposals(ctx: Context, r: int) -> list[Candidate]:
    state = read_state(r - 1, ctx.root)
    cands = propose(state, r, ctx.params, ctx.space, ctx.actions(state))
    write_json(round_dir(r, ctx.root) / "proposals.json", [asdict(c) for c in cands])
    return cands


def run_candidate(ctx: Context, r: int, k: int) -> dict[str, Any]:
    """Train candidate k of round r (inherit weights, KD from its teacher), score it on minival."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import save_detector
    from jdnas.student import train_student
    from jdnas.teacher_pool import TeacherPool
    out = round_dir(r, ctx.root) / f"cand_{k}"
    cands = load_json(round_dir(r, ctx.root) / "proposals.json")
    if k >= len(cands):  # early stop, or fewer distinct candidates than K
        result = {"round": r, "index": k, "skipped": True}
        write_json(out / "result.json", result)
        return result
    c = Candidate(**cands[k])
    result = {"round": r, "index": k, "skipped": False, "control": c.action == CONTROL,
              **_train_with_teacher(ctx, ctx.params, out, round_dir(r - 1, ctx.root) / "student.pt", c.action,
                                    c.teacher, c.seed)}
    write_json(out / "result.json", result)
    return result


def _train_with_teacher(ctx: Context, params: dict, out: Path, init: Path, action: str, teacher_name: str,
                        seed: int) -> dict[str, Any]:
    """Extract the teacher from the pool, train `init` after `action` with KD from it (out/model.pt),
    score it on minival; the result fields of a candidate, with the compute it spent."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import save_detector
    from jdnas.student import train_student
    from jdnas.teacher_pool import TeacherPool
    t0, cpu0 = time.time(), time.process_time()
    teacher_arch = Teacher.parse(teacher_name).arch(ctx.space)
    pool = TeacherPool.load(ctx.supernet, ctx.data_dir, params)
    teacher = pool.teacher(teacher_arch).cpu()
    teacher_ap = evaluate(teacher, ctx.data_dir / "minival.json", params["eval"]["batch_size"],
                          resolve_device(params["device"]))["AP"]
    save_detector(out / "teacher.pt", teacher, stage="search", teacher=teacher_name)
    metrics = train_student(params, ctx.data_dir, out, init, action, out / "teacher.pt", eval_split="minival",
                            seed=seed)
    arch, head = Arch.parse(metrics["arch"]), Head.parse(metrics["head"])
    lat = ctx.latency(arch, head)
    (out / "teacher.pt").unlink()  # rebuilt from the pool on demand; not worth the disk
    return {"action": action, "teacher": teacher_name, "teacher_arch": str(teacher_arch), "teacher_ap": teacher_ap,
            "student_arch": str(arch), "student_head": str(head), "ap": metrics["AP"], "ap50": metrics["AP50"],
            "latency_ms": round(lat, 4), "meets_target": lat <= ctx.target_ms,
            "score": round(ctx.score(metrics["AP"], lat), 4),
            "student_params": metrics["params"], "student_flops": metrics["flops"],
            "teacher_params": count_params(teacher), "teacher_flops": count_flops(teacher),
            "iters": metrics["train_iters"],
            # a resumed job adds what its killed predecessor's training spent
            "seconds": round(time.time() - t0, 2),
            "cpu_seconds": round(time.process_time() - cpu0 + metrics["resumed_cpu_seconds"], 2),
            "started": t0, "finished": time.time()}


def finish(ctx: Context) -> State:
    """The search's winner trained on for `search.final_iters` iterations with KD from its teacher
    (same recipe as a candidate; the architecture and the teacher stay): the rounds spend most of
    their compute on candidates that lose, so the student they hand back has had only its own
    rounds' fine-tunes. 0 iterations: the winner as the rounds left it. Writes finish/state.json,
    student.pt and result.json (its compute: it counts in the search's)."""
    last = read_state(ctx.cfg["rounds"], ctx.root)
    d = finish_dir(ctx.root)
    src = round_dir(last.round, ctx.root) / "student.pt"
    iters = ctx.cfg["final_iters"]
    result: dict[str, Any] = {"iters": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    state = last
    if iters > 0:
        params = {**ctx.params, "train_student": {**ctx.params["train_student"], "iters": iters}}
        seed = ctx.params["seed"] * 1_000_003 + 1_000_002  # the last of this seed's block (candidates: r * 101 + k)
        result = _train_with_teacher(ctx, params, d, src, CONTROL, last.teacher, seed)
        state = State(**{**asdict(last), "ap": result["ap"], "ap50": result["ap50"], "score": result["score"]})
        src = d / "model.pt"
    write_json(d / "result.json", result)
    _write_state(state, src, ctx.root, d)
    return state


def pick(results: list[dict], target_ms: float, penalty: float, tolerance: float, under: bool) -> dict:
    """The round's winner among the trained candidates (the control included). The target is a
    constraint: while the current student is above it (`under` false), a cut always wins (every
    candidate but the control is one: `candidate_actions` proposes only cuts there), the best score
    (AP - penalty x overshoot) among the cuts; the control trains on only when no cut finished.
    A latency within `tolerance` (relative) of the control's counts as the control's, so timing
    noise never buys a cut a lower penalty. (With the control competing above the target, a
    default run trained on in two of its six rounds, once 3% above the target against a cut under
    it: near the target the penalty is worth less than the AP that training on wins.) Once the
    student is under the target only candidates under it compete, on minival AP. Ties go to the
    lower index (the control first)."""
    control = next((x for x in results if x.get("control")), None)
    feasible = [x for x in results if x["latency_ms"] <= target_ms]
    if under and feasible:  # the control always is, unless its job failed
        return max(feasible, key=lambda x: (x["ap"], -x["index"]))

    def latency(x: dict) -> float:
        if control and abs(x["latency_ms"] - control["latency_ms"]) <= tolerance * control["latency_ms"]:
            return control["latency_ms"]
        return x["latency_ms"]
    cuts = [x for x in results if not x.get("control")] or results
    return max(cuts, key=lambda x: (score(x["ap"], latency(x), target_ms, penalty), -x["index"]))


def select(ctx: Context, r: int) -> State:
    """Move to the round's winner (see `pick`; the control keeps the architecture, trained on);
    stop after R rounds, or after `patience` rounds in which the architecture did not change."""
    prev = read_state(r - 1, ctx.root)
    results = [load_json(p, ["index", "skipped"])
               for p in sorted(round_dir(r, ctx.root).glob("cand_*/result.json"))]
    done = [x for x in results if not x.get("skipped")]
    if done:
        best = pick(done, ctx.target_ms, ctx.cfg["penalty"], ctx.cfg["latency_tolerance"], prev.meets_target)
        state = State(r, best["student_arch"], best["student_head"], best["teacher"], best["ap"], best["ap50"],
                      best["latency_ms"], ctx.target_ms, best["score"], 0 if not best.get("control") else prev.stale + 1,
                      False, f"cand_{best['index']}")
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
    summary.json: the latency target and the compute all candidate jobs and `finish` spent."""
    rounds = params["search"]["rounds"]
    rows = []
    for r in range(1, rounds + 1):
        accepted = read_state(r, root).accepted
        for p in sorted(round_dir(r, root).glob("cand_*/result.json")):
            x = load_json(p, ["index"])
            if not x.get("skipped"):
                rows.append({**{k: x[k] for k in HISTORY_COLUMNS if k in x},
                             "accepted": accepted == f"cand_{x['index']}"})
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values(["round", "index"])
    with atomic_path(out or root / "history.csv") as tmp:
        df.to_csv(tmp, index=False)
    fin = load_json(finish_dir(root) / "result.json", ["iters", "seconds", "cpu_seconds"])
    cpu = float(df["cpu_seconds"].fillna(0).sum()) + fin["cpu_seconds"]
    wall = float(df["seconds"].fillna(0).sum()) + fin["seconds"]
    compute, unit = compute_spent(cpu, wall, params["device"])
    write_json(root / "summary.json", {
        "rounds": rounds, "candidates_trained": len(df), "accepted": int(df["accepted"].sum()),
        "target_ms": params["search"]["latency_target"] * read_state(0, root).latency_ms,
        "penalty": params["search"]["penalty"], "final_iters": fin["iters"],
        "final_cpu_seconds": fin["cpu_seconds"], "final_minival_ap": fin.get("ap"),
        "cpu_seconds": round(cpu, 2), "seconds": round(wall, 2), "compute": round(compute, 2), "compute_unit": unit})
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
        for i in range(k + 1):  # the control and K candidates
            if not (round_dir(r, ctx.root) / f"cand_{i}" / "result.json").is_file():
                run_candidate(ctx, r, i)
        select(ctx, r)
    if not (finish_dir(ctx.root) / "state.json").is_file():
        finish(ctx)
    write_history(ctx.root, ctx.params)
    return load_state(finish_dir(ctx.root) / "state.json")


def deployment_latency(models: dict[str, Any], data_dir: Path, out_dir: Path, params: dict,
                       max_size: int) -> dict[str, dict]:
    """The models exported to ONNX (out_dir/model.onnx for the final student; the base's in a
    temporary folder), checked against PyTorch on the val images latency is timed on, then timed
    under onnxruntime on the CPU in one interleaved measurement: the latency they ship with."""
    import tempfile
    import torch
    from jdnas.export import OnnxDetector, export_onnx
    from jdnas.latency.measure import compare_on_val, latency_images
    images = latency_images(data_dir / "val.json", max_size)
    threads = params["teacher_pool"]["eval"]["latency_threads"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: out_dir / "model.onnx" if name == "final" else Path(tmp) / f"{name}.onnx" for name in models}
        checks = {name: export_onnx(models[name].cpu(), paths[name], images) for name in models}
        latency = compare_on_val({name: OnnxDetector(p, threads) for name, p in paths.items()}, data_dir, params,
                                 torch.device("cpu"), max_size)
    for c in checks.values():
        c.pop("path")
    return {"latency": latency, "checks": checks}


def evaluate_final(params: dict, data_dir: str | Path, state_path: str | Path, base: str | Path,
                   out_dir: str | Path, latency_table: str | Path) -> dict[str, Any]:
    """The final student and the base detector on val: AP, measured latency, predicted latency per
    part (from the table), params, FLOPs; whether the final student meets the target."""
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import load_detector, save_detector
    from jdnas.latency.measure import compare_on_val
    device = resolve_device(params["device"])
    state = asdict(load_state(Path(state_path)))
    state["meets_target"] = state["latency_ms"] <= state["target_ms"]
    models = {"final": load_detector(Path(state_path).parent / "student.pt", device),
              "base": load_detector(base, device)}
    round0 = asdict(load_state(Path(state_path).parent.parent / "round_0" / "state.json"))
    table = LatencyTable.load(latency_table)
    # both timed in the same interleaved rounds: what differs between them is the models
    max_size = models["base"].head_cfg["max_size"]
    latency = compare_on_val(models, data_dir, params, device, max_size)
    deployed = deployment_latency(models, Path(data_dir), Path(out_dir), params, max_size)
    summary: dict[str, Any] = {}
    for name, model in models.items():
        m = evaluate(model, Path(data_dir) / "val.json", params["eval"]["batch_size"], device)
        m.update({"arch": str(model.arch), "head": str(Head.of(model.head_cfg)), "params": count_params(model),
                  "flops": count_flops(model), "latency_ms": latency[name],
                  "latency_onnxruntime_ms": deployed["latency"][name], "onnx_check": deployed["checks"][name],
                  "predicted_latency_ms": state["latency_ms"] if name == "final" else round0["latency_ms"],
                  "predicted_breakdown_ms": {k: round(v, 4) for k, v in
                                             table.breakdown(model.arch, Head.of(model.head_cfg)).items()}})
        summary[name] = m
    summary["final"].update({"target_ms": state["target_ms"], "meets_target": state["meets_target"],
                             "latency_ratio": round(latency["final"] / latency["base"], 4),
                             "latency_ratio_onnxruntime": round(deployed["latency"]["final"]
                                                                / deployed["latency"]["base"], 4),
                             "predicted_latency_ratio": round(state["latency_ms"] / round0["latency_ms"], 4)})
    save_detector(Path(out_dir) / "model.pt", models["final"].cpu(), stage="evaluate_final", metrics=summary["final"],
                  teacher=state["teacher"], search_round=state["round"])
    write_json(Path(out_dir) / "metrics.json", summary)
    return summary
