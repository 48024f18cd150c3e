"""Search logic: score, seeded distinct proposals, teacher moves, selection and early stop."""
import json
import random
from dataclasses import asdict

import pytest

from jdnas.models.arch import preset
from jdnas.models.elastic import PoolSpace
from jdnas.search import (Candidate, State, Teacher, largest_teacher, mutate_teacher, propose, round_dir,
                          sample_teacher, score, select, write_history)
from conftest import with_overrides

SPACE = PoolSpace(preset("r18", 0.25), (1, 1, 1, 1), (0.5, 0.75, 1.0))


def test_score_penalises_only_overshoot():
    assert score(30.0, 8.0, 10.0, 50.0) == 30.0
    assert score(30.0, 10.0, 10.0, 50.0) == 30.0
    assert score(30.0, 12.0, 10.0, 50.0) == pytest.approx(20.0)


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
    base = dict(round=0, student_arch=str(preset("r18", 0.25)), teacher=str(largest_teacher(SPACE)), ap=10.0,
                ap50=20.0, latency_ms=10.0, score=10.0)
    return State(**{**base, **kw})


def test_proposals_are_distinct_seeded_and_legal(smoke_params):
    p = with_overrides(smoke_params, {"search": {"candidates": 5}, "search_space": {"max_depth": [3, 3, 3, 3]}})
    a = propose(_state(), 1, p, SPACE)
    assert a == propose(_state(), 1, p, SPACE)
    assert a != propose(_state(), 2, p, SPACE)
    assert len(a) == 5 and len({(c.action, c.teacher) for c in a}) == 5
    assert [c.index for c in a] == list(range(5)) and len({c.seed for c in a}) == 5
    assert propose(_state(stopped=True), 1, p, SPACE) == []


class _Ctx:
    def __init__(self, root, patience=2, rounds=3):
        self.root, self.cfg = root, {"patience": patience, "rounds": rounds}


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


def _result(r, k, s, skipped=False):
    return {"round": r, "index": k, "skipped": skipped, "action": "prune(1,0.25)", "teacher": "d2,2,2,2/w1,1,1,1",
            "student_arch": "S16:2x16m16-2x32m24-2x64m64-2x128m128", "ap": s, "ap50": s, "latency_ms": 9.0,
            "score": s, "seconds": 1.0, "cpu_seconds": 0.5}


def test_select_accepts_best_improvement_then_stops_on_patience(tmp_path):
    _write_round(tmp_path, 0, _state(), [])
    _write_round(tmp_path, 1, None, [_result(1, 0, 11.0), _result(1, 1, 12.0)])
    s1 = select(_Ctx(tmp_path), 1)
    assert s1.accepted == "cand_1" and s1.score == 12.0 and s1.stale == 0 and not s1.stopped
    assert (round_dir(1, tmp_path) / "student.pt").read_bytes() == b"cand 1"
    _write_round(tmp_path, 2, None, [_result(2, 0, 5.0), _result(2, 1, 12.0)])
    s2 = select(_Ctx(tmp_path, patience=1), 2)
    assert s2.accepted is None and s2.score == 12.0 and s2.stale == 1 and s2.stopped
    assert (round_dir(2, tmp_path) / "student.pt").read_bytes() == b"cand 1"
    _write_round(tmp_path, 3, None, [{"round": 3, "index": 0, "skipped": True}])
    s3 = select(_Ctx(tmp_path, patience=1), 3)
    assert s3.stopped and s3.stale == 1 and s3.score == 12.0  # a stopped search passes its state through
    df = write_history(tmp_path, {"device": "cpu", "search": {"rounds": 3, "latency_target": 0.8, "penalty": 50.0}})
    assert list(df["accepted"]) == [False, True, False, False]
    assert (tmp_path / "history.csv").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compute_unit"] == "cpu_seconds" and summary["compute"] == summary["cpu_seconds"] == 4 * 0.5
    assert summary["seconds"] == 4.0 and summary["candidates_trained"] == 4 and summary["accepted"] == 1
    assert summary["target_ms"] == pytest.approx(0.8 * 10.0)
