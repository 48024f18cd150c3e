"""Joint search (DESIGN §8): one student lineage, changed one screened move at a time, with its teacher.

The search has one training budget, `search.iters` iterations on one lr schedule (warm-up once,
cosine over the whole search, the finish being its tail). Each round r:
1. `propose`: every legal move of the current student is screened without training (inherit,
   recalibrate BN, AP on a minival subset: `jdnas.joint.screen`). Above the target the first cut
   is prune_kd's (`Screen.greedy_cut`: one action at a time, each child screened again); the
   others are ranked by predicted latency saved per screen AP lost on this one screen and composed,
   best first (in passes over the ranking, so one part can be cut again); each goes until the
   round's share of the way to the target is made (the lineage reaches it in `cut_rounds` rounds, so
   the rest of the schedule trains the student at its final size and the later rounds use the
   headroom); under it the moves that add capacity back are ranked by screen AP, beside the
   control (no move), and those more than `grow_margin` screen AP below the control's are not
   trained (a move that wrecks the student is not worth a trial). The best `cut_candidates`
   cuts (above) or the control and the best `candidates` - 1 moves (under) become finalists;
   under the target also `teacher_moves` finalists that hold the best move fixed and change the
   teacher (the control is the lineage unchanged: no move, its own teacher).
2. `candidate` k: finalist k inherits the lineage (weights, momentum, KD adapters) and trains
   `trial_iters` (a cut above the target: `cut_trial_iters`, as what a cut took away shows later
   than what it broke) at the lineage's position in the schedule, on the same batches and seed as
   the other finalists; scored on minival, detections kept.
3. `select`: the winner by score (AP, less a penalty per unit of predicted overshoot above the
   target); a paired per-image bootstrap that calls two finalists a tie gives the round to the
   cheaper (down to the target: a cut past it buys nothing), then to the one closer to the
   lineage (the control, the current teacher). The winner
   trains on to the round's end of the schedule: its trial iterations count as lineage.
"The target" in every decision above is its aim, `search.latency_margin` under it as predicted
(`aim_ms`): trained students measured 1-8% over their predicted ratio to the base, so a student
just under the target as predicted measured over it (prune_kd and the naive pipeline cut to the
same aim; every `meets_target` is still judged at the target).
`finish` trains the lineage to the end of the schedule. Each distinct teacher is extracted from
the pool and recalibrated once per search (`teachers/`), and every job accounts its compute by
part (lineage training, discarded training, screening, evaluation, teacher extraction).

Files, under `runs/search/`:
  round_0/state.json, student.pt          the lineage's start (the base or its twin in the pool), scored on minival
  round_r/proposals.json, screen.csv      the finalists; every screened move
  round_r/cand_k/result.json, student.pt, lineage.pt, detections.json   a finalist after its trial
  round_r/state.json, student.pt, lineage.pt    the lineage at the round's end
  finish/state.json, student.pt, result.json    the lineage at the schedule's end
  history.csv, summary.json               every finalist of every round; the compute split
Each file is one Snakemake job's output, so the DAG is static (R rounds x K finalists); `run_search`
does the same in one process for `dvc repro`. Randomness comes from `derive_seed(seed, ...)`.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from jdnas.data.dataset import CocoDetection
from jdnas.data.prepare import prepared_bounds
from jdnas.engine.device import resolve_device
from jdnas.engine.loop import coco_metrics, predict, schedule_for
from jdnas.io import atomic_path, file_sha256, fingerprint, load_json, resume_dir, write_json
from jdnas.joint.bootstrap import image_matches, is_tie, paired_bootstrap
from jdnas.joint.lineage import (Lineage, Recipe, apply_moves, load_lineage, moves_text, parse_moves, save_lineage,
    train_segment)
from jdnas.joint.rounds import (ROOT, Candidate, State, finish_dir, load_state, pass_round, propose_nothing,
    read_state, round_dir, skip_slot, trained_finalists, write_state)
from jdnas.joint.screen import Screen, cut_gain
from jdnas.joint.teacher_pool import TeacherPool, load_supernet
from jdnas.latency import LatencyTable, NotCovered
from jdnas.models.arch import Arch, Head
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import Detector, load_detector, read_checkpoint, save_detector
from jdnas.models.elastic import PoolSpace
from jdnas.models.morphism import Action, child, is_legal, legal_actions
from jdnas.models.teacher_gene import TeacherGene, largest_gene, mutate_gene, sample_gene
from jdnas.seeding import derive_seed
from jdnas.stages import inputs_fingerprint

HISTORY_COLUMNS = ["round", "index", "control", "action", "teacher", "teacher_arch", "teacher_ap", "student_arch",
                   "student_head", "ap", "ap50", "latency_ms", "meets_target", "score", "accepted", "seconds",
                   "cpu_seconds", "student_params", "student_flops", "teacher_params", "teacher_flops", "screen_ap"]
CONTROL = "none"  # the control's move: the current student trained on
CUT_KINDS = ("shallow", "prune", "slim", "fpn_prune", "head_prune", "resize", "proposals")
GROW_KINDS = ("deepen", "shift", "widen")  # moves that add capacity back under the target
PARTS = ("lineage", "discarded", "screening", "evaluation", "teachers")  # summary.json's compute split


def aim_ms(target_ms: float, margin: float) -> float:
    """The predicted latency the pipelines cut to: `margin` (`search.latency_margin`) under the
    target, as trained students measured 1-8% over their predicted ratio to the base (docs/results.md)."""
    return target_ms * (1.0 - margin)


def score(ap: float, latency_ms: float, target_ms: float, penalty: float) -> float:
    """AP minus `penalty` per unit of relative latency overshoot beyond the target; -inf when the
    latency is not a finite number (a NaN overshoot must never look like none)."""
    if not math.isfinite(latency_ms):
        return -math.inf
    return ap - penalty * max(0.0, latency_ms / target_ms - 1.0)


class Spent:
    """CPU-seconds and seconds a job spent, by part (PARTS, or `training` until select knows
    whether a finalist's trial was lineage or discarded)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, float]] = {}

    def add(self, part: str, cpu: float, wall: float) -> None:
        p = self.parts.setdefault(part, {"cpu_seconds": 0.0, "seconds": 0.0})
        p["cpu_seconds"] = round(p["cpu_seconds"] + cpu, 3)
        p["seconds"] = round(p["seconds"] + wall, 3)

    @contextlib.contextmanager
    def on(self, part: str) -> Iterator[None]:
        t0, c0 = time.time(), time.process_time()
        try:
            yield
        finally:
            self.add(part, time.process_time() - c0, time.time() - t0)


def compute_spent(cpu_seconds: float, seconds: float, device: str) -> tuple[float, str]:
    """The compute a job spent, in the unit pipelines are matched on: CPU-seconds on CPU (robust
    to other jobs sharing the cores), GPU-seconds (wall time of its one GPU) on CUDA."""
    return (cpu_seconds, "cpu_seconds") if device == "cpu" else (seconds, "gpu_seconds")


# --- the context -------------------------------------------------------------------------------
class Context:
    """What every step needs, unpacked once from the params: data, pool, latency table, target,
    the lineage's recipe and the screen's settings."""

    def __init__(self, params: dict, data_dir: str | Path, supernet: str | Path, latency_table: str | Path,
                 base: str | Path, root: str | Path = ROOT) -> None:
        self.cfg = params["search"]
        self.seed = int(params["seed"])
        self.eval_batch = params["eval"]["batch_size"]
        self.pool_eval = params["teacher_pool"]["eval"]
        self.device = resolve_device(params["device"])
        self.data_dir, self.root = Path(data_dir), Path(root)
        self.base = Path(base)
        self.supernet_path = Path(supernet)
        self.inputs = [self.data_dir / "manifest.json", Path(supernet), Path(latency_table), self.base]
        self.supernet = load_supernet(supernet)
        self.space: PoolSpace = self.supernet.space
        self.pool_key = file_sha256(supernet)[:12]
        self.table = LatencyTable.load(latency_table)
        ckpt = read_checkpoint(base)
        self.base_arch, self.base_head = Arch.from_json(ckpt["arch"]), Head.of(ckpt["head"])
        self.bounds = prepared_bounds(params["search_space"], self.data_dir, self.base_head.min_size,
                                      self.base_head.max_size)
        self.target_ms = self.cfg["latency_target"] * self.latency(self.base_arch, self.base_head)
        self.aim_ms = aim_ms(self.target_ms, self.cfg["latency_margin"])  # what every decision cuts to
        self.recipe = Recipe.of(params["train_student"], self.cfg["iters"])
        self.device_name = params["device"]
        self.fingerprint = inputs_fingerprint("search", params, self.inputs)  # what its files belong to
        self._train_set: CocoDetection | None = None

    @property
    def train_set(self) -> CocoDetection:
        if self._train_set is None:
            self._train_set = CocoDetection(self.data_dir / "train.json", max_size=self.base_head.max_size)
        return self._train_set

    @property
    def minival(self) -> Path:
        return self.data_dir / "minival.json"

    def latency(self, arch: Arch, head: Head) -> float:
        return self.table.predict(arch, head)

    def score(self, ap: float, latency_ms: float) -> float:
        return score(ap, latency_ms, self.aim_ms, self.cfg["penalty"])

    def screen(self) -> Screen:
        return Screen(self.train_set, self.minival, self.cfg["screen_images"], self.cfg["screen_bn_batches"],
                      self.pool_eval["bn_batch_size"], self.eval_batch, derive_seed(self.seed, "screen"), self.device)


# --- teachers: extracted once per search ----------------------------------------------------------
def teacher_for(ctx: Context, gene: str, spent: Spent) -> tuple[Detector, dict[str, Any]]:
    """The pool member `gene` as a frozen detector with recalibrated BN, and its minival AP:
    extracted once per search (`teachers/<gene>-<pool>/`), reused by every later job."""
    d = ctx.root / "teachers" / f"{gene.replace('/', '_')}-{ctx.pool_key}"
    if (d / "info.json").is_file():
        return load_detector(d / "teacher.pt", ctx.device), load_json(d / "info.json")
    with spent.on("teachers"):
        pool = TeacherPool(ctx.supernet, ctx.train_set, ctx.pool_eval["bn_batches"], ctx.pool_eval["bn_batch_size"],
                           ctx.seed, ctx.device)
        model = pool.teacher(TeacherGene.parse(gene).arch(ctx.space))
    with spent.on("evaluation"):
        ap = coco_metrics(ctx.minival, predict(model, _dataset(ctx.minival, model), ctx.eval_batch, ctx.device))["AP"]
    info = {"teacher": gene, "teacher_arch": str(model.arch), "teacher_ap": ap,
            "teacher_params": count_params(model), "teacher_flops": count_flops(model)}
    d.mkdir(parents=True, exist_ok=True)
    save_detector(d / "teacher.pt", model.cpu(), stage="search", teacher=gene)
    write_json(d / "info.json", info)
    return model.to(ctx.device), info


def _dataset(gt: Path, model: Detector) -> CocoDetection:
    return CocoDetection(gt, max_size=model.head_cfg["max_size"])


# --- round 0 -------------------------------------------------------------------------------------
def init_search(ctx: Context) -> State:
    """Round 0: the lineage's start at iteration 0 of the schedule, scored on minival, with the
    pool's largest member as teacher. The start is the base detector or, with `search.from_pool`,
    the pool's twin of the base where it scores higher on minival (`TeacherPool.twin`; prune_kd
    starts the same way)."""
    spent = Spent()
    model = load_detector(ctx.base, ctx.device)
    metrics = _evaluate(ctx, model, None, spent)
    start, base_ap = "base", metrics["AP"]
    if ctx.cfg["from_pool"]:
        with spent.on("teachers"):
            twin = TeacherPool(ctx.supernet, ctx.train_set, ctx.pool_eval["bn_batches"],
                               ctx.pool_eval["bn_batch_size"], ctx.seed, ctx.device).twin(model)
        twin_metrics = _evaluate(ctx, twin, None, spent) if twin is not None else None
        if twin_metrics is not None and twin_metrics["AP"] > metrics["AP"]:  # a tie keeps the base
            model, metrics, start = twin, twin_metrics, "pool"
    lat = ctx.latency(ctx.base_arch, ctx.base_head)
    state = State(0, str(ctx.base_arch), str(ctx.base_head), str(largest_gene(ctx.space)), metrics["AP"],
                  metrics["AP50"], lat, ctx.target_ms, ctx.score(metrics["AP"], lat))
    d = round_dir(0, ctx.root)
    save_lineage(d, Lineage(model, 0, state.teacher))
    write_state(d, state, start=start, base_minival_ap=base_ap, compute=spent.parts)
    return state


# --- propose: screen every legal move ---------------------------------------------------------------
def candidate_actions(arch: Arch, head: Head, base_head: Head, bounds: dict, table: LatencyTable,
                      latency_ms: float, target_ms: float) -> dict[Action, float]:
    """The legal actions the round may use, with their child's predicted latency: above the target
    every cut that brings it down; under it every move that adds capacity back and stays under."""
    above = latency_ms > target_ms
    kinds = CUT_KINDS if above else GROW_KINDS
    out = {}
    for a in legal_actions(arch, bounds, head, base_head):
        if a.kind not in kinds:
            continue
        try:
            ms = table.predict(*child(a, arch, head))
        except NotCovered:
            continue
        if (ms < latency_ms) if above else (ms <= target_ms):
            out[a] = ms
    return out


def round_goal(latency_ms: float, target_ms: float, rounds_left: int) -> float:
    """The latency a round's cut must reach: an equal share (geometric) of the way to the target
    over the cut rounds left (`search.cut_rounds`), so the last of them arrives; the target itself
    when one (or none) is left."""
    if latency_ms <= target_ms:
        return target_ms
    return latency_ms * (target_ms / latency_ms) ** (1.0 / max(1, rounds_left))


def compose_cut(first: Action, ranked: list[Action], arch: Arch, head: Head, bounds: dict,
                base_head: Head, table: LatencyTable, goal_ms: float) -> tuple[list[Action], float]:
    """`first`, then the next best-ranked cuts, each legal where it lands and predicted faster,
    until the predicted latency reaches `goal_ms`; the move and its predicted latency. One pass
    over the ranking takes each kind and stage once; later passes go over it again on what the
    earlier ones left (prune_kd cuts the FPN four times: a one-pass composition would have to cut
    the backbone instead)."""
    moves: list[Action] = []
    a_arch, a_head, ms = arch, head, math.inf
    order = [first] + [x for x in ranked if x != first]
    while ms > goal_ms:
        used, before = set(), len(moves)
        for a in order:
            key = (a.kind, a.stage)
            if key in used or not is_legal(a, a_arch, bounds, a_head, base_head):
                continue
            n_arch, n_head = child(a, a_arch, a_head)
            try:
                n_ms = table.predict(n_arch, n_head)
            except NotCovered:
                continue
            if moves and n_ms >= ms:
                continue
            moves.append(a)
            used.add(key)
            a_arch, a_head, ms = n_arch, n_head, n_ms
            if ms <= goal_ms:
                break
        if len(moves) == before:  # nothing legal and faster is left
            break
    return moves, ms


def rank_cuts(rows: list[dict], parent_ap: float, latency_ms: float) -> list[dict]:
    """Cuts by predicted latency saved per screen AP lost (`cut_gain`),
    as prune_kd ranks them; ties keep the screen's (legal_actions') order."""
    # stable: equal gains keep the screen's order
    return sorted(rows, key=lambda x: -cut_gain(latency_ms - x["latency_ms"], parent_ap - x["ap"]))


def cut_starts(ranked: list[dict], latency_ms: float, tolerance: float) -> list[tuple[Action, list[Action]]]:
    """Where finalists' cuts start, and the order they compose in: alternately by efficiency alone
    and big cuts first (those saving more than `tolerance` of the latency, prune_kd's rule), so
    that many small cuts and a few big ones both reach the trial, where training decides."""
    by_gain = [x["action"] for x in ranked]
    big = [x["action"] for x in ranked if x["latency_ms"] < latency_ms * (1 - tolerance)]
    by_size = big + [a for a in by_gain if a not in big]
    starts = []
    for a, b in zip(by_gain, by_size):
        starts += [(a, by_gain), (b, by_size)]
    return starts


def _chain_latency(moves: list[Action], arch: Arch, head: Head, bounds: dict, base_head: Head,
                   table: LatencyTable) -> float | None:
    """The predicted latency after `moves` in order, or None when one is illegal where it lands."""
    for a in moves:
        if not is_legal(a, arch, bounds, head, base_head):
            return None
        arch, head = child(a, arch, head)
    try:
        return table.predict(arch, head)
    except NotCovered:
        return None


def trim_cut(moves: list[Action], ms: float, arch: Arch, head: Head, bounds: dict, base_head: Head,
             table: LatencyTable, goal_ms: float) -> tuple[list[Action], float]:
    """The composed cut less every cut the goal no longer needs (the least efficient tried first):
    a cut that lands far below the goal costs AP for latency nobody asked for."""
    moves = list(moves)
    for i in reversed(range(len(moves))):
        rest = moves[:i] + moves[i + 1:]
        lat = _chain_latency(rest, arch, head, bounds, base_head, table) if rest else None
        if lat is not None and lat <= goal_ms:
            moves, ms = rest, lat
    return moves, ms


def teacher_move(current: str, space: PoolSpace, cfg: dict, rng: random.Random) -> str:
    """Another teacher: one stage's depth or width changed, or a new member drawn."""
    gene = TeacherGene.parse(current)
    total = cfg["teacher_mutate"] + cfg["teacher_resample"]
    for _ in range(20):
        new = (mutate_gene(gene, space, rng) if rng.random() * total < cfg["teacher_mutate"]
               else sample_gene(space, rng))
        if new != gene:
            return str(new)
    return current


def _screen(ctx: Context, screen: Screen, lin: Lineage, options: dict[Action, float], state: State, r: int,
            spent: Spent) -> tuple[float, list[dict]]:
    """The parent's screen AP and `{"action", "latency_ms", "ap", "model"}` per legal move (the
    child screened; ablation `search.screen: false`: every move alike, in a seeded random order,
    no child)."""
    if not ctx.cfg["screen"]:
        rows = [{"action": a, "latency_ms": ms, "ap": state.ap} for a, ms in options.items()]
        random.Random(derive_seed(ctx.seed, "draw", r)).shuffle(rows)
        return state.ap, rows
    with spent.on("screening"):
        parent_ap = screen.score(lin.model)
        rows = [{**x, "latency_ms": options[x["action"]]}
                for x in screen.actions(lin.model, list(options), seed=derive_seed(ctx.seed, "morph", r))]
    return parent_ap, rows


def cuts_above(bounds: dict, base_head: Head, table: LatencyTable,
               target_ms: float) -> Callable[[Detector, float], dict[Action, float]]:
    """`Screen.greedy_cut`'s cuts of a student above the target (`candidate_actions`)."""
    return lambda m, ms: candidate_actions(m.arch, Head.of(m.head_cfg), base_head, bounds, table, ms, target_ms)


def _greedy_cut(ctx: Context, screen: Screen, lin: Lineage, rows: list[dict], parent_ap: float, latency_ms: float,
                goal: float, r: int, spent: Spent) -> tuple[list[Action], float, float]:
    """prune_kd's cut (`Screen.greedy_cut`): one action at a time, every cut of each child screened
    again, from this round's screen of the parent; (moves, predicted latency, screen AP)."""
    cuts = cuts_above(ctx.bounds, ctx.base_head, ctx.table, ctx.aim_ms)
    with spent.on("screening"):
        _, plan = screen.greedy_cut(lin.model, parent_ap, latency_ms, goal, cuts, ctx.cfg["latency_tolerance"],
                                    seed=derive_seed(ctx.seed, "morph", r), first=rows)
    return [x["action"] for x in plan], plan[-1]["latency_ms"] if plan else latency_ms, \
        plan[-1]["screen_ap"] if plan else parent_ap


def _cut_finalists(ctx: Context, screen: Screen, lin: Lineage, rows: list[dict], parent_ap: float,
                   latency_ms: float, goal: float, r: int,
                   spent: Spent) -> list[tuple[list[Action], float, float | None]]:
    """Up to `search.cut_candidates` distinct cuts that reach the round's goal: (moves, predicted
    latency, screen AP where known). First prune_kd's greedy cut (screened step by step), then
    cuts composed from this screen alone, alternately small-first and big-first."""
    arch, head = lin.model.arch, Head.of(lin.model.head_cfg)
    ranked = rank_cuts(rows, parent_ap, latency_ms)
    screen_ap = {x["action"]: x["ap"] for x in rows}
    tried: list[tuple[list[Action], float, float | None]] = []
    if ctx.cfg["screen"]:
        tried.append(_greedy_cut(ctx, screen, lin, rows, parent_ap, latency_ms, goal, r, spent))
    for first, order in cut_starts(ranked, latency_ms, ctx.cfg["latency_tolerance"]):
        moves, ms = compose_cut(first, order, arch, head, ctx.bounds, ctx.base_head, ctx.table, goal)
        tried.append((moves, ms, screen_ap[moves[0]] if len(moves) == 1 else None))
    finalists, seen = [], set()
    for moves, ms, ap in tried:
        trimmed, ms = trim_cut(moves, ms, arch, head, ctx.bounds, ctx.base_head, ctx.table, goal)
        key = tuple(sorted(map(str, trimmed)))
        if trimmed and key not in seen:
            seen.add(key)
            finalists.append((trimmed, ms, ap if trimmed == moves else None))
        if len(finalists) == ctx.cfg["cut_candidates"]:
            break
    return finalists


def propose(ctx: Context, r: int) -> dict[str, Any]:
    """Screen the current student's legal moves; the round's finalists (proposals.json) and every
    screened move (screen.csv)."""
    nothing = propose_nothing(r, ctx.root)  # the search stopped
    if nothing is not None:
        return nothing
    state = read_state(r - 1, ctx.root)
    d = round_dir(r, ctx.root)
    d.mkdir(parents=True, exist_ok=True)
    spent = Spent()
    lin = load_lineage(round_dir(r - 1, ctx.root))
    arch, head = lin.model.arch, Head.of(lin.model.head_cfg)
    above = state.latency_ms > ctx.aim_ms
    options = candidate_actions(arch, head, ctx.base_head, ctx.bounds, ctx.table, state.latency_ms, ctx.aim_ms)
    rng = random.Random(derive_seed(ctx.seed, "teacher", r))
    k = ctx.cfg["candidates"]
    with ctx.screen() as screen:  # one per round: the greedy cut screens on with it
        # under the target with no growth finalist wanted, the control alone goes on: nothing to screen
        parent_ap, rows = _screen(ctx, screen, lin, options, state, r, spent) if above or k > 1 else (None, [])
        if above:
            goal = round_goal(state.latency_ms, ctx.aim_ms, min(ctx.cfg["cut_rounds"], ctx.cfg["rounds"]) - r + 1)
            finalists = _cut_finalists(ctx, screen, lin, rows, parent_ap, state.latency_ms, goal, r, spent)
        else:
            finalists = [([], state.latency_ms, parent_ap)]  # the control: it can win here
            grown = [x for x in rows if x["ap"] >= parent_ap - ctx.cfg["grow_margin"]]  # the screen drops the rest
            finalists += [([x["action"]], x["latency_ms"], x["ap"])
                          for x in sorted(grown, key=lambda x: -x["ap"])[:k - 1]]
    cands = [Candidate(r, i, moves_text(m), state.teacher, ap, round(ms, 4)) for i, (m, ms, ap) in
             enumerate(finalists)]
    if cands and not above:  # a teacher competes where the lineage does not have to move
        for _ in range(ctx.cfg["teacher_moves"]):
            t = teacher_move(state.teacher, ctx.space, ctx.cfg, rng)
            if t != state.teacher and all((c.action, c.teacher) != (cands[0].action, t) for c in cands):
                cands.append(replace(cands[0], index=len(cands), teacher=t))
    pd.DataFrame([{"action": str(x["action"]), "latency_ms": round(x["latency_ms"], 4), "screen_ap": x["ap"]}
                  for x in rows], columns=["action", "latency_ms", "screen_ap"]).to_csv(d / "screen.csv", index=False)
    out = {"parent_screen_ap": parent_ap, "above_target": above, "candidates": [asdict(c) for c in cands],
           "compute": spent.parts}
    write_json(d / "proposals.json", out)
    return out


# --- candidate: a finalist's trial --------------------------------------------------------------------
def _evaluate(ctx: Context, model: Detector, out: Path | None, spent: Spent) -> dict[str, Any]:
    """Minival metrics of `model`; its detections kept in out/detections.json (for the bootstrap)."""
    with spent.on("evaluation"):
        dets = predict(model, _dataset(ctx.minival, model), ctx.eval_batch, ctx.device)
        metrics = coco_metrics(ctx.minival, dets)
    if out is not None:
        write_json(out / "detections.json", dets)
    return metrics


def _train(ctx: Context, lin: Lineage, teacher: Detector, until: int, seed: int, out: Path, spent: Spent,
           part: str, init: Path) -> Lineage:
    """The lineage trained to `until`, resumable through out/train_state.pt."""
    fp = fingerprint(file_sha256(init)[:16], lin.it, until, lin.teacher, ctx.recipe.cfg, seed, ctx.pool_key,
                      ctx.cfg["continuous"])
    recipe, start, stop = ctx.recipe, lin, until
    if not ctx.cfg["continuous"]:  # ablation: the segment restarts a schedule of its own, momentum and adapters
        recipe = replace(recipe, cfg=schedule_for(ctx.recipe.cfg, until - lin.it))
        start, stop = replace(lin, it=0, momentum={}, adapters={}), until - lin.it
    t0, c0 = time.time(), time.process_time()
    lin, summary = train_segment(start, teacher, ctx.train_set, recipe, stop, seed, out / "train_state.pt",
                                 ctx.device, fp, desc=f"search {out.name}")
    spent.add(part, time.process_time() - c0 + summary["resumed_cpu_seconds"], time.time() - t0)
    return replace(lin, it=until)


def run_candidate(ctx: Context, r: int, k: int) -> dict[str, Any]:
    """Finalist k of round r: the lineage after its move, trained `trial_iters` (a cut above the
    target: `cut_trial_iters`) with KD from its teacher at the lineage's position, on the round's
    batches and seed; scored on minival. A round's only finalist has nothing to be compared with:
    it trains to the round's end at once, and is scored once."""
    skipped = skip_slot(r, k, ctx.root)  # a stopped search, or fewer distinct finalists than slots
    if skipped is not None:
        return skipped
    d = round_dir(r, ctx.root)
    out = d / f"cand_{k}"
    out.mkdir(parents=True, exist_ok=True)
    proposals = load_json(d / "proposals.json", ["candidates"])
    cands = proposals["candidates"]
    c = Candidate(**cands[k])
    spent, started = Spent(), time.time()
    init = round_dir(r - 1, ctx.root) / "student.pt"
    lin = apply_moves(load_lineage(init.parent), parse_moves(c.action), seed=derive_seed(ctx.seed, "morph", r, k))
    control = c.action == CONTROL and c.teacher == lin.teacher  # the lineage trained on unchanged
    lin = replace(lin, teacher=c.teacher)
    teacher, info = teacher_for(ctx, c.teacher, spent)
    trial = ctx.cfg["cut_trial_iters" if proposals.get("above_target") else "trial_iters"]
    until = min(lin.it + (ctx.cfg["round_iters"] if len(cands) == 1 else trial), ctx.cfg["iters"])
    seed = derive_seed(ctx.seed, "trial", r) if ctx.cfg["paired"] else derive_seed(ctx.seed, "trial", r, k)
    lin = _train(ctx, lin, teacher, until, seed, out, spent, "training", init)
    metrics = _evaluate(ctx, lin.model, out, spent)
    save_lineage(out, lin, stage="search")
    (out / "train_state.pt").unlink(missing_ok=True)
    arch, head = lin.model.arch, Head.of(lin.model.head_cfg)
    lat = ctx.latency(arch, head)
    result = {"round": r, "index": k, "skipped": False, "control": control, "action": c.action,
              **info, "student_arch": str(arch), "student_head": str(head), "screen_ap": c.screen_ap,
              "ap": metrics["AP"], "ap50": metrics["AP50"], "latency_ms": round(lat, 4),
              "meets_target": lat <= ctx.target_ms, "score": round(ctx.score(metrics["AP"], lat), 4),
              "student_params": count_params(lin.model), "student_flops": count_flops(lin.model),
              "it": lin.it, "compute": spent.parts, **_totals(spent.parts), "started": started,
              "finished": time.time()}
    write_json(out / "result.json", result)
    return result


def _totals(parts: dict[str, dict[str, float]]) -> dict[str, float]:
    return {"cpu_seconds": round(sum(p["cpu_seconds"] for p in parts.values()), 2),
            "seconds": round(sum(p["seconds"] for p in parts.values()), 2)}


# --- select: paired decisions, then the winner trains on ----------------------------------------------
def pick(results: list[dict], target_ms: float, penalty: float, tolerance: float, under: bool,
         current_teacher: str, tie: Callable[[dict, dict, float], bool]) -> dict:
    """The round's winner among the trained finalists. Under the target only finalists under it
    compete, on minival AP; above it, on score (AP - penalty x predicted overshoot). The best
    score leads; a finalist that `tie(leader, other, offset)` (the paired bootstrap, with `offset`
    the score difference the latencies make) cannot tell apart takes the lead when it is cheaper:
    a student whose predicted latency is lower by more than `tolerance` (the table's error; latency
    under the target counts as the target: a cut past it buys nothing), or as fast a student with a
    teacher of fewer FLOPs by more than `tolerance` (every lineage iteration runs the teacher: the
    search's compute, which the matched baselines get, shrinks), or as cheap and closer to the
    lineage (the control, then the current teacher). Ties in score go to the lower index."""
    pool = [x for x in results if x["latency_ms"] <= target_ms] if under else list(results)
    pool = pool or list(results)

    def s(x: dict) -> float:
        return x["ap"] if under else score(x["ap"], x["latency_ms"], target_ms, penalty)

    def closeness(x: dict) -> int:
        return 0 if x.get("control") else 1 if x["teacher"] == current_teacher else 2

    def cost(x: dict) -> float:
        return max(x["latency_ms"], target_ms)

    def teacher_cost(x: dict) -> float:
        return float(x.get("teacher_flops") or 0)

    def same(a: float, b: float) -> bool:
        return abs(a - b) <= tolerance * b

    def preferred(x: dict, lead: dict) -> bool:
        if cost(x) < cost(lead) * (1 - tolerance):
            return True
        if not same(cost(x), cost(lead)):
            return False
        if teacher_cost(x) < teacher_cost(lead) * (1 - tolerance):
            return True
        return same(teacher_cost(x), teacher_cost(lead)) and closeness(x) < closeness(lead)

    lead = max(pool, key=lambda x: (s(x), -x["index"]))
    for x in sorted(pool, key=lambda x: (cost(x), teacher_cost(x), closeness(x), x["index"])):
        if x is not lead and preferred(x, lead):
            offset = (s(lead) - lead["ap"]) - (s(x) - x["ap"])
            if tie(lead, x, offset):
                lead = x
    return lead


def _bootstrap_tie(ctx: Context, d: Path, r: int, log: list[dict]) -> Callable[[dict, dict, float], bool]:
    """The paired per-image bootstrap on minival between two finalists' detections."""
    cache: dict[int, Any] = {}

    def matches(x: dict) -> Any:
        if x["index"] not in cache:
            cache[x["index"]] = image_matches(ctx.minival, load_json(d / f"cand_{x['index']}" / "detections.json"))
        return cache[x["index"]]

    def tie(a: dict, b: dict, offset: float) -> bool:
        res = paired_bootstrap(matches(a), matches(b), ctx.cfg["bootstrap"], derive_seed(ctx.seed, "bootstrap", r),
                               offset=offset, confidence=ctx.cfg["confidence"])
        log.append({"lead": f"cand_{a['index']}", "other": f"cand_{b['index']}", "tie": is_tie(res),
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}})
        return is_tie(res)
    return tie


def select(ctx: Context, r: int) -> State:
    """Move to the round's winner (see `pick`) and train it on to the round's end of the schedule;
    stop after R rounds, or after `patience` rounds that left the architecture unchanged (the control
    or a teacher move won). A round with no finalist passes the lineage through."""
    passed = pass_round(r, ctx.root)  # no finalist trained: the search stopped
    if passed is not None:
        return passed
    prev = read_state(r - 1, ctx.root)
    d = round_dir(r, ctx.root)
    done = trained_finalists(r, ctx.root)
    spent, decisions = Spent(), []
    tie = _bootstrap_tie(ctx, d, r, decisions) if ctx.cfg["paired"] else (lambda a, b, offset: False)
    best = pick(done, ctx.aim_ms, ctx.cfg["penalty"], ctx.cfg["latency_tolerance"],
                prev.latency_ms <= ctx.aim_ms, prev.teacher, tie)
    src = d / f"cand_{best['index']}"
    lin = load_lineage(src)
    teacher, _ = teacher_for(ctx, lin.teacher, spent)
    until = min(prev.it + ctx.cfg["round_iters"], ctx.cfg["iters"])
    if until > lin.it:
        lin = _train(ctx, lin, teacher, until, derive_seed(ctx.seed, "lineage", r), d, spent, "lineage",
                     src / "student.pt")
        metrics = _evaluate(ctx, lin.model, None, spent)
    else:
        metrics = {"AP": best["ap"], "AP50": best["ap50"]}
    save_lineage(d, lin, stage="search")
    (d / "train_state.pt").unlink(missing_ok=True)
    lat = best["latency_ms"]
    stale = prev.stale + 1 if best["action"] == CONTROL else 0  # the architecture unchanged
    state = State(r, best["student_arch"], best["student_head"], best["teacher"], metrics["AP"], metrics["AP50"],
                  lat, ctx.target_ms, ctx.score(metrics["AP"], lat), stale, False, f"cand_{best['index']}", lin.it)
    state.stopped = prev.stopped or state.stale >= ctx.cfg["patience"] or r >= ctx.cfg["rounds"]
    write_state(d, state, decisions=decisions, compute=spent.parts)
    return state


def finish(ctx: Context) -> State:
    """The lineage trained to the end of its schedule (the schedule's tail, not a restart): the
    search's student needs no training after it. Writes finish/state.json, student.pt, result.json."""
    last = read_state(ctx.cfg["rounds"], ctx.root)
    d = finish_dir(ctx.root)
    d.mkdir(parents=True, exist_ok=True)
    src = round_dir(last.round, ctx.root)
    lin, spent = load_lineage(src), Spent()
    start = lin.it
    state = last
    if lin.it < ctx.cfg["iters"]:
        teacher, _ = teacher_for(ctx, lin.teacher or last.teacher, spent)
        lin = _train(ctx, lin, teacher, ctx.cfg["iters"], derive_seed(ctx.seed, "finish"), d, spent, "lineage",
                     src / "student.pt")
        metrics = _evaluate(ctx, lin.model, None, spent)
        state = replace(last, ap=metrics["AP"], ap50=metrics["AP50"], score=ctx.score(metrics["AP"], last.latency_ms),
                        it=lin.it)
    save_lineage(d, lin, stage="search")
    (d / "train_state.pt").unlink(missing_ok=True)
    write_json(d / "result.json", {"iters": lin.it - start, "start": start, "minival_ap_before": last.ap,
                                   "ap": state.ap, "compute": spent.parts, **_totals(spent.parts)})
    write_state(d, state)
    return state


# --- history and the compute split -------------------------------------------------------------------
def _add(split: dict, part: str, cost: dict) -> None:
    p = split.setdefault(part, {"cpu_seconds": 0.0, "seconds": 0.0})
    for k in p:
        p[k] += cost.get(k, 0.0)


def write_history(root: Path, cfg: dict[str, Any], device: str, out: Path | None = None) -> pd.DataFrame:
    """history.csv: one row per trained finalist, with whether its round accepted it; and
    summary.json: the target (and the aim, `aim_ms`), the lineage's minival AP before the finish,
    and the compute split by part (lineage and discarded training, screening, evaluation, teacher
    extraction), in the unit of `device` (`cfg`: the `search` params)."""
    rows, split = [], {p: {"cpu_seconds": 0.0, "seconds": 0.0} for p in PARTS}
    start = load_json(round_dir(0, root) / "state.json")
    for part, cost in start.get("compute", {}).items():
        _add(split, part, cost)
    for r in range(1, cfg["rounds"] + 1):
        d = round_dir(r, root)
        state = load_json(d / "state.json", ["accepted"])
        for part, cost in state.get("compute", {}).items():
            _add(split, part, cost)
        for part, cost in load_json(d / "proposals.json").get("compute", {}).items():
            _add(split, part, cost)
        for p in sorted(d.glob("cand_*/result.json")):
            x = load_json(p, ["index"])
            if x.get("skipped"):
                continue
            accepted = state["accepted"] == f"cand_{x['index']}"
            for part, cost in x.get("compute", {}).items():
                _add(split, ("lineage" if accepted else "discarded") if part == "training" else part, cost)
            rows.append({**{k: x[k] for k in HISTORY_COLUMNS if k in x}, "accepted": accepted})
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values(["round", "index"])
    with atomic_path(out or root / "history.csv") as tmp:
        df.to_csv(tmp, index=False)
    fin = load_json(finish_dir(root) / "result.json", ["iters"])
    for part, cost in fin.get("compute", {}).items():
        _add(split, part, cost)
    cpu = sum(p["cpu_seconds"] for p in split.values())
    wall = sum(p["seconds"] for p in split.values())
    compute, unit = compute_spent(cpu, wall, device)
    key = "cpu_seconds" if unit == "cpu_seconds" else "seconds"
    training = split["lineage"][key] + split["discarded"][key]
    target_ms = cfg["latency_target"] * read_state(0, root).latency_ms
    write_json(root / "summary.json", {
        "rounds": cfg["rounds"], "start": start.get("start", "base"),
        "candidates_trained": len(df), "accepted": int(df["accepted"].sum()),
        "target_ms": target_ms, "aim_ms": aim_ms(target_ms, cfg["latency_margin"]), "penalty": cfg["penalty"],
        "iters": cfg["iters"], "final_iters": fin["iters"], "final_minival_ap": fin.get("ap"),
        "minival_ap_before_finish": fin.get("minival_ap_before"),
        "compute_split": {p: round(v[key], 2) for p, v in split.items()},
        "lineage_share_of_training": round(split["lineage"][key] / training, 4) if training else None,
        "overhead_share": round(1 - training / compute, 4) if compute else None,
        "cpu_seconds": round(cpu, 2), "seconds": round(wall, 2), "compute": round(compute, 2), "compute_unit": unit})
    return df


def run_search(ctx: Context) -> State:
    """Every round in one process (the DVC stage), resuming from the files already written by the
    same params and inputs (other files are cleared first)."""
    resume_dir(ctx.root, ctx.fingerprint)
    if not (round_dir(0, ctx.root) / "state.json").is_file():
        init_search(ctx)
    rounds, k = ctx.cfg["rounds"], finalist_slots(ctx.cfg)
    for r in range(1, rounds + 1):
        if (round_dir(r, ctx.root) / "state.json").is_file():
            continue
        if not (round_dir(r, ctx.root) / "proposals.json").is_file():
            propose(ctx, r)
        for i in range(k):
            if not (round_dir(r, ctx.root) / f"cand_{i}" / "result.json").is_file():
                run_candidate(ctx, r, i)
        select(ctx, r)
    if not (finish_dir(ctx.root) / "state.json").is_file():
        finish(ctx)
    write_history(ctx.root, ctx.cfg, ctx.device_name)
    return load_state(finish_dir(ctx.root) / "state.json")


def finalist_slots(cfg: dict) -> int:
    """Candidate jobs per round: the most finalists a round can have (under the target: with the
    teacher moves)."""
    return max(cfg["cut_candidates"], cfg["candidates"] + cfg["teacher_moves"])
