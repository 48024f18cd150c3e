"""Baselines matched to the joint search's compute: what a user with a trained detector and a
latency target would otherwise do.

- `control`: the base detector fine-tuned (the `train_student` recipe, no action, no KD) for
  the joint search's whole compute. It shows what training longer alone buys. One warm-up,
  stable, decay schedule in two steps: `stable` trains at the recipe's lr for the pool's compute
  and needs nothing from the search, so the workflow runs it beside the search (stage
  control_stable); `decay` continues from it (no second warm-up; SGD's momentum restarts) with
  the lr decayed to zero over the rest of the joint compute (stage control). The control is then
  off the workflow's critical path, which a schedule whose length is known only once the search
  is done would put it on.
- `prune_kd`: greedy structured pruning of the base (or of its twin in the teacher pool where
  that scores higher on minival, as the joint search starts) over the same whole-detector space as the
  search (backbone blocks and channels, FPN width, box head, input size, proposals) until the
  predicted latency meets the search's aim (`search.latency_margin` under the same target):
  each step takes the cut with the most predicted latency saved per screen AP lost (the joint
  search's screen: BN recalibrated, the same minival subset; channels ranked by the morphism's
  L1 importance; a cut must save more than `search.latency_tolerance` while one does). Then it
  fine-tunes with KD from the pool's largest member for the rest of its budget.

Compute rule (the report states it): CPU-seconds on CPU, GPU-seconds on CUDA, measured around
everything a pipeline runs (training with its teacher's forwards, minival evaluations, the
pruning's trial evaluations). A pipeline that distils from the teacher pool is charged the
pool's training compute: joint = pool + search jobs; prune_kd = pool + its own; control
(no teacher) = its own. prune_kd and control each get the joint search's total.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from jdnas.baselines.naive import Budget, Tuning, fine_tune, largest_teacher, run_step
from jdnas.data.dataset import CocoDetection
from jdnas.data.prepare import prepared_bounds
from jdnas.engine.loop import evaluate
from jdnas.errors import JdnasError
from jdnas.io import load_json, resume_dir, write_json
from jdnas.joint.screen import Screen
from jdnas.joint.search import compute_spent, cuts_above
from jdnas.joint.teacher_pool import SUPERNET_FORMAT, TeacherPool, load_supernet
from jdnas.latency import LatencyTable
from jdnas.models.arch import Head
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import Detector, load_detector, read_checkpoint, save_detector
from jdnas.seeding import derive_seed
from jdnas.stages import inputs_fingerprint


def pool_compute(supernet: str | Path, unit: str) -> float:
    """What training the teacher pool cost, in `unit` (from the supernet's meta)."""
    meta = read_checkpoint(supernet, SUPERNET_FORMAT)["meta"]
    return float(meta.get("cpu_seconds" if unit == "cpu_seconds" else "seconds", 0.0))


class Matched:
    """A pipeline of resumable steps under one compute budget (`<out>/<step>/metrics.json`)."""

    name = ""
    steps: tuple[str, ...] = ()
    before_search: tuple[str, ...] = ()  # steps that need no search summary (stage <name>_stable)
    uses_pool = False  # distils from the teacher pool: charged its training

    def __init__(self, params: dict, data_dir: str | Path, table: str | Path, base: str | Path,
                 supernet: str | Path, search_summary: str | Path | None, out_dir: str | Path) -> None:
        """`search_summary` None: only the steps `before_search` can run (their budget: the pool's compute)."""
        self.params, self.data_dir, self.out = params, Path(data_dir), Path(out_dir)
        self.base, self.supernet = Path(base), Path(supernet)
        self.table = LatencyTable.load(table)
        self.inputs = [self.data_dir / "manifest.json", Path(table), self.base, self.supernet]  # every step's
        self.summary_file = None if search_summary is None else Path(search_summary)  # the steps after the search's
        self.target_ms = self.aim_ms = None
        unit, search = compute_spent(0.0, 0.0, params["device"])[1], 0.0
        if search_summary is not None:
            summary = load_json(search_summary, ["target_ms", "compute", "compute_unit"])
            self.target_ms, unit = float(summary["target_ms"]), summary["compute_unit"]
            self.aim_ms = float(summary.get("aim_ms", self.target_ms))  # what the search cut to
            search = float(summary["compute"])
        self.tuning = Tuning.from_params(params)
        self.device = self.tuning.device
        self.pool = pool_compute(supernet, unit)
        self.joint = search + self.pool  # the joint search: its jobs + the pool it draws from
        self.charged = self.pool if self.uses_pool else 0.0  # compute charged before any step runs
        self.budget = Budget(self.joint - self.charged, unit, self.shares(search), self.steps)
        max_size = read_checkpoint(base)["head"]["max_size"]
        self.train_set = CocoDetection(self.data_dir / "train.json", max_size=max_size)

    def shares(self, search: float) -> list[float]:
        """How the budget splits over the steps (`Budget`): evenly unless a pipeline says otherwise."""
        return [1.0] * len(self.steps)

    def screen(self) -> Screen:
        """The joint search's screen: the same minival subset, BN recalibration and seed."""
        cfg, ev = self.params["search"], self.params["teacher_pool"]["eval"]
        return Screen(self.train_set, self.data_dir / "minival.json", cfg["screen_images"], cfg["screen_bn_batches"],
                      ev["bn_batch_size"], self.params["eval"]["batch_size"], derive_seed(self.params["seed"], "screen"),
                      self.device)

    def step(self, name: str) -> dict[str, Any]:
        """Run step `name` (or reuse its results): its folder belongs to the params and input files of
        its stage and to the step before it."""
        i = self.steps.index(name)
        early = name in self.before_search
        inputs = self.inputs + ([] if early else [self.summary_file])
        inputs += [self.out / self.steps[i - 1] / "metrics.json"] if i else []
        resume_dir(self.out / name, inputs_fingerprint(f"{self.name}_stable" if early else self.name, self.params,
                                                       inputs))
        return run_step(self.out / name, self.budget, getattr(self, name))

    def fine_tune(self, init: Path, share: float, out: Path, teacher: Detector | None,
                  **recipe: Any) -> dict[str, Any]:
        """A fine-tune for `share` of the budget (`recipe` overrides `train_student` keys) -> the
        step's result: the trained model described, its iterations and their price."""
        tuning = replace(self.tuning, recipe={**self.tuning.recipe, **recipe})
        metrics = fine_tune(tuning, self.data_dir, self.train_set, self.budget, init, share, out, teacher)
        return {**self.describe(load_detector(out / "model.pt"), metrics),
                **{k: metrics[k] for k in ("iters", "cost_per_iter", "resumed_compute")}}

    def describe(self, model: Detector, metrics: dict[str, Any]) -> dict[str, Any]:
        head = Head.of(model.head_cfg)
        lat = self.table.predict(model.arch, head)
        return {"arch": str(model.arch), "head": str(head),
                **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                "latency_ms": round(lat, 4), "meets_target": None if self.target_ms is None else lat <= self.target_ms,
                "params": count_params(model), "flops": count_flops(model)}

    def run(self, until: str | None = None) -> dict[str, Any]:
        """Every step, or those up to `until` (then no summary.json: the pipeline is not done)."""
        steps = self.steps if until is None else self.steps[:self.steps.index(until) + 1]
        if self.target_ms is None and not set(steps) <= set(self.before_search):
            raise JdnasError(f"baseline {self.name}: steps {', '.join(steps)} need the search's summary")
        done = [self.step(s) for s in steps]
        final = done[-1]
        if steps != self.steps:
            return final
        summary = {"pipeline": self.name, "compute_unit": self.budget.unit, "joint_compute": round(self.joint, 2),
                   "charged_pool": round(self.charged, 2), "budget": round(self.budget.total, 2),
                   "compute": round(self.charged + self.budget.spent, 2),
                   "latency_target_ms": round(self.target_ms, 4), "steps": done,
                   **{k: final[k] for k in ("arch", "head", "AP", "AP50", "latency_ms", "meets_target",
                                            "params", "flops")}}
        write_json(self.out / "summary.json", summary)
        return summary


class Control(Matched):
    """The base, fine-tuned for the joint search's compute: no action, no KD (warm-up, stable,
    decay: see the module's docstring)."""

    name, steps, before_search = "control", ("stable", "decay"), ("stable",)

    def shares(self, search: float) -> list[float]:
        return [self.pool, search]  # stable: the pool's compute; decay: the rest

    def stable(self, out: Path, share: float) -> dict[str, Any]:
        """The base at the recipe's lr, flat after its warm-up."""
        return self.fine_tune(self.base, share, out, None, schedule="constant")

    def decay(self, out: Path, share: float) -> dict[str, Any]:
        """The stable step's detector with the lr decayed to zero by the recipe's schedule."""
        return self.fine_tune(self.out / "stable" / "model.pt", share, out, None, warmup_iters=0)


class PruneKD(Matched):
    """Greedy whole-detector pruning to the target, then KD from the pool's largest member."""

    name, steps, uses_pool = "prune_kd", ("prune", "kd"), True

    def start(self) -> tuple[Detector, dict[str, Any]]:
        """The base or, with `search.from_pool`, its twin in the pool where that scores higher on
        minival: the joint search's start, by the same rule (`TeacherPool.twin`)."""
        model = load_detector(self.base, self.device)
        info: dict[str, Any] = {"start": "base"}
        if not self.params["search"]["from_pool"]:
            return model, info
        ev = self.params["teacher_pool"]["eval"]
        twin = TeacherPool(load_supernet(self.supernet), self.train_set, ev["bn_batches"], ev["bn_batch_size"],
                           self.params["seed"], self.device).twin(model)
        if twin is not None:
            minival, batch = self.data_dir / "minival.json", self.params["eval"]["batch_size"]
            info["base_minival_ap"], info["twin_minival_ap"] = (evaluate(m, minival, batch, self.device)["AP"]
                                                                for m in (model, twin))
            if info["twin_minival_ap"] > info["base_minival_ap"]:  # a tie keeps the base
                model, info["start"] = twin, "pool"
        return model, info

    def prune(self, out: Path, share: float) -> dict[str, Any]:
        model, start = self.start()
        base_head = Head.of(model.head_cfg)
        space = prepared_bounds(self.params["search_space"], self.data_dir, base_head.min_size,
                                base_head.max_size)  # as the joint search
        cfg = self.params["search"]
        batch = self.params["eval"]["batch_size"]
        lat = self.table.predict(model.arch, base_head)
        cuts = cuts_above(space, base_head, self.table, self.aim_ms)  # the joint search's cuts, to its aim
        with self.screen() as screen:
            model, steps = screen.greedy_cut(model, screen.score(model), lat, self.aim_ms, cuts,
                                             cfg["latency_tolerance"], seed=self.params["seed"])
        plan = [{**x, "action": str(x["action"]), "latency_ms": round(x["latency_ms"], 4)} for x in steps]
        for x in plan:
            print(f"prune_kd: {x['action']}: predicted {x['latency_ms']:.2f} ms (aim {self.aim_ms:.2f}, "
                  f"target {self.target_ms:.2f}), screen AP {x['screen_ap']:.2f}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        save_detector(out / "model.pt", model.cpu(), stage="prune_kd", plan=plan)
        metrics = evaluate(model, self.data_dir / "val.json", batch, self.device)
        return {**self.describe(model, metrics), **start, "plan": plan}

    def kd(self, out: Path, share: float) -> dict[str, Any]:
        teacher = largest_teacher(self.supernet, self.data_dir, self.tuning)
        return {**self.fine_tune(self.out / "prune" / "model.pt", share, out, teacher), "teacher": str(teacher.arch)}


PIPELINES = {"control": Control, "prune_kd": PruneKD}


def run_matched(name: str, params: dict, data_dir: str | Path, table: str | Path, base: str | Path,
                supernet: str | Path, search_summary: str | Path | None, out_dir: str | Path,
                until: str | None = None) -> dict[str, Any]:
    """Stage control or prune_kd -> `<out_dir>/summary.json` (and one folder per step); with
    `until`, only the steps up to it (stage control_stable: `--until stable`, no search summary)."""
    if name not in PIPELINES:
        raise JdnasError(f"unknown baseline {name!r} (one of {', '.join(PIPELINES)})")
    pipeline = PIPELINES[name]
    if until is not None and until not in pipeline.steps:
        raise JdnasError(f"baseline {name}: --until {until} is not one of its steps ({', '.join(pipeline.steps)})")
    early = until is not None and set(pipeline.steps[:pipeline.steps.index(until) + 1]) <= set(pipeline.before_search)
    return pipeline(params, data_dir, table, base, supernet, None if early else search_summary, out_dir).run(until)
