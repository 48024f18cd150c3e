"""The joint search: pacing, composed cuts, paired decisions, teacher moves, one lineage, determinism."""
import json
import random

import pandas as pd
import pytest

from jdnas.joint.search import (Context, candidate_actions, compose_cut, finalist_slots, init_search, pick, propose,
                                rank_cuts, round_dir, round_goal, run_candidate, run_search, score, teacher_move)
from jdnas.joint.screen import Screen
from jdnas.models.arch import Head, preset, resolve_arch
from jdnas.models.elastic import PoolSpace
from jdnas.models.morphism import Action, child
from jdnas.models.teacher_gene import TeacherGene, largest_gene, mutate_gene, sample_gene
from conftest import REPO, proxy_table, with_overrides

SPACE = PoolSpace(preset("r18", 0.25), (1, 1, 1, 1), (0.5, 0.75, 1.0))
TEACHER = "d2,2,2,2/w1,1,1,1"


def test_score_penalises_only_overshoot():
    assert score(30.0, 8.0, 10.0, 50.0) == 30.0
    assert score(30.0, 10.0, 10.0, 50.0) == 30.0
    assert score(30.0, 12.0, 10.0, 50.0) == pytest.approx(20.0)
    assert score(30.0, float("nan"), 10.0, 50.0) == float("-inf") == score(30.0, float("inf"), 10.0, 50.0)


def test_teacher_genes_round_trip_and_move():
    t = largest_gene(SPACE)
    assert TeacherGene.parse(str(t)) == t and t.arch(SPACE) == SPACE.max_arch
    rng = random.Random(0)
    for _ in range(50):
        m = mutate_gene(t, SPACE, rng)
        assert sum(a != b for a, b in zip(m.depths + m.ratios, t.depths + t.ratios)) == 1
        assert SPACE.contains(m.arch(SPACE)) and SPACE.contains(sample_gene(SPACE, rng).arch(SPACE))
    cfg = {"teacher_mutate": 1.0, "teacher_resample": 0.0}
    moved = teacher_move(str(t), SPACE, cfg, random.Random(1))
    assert moved != str(t) and moved == teacher_move(str(t), SPACE, cfg, random.Random(1))


def test_round_goal_paces_the_cuts_to_arrive_at_the_last_round():
    lat, target = 10.0, 6.0
    for rounds_left in (5, 4, 3, 2, 1):
        lat = round_goal(lat, target, rounds_left)
    assert lat == pytest.approx(target)
    assert round_goal(10.0, 6.0, 5) == pytest.approx(10.0 * 0.6 ** 0.2)
    assert round_goal(5.0, 6.0, 3) == 6.0  # under the target: the target


def _space_and_table(smoke_params):
    p = with_overrides(smoke_params, {"search_space": {"resize_ratios": [0.5]}})
    table = proxy_table(p)
    arch, head = resolve_arch(p["model"]["base"], p["model"]["width"]), Head.of(p["model"])
    return p, table, arch, head


def test_candidate_actions_are_cuts_above_the_target_and_growth_under_it(smoke_params):
    p, table, arch, head = _space_and_table(smoke_params)
    full = table.predict(arch, head)
    cuts = candidate_actions(arch, head, head, p["search_space"], table, full, 0.5 * full)
    assert cuts and all(ms < full for ms in cuts.values()) and {a.kind for a in cuts} <= {
        "shallow", "prune", "slim", "fpn_prune", "head_prune", "resize", "proposals"}
    assert all(table.predict(*child(a, arch, head)) == ms for a, ms in cuts.items())
    grow = candidate_actions(arch, head, head, p["search_space"], table, full, 2.0 * full)
    assert grow and all(ms <= 2.0 * full for ms in grow.values()) and {a.kind for a in grow} <= {"deepen", "shift"}


def test_a_cut_is_composed_best_first_until_the_round_goal(smoke_params):
    p, table, arch, head = _space_and_table(smoke_params)
    full = table.predict(arch, head)
    cuts = candidate_actions(arch, head, head, p["search_space"], table, full, 0.5 * full)
    rows = [{"action": a, "latency_ms": ms, "ap": 10.0 - 100 * (full - ms) / full} for a, ms in cuts.items()]
    ranked = [x["action"] for x in rank_cuts(rows, 10.0, full)]
    goal = 0.8 * full
    moves, ms = compose_cut(ranked[0], ranked, arch, head, p["search_space"], head, table, goal)
    assert moves[0] == ranked[0] and ms <= goal
    assert len({(a.kind, a.stage) for a in moves}) == len(moves)     # one pass reaches this goal: each kind and stage once
    a, h = arch, head
    for m in moves:
        a, h = child(m, a, h)
    assert table.predict(a, h) == pytest.approx(ms)
    # a goal already met by the first cut is met by it alone
    one, _ = compose_cut(ranked[0], ranked, arch, head, p["search_space"], head, table, full)
    assert one == [ranked[0]]


def test_a_cut_goes_over_the_ranking_again_when_one_pass_falls_short(smoke_params):
    p, table, arch, head = _space_and_table(smoke_params)
    full = table.predict(arch, head)
    cuts = candidate_actions(arch, head, head, p["search_space"], table, full, 0.5 * full)
    fpn = [a for a in cuts if a.kind == "fpn_prune"]
    assert fpn
    once = cuts[fpn[0]]
    moves, ms = compose_cut(fpn[0], fpn[:1], arch, head, p["search_space"], head, table, once - 1e-6)
    assert moves[:2] == [fpn[0], fpn[0]] and ms < once    # the FPN cut twice, as prune_kd would
    a, h = arch, head
    for m in moves:
        a, h = child(m, a, h)
    assert table.predict(a, h) == pytest.approx(ms)
    # nothing legal left: the composition stops short of an unreachable goal instead of looping
    far, far_ms = compose_cut(fpn[0], fpn[:1], arch, head, p["search_space"], head, table, 0.0)
    assert far and far_ms > 0.0


def test_rank_cuts_by_latency_saved_per_ap_lost():
    rows = [{"action": "a", "latency_ms": 9.0, "ap": 9.0}, {"action": "b", "latency_ms": 8.0, "ap": 8.5},
            {"action": "c", "latency_ms": 9.5, "ap": 10.0}]
    # a: 1 ms / 1 AP; b: 2 ms / 1.5 AP; c: 0.5 ms / (0.1 floor) = 5
    assert [x["action"] for x in rank_cuts(rows, 10.0, 10.0)] == ["c", "b", "a"]


def _r(k, ap, ms, control=False, teacher=TEACHER):
    return {"index": k, "ap": ap, "latency_ms": ms, "control": control, "teacher": teacher}


def test_pick_takes_the_best_score_unless_a_cheaper_finalist_ties_it():
    never = lambda a, b, off: pytest.fail("compared needlessly")  # noqa: E731
    always, no = (lambda a, b, off: True), (lambda a, b, off: False)
    strong, cheap = _r(0, 20.0, 9.0), _r(1, 19.5, 8.0)
    assert pick([strong, cheap], 8.0, 50.0, 0.04, False, TEACHER, never) is cheap  # 20 - 6.25 < 19.5
    assert pick([strong, cheap], 8.0, 2.0, 0.04, False, TEACHER, no) is strong     # 20 - 0.25 > 19.5
    assert pick([strong, cheap], 8.0, 2.0, 0.04, False, TEACHER, always) is cheap  # a tie: the cheaper
    # a more expensive finalist is never compared with a cheaper leader
    assert pick([_r(0, 10.0, 9.0), _r(1, 30.0, 8.0)], 8.0, 5.0, 0.04, False, TEACHER, never)["index"] == 1


def test_pick_does_not_prefer_a_cut_past_the_target():
    # the default run's last round: both finalists meet the target, the bootstrap calls them a
    # tie; the deeper cut buys no latency that matters, so the better score keeps the round
    always = lambda a, b, off: True  # noqa: E731
    enough, deeper = _r(0, 72.08, 11.28), _r(1, 71.06, 9.86)
    assert pick([enough, deeper], 11.33, 60.0, 0.04, False, TEACHER, always) is enough
    # one still above the target: cheaper (down to the target) wins the tie
    above = _r(0, 72.08, 12.5)
    assert pick([above, deeper], 11.33, 1.0, 0.04, False, TEACHER, always) is deeper


def test_pick_under_the_target_is_a_hard_constraint_and_ties_go_to_the_lineage():
    always = lambda a, b, off: True  # noqa: E731
    control, above = _r(0, 20.0, 7.0, control=True), _r(1, 40.0, 8.01)
    assert pick([control, above], 8.0, 50.0, 0.04, True, TEACHER, always) is control
    grow = _r(1, 21.0, 7.1)
    assert pick([control, grow], 8.0, 50.0, 0.04, True, TEACHER, lambda a, b, off: False) is grow
    assert pick([control, grow], 8.0, 50.0, 0.04, True, TEACHER, always) is control   # a tie: the lineage
    other = _r(1, 21.0, 7.0, teacher="d1,1,1,1/w1,1,1,1")
    assert pick([_r(0, 20.0, 7.0), other], 8.0, 50.0, 0.04, True, TEACHER, always)["index"] == 0


def test_a_tie_between_teachers_goes_to_the_cheaper_teacher():
    """As fast a student: a teacher of fewer FLOPs wins a tie (every lineage iteration runs it),
    even over the control; one within the tolerance does not, and a win is a win."""
    always, no = (lambda a, b, off: True), (lambda a, b, off: False)
    control = {**_r(0, 20.0, 7.0, control=True), "teacher_flops": 1000}
    small = {**_r(1, 19.0, 7.0, teacher="d1,1,1,1/w1,1,1,1"), "teacher_flops": 600}
    big = {**_r(1, 21.0, 7.0, teacher="d1,1,1,1/w1,1,1,1"), "teacher_flops": 1500}
    assert pick([control, small], 8.0, 50.0, 0.04, True, TEACHER, always) is small
    assert pick([control, small], 8.0, 50.0, 0.04, True, TEACHER, no) is control
    assert pick([control, {**small, "teacher_flops": 990}], 8.0, 50.0, 0.04, True, TEACHER, always) is control
    assert pick([control, big], 8.0, 50.0, 0.04, True, TEACHER, always) is control  # a tie: the cheaper
    assert pick([control, big], 8.0, 50.0, 0.04, True, TEACHER, no) is big


def test_pick_offsets_the_bootstrap_by_what_the_latencies_make():
    seen = []
    pick([_r(0, 20.0, 10.0), _r(1, 19.0, 8.0)], 8.0, 10.0, 0.04, False, TEACHER,
         lambda a, b, off: seen.append((a["index"], b["index"], off)) or False)
    # leader 0 scores 20 - 10 x 0.25 = 17.5 against 19: not the leader; nothing cheaper than 1
    assert seen == []
    pick([_r(0, 20.0, 9.0), _r(1, 19.8, 8.0)], 8.0, 1.0, 0.04, False, TEACHER,
         lambda a, b, off: seen.append((a["index"], b["index"], off)) or False)
    assert seen == [(0, 1, pytest.approx(-0.125))]  # leader 20 - 0.125; the other 19.8 - 0


def _search(root, params, prepared, supernet, base):
    ctx = Context(params, prepared, supernet, REPO / "config" / "latency" / "smoke_cpu.csv", base, root)
    return ctx, run_search(ctx)


def test_search_is_one_lineage_and_decides_the_same_twice(prepared, smoke_params, supernet_ckpt, base_ckpt,
                                                           tmp_path):
    """The lineage's position moves by round_iters per round and ends at search.iters; each
    finalist starts where the lineage stood; the compute split adds up; a second run decides alike."""
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 0.8}})  # reached in round 1: round 2 trains
    ctx, state = _search(tmp_path / "a", p, prepared, supernet_ckpt, base_ckpt)
    cfg = p["search"]
    assert state.it == cfg["iters"]
    for r in (1, 2):
        s = json.loads((round_dir(r, ctx.root) / "state.json").read_text())
        assert s["it"] == r * cfg["round_iters"]
        for c in round_dir(r, ctx.root).glob("cand_*/result.json"):
            x = json.loads(c.read_text())
            trial = cfg["cut_trial_iters"] if r == 1 else cfg["trial_iters"]  # above the target, then under it
            assert x["skipped"] or x["it"] == (r - 1) * cfg["round_iters"] + trial
    summary = json.loads((ctx.root / "summary.json").read_text())
    split = summary["compute_split"]
    assert set(split) == {"lineage", "discarded", "screening", "evaluation", "teachers"}
    assert sum(split.values()) == pytest.approx(summary["compute"], abs=0.05)
    assert summary["final_iters"] == cfg["iters"] - 2 * cfg["round_iters"]
    teachers = list((ctx.root / "teachers").iterdir())
    assert len(teachers) == len({x for x in pd.read_csv(ctx.root / "history.csv")["teacher"]})  # once each
    _, again = _search(tmp_path / "b", p, prepared, supernet_ckpt, base_ckpt)
    timing = ["seconds", "cpu_seconds"]
    h1 = pd.read_csv(ctx.root / "history.csv").drop(columns=timing)
    h2 = pd.read_csv(tmp_path / "b" / "history.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(h1, h2)
    a = torch.load(ctx.root / "finish" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "finish" / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_search_passes_its_lineage_through(prepared, smoke_params, supernet_ckpt, base_ckpt, tmp_path):
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 5.0, "patience": 1, "candidates": 1,
                                                 "teacher_moves": 0}})  # under the target from the start
    ctx, state = _search(tmp_path, p, prepared, supernet_ckpt, base_ckpt)
    s1 = json.loads((round_dir(1, ctx.root) / "state.json").read_text())
    assert s1["accepted"] == "cand_0" and s1["stopped"] and s1["stale"] == 1   # the control won: patience 1
    # the control alone: nothing screened, trained to the round's end at once, scored once
    proposals = json.loads((round_dir(1, ctx.root) / "proposals.json").read_text())
    assert len(proposals["candidates"]) == 1 and proposals["compute"] == {}
    assert pd.read_csv(round_dir(1, ctx.root) / "screen.csv").empty
    cand = json.loads((round_dir(1, ctx.root) / "cand_0" / "result.json").read_text())
    assert cand["it"] == s1["it"] == p["search"]["round_iters"] and s1["ap"] == cand["ap"]
    assert set(s1["compute"]) <= {"teachers"}  # select neither trains nor evaluates again
    s2 = json.loads((round_dir(2, ctx.root) / "state.json").read_text())
    assert s2["accepted"] is None and s2["it"] == s1["it"]
    assert (round_dir(2, ctx.root) / "student.pt").read_bytes() == (round_dir(1, ctx.root) / "student.pt").read_bytes()
    assert state.it == p["search"]["iters"]  # the finish trains the rest of the schedule


def test_steps_with_nothing_to_train_pass_files_through_without_torch(tmp_path):
    """A round after the stop (propose, every finalist slot, select) and a slot beyond a round's
    finalists are Snakemake jobs of their own: they write their files without importing torch."""
    import subprocess
    import sys
    root = tmp_path / "search"
    r1 = round_dir(1, root)
    (r1 / "cand_0").mkdir(parents=True)
    state = {"round": 1, "student_arch": "A", "student_head": "H", "teacher": "T", "ap": 50.0, "ap50": 70.0,
             "latency_ms": 5.0, "target_ms": 6.0, "score": 50.0, "stale": 1, "stopped": True,
             "accepted": "cand_0", "it": 100}
    (r1 / "state.json").write_text(json.dumps(state))
    (r1 / "student.pt").write_bytes(b"student")
    (r1 / "lineage.pt").write_bytes(b"lineage")
    (r1 / "proposals.json").write_text(json.dumps({"candidates": [{"round": 1, "index": 0}]}))
    code = ("import sys; from jdnas.cli import main\n"
            f"root = {str(root)!r}\n"
            "steps = [['candidate', '1', '1'], ['propose', '2', '0'], ['candidate', '2', '0'], ['candidate', '2', '1'],"
            " ['select', '2', '0']]\n"
            "for step, r, k in steps:\n"
            "    assert main(['search-step', step, '--round', r, '--index', k, '--root', root]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((r1 / "cand_1" / "result.json").read_text())["skipped"]
    r2 = round_dir(2, root)
    assert json.loads((r2 / "proposals.json").read_text())["candidates"] == []
    assert all(json.loads((r2 / f"cand_{k}" / "result.json").read_text())["skipped"] for k in (0, 1))
    s2 = json.loads((r2 / "state.json").read_text())
    assert s2["stopped"] and s2["accepted"] is None and s2["it"] == 100 and s2["stale"] == 1
    assert (r2 / "student.pt").read_bytes() == b"student" and (r2 / "lineage.pt").read_bytes() == b"lineage"


@pytest.mark.parametrize("from_pool, twin_better, start", [(True, True, "pool"), (True, False, "base"),
                                                            (False, True, "base")])
def test_the_lineage_starts_from_the_better_of_the_base_and_its_twin_in_the_pool(
        prepared, smoke_params, supernet_ckpt, base_ckpt, tmp_path, monkeypatch, from_pool, twin_better, start):
    """search.from_pool: the pool's member of the base's architecture starts the lineage where it
    scores higher on minival (a tie keeps the base); its weights are the pool's, its minival AP the
    round's, and the extraction and evaluations count in the compute split."""
    import torch
    import jdnas.joint.search as search
    from jdnas.joint.lineage import load_lineage
    from jdnas.joint.teacher_pool import load_supernet
    from jdnas.models.detector import load_detector
    torch.set_num_threads(1)
    base = load_detector(base_ckpt)
    twin_ap, base_ap = (60.0, 50.0) if twin_better else (50.0, 50.0)
    real, key = search._evaluate, next(k for k in base.state_dict() if k.endswith("conv.weight"))

    def fake_ap(ctx, model, out, spent):  # minival AP by which weights the model holds
        metrics = real(ctx, model, out, spent)
        is_base = torch.equal(model.state_dict()[key].cpu(), base.state_dict()[key])
        return {**metrics, "AP": base_ap if is_base else twin_ap}

    monkeypatch.setattr(search, "_evaluate", fake_ap)
    p = with_overrides(smoke_params, {"search": {"from_pool": from_pool}})
    ctx = Context(p, prepared, supernet_ckpt, REPO / "config" / "latency" / "smoke_cpu.csv", base_ckpt, tmp_path)
    state = init_search(ctx)
    saved = json.loads((round_dir(0, tmp_path) / "state.json").read_text())
    assert saved["start"] == start and saved["base_minival_ap"] == base_ap
    assert state.ap == (twin_ap if start == "pool" else base_ap) and state.student_arch == str(base.arch)
    want = load_supernet(supernet_ckpt).extract(base.arch) if start == "pool" else base
    got = load_lineage(round_dir(0, tmp_path)).model.state_dict()
    assert all(torch.equal(got[k].cpu(), v) for k, v in want.state_dict().items()
               if "running" not in k and "num_batches" not in k)
    assert ("teachers" in saved["compute"]) is from_pool and saved["compute"]["evaluation"]["cpu_seconds"] > 0


@pytest.mark.parametrize("from_pool", [True, False])
def test_prune_kd_starts_where_the_search_starts(prepared, smoke_params, supernet_ckpt, base_ckpt, tmp_path,
                                                  from_pool):
    """prune_kd takes the base or its twin in the pool by the search's rule, on the same minival."""
    import torch
    from jdnas.baselines.matched import PruneKD
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"from_pool": from_pool}})
    table = REPO / "config" / "latency" / "smoke_cpu.csv"
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"target_ms": 5.0, "compute": 10.0, "compute_unit": "cpu_seconds"}))
    model, info = PruneKD(p, prepared, table, base_ckpt, supernet_ckpt, summary, tmp_path / "pk").start()
    init_search(Context(p, prepared, supernet_ckpt, table, base_ckpt, tmp_path / "search"))
    searched = json.loads((round_dir(0, tmp_path / "search") / "state.json").read_text())
    assert info["start"] == searched["start"]
    assert ("twin_minival_ap" in info) is from_pool  # no evaluation spent where there is no choice
    if from_pool:
        assert info["base_minival_ap"] == searched["base_minival_ap"]
        assert info["start"] == ("pool" if info["twin_minival_ap"] > info["base_minival_ap"] else "base")


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_the_search_and_prune_kd_cut_to_the_aim_under_the_target(prepared, smoke_params, supernet_ckpt, base_ckpt,
                                                                  tmp_path, margin):
    """At a target the base meets (1.0x), a margin sends both pipelines cutting to its aim, and
    both stop there: round 1's finalists and prune_kd's last cut are at or under the aim."""
    import torch
    from jdnas.baselines.matched import PruneKD
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 1.0, "latency_margin": margin, "cut_rounds": 1,
                                                 "from_pool": False}})
    table = REPO / "config" / "latency" / "smoke_cpu.csv"
    ctx = Context(p, prepared, supernet_ckpt, table, base_ckpt, tmp_path / "search")
    assert ctx.aim_ms == pytest.approx(ctx.target_ms * (1 - margin))
    init_search(ctx)
    out = propose(ctx, 1)
    assert out["above_target"] is (margin > 0)
    if margin:
        assert out["candidates"] and all(c["latency_ms"] <= ctx.aim_ms for c in out["candidates"])
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"target_ms": ctx.target_ms, "aim_ms": ctx.aim_ms, "compute": 10.0,
                                   "compute_unit": "cpu_seconds"}))
    pk = PruneKD(p, prepared, table, base_ckpt, supernet_ckpt, summary, tmp_path / "pk")
    plan = pk.prune(tmp_path / "pk" / "prune", 1.0)["plan"]
    assert bool(plan) is (margin > 0) and all(x["latency_ms"] > ctx.aim_ms for x in plan[:-1])
    assert not plan or plan[-1]["latency_ms"] <= ctx.aim_ms


@pytest.mark.parametrize("target, above", [(0.01, True), (5.0, False)])
def test_finalists_are_cuts_above_the_target_and_the_control_with_a_teacher_move_under_it(
        prepared, smoke_params, supernet_ckpt, base_ckpt, tmp_path, target, above):
    """Above the target up to cut_candidates cuts, all with the lineage's teacher; under it the
    control first, then growth, then teacher moves that keep the control's move."""
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": target, "cut_candidates": 2, "candidates": 1,
                                                 "teacher_moves": 1}})
    ctx = Context(p, prepared, supernet_ckpt, REPO / "config" / "latency" / "smoke_cpu.csv", base_ckpt, tmp_path)
    teacher = init_search(ctx).teacher
    out = propose(ctx, 1)
    cands = out["candidates"]
    assert out["above_target"] is above and finalist_slots(p["search"]) == 2
    if above:
        assert 1 <= len(cands) <= 2 and all(c["action"] != "none" and c["teacher"] == teacher for c in cands)
    else:
        assert [c["action"] for c in cands] == ["none", "none"]
        assert cands[0]["teacher"] == teacher != cands[1]["teacher"]


def test_a_teacher_move_on_the_control_is_not_the_control(prepared, smoke_params, supernet_ckpt, base_ckpt,
                                                          tmp_path):
    """Only the lineage trained on unchanged (no move, its own teacher) is the control: ties go to it."""
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 5.0, "candidates": 1, "teacher_moves": 1}})
    ctx = Context(p, prepared, supernet_ckpt, REPO / "config" / "latency" / "smoke_cpu.csv", base_ckpt, tmp_path)
    init_search(ctx)
    assert [c["action"] for c in propose(ctx, 1)["candidates"]] == ["none", "none"]
    assert [run_candidate(ctx, 1, k)["control"] for k in (0, 1)] == [True, False]


@pytest.mark.parametrize("margin", [0.0, 100.0])
def test_growth_far_below_the_control_on_the_screen_is_not_trained(prepared, smoke_params, supernet_ckpt, base_ckpt,
                                                                   tmp_path, margin):
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 5.0, "candidates": 3, "teacher_moves": 0,
                                                 "grow_margin": margin}})
    ctx = Context(p, prepared, supernet_ckpt, REPO / "config" / "latency" / "smoke_cpu.csv", base_ckpt, tmp_path)
    init_search(ctx)
    out = propose(ctx, 1)
    grown = out["candidates"][1:]
    screened = pd.read_csv(round_dir(1, ctx.root) / "screen.csv")
    assert out["candidates"][0]["action"] == "none" and len(screened)
    assert all(c["screen_ap"] >= out["parent_screen_ap"] - margin for c in grown)
    eligible = (screened["screen_ap"] >= out["parent_screen_ap"] - margin).sum()
    assert len(grown) == min(2, eligible)


@pytest.mark.parametrize("cut_rounds", [1, 2])
def test_the_cut_rounds_pace_the_way_to_the_target(prepared, smoke_params, supernet_ckpt, base_ckpt, tmp_path,
                                                   cut_rounds):
    """cut_rounds 1: round 1's finalists are composed all the way down to the target (the rest of
    the schedule trains the student at its final size); 2: round 1 cuts only its share."""
    import torch
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"search": {"latency_target": 0.9, "cut_rounds": cut_rounds, "rounds": 2}})
    ctx = Context(p, prepared, supernet_ckpt, REPO / "config" / "latency" / "smoke_cpu.csv", base_ckpt, tmp_path)
    init_search(ctx)
    out = propose(ctx, 1)
    assert out["above_target"] and out["candidates"]
    assert all(c["latency_ms"] <= ctx.target_ms for c in out["candidates"]) is (cut_rounds == 1)


@pytest.mark.parametrize("content, words", [
    (b"{bad", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b'{"round": 0}', "missing key 'student_arch'"),
    (b"[1, 2]", "missing key 'round'"),
    (None, "file not found"),
])
def test_a_damaged_search_state_is_one_line(tmp_path, content, words):
    """A state.json that is not what select wrote (truncated, hand-edited, gone): one line naming it."""
    from jdnas.errors import JdnasError
    from jdnas.joint.search import load_state
    path = tmp_path / "state.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JdnasError, match=words) as e:
        load_state(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_search_summary_stops_a_matched_baseline(tmp_path):
    from jdnas.errors import JdnasError
    from jdnas.baselines.matched import run_matched
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"target_ms": 5.0, "compute_unit": "cpu_seconds"}))
    with pytest.raises(JdnasError, match=r"summary.json: missing key 'compute'"):
        run_matched("control", {"device": "cpu"}, tmp_path, "config/latency/smoke_cpu.csv", tmp_path / "b.pt",
                    tmp_path / "s.pt", summary, tmp_path / "out")


def test_finalists_start_from_small_cuts_and_big_ones_and_drop_what_the_goal_does_not_need(smoke_params):
    from jdnas.joint.search import cut_starts, trim_cut
    p, table, arch, head = _space_and_table(smoke_params)
    full = table.predict(arch, head)
    cuts = candidate_actions(arch, head, head, p["search_space"], table, full, 0.5 * full)
    rows = [{"action": a, "latency_ms": ms, "ap": 10.0} for a, ms in cuts.items()]
    ranked = rank_cuts(rows, 10.0, full)
    starts = cut_starts(ranked, full, 0.04)
    big = {x["action"] for x in ranked if x["latency_ms"] < 0.96 * full}
    assert starts[0][0] == ranked[0]["action"] and starts[1][0] in big  # small first, then big first
    goal = 0.9 * full
    moves, ms = compose_cut(starts[0][0], starts[0][1], arch, head, p["search_space"], head, table, goal)
    trimmed, t_ms = trim_cut(moves, ms, arch, head, p["search_space"], head, table, goal)
    assert set(trimmed) <= set(moves) and t_ms <= goal and t_ms >= ms
    for i in range(len(trimmed)) if len(trimmed) > 1 else []:  # nothing left to drop
        rest = trimmed[:i] + trimmed[i + 1:]
        a_, h_ = arch, head
        for m in rest:
            a_, h_ = child(m, a_, h_)
        assert table.predict(a_, h_) > goal


def test_resize_goes_only_as_low_as_the_objects_stay_visible():
    from jdnas.data.inspect import data_bounds, resize_floor
    stats = {"short_side": {"median": 256}, "long_side": {"median": 256}, "object_size": {"p5": 24.0}}
    # at 160 px the 5th-percentile object is 15 px: 12 px is reached at 0.8x
    assert resize_floor(stats, 160, 160, 12.0) == pytest.approx(0.8)
    bounds = {"min_input_ratio": 0.5, "resize_min_object": 12.0}
    assert data_bounds(bounds, stats, 160, 160)["min_input_ratio"] == pytest.approx(0.8)
    assert data_bounds({**bounds, "resize_min_object": 0.0}, stats, 160, 160)["min_input_ratio"] == 0.5
    tiny = {**stats, "object_size": {"p5": 10.0}}
    assert data_bounds(bounds, tiny, 128, 128)["min_input_ratio"] == 1.0  # no resize at all


def test_objects_too_small_for_resize_leave_every_other_head_action_legal(smoke_params):
    from jdnas.data.inspect import data_bounds
    from jdnas.models.morphism import legal_actions
    p, table, arch, head = _space_and_table(smoke_params)
    tiny = {"short_side": {"median": 64}, "long_side": {"median": 64}, "object_size": {"p5": 4.0}}
    bounds = data_bounds({**p["search_space"], "resize_min_object": 12.0}, tiny, head.min_size, head.max_size)
    kinds = {a.kind for a in legal_actions(arch, bounds, head, head)}
    assert "resize" not in kinds and {"fpn_prune", "head_prune", "proposals"} <= kinds


def test_the_latency_grid_and_the_search_bound_resize_by_the_same_prepared_data(tmp_path):
    """resize is listed by default: on small objects neither the table's grid nor the search gets
    a smaller input; on large ones both get the same sizes. Without statistics it is one line."""
    from jdnas.config import load_params
    from jdnas.data.prepare import prepared_bounds
    from jdnas.errors import DataError
    from jdnas.latency.space import HeadSpace
    params = load_params([REPO / "params.yaml"])
    bounds, base = params["search_space"], Head.of(params["model"])
    assert "resize" in bounds["actions"] and bounds["resize_min_object"] > 0

    def sizes(p5: float) -> list[tuple[int, int]]:
        d = tmp_path / str(p5)
        d.mkdir()
        stats = {"short_side": {"median": 128}, "long_side": {"median": 128}, "object_size": {"p5": p5}}
        (d / "manifest.json").write_text(json.dumps({"stats": {"train": stats}}))
        b = prepared_bounds(bounds, d, base.min_size, base.max_size)
        return list(HeadSpace.around(base, b, [0.5]).sizes)

    assert sizes(10.0) == [(128, 128)]                        # the synthetic set: 10-px objects
    assert sizes(48.0) == [(128, 128), (96, 96), (64, 64)]    # 24 px at 64: down to min_input_ratio
    assert sizes(20.0) == [(128, 128), (96, 96)]              # 15 px at 96, 10 at 64
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "manifest.json").write_text(json.dumps({"categories": []}))
    with pytest.raises(DataError, match=r"bare/manifest.json: stats: missing"):
        prepared_bounds(bounds, tmp_path / "bare", 128, 128)
    assert prepared_bounds({**bounds, "resize_min_object": 0}, tmp_path / "bare", 128, 128)["min_input_ratio"] == 0.5


@pytest.mark.parametrize("text", ["shift(0,+1)", "shift(1,-1)+prune(2,0.25)", "slim(2,0.25)+fpn_prune(0.125)",
                                  "deepen(3)+shift(2,+1)+proposals(0.5)", "none"])
def test_a_move_round_trips_through_its_text(text):
    """A finalist's move is stored as text (proposals.json) and parsed by its candidate job; a
    shift's signed step must not split it (the default run's round 5 stopped on 'shift(0,+1)')."""
    from jdnas.joint.lineage import moves_text, parse_moves
    moves = parse_moves(text)
    assert moves_text(moves) == text and all(isinstance(m, Action) for m in moves)
    assert len(moves) == (0 if text == "none" else text.count(")"))


class _ScriptedScreen:
    """Screen.greedy_cut on scripted screen APs: a child is its parent's name + the cut, its AP
    50 less each cut's loss."""

    LOSS = {"a": 0.01, "b": 6.0, "c": 2.0}
    greedy_cut = Screen.greedy_cut

    def __init__(self) -> None:
        self.screened: list[list[str]] = []

    def actions(self, model, actions, seed=0):
        self.screened.append(list(actions))
        return [{"action": a, "model": model + a, "ap": 50 - sum(self.LOSS[x] for x in model + a)} for a in actions]


def test_the_greedy_cut_rescreens_each_child_and_takes_big_cuts_first():
    """prune_kd's rule, shared with the search: the most latency saved per AP lost among the cuts
    saving more than the tolerance, each child screened again, until the goal is reached."""
    screen = _ScriptedScreen()

    def cuts(model, ms):  # a saves 2% (below the tolerance), b 3 ms, c 2 ms
        return {"a": ms - 0.2, "b": ms - 3.0, "c": ms - 2.0}

    model, plan = screen.greedy_cut("", 50.0, 10.0, 6.0, cuts, 0.04)
    assert model == "cc" and [x["action"] for x in plan] == ["c", "c"]   # b: 0.5 ms per AP, c: 1; a never
    assert [x["latency_ms"] for x in plan] == [8.0, 6.0] and plan[-1]["screen_ap"] == 46.0
    assert len(screen.screened) == 2                                      # the child screened again
    first = screen.actions("", ["a", "b", "c"])
    model, plan = screen.greedy_cut("", 50.0, 10.0, 6.0, cuts, 0.04, first=first)
    assert model == "cc" and len(screen.screened) == 4                   # the given rows spare one screen
    assert screen.greedy_cut("", 50.0, 5.0, 6.0, cuts, 0.04) == ("", [])  # at the goal already
