"""Search logic: score, seeded distinct proposals, teacher moves, selection and early stop."""
import json
import random
from dataclasses import asdict

import pytest

from jdnas.models.arch import preset
from jdnas.models.elastic import PoolSpace
from jdnas.search import (Candidate, State, Teacher, largest_teacher, mutate_teacher, pick, propose, round_dir,
                          sample_teacher, score, select, write_history)
from conftest import with_overrides

SPACE = PoolSpace(preset("r18", 0.25), (1, 1, 1, 1), (0.5, 0.75, 1.0))


def test_score_penalises_only_overshoot():
    assert score(30.0, 8.0, 10.0, 50.0) == 30.0
    assert score(30.0, 10.0, 10.0, 50.0) == 30.0
    assert score(30.0, 12.0, 10.0, 50.0) == pytest.approx(20.0)
    assert score(30.0, float("nan"), 10.0, 50.0) == float("-inf") == score(30.0, float("inf"), 10.0, 50.0)


def test_teacher_genome_round_trip_and_moves():
    t = largest_teacher(SPACE)
    assert Teacher.parse(str(t)) == t and t.arch(SPACE) == SPACE.max_arch
    rng = random.Random(0)
    for _ in range(50):
        m = mutate_teacher(t, SPACE, rng)
        diff = sum(a != b for a, b in zip(m.depths + m.ratios, t.depths + t.ratios))
        assert diff == 1 and SPACE.contains(m.arch(SPACE))
        s = sample_teacher(SPACE, rng)
        assert SPACE.contains(s.arch(SPACE))


def _state(**kw) -> State:
    base = dict(round=0, student_arch=str(preset("r18", 0.25)), student_head="F64-R256-I128/128-P100",
                teacher=str(largest_teacher(SPACE)), ap=10.0, ap50=20.0, latency_ms=10.0, target_ms=8.0, score=10.0)
    return State(**{**base, **kw})


ACTIONS = ["deepen(0)", "prune(1,0.25)", "slim(2,0.25)", "fpn_prune(0.5)", "head_prune(0.25)", "resize(0.75)"]


def test_proposals_are_the_control_then_distinct_seeded_candidates(smoke_params):
    p = with_overrides(smoke_params, {"search": {"candidates": 5}})
    a = propose(_state(), 1, p, SPACE, ACTIONS)
    assert a == propose(_state(), 1, p, SPACE, ACTIONS)
    assert a != propose(_state(), 2, p, SPACE, ACTIONS)
    assert a[0].action == "none" and a[0].teacher == _state().teacher  # the control: no action, same teacher
    assert len(a) == 6 and len({(c.action, c.teacher) for c in a}) == 6
    assert {c.action for c in a[1:]} <= set(ACTIONS)
    assert [c.index for c in a] == list(range(6)) and len({c.seed for c in a}) == 6
    assert propose(_state(stopped=True), 1, p, SPACE, ACTIONS) == []
    assert [c.action for c in propose(_state(), 1, p, SPACE, [])] == ["none"]


class _Ctx:
    def __init__(self, root, patience=2, rounds=3, target_ms=8.0):
        self.root, self.target_ms = root, target_ms
        self.cfg = {"patience": patience, "rounds": rounds, "penalty": 50.0, "latency_tolerance": 0.05}


def _write_round(root, r, state, results):
    d = round_dir(r, root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "student.pt").write_bytes(b"student %d" % r)
    if state is not None:
        (d / "state.json").write_text(json.dumps(asdict(state)))
    for x in results:
        (d / f"cand_{x['index']}").mkdir(exist_ok=True)
        (d / f"cand_{x['index']}" / "model.pt").write_bytes(b"cand %d" % x["index"])
        (d / f"cand_{x['index']}" / "result.json").write_text(json.dumps(x))


def _result(r, k, ap, latency_ms=9.0, skipped=False):
    return {"round": r, "index": k, "skipped": skipped, "control": k == 0, "action": "none" if k == 0 else "prune(1,0.25)",
            "teacher": "d2,2,2,2/w1,1,1,1", "student_arch": "S16:2x16m16-2x32m24-2x64m64-2x128m128",
            "student_head": "F64-R256-I128/128-P100", "ap": ap, "ap50": ap, "latency_ms": latency_ms,
            "score": score(ap, latency_ms, 8.0, 50.0), "seconds": 1.0, "cpu_seconds": 0.5}


def test_pick_above_the_target_always_cuts_and_timing_noise_buys_nothing():
    control = _result(1, 0, 20.0, 10.0)
    faster = _result(1, 1, 18.0, 9.0)                 # 1 point of AP for 10% less latency
    noise = _result(1, 2, 20.5, 9.7)                  # 3% faster: within the tolerance, counts as the control's
    assert pick([control, faster, noise], 8.0, 50.0, 0.05, False) is faster
    assert pick([control, noise], 8.0, 50.0, 0.05, False) is noise
    # among the cuts the score decides: AP against the latency it saves
    assert pick([control, _result(1, 1, 5.0, 7.9), _result(1, 2, 17.0, 8.5)], 8.0, 50.0, 0.05, False)["ap"] == 17.0
    # the target is a constraint: above it a cut wins even where the control scores higher
    assert pick([control, _result(1, 1, 5.0, 7.9)], 8.0, 50.0, 0.05, False)["ap"] == 5.0
    assert pick([control], 8.0, 50.0, 0.05, False) is control  # no cut finished: the control trains on


def test_pick_under_the_target_is_a_hard_constraint():
    control = _result(1, 0, 20.0, 7.0)
    above = _result(1, 1, 40.0, 8.01)
    better = _result(1, 2, 21.0, 7.5)
    assert pick([control, above], 8.0, 50.0, 0.05, True) is control                  # never above once under
    assert pick([control, above, better], 8.0, 50.0, 0.05, True) is better           # under it: AP decides
    assert pick([control, _result(1, 1, 20.0, 6.0)], 8.0, 50.0, 0.05, True) is control  # ties go to the control


def test_select_moves_to_the_winner_and_stops_on_patience(tmp_path):
    _write_round(tmp_path, 0, _state(), [])
    _write_round(tmp_path, 1, None, [_result(1, 0, 11.0, 10.0), _result(1, 1, 12.0, 7.5)])
    s1 = select(_Ctx(tmp_path), 1)
    assert s1.accepted == "cand_1" and s1.ap == 12.0 and s1.stale == 0 and not s1.stopped and s1.meets_target
    assert (round_dir(1, tmp_path) / "student.pt").read_bytes() == b"cand 1"
    assert json.loads((round_dir(1, tmp_path) / "state.json").read_text())["meets_target"] is True
    _write_round(tmp_path, 2, None, [_result(2, 0, 13.0, 7.5), _result(2, 1, 12.5, 7.0)])
    s2 = select(_Ctx(tmp_path, patience=1), 2)
    assert s2.accepted == "cand_0" and s2.ap == 13.0 and s2.stale == 1 and s2.stopped  # the control, trained on
    assert (round_dir(2, tmp_path) / "student.pt").read_bytes() == b"cand 0"
    _write_round(tmp_path, 3, None, [{"round": 3, "index": 0, "skipped": True}])
    s3 = select(_Ctx(tmp_path, patience=1), 3)
    assert s3.stopped and s3.stale == 1 and s3.ap == 13.0  # a stopped search passes its state through
    (tmp_path / "finish").mkdir()
    (tmp_path / "finish" / "result.json").write_text(json.dumps({"iters": 5, "seconds": 2.0, "cpu_seconds": 1.5,
                                                                 "ap": 14.0}))
    df = write_history(tmp_path, {"device": "cpu", "search": {"rounds": 3, "latency_target": 0.8, "penalty": 50.0}})
    assert list(df["accepted"]) == [False, True, True, False] and list(df["control"]) == [True, False, True, False]
    assert (tmp_path / "history.csv").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the candidates' compute and the final fine-tune's
    assert summary["compute_unit"] == "cpu_seconds" and summary["compute"] == summary["cpu_seconds"] == 4 * 0.5 + 1.5
    assert summary["seconds"] == 6.0 and summary["candidates_trained"] == 4 and summary["accepted"] == 2
    assert summary["final_iters"] == 5 and summary["final_minival_ap"] == 14.0
    assert summary["target_ms"] == pytest.approx(0.8 * 10.0)


def test_candidate_actions_are_predicted_first_and_respect_the_target(smoke_params):
    """Every action drawn is one whose child the table predicts: above the target the ones that cut
    latency by more than the tolerance, under it the ones that stay under it."""
    from jdnas.models.arch import Arch, Head, resolve_arch
    from jdnas.morphism import Action, child
    from jdnas.search import candidate_actions
    from conftest import proxy_table
    p = with_overrides(smoke_params, {"search_space": {"resize_ratios": [0.5], "fpn_prune_ratios": [0.25, 0.5]},
                                      "search": {"latency_tolerance": 0.03}})
    table = proxy_table(p)
    base, head = resolve_arch(p["model"]["base"], p["model"]["width"]), Head.of(p["model"])
    full = table.predict(base, head)

    def child_ms(text):
        return table.predict(*child(Action.parse(text), base, head))
    above = _state(student_arch=str(base), student_head=str(head), latency_ms=full, target_ms=0.5 * full)
    acts = candidate_actions(above, p, table, head)
    assert acts and {"fpn_prune(0.5)", "resize(0.5)"} <= set(acts)
    assert all(child_ms(a) < full * 0.97 for a in acts) and "prune(0,0.25)" not in acts
    loose = with_overrides(p, {"search": {"latency_tolerance": 0.5}})   # no action cuts 50%: any cut will do
    acts = candidate_actions(above, loose, table, head)
    assert "prune(0,0.25)" in acts and all(child_ms(a) < full for a in acts)
    under = _state(student_arch=str(base), student_head=str(head), latency_ms=full, target_ms=1.001 * full)
    acts = candidate_actions(under, p, table, head)
    assert acts and all(child_ms(a) <= 1.001 * full for a in acts) and "deepen(0)" not in acts


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
    from jdnas.search import load_state
    path = tmp_path / "state.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JdnasError, match=words) as e:
        load_state(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_search_summary_stops_a_matched_baseline(tmp_path):
    from jdnas.errors import JdnasError
    from jdnas.matched import run_matched
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"target_ms": 5.0, "compute_unit": "cpu_seconds"}))
    with pytest.raises(JdnasError, match=r"summary.json: missing key 'compute'"):
        run_matched("control", {"device": "cpu"}, tmp_path, "config/latency/smoke_cpu.csv", tmp_path / "b.pt",
                    tmp_path / "s.pt", summary, tmp_path / "out")
