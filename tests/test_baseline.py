"""The naive pipeline's pieces: random archs of the search space, pruning to a latency target, the budget."""
from __future__ import annotations

import random

import pytest
import torch

from jdnas.baselines.naive import Budget, iteration_cost, nas_archs, prune_actions, random_arch
from jdnas.config import load_params
from jdnas.data.dataset import CocoDetection
from jdnas.errors import JdnasError
from jdnas.models.arch import resolve_arch
from jdnas.models.detector import build_detector, head_config
from jdnas.models.morphism import legal_actions
from conftest import REPO
from test_latency import synthetic_table


@pytest.fixture(scope="module")
def default():
    params = load_params([REPO / "params.yaml"])
    base = resolve_arch(params["model"]["base"], params["model"]["width"])
    table = synthetic_table(params)
    return params, base, table


def _in_bounds(arch, bounds) -> bool:
    return all(lo <= d <= hi for d, lo, hi in zip(arch.depths, bounds["min_depth"], bounds["max_depth"]))


def test_random_archs_are_seeded_walks_inside_the_search_space(default):
    params, base, _ = default
    bounds = params["search_space"]
    walks = [random_arch(base, bounds, random.Random(s), 6) for s in range(20)]
    assert walks == [random_arch(base, bounds, random.Random(s), 6) for s in range(20)]
    assert len(set(walks)) > 10 and base not in walks[:1]
    assert all(_in_bounds(a, bounds) and min(min(s.mids) for s in a.stages) >= bounds["min_width"] for a in walks)


def test_nas_archs_put_those_meeting_the_target_first(default):
    params, base, table = default
    target = 0.97 * table.predict(base)
    archs = nas_archs(base, params["search_space"], table, target, 4, seed=0, max_steps=6)
    assert len(archs) == len(set(archs)) == 4
    meets = [table.predict(a) <= target for a in archs]
    assert meets == sorted(meets, reverse=True) and meets[0]
    assert archs == nas_archs(base, params["search_space"], table, target, 4, seed=0, max_steps=6)


def test_prune_plan_reaches_the_target_one_latency_cut_at_a_time(default):
    params, base, table = default
    model = build_detector(base, head_config(params["model"], 5))
    target = 0.9 * table.predict(base)
    plan = prune_actions(model, params["search_space"], table, target)
    assert plan and {a.kind for a in plan} <= {"prune", "slim"}
    from jdnas.models.morphism import child_arch
    arch, last = base, table.predict(base)
    for action in plan:
        assert action in legal_actions(arch, params["search_space"])
        arch = child_arch(action, arch)
        assert table.predict(arch) < last
        last = table.predict(arch)
    assert last <= target
    assert prune_actions(model, params["search_space"], table, 2 * table.predict(base)) == []
    # an unreachable target: prune as far as the bounds allow, then stop
    deepest = prune_actions(model, params["search_space"], table, 0.01)
    assert len(deepest) > len(plan)


def test_budget_shares_what_is_left():
    b = Budget(100.0, "cpu_seconds", [0.4, 0.3, 0.15, 0.15])
    assert b.share("nas") == pytest.approx(40.0)
    b.spent = 50.0  # the NAS overspent: the later steps share what is left, in proportion
    assert b.share("retrain") == pytest.approx(50.0 * 0.3 / 0.6)
    b.spent = 120.0
    assert b.share("kd") == 0.0
    assert Budget(1.0, "gpu_seconds", [1, 1, 1, 1]).clock() > 1e9  # GPU-seconds: wall clock
    assert Budget(None, "cpu_seconds", [1, 1, 1, 1]).share("nas") == 0.0  # metered only (the naive pipeline)
    # shares weighted by compute that was nil (a pool checkpoint without its cost): an even split
    assert Budget(10.0, "cpu_seconds", [0.0, 0.0], ("a", "b")).share("a") == pytest.approx(5.0)


def test_iteration_cost_is_measured_on_a_copy(prepared, smoke_params):
    torch.set_num_threads(1)
    data = CocoDetection(prepared / "train.json", max_size=smoke_params["model"]["max_size"])
    model = build_detector(resolve_arch("tiny", 0.5), head_config(smoke_params["model"], data.labels.num_classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    import time
    cost = iteration_cost(model, data, smoke_params["train_student"], torch.device("cpu"), time.process_time, iters=2)
    assert cost > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_kd_iterations_are_priced_with_the_teachers_forward(prepared, smoke_params):
    """The probe that prices a KD fine-tune runs the teacher's forward pass in every iteration (and
    only the timed ones count): with a clock that ticks once per forward pass of the student or
    the teacher (their backbones), an iteration costs one tick alone and two with a teacher. A live
    clock would make this a timing test, which a loaded machine fails."""
    cfg = {**smoke_params["train_student"], "warmup_iters": 0}
    data = CocoDetection(prepared / "train.json", max_size=smoke_params["model"]["max_size"])
    head = head_config(smoke_params["model"], data.labels.num_classes)
    torch.manual_seed(0)
    student, teacher = build_detector(resolve_arch("tiny", 0.5), head), build_detector(resolve_arch("r34", 0.5), head)
    ticks = []
    for m in (student, teacher):  # the probe works on deep copies: the hooks go with them
        m.backbone.register_forward_hook(lambda *_: ticks.append(1))
    clock = lambda: float(len(ticks))  # noqa: E731
    cpu = torch.device("cpu")
    assert iteration_cost(student, data, cfg, cpu, clock, iters=4) == 1.0
    assert iteration_cost(student, data, cfg, cpu, clock, iters=4, teacher=teacher) == 2.0
    assert len(ticks) == 5 + 10  # one untimed warm-up iteration each


def test_the_naive_nas_steps_need_no_pool_and_a_rerun_reuses_them(prepared, smoke_params, tmp_path):
    """Stage baseline_nas (`until` retrain) runs before the teacher pool exists (the workflow starts
    it beside train_base); a rerun reuses its steps; a param it reads makes them run again."""
    from conftest import proxy_table, with_overrides
    from jdnas.baselines.naive import run_baseline
    from jdnas.data.prepare import resolved_params
    torch.set_num_threads(1)
    params = resolved_params(smoke_params, prepared)
    proxy_table(params, classes=len(params["data"]["synthetic"]["classes"]) + 1).save(tmp_path / "table.csv")
    out, no_pool = tmp_path / "baseline", tmp_path / "absent" / "supernet.pt"
    first = run_baseline(params, prepared, tmp_path / "table.csv", no_pool, out, until="retrain")
    assert [s["step"] for s in first["steps"]] == ["nas", "retrain"] and first["final"]["step"] == "retrain"
    assert not (out / "metrics.json").exists() and not (out / "steps" / "prune").exists()
    done = {s: (out / "steps" / s / "metrics.json").read_text() for s in ("nas", "retrain")}
    run_baseline(params, prepared, tmp_path / "table.csv", no_pool, out, until="retrain")
    assert {s: (out / "steps" / s / "metrics.json").read_text() for s in done} == done
    longer = with_overrides(params, {"baseline": {"nas_iters": params["baseline"]["nas_iters"] + 1}})
    nas = run_baseline(longer, prepared, tmp_path / "table.csv", no_pool, out, until="nas")["final"]
    assert {c["iters"] for c in nas["candidates"]} == {longer["baseline"]["nas_iters"]}


def test_a_matched_fine_tune_resumes_on_the_iterations_it_planned(prepared, smoke_params, base_ckpt, tmp_path):
    """Control and prune_kd price an iteration with a timing probe; a killed run must resume on the
    first run's plan (a new probe would change the iterations and throw away the training state)."""
    import json
    from jdnas.baselines.naive import Tuning, fine_tune
    from jdnas.data.prepare import resolved_params
    torch.set_num_threads(1)
    params = resolved_params(smoke_params, prepared)
    data = CocoDetection(prepared / "train.json", max_size=params["model"]["max_size"])
    first = fine_tune(Tuning.from_params(params), prepared, data, Budget(None, "cpu_seconds", [1.0] * 4), base_ckpt,
                      1.0, tmp_path / "a", None)
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["iters"] == first["planned_iters"] >= params["baseline"]["min_iters"] and plan["cost_per_iter"] > 0
    assert first["iters"] >= params["baseline"]["min_iters"]  # replanned on what training paid
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "plan.json").write_text(json.dumps({"iters": 3, "cost_per_iter": 0.5, "share": 1.5}))
    again = fine_tune(Tuning.from_params(params), prepared, data, Budget(None, "cpu_seconds", [1.0] * 4), base_ckpt,
                      1000.0, tmp_path / "b", None)
    # the plan's 3 iterations (checkpoint_every 2: its one checkpoint is past the half, where a
    # replan may only shorten the schedule, and the share is ample)
    assert again["planned_iters"] == again["iters"] == 3 and again["cost_per_iter"] == 0.5


def test_a_matched_fine_tune_pays_what_its_step_clock_counts(prepared, smoke_params, base_ckpt, tmp_path):
    """The replan prices an iteration by the step's clock, not only by the training loop's meter
    (which leaves out loading batches and writing checkpoints): with a clock that runs 3x the
    meter, the schedule stays near its plan instead of growing to what the meter alone would buy."""
    import time
    from jdnas.baselines.naive import Tuning, fine_tune
    from jdnas.data.prepare import resolved_params
    torch.set_num_threads(1)
    params = resolved_params(smoke_params, prepared)
    data = CocoDetection(prepared / "train.json", max_size=params["model"]["max_size"])
    budget = Budget(None, "cpu_seconds", [1.0] * 4)
    budget.clock = lambda: 3 * time.process_time()  # what the step costs: 3x what the loop meters
    budget.step_start = budget.clock()
    out = fine_tune(Tuning.from_params(params), prepared, data, budget, base_ckpt, 6.0, tmp_path / "a", None)
    assert out["planned_iters"] >= 8  # checkpoints (every 2) in both halves of the schedule
    assert out["iters"] <= 1.5 * out["planned_iters"], out  # the meter alone: ~REPLAN_CAP x the plan


def test_the_control_trains_flat_without_the_search_then_decays_on_the_rest_of_its_compute(
        prepared, smoke_params, base_ckpt, supernet_ckpt, tmp_path):
    """Stage control_stable needs no search summary: the base at the recipe's lr, flat after its
    warm-up, for the pool's compute. Stage control reuses that step and continues from its detector
    with the lr decayed to zero (no second warm-up) for the rest of the joint search's compute."""
    import json
    from conftest import proxy_table, with_overrides
    from jdnas.baselines.matched import pool_compute, run_matched
    from jdnas.data.prepare import resolved_params
    from test_tblog import scalars
    torch.set_num_threads(1)
    # the smoke pool's compute buys ~2 iterations: 6 at least, so the warm-up and the decay show
    params = with_overrides(resolved_params(smoke_params, prepared), {"baseline": {"min_iters": 6}})
    table, out, lr = tmp_path / "table.csv", tmp_path / "control", params["train_student"]["lr"]
    proxy_table(params, classes=len(params["data"]["synthetic"]["classes"]) + 1).save(table)
    where = (params, prepared, table, base_ckpt, supernet_ckpt)
    stable = run_matched("control", *where, tmp_path / "absent" / "summary.json", out, until="stable")
    pool = pool_compute(supernet_ckpt, "cpu_seconds")
    assert stable["step"] == "stable" and stable["share"] == pytest.approx(pool, abs=0.01)
    assert not (out / "summary.json").exists() and not (out / "decay").exists()
    flat = scalars(out / "stable" / "tb")["train/lr"]
    warm = params["train_student"]["warmup_iters"]
    assert len(flat) == stable["iters"] >= 6 and flat[0] < lr
    assert all(v == pytest.approx(lr) for it, v in flat.items() if it >= warm)
    done = (out / "stable" / "metrics.json").read_text()
    summary_file = tmp_path / "summary.json"
    summary_file.write_text(json.dumps({"target_ms": 1e3, "compute": 3.0, "compute_unit": "cpu_seconds"}))
    summary = run_matched("control", *where, summary_file, out)
    assert (out / "stable" / "metrics.json").read_text() == done  # reused, not retrained
    assert [s["step"] for s in summary["steps"]] == ["stable", "decay"]
    assert summary["budget"] == pytest.approx(pool + 3.0, abs=0.01) and summary["charged_pool"] == 0
    decay = scalars(out / "decay" / "tb")["train/lr"]
    values = [decay[k] for k in sorted(decay)]
    assert values[0] == pytest.approx(lr) and values == sorted(values, reverse=True) and values[-1] < values[0]
    with pytest.raises(JdnasError, match="--until kd is not one of its steps"):
        run_matched("control", *where, summary_file, out, until="kd")
