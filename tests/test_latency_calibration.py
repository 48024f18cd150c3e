"""Latency table calibration: the in-context fit over detectors that span the backbone and the
head space, on synthetic timings (no live timing decides anything here)."""
from __future__ import annotations

import random

import pytest
import torch

from jdnas.config import load_params
from jdnas.latency import LatencyTable, arch_entries, spaces_from_params
from jdnas.latency.measure import Timer, measure_all
from jdnas.latency.space import FIXED_PARTS, e2e_entry, head_entries
from jdnas.models.arch import Arch, Head, preset
from conftest import REPO, linear_ms

FB, FH, GLUE = 1.3, 1.15, 0.4  # the "true" in-context factors and glue of the synthetic timings


@pytest.fixture(scope="module")
def default_params():
    return load_params([REPO / "params.yaml"])


@pytest.fixture(scope="module")
def prof(default_params):
    from jdnas.latency.profile import Profiler
    threads = torch.get_num_threads()
    try:
        yield Profiler(default_params, 5)
    finally:
        torch.set_num_threads(threads)


def parts_ms(arch: Arch, head: Head, hw: tuple[int, int], classes: int = 5) -> tuple[float, float]:
    """(backbone, fixed parts) of a detector at the linear proxy cost (exact for off-grid widths too)."""
    return (sum(linear_ms(e) for e in arch_entries(arch, hw, head.fpn)),
            sum(linear_ms(e) for e in head_entries(hw, head, classes) if e.part in FIXED_PARTS))


def synthetic_raw(prof, spaces, calibration, fb=FB, fh=FH, glue=GLUE) -> dict:
    """Raw timings as the stage would measure them: every entry on its own at the proxy cost, and
    every end-to-end timing = fb x backbone + fh x head parts + glue."""
    from jdnas.latency.profile import needed_entries
    raw = {}
    for e in needed_entries(prof, spaces, calibration):
        if e.part == "e2e":
            a, h = e.block.split("|")
            b, f = parts_ms(Arch.parse(a), Head.parse(h), (e.height, e.width))
            raw[e] = fb * b + fh * f + glue
        else:
            raw[e] = linear_ms(e)
    return raw


def test_calibration_detectors_span_the_head_space(prof, default_params):
    from jdnas.latency.profile import calibration_detectors
    spaces = spaces_from_params(default_params)
    cal = calibration_detectors(prof, spaces)
    assert cal == calibration_detectors(prof, spaces)  # deterministic
    heads = {h for _, h in cal}
    assert prof.base_head in heads and prof.head_space.smallest in heads and len(heads) >= 3
    (space,) = spaces
    for arch in (prof.base, space.smallest(), space.largest()):
        assert {(arch, prof.base_head), (arch, prof.head_space.smallest)} <= set(cal)
    assert all(h.min_size == prof.base_head.min_size for h in heads)  # at the base's input size
    assert len(cal) == len(set(cal))


def test_fit_recovers_backbone_and_head_factors():
    from jdnas.latency.profile import fit_context2
    b = [1.0, 3.0, 1.0, 3.0, 2.0, 2.5]
    h = [9.0, 9.0, 3.0, 3.0, 5.0, 4.0]
    y = [FB * u + FH * v + GLUE for u, v in zip(b, h)]
    assert fit_context2(b, h, y) == pytest.approx((FB, FH, GLUE))


def test_fit_falls_back_when_the_head_does_not_vary():
    """One head in the space: its factor cannot be told from the glue; it stays 1 and the backbone
    fit is the 1-D one (the table then is what it was before per-part factors)."""
    from jdnas.latency.profile import fit_context, fit_context2
    b, h = [1.0, 2.0, 3.0, 4.0], [6.0] * 4
    y = [1.3 * u + 6.9 for u in b]
    fb, fh, g = fit_context2(b, h, y)
    assert (fb, g) == pytest.approx(fit_context(b, [w - v for v, w in zip(h, y)])) and fh == 1.0
    assert fb == pytest.approx(1.3) and g == pytest.approx(0.9)
    # head moving with the backbone (collinear): the same fallback
    assert fit_context2(b, [2 * u for u in b], y)[1] == 1.0
    # nothing varies: both factors 1
    assert fit_context2([2.0, 2.0], [5.0, 5.0], [8.0, 8.2]) == pytest.approx((1.0, 1.0, 1.1))


def test_an_implausible_factor_is_clamped_and_the_rest_refitted():
    from jdnas.latency.profile import fit_context2
    b = [1.0, 3.0, 1.0, 3.0]
    h = [9.0, 9.0, 3.0, 3.0]
    y = [5.0 * u + 1.2 * v + 0.1 for u, v in zip(b, h)]
    fb, fh, g = fit_context2(b, h, y)
    assert fb == 3.0
    assert fh == pytest.approx(1.2) and g == pytest.approx(0.1 + 2.0 * 2.0)  # the excess backbone slope in the glue


def test_table_predicts_every_head_of_the_space(prof, default_params):
    """Timings whose in-context slowdown differs for the backbone and the head: the calibrated table
    predicts random detectors with any head of the space (off-grid widths too) exactly."""
    from jdnas.latency.profile import calibration_detectors, finish_table
    spaces = spaces_from_params(default_params)
    cal = calibration_detectors(prof, spaces)
    raw = synthetic_raw(prof, spaces, cal)
    table, info = finish_table(prof, raw, cal)
    assert info["in_context_factor"] == pytest.approx(FB) and info["head_context_factor"] == pytest.approx(FH)
    assert list(info["glue_ms"].values()) == [pytest.approx(GLUE)] * len(prof.rungs())  # one per input size
    for e, v in table.ms.items():
        if e.part in FIXED_PARTS:
            assert v == pytest.approx(FH * table.isolated[e])
        elif e.part in ("stem", "block", "fpn_lateral"):
            assert v == pytest.approx(FB * table.isolated[e])
    rng = random.Random(3)
    (space,) = spaces
    for i in range(40):
        arch, head = space.sample(rng, off_grid=i % 2 == 1), prof.head_space.sample(rng)
        b, f = parts_ms(arch, head, prof.hw(head))  # the head's input size (resize in the space: several)
        assert table.predict(arch, head) == pytest.approx(FB * b + FH * f + GLUE, rel=1e-9), f"{arch} {head}"
    # the same timings give the same table (a profile is deterministic given its timings)
    again, _ = finish_table(prof, dict(raw), cal)
    assert again.ms == table.ms


def test_base_head_calibration_alone_overpredicts_smaller_heads(prof, default_params):
    """The bug this calibration fixes: fitted on detectors that all have the base's head, the glue
    absorbs the base head's in-context slowdown and every smaller head is over-predicted by
    (head factor - 1) x (base head parts - its parts)."""
    from jdnas.latency.profile import finish_table
    spaces = spaces_from_params(default_params)
    (space,) = spaces
    base_only = [(a, prof.base_head) for a in (prof.base, space.smallest(), space.largest())]
    table, info = finish_table(prof, synthetic_raw(prof, spaces, base_only), base_only)
    assert info["head_context_factor"] == 1.0
    small = prof.head_space.smallest
    b_base, f_base = parts_ms(prof.base, prof.base_head, prof.input_hw)
    b, f = parts_ms(prof.base, small, prof.input_hw)  # FPN laterals follow the head's FPN width
    assert table.predict(prof.base, prof.base_head) == pytest.approx(FB * b_base + FH * f_base + GLUE)
    error = table.predict(prof.base, small) - (FB * b + FH * f + GLUE)
    assert error == pytest.approx((FH - 1) * (f_base - f)) and error > 0


def test_glue_at_other_input_sizes(tmp_path, default_params):
    """With resize in the space, each input size's glue is what the base's end-to-end timing there
    leaves over its calibrated parts: predictions hold at every size."""
    from jdnas.latency.profile import Profiler, calibration_detectors, finish_table
    from conftest import with_overrides
    acts = list(dict.fromkeys(default_params["search_space"]["actions"] + ["resize"]))
    params = with_overrides(default_params, {"search_space": {"actions": acts}})
    threads = torch.get_num_threads()
    try:
        prof = Profiler(params, 5)
    finally:
        torch.set_num_threads(threads)
    assert len(prof.rungs()) > 1
    spaces = spaces_from_params(params)
    cal = calibration_detectors(prof, spaces)
    glue = {hw: 0.3 + 0.001 * hw[0] for hw in (prof.hw(h) for h in prof.rungs())}
    raw = synthetic_raw(prof, spaces, cal, glue=0.0)
    for e in raw:
        if e.part == "e2e":
            raw[e] += glue[(e.height, e.width)]
    table, _ = finish_table(prof, raw, cal)
    rng = random.Random(4)
    (space,) = spaces
    for rung in prof.rungs():
        for _ in range(5):
            arch, h = space.sample(rng), prof.head_space.sample(rng)
            head = Head(h.fpn, h.rep, rung.min_size, rung.max_size, h.proposals)
            hw = prof.hw(head)
            b, f = parts_ms(arch, head, hw)
            assert table.predict(arch, head) == pytest.approx(FB * b + FH * f + glue[hw], rel=1e-9)


def test_pinned_smoke_table_predicts_as_before():
    """The committed smoke table loads and predicts exactly what it did when it was committed: its
    `ms` column is summed as is, whatever the calibration that made it (an FPN width between grid
    points interpolated on the FPN grid's block steps)."""
    table = LatencyTable.load(REPO / "config" / "latency" / "smoke_cpu.csv")
    tiny = preset("tiny", 0.5)
    assert table.predict(tiny) == pytest.approx(3.709947, abs=1e-9)
    assert table.predict(tiny, Head.parse("F8-R16-I64/64-P10")) == pytest.approx(3.386438, abs=1e-9)
    assert table.predict(tiny, Head.parse("F13-R16-I64/64-P10")) == pytest.approx(3.487532, abs=1e-9)
    assert table.predict(Arch.parse("S8:1x8m8-1x16m12-1x32m20-1x64m64"),
                         Head.parse("F5-R11-I64/64-P7")) == pytest.approx(2.78489174375, abs=1e-9)


class FakeTimer(Timer):
    """A timer whose readings come from a list (the calls still run)."""

    def __init__(self, readings):
        super().__init__(torch.device("cpu"))
        self.readings = iter(readings)

    def __call__(self, fn):
        fn()
        return next(self.readings)


def test_measure_all_keeps_the_fastest_call():
    readings = [5.0, 1.0, 3.0, 9.0]  # other processes only add time: the fastest call is the least disturbed
    ms = measure_all({"a": lambda: (lambda: None)}, FakeTimer(readings), warmup=1, runs=4)
    assert ms == {"a": 1.0}


def test_calibration_e2e_entries_are_cached_with_their_head(prof, default_params):
    """Calibration end-to-end timings are keyed by arch and head: a cached one is reused only for
    the same detector."""
    from jdnas.latency.profile import calibration_detectors, needed_entries
    spaces = spaces_from_params(default_params)
    cal = calibration_detectors(prof, spaces)
    e2e = {e for e in needed_entries(prof, spaces, cal) if e.part == "e2e"}
    assert {e2e_entry(a, h, prof.input_hw) for a, h in cal} <= e2e
    # the base at its head is one of them; the base at every other input size sets that size's glue
    assert len({e.block for e in e2e}) == len(e2e) == len(cal) + len(prof.rungs()) - 1
