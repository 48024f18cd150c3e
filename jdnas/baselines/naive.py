"""The naive pipeline (DESIGN §10): NAS, then retrain, then prune, then KD, one step after another.

What the paper compares with, given a real training budget of its own (its iterations come from
`baseline`; its compute is measured and reported, not matched to the search's). It runs on the
search's prepared data, latency table and latency target (`search.latency_target` x the base's
predicted latency), and needs nothing from the search, so it can run beside it.

1. nas: random archs of the search's space (random walks of legal actions from the base arch),
   each trained from scratch with the base's recipe shortened to `baseline.nas_iters` (a proxy
   schedule), scored on minival like the search scores;
2. retrain: the best one from scratch with the base's full recipe (`train_base`);
3. prune: L1 channel pruning (the morphism's prune/slim) until the predicted latency meets the
   target, then a fine-tune of `baseline.prune_iters`;
4. kd: `baseline.kd_iters` of distillation from the teacher pool's largest member.

Every step writes `runs/baseline/steps/<step>/` (model.pt, metrics.json), so a killed run resumes
from the last finished step; `runs/baseline/metrics.json` sums them up. Steps 1-2 need neither the
teacher pool nor the base's weights (its arch and head come from the params), so the workflow runs
them as a stage of their own (`--until retrain`, stage baseline_nas) from the start, on the core
that train_base and the pool leave free. The pieces (`Budget`, `run_step`, `fine_tune`) also
serve the compute-matched baselines (jdnas/baselines/matched.py).
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from jdnas.data.dataset import CocoDetection, IterationSampler, collate
from jdnas.engine.device import resolve_device
from jdnas.engine.loop import detection_loss, evaluate, make_optimizer, schedule_for, to_device, train_detector
from jdnas.engine.tblog import TrainLog
from jdnas.errors import JdnasError
from jdnas.io import fingerprint, load_json, resume_dir, write_json
from jdnas.joint.distill import Distiller, Teacher
from jdnas.joint.search import aim_ms, compute_spent, score
from jdnas.joint.student import train_student
from jdnas.joint.teacher_pool import TeacherPool
from jdnas.latency import LatencyTable
from jdnas.latency.measure import latency_images, measure_latency
from jdnas.models.arch import Arch, Head, resolve_arch
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import (Detector, build_detector, head_config, jittered_input, load_detector, save_detector,
    set_input_size)
from jdnas.models.morphism import Action, child_arch, legal_actions, morph_detector
from jdnas.stages import inputs_fingerprint

STEPS = ("nas", "retrain", "prune", "kd")
NAS_STEPS = STEPS[:2]  # stage baseline_nas; the rest is stage baseline_naive
PROBE_ITERS = 10  # timed iterations that price a matched fine-tune (3 misjudged a loaded machine by 8-37%)


# --- the pieces ------------------------------------------------------------------------------
def random_arch(base: Arch, bounds: dict[str, Any], rng: random.Random, max_steps: int) -> Arch:
    """A random walk of 1..max_steps legal actions from `base`: an arch the search could reach."""
    arch = base
    for _ in range(rng.randint(1, max(1, max_steps))):
        actions = legal_actions(arch, bounds)
        if not actions:
            break
        arch = child_arch(rng.choice(actions), arch)
    return arch


def nas_archs(base: Arch, bounds: dict[str, Any], table: LatencyTable, target_ms: float, n: int, seed: int,
              max_steps: int, tries: int = 500) -> list[Arch]:
    """`n` distinct random archs, those meeting the latency target first (then the fastest others)."""
    rng = random.Random(seed)
    seen: dict[Arch, float] = {}
    for _ in range(tries):
        arch = random_arch(base, bounds, rng, max_steps)
        if arch not in seen and table.covers(arch):
            seen[arch] = table.predict(arch)
        if sum(ms <= target_ms for ms in seen.values()) >= n:
            break
    ranked = sorted(seen, key=lambda a: (seen[a] > target_ms, seen[a] if seen[a] > target_ms else 0.0))
    return ranked[:n]


def prune_actions(model: Detector, bounds: dict[str, Any], table: LatencyTable, target_ms: float) -> list[Action]:
    """Greedy L1 channel pruning plan: the prune/slim action saving the most latency, until the
    predicted latency meets the target or no prune/slim action is legal."""
    arch, plan = model.arch, []
    bounds = {**bounds, "actions": [a for a in ("prune", "slim") if a in bounds["actions"]] or ["prune"]}
    while table.predict(arch) > target_ms:
        options = [a for a in legal_actions(arch, bounds) if table.covers(child_arch(a, arch))]
        if not options:
            break
        best = min(options, key=lambda a: (table.predict(child_arch(a, arch)), str(a)))
        if table.predict(child_arch(best, arch)) >= table.predict(arch):
            break
        plan.append(best)
        arch = child_arch(best, arch)
    return plan


def iteration_cost(model: Detector, dataset: CocoDetection, cfg: dict[str, Any], device: torch.device,
                   clock: Callable[[], float], iters: int = 3, teacher: Detector | None = None) -> float:
    """Measured compute of one training iteration of `model` (on a copy: the model is untouched),
    with KD from `teacher` when given (its forward pass and the KD loss are part of the price)."""
    probe = copy.deepcopy(model).to(device).train()
    loss_fn, extra = detection_loss, None
    if teacher is not None:
        extra = Distiller(probe, Teacher(copy.deepcopy(teacher), device), cfg["kd_loss"], cfg["kd_weight"],
                          cfg["kd_fg_weight"], cfg["kd_bg_weight"], cfg["kd_temperature"], 0)
        loss_fn = extra.loss_fn
    opt = make_optimizer(probe if extra is None else torch.nn.ModuleList([probe, extra]), cfg)
    batches = IterationSampler(len(dataset), cfg["batch_size"], iters + 1, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[]):
        t0 = None
        for i, (images, targets) in enumerate(loader):
            if i == 1:  # the first iteration warms up allocators and caches
                sync()
                t0 = clock()
            images, targets = to_device(images, targets, device)
            scales = cfg.get("scales", [1.0])  # priced at the sizes it trains at, each as often as drawn
            with jittered_input([probe], [scales[i % len(scales)]], 0, i):
                loss = sum(loss_fn(probe, images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
    return (clock() - t0) / iters


@dataclass(frozen=True)
class Tuning:
    """What a baseline's fine-tunes need, unpacked once from the params by its stage: the
    `train_student` recipe, seed, device, val's eval batch, the fewest iterations a step trains,
    and how the pool's teacher is recalibrated (`teacher_pool.eval`)."""

    recipe: dict[str, Any]
    seed: int
    device: torch.device
    eval_batch: int
    min_iters: int
    bn_batches: int
    bn_batch_size: int

    @classmethod
    def from_params(cls, params: dict) -> "Tuning":
        ev = params["teacher_pool"]["eval"]
        return cls(params["train_student"], int(params["seed"]), resolve_device(params["device"]),
                   params["eval"]["batch_size"], params["baseline"]["min_iters"], ev["bn_batches"], ev["bn_batch_size"])


def largest_teacher(supernet: str | Path, data_dir: str | Path, tuning: Tuning) -> Detector:
    """The teacher pool's largest member (BN recalibrated), on the CPU."""
    pool = TeacherPool.load(supernet, data_dir, tuning.bn_batches, tuning.bn_batch_size, tuning.seed, tuning.device)
    return pool.teacher(pool.space.largest()).cpu()


def run_step(out: Path, budget: "Budget", run: Callable[[Path, float], dict[str, Any]]) -> dict[str, Any]:
    """Run one pipeline step into `out` unless its metrics.json exists (a rerun resumes after the
    last finished step), with its share of `budget`; charge what it measurably spent (plus what a
    killed predecessor spent, `resumed_compute`) to the budget."""
    done = out / "metrics.json"
    if not done.is_file():
        share = budget.share(out.name)
        t0, c0 = time.time(), budget.clock()
        budget.step_start = c0
        result = run(out, share)
        spent = budget.clock() - c0 + result.pop("resumed_compute", 0.0)
        write_json(done, {"step": out.name, **result, "share": round(share, 2), "compute": round(spent, 2),
                          "seconds": round(time.time() - t0, 2)})
    result = json.loads(done.read_text())
    budget.spent += result["compute"]
    return result


def fine_tune(tuning: Tuning, data_dir: Path, train_set: CocoDetection, budget: "Budget", init: Path, share: float,
              out: Path, teacher: Detector | None, iters: int | None = None) -> dict[str, Any]:
    """`jdnas train` from `init` (KD when a teacher is given) on val, for `iters` iterations or, if
    None, for those `share` buys: what the step has not yet spent (its teacher, the probe) less
    the closing val evaluation (`eval_cost`), at the price of a measured iteration that includes
    the teacher's forward pass; replanned at every checkpoint at the price training has paid so
    far (a short probe misjudges a machine whose load changes; past the schedule's half only
    shorter: see `engine.train_loop`)."""
    cfg, device = tuning.recipe, tuning.device
    kd = teacher if teacher is not None and cfg["kd_weight"] > 0 else None
    cost, replan = None, None
    least = tuning.min_iters
    val_images = len(load_json(Path(data_dir) / "val.json", ["images"])["images"])
    plan = out / "plan.json"  # a killed run resumes on the iterations it planned, not on a new probe's
    if iters is None and plan.is_file():
        iters, cost = (json.loads(plan.read_text())[k] for k in ("iters", "cost_per_iter"))
    elif iters is None:
        student = load_detector(init)
        cost = iteration_cost(student, train_set, cfg, device, budget.clock, iters=PROBE_ITERS,
                              teacher=kd and set_input_size(kd, student.head_cfg))
        before = budget.clock() - budget.step_start  # the step's teacher and the probe
        iters = max(least, int((share - before - eval_cost(val_images, cfg["batch_size"], cost)) / cost))
        write_json(plan, {"iters": iters, "cost_per_iter": cost, "share": share, "before_training": before})
    if cost is not None:
        before = json.loads(plan.read_text()).get("before_training", 0.0)

        def replan(it: int, seconds: float, cpu_seconds: float) -> int:
            metered = cpu_seconds if budget.unit == "cpu_seconds" else seconds
            # the step's clock also counts what the loop's meter leaves out (loading batches, writing
            # checkpoints: 6% over budget without it); after a resume only the meter holds the first run
            spent = max(metered, budget.clock() - budget.step_start - before)
            price = spent / it
            left = share - before - eval_cost(val_images, cfg["batch_size"], price) - spent
            return max(least, it + int(left / price))
    metrics = train_student(schedule_for(cfg, iters), data_dir, out, init, None, kd, seed=tuning.seed, device=device,
                            eval_batch=tuning.eval_batch, eval_split="val", replan=replan)
    resumed = metrics.get("resumed_cpu_seconds", 0.0) if budget.unit == "cpu_seconds" else 0.0
    return {**metrics, "iters": metrics["train_iters"], "planned_iters": iters,
            "cost_per_iter": cost and round(cost, 4), "resumed_compute": resumed}


def eval_cost(images: int, batch_size: int, iter_cost: float) -> float:
    """What evaluating `images` costs, from a training iteration's price: a forward pass is about a
    third of an iteration (forward + backward, per `batch_size` images)."""
    return images / batch_size * iter_cost / 3


class Budget:
    """Compute spent step by step, in the unit the joint search was measured in; with a `total`,
    the budget each step gets its share of (None: metered only)."""

    def __init__(self, total: float | None, unit: str, shares: list[float], steps: tuple[str, ...] = STEPS) -> None:
        self.total, self.unit, self.spent, self.steps = total, unit, 0.0, steps
        self.step_start = self.clock()  # where the running step's compute began (run_step sets it)
        self.shares = dict(zip(steps, shares))

    def clock(self) -> float:
        return time.process_time() if self.unit == "cpu_seconds" else time.time()

    def share(self, step: str) -> float:
        """This step's part of what is left, by the shares of the steps not yet run."""
        if self.total is None:
            return 0.0
        left = self.steps[self.steps.index(step):]
        weights = sum(self.shares[s] for s in left)
        return max(0.0, self.total - self.spent) * (self.shares[step] / weights if weights > 0 else 1 / len(left))


# --- the pipeline ----------------------------------------------------------------------------
class Naive:
    """Runs the four steps; each step's result is kept in `<out>/<step>/` and reused on a rerun."""

    def __init__(self, params: dict, data_dir: str | Path, table: str | Path, supernet: str | Path,
                 out_dir: str | Path) -> None:
        self.params, self.cfg = params, params["baseline"]
        self.data_dir, self.out = Path(data_dir), Path(out_dir)
        self.steps = self.out / "steps"  # one folder per step: a DVC output that survives reruns
        self.supernet = Path(supernet)
        self.tuning = Tuning.from_params(params)
        self.device = self.tuning.device
        self.table = LatencyTable.load(table)
        self.inputs = [self.data_dir / "manifest.json", Path(table)]
        self.budget = Budget(None, compute_spent(0.0, 0.0, params["device"])[1], [1.0] * len(STEPS))
        self.train_set = CocoDetection(self.data_dir / "train.json", max_size=params["model"]["max_size"])
        self.head = head_config(params["model"], self.train_set.labels.num_classes)
        # the base's arch and head as train_base builds (or adopts) it; the search's target: its
        # ratio x the base's predicted latency
        self.base_arch = resolve_arch(params["model"]["base"], params["model"]["width"])
        self.target_ms = params["search"]["latency_target"] * self.table.predict(self.base_arch, Head.of(self.head))
        self.aim_ms = aim_ms(self.target_ms, params["search"]["latency_margin"])  # cut to, as the search

    def score(self, ap: float, latency_ms: float) -> float:
        return score(ap, latency_ms, self.aim_ms, self.params["search"]["penalty"])

    def train_scratch(self, arch: Arch, iters: int, out: Path, seed: int,
                      split: str) -> tuple[Detector, dict[str, Any], dict[str, Any]]:
        """A fresh detector of `arch` trained with the base's recipe for `iters` iterations, and its
        metrics on `split` (TensorBoard events in out/tb)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_detector(arch, self.head)
        cfg = schedule_for(self.params["train_base"], iters)
        fp = fingerprint(str(arch), self.head, cfg, seed, "baseline")
        with TrainLog(out) as log:
            train_detector(model, self.train_set, cfg, out / "train_state.pt", seed, self.device, fp,
                           desc=f"baseline {out.name}", log=log)
            metrics = evaluate(model, self.data_dir / f"{split}.json", self.params["eval"]["batch_size"], self.device)
            log.metrics(metrics, iters, prefix=f"{split}/")
        (out / "train_state.pt").unlink(missing_ok=True)
        return model, {"iters": iters}, metrics

    def fine_tune(self, init: Path, iters: int, out: Path, teacher: Detector | None) -> dict[str, Any]:
        return fine_tune(self.tuning, self.data_dir, self.train_set, self.budget, init, 0.0, out, teacher, iters=iters)

    def describe(self, model: Detector, metrics: dict[str, Any]) -> dict[str, Any]:
        lat = self.table.predict(model.arch)
        ev = self.params["teacher_pool"]["eval"]
        images = latency_images(self.data_dir / "val.json", self.head["max_size"])
        return {"arch": str(model.arch), **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                "latency_ms": round(lat, 4), "meets_target": lat <= self.target_ms,
                "measured_latency_ms": measure_latency({"m": model}, images, ev["latency_runs"],
                                                       ev["latency_threads"], self.device,
                                                       self.params["latency"]["clock"])["m"],
                "params": count_params(model), "flops": count_flops(model)}

    def step(self, name: str) -> dict[str, Any]:
        """Run step `name` (or reuse its results): a step's folder belongs to the params and input
        files of its stage, to the step before it, and (kd) to the teacher pool."""
        i = STEPS.index(name)
        inputs = self.inputs + ([self.steps / STEPS[i - 1] / "metrics.json"] if i else [])
        inputs += [self.supernet] if name == "kd" else []
        stage = "baseline_nas" if name in NAS_STEPS else "baseline_naive"
        resume_dir(self.steps / name, inputs_fingerprint(stage, self.params, inputs))
        return run_step(self.steps / name, self.budget, getattr(self, name))

    # the four steps
    def nas(self, out: Path, share: float) -> dict[str, Any]:
        n = self.cfg["nas_candidates"]
        archs = nas_archs(self.base_arch, self.params["search_space"], self.table, self.aim_ms, n,
                          self.params["seed"], max_steps=2 * self.params["search"]["rounds"])
        if not archs:
            raise JdnasError("baseline: no arch of the search space is covered by the latency table")
        candidates: list[dict[str, Any]] = []
        for i, arch in enumerate(archs):
            done = out / f"cand_{i}" / "result.json"
            if not done.is_file():
                c0 = self.budget.clock()
                model, info, m = self.train_scratch(arch, self.cfg["nas_iters"], out / f"cand_{i}",
                                                    self.params["seed"] + i, "minival")
                save_detector(out / f"cand_{i}" / "model.pt", model.cpu(), stage="baseline_nas", metrics=m)
                lat = self.table.predict(arch)
                write_json(done, {"arch": str(arch), "ap": m["AP"], "latency_ms": round(lat, 4),
                                  "score": round(self.score(m["AP"], lat), 4), **info,
                                  "compute": round(self.budget.clock() - c0, 2)})
            candidates.append(json.loads(done.read_text()))
        best = max(range(len(candidates)), key=lambda i: (candidates[i]["score"], -i))
        model = load_detector(out / f"cand_{best}" / "model.pt", self.device)
        metrics = evaluate(model, self.data_dir / "val.json", self.params["eval"]["batch_size"], self.device)
        save_detector(out / "model.pt", model.cpu(), stage="baseline_nas")
        return {**self.describe(model, metrics), "chosen": best, "candidates": candidates}

    def retrain(self, out: Path, share: float) -> dict[str, Any]:
        arch = Arch.parse(json.loads((self.steps / "nas" / "metrics.json").read_text())["arch"])
        model, info, metrics = self.train_scratch(arch, self.params["train_base"]["iters"], out, self.params["seed"],
                                                  "val")
        save_detector(out / "model.pt", model.cpu(), stage="baseline_retrain", metrics=metrics)
        return {**self.describe(model, metrics), **info}

    def prune(self, out: Path, share: float) -> dict[str, Any]:
        init = self.steps / "retrain" / "model.pt"
        model = load_detector(init)
        plan = prune_actions(model, self.params["search_space"], self.table, self.aim_ms)
        for action in plan:
            model = morph_detector(model, action)
        out.mkdir(parents=True, exist_ok=True)
        save_detector(out / "pruned.pt", model, stage="baseline_prune", actions=[str(a) for a in plan])
        metrics = self.fine_tune(out / "pruned.pt", self.cfg["prune_iters"], out, None)
        return {**self.describe(load_detector(out / "model.pt"), metrics), "actions": [str(a) for a in plan],
                **{k: metrics[k] for k in ("iters", "cost_per_iter", "resumed_compute")}}

    def kd(self, out: Path, share: float) -> dict[str, Any]:
        teacher = largest_teacher(self.supernet, self.data_dir, self.tuning)
        metrics = self.fine_tune(self.steps / "prune" / "model.pt", self.cfg["kd_iters"], out, teacher)
        return {**self.describe(load_detector(out / "model.pt"), metrics), "teacher": str(teacher.arch),
                **{k: metrics[k] for k in ("iters", "cost_per_iter", "resumed_compute")}}

    def run(self, until: str = STEPS[-1]) -> dict[str, Any]:
        """The steps up to `until`; after the last one, `<out>/metrics.json` sums them up."""
        steps = [self.step(name) for name in STEPS[:STEPS.index(until) + 1]]
        if until != STEPS[-1]:
            return {"steps": steps, "final": steps[-1]}
        summary = {"compute_unit": self.budget.unit, "spent": round(self.budget.spent, 2),
                   "iters": {"nas": self.cfg["nas_iters"] * len(steps[0]["candidates"]),
                             "retrain": self.params["train_base"]["iters"], "prune": self.cfg["prune_iters"],
                             "kd": self.cfg["kd_iters"]},
                   "latency_target_ms": round(self.target_ms, 4),
                   "nas_candidates": steps[0]["candidates"], "steps": steps, "final": steps[-1]}
        write_json(self.out / "metrics.json", summary)
        return summary


def run_baseline(params: dict, data_dir: str | Path, table: str | Path, supernet: str | Path, out_dir: str | Path,
                 until: str = STEPS[-1]) -> dict[str, Any]:
    """Stages baseline_nas (`until` retrain) and baseline_naive (the four steps, reusing those done)
    -> `<out_dir>/metrics.json`."""
    if until not in STEPS:
        raise JdnasError(f"baseline naive: --until {until} is not one of its steps ({', '.join(STEPS)})")
    return Naive(params, data_dir, table, supernet, out_dir).run(until)
