"""Latency lookup table: enumeration, predictor, CSV round-trip, device errors, the stage."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

from jdnas.config import load_params
from jdnas.errors import ConfigError, JdnasError
from jdnas.latency import (Entry, LatencyTable, NotCovered, arch_entries, space_entries,
                           spaces_from_params)
from jdnas.latency.measure import Timer, measure_all
from jdnas.latency.parts import backbone_call
from jdnas.latency.space import HEAD_PARTS, head_entries, network_input_size
from jdnas.models.arch import Arch, Head, Stage, preset, resolve_arch
from jdnas.models.detector import head_config
from jdnas.stages import STAGES
from conftest import REPO, cli_env, linear_ms, proxy_table, with_overrides, write_yaml

HW = (128, 128)
FPN = 64


@pytest.fixture(scope="module")
def default_params():
    return load_params([REPO / "params.yaml"])


@pytest.fixture(scope="module")
def space(default_params):
    (s,) = spaces_from_params(default_params)
    return s


def synthetic_table(params) -> LatencyTable:
    return proxy_table(params)


def base_head(params):
    return Head.of(params["model"])


def test_default_space_covers_the_base_and_presets(default_params, space):
    base = resolve_arch(default_params["model"]["base"], default_params["model"]["width"])
    assert str(base) == "S16:2x16m16-2x32m32-2x64m64-2x128m128"
    assert space.contains(base)
    for name in ("tiny", "r18", "r34"):
        assert space.contains(preset(name, 0.25)), name


def test_enumeration_covers_every_block_of_random_archs(space):
    entries = space_entries(space, HW, [FPN])
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        arch = space.sample(rng)
        assert space.contains(arch)
        needed = set(arch_entries(arch, HW, FPN))
        assert needed <= entries, needed - entries
        seen |= needed
    # and the enumeration is not padded with configurations no arch of the space uses
    assert len(seen) > 0.5 * len(entries)


def test_enumeration_is_distinct_configurations(space):
    entries = space_entries(space, HW, [FPN])
    blocks = [e for e in entries if e.part == "block"]
    first = sum(len(space.stems if s == 0 else space.outs[s - 1]) * len(space.outs[s]) * len(space.mids[s])
                for s in range(4))
    rest = sum(len(space.outs[s]) * len(space.mids[s]) for s in range(4))
    # stage 0's first block without projection (stem width == stage width) is also a repeated block
    overlap = len(set(space.stems) & set(space.outs[0])) * len(space.mids[0])
    assert len(blocks) == first + rest - overlap
    assert {e.height for e in blocks} == {32, 16, 8, 4}  # stage inputs, and C5 for repeated blocks


def test_arch_entries_follow_the_backbone():
    arch = Arch.parse("S8:2x8m4,6-1x16m8-1x32m16-2x64m32")
    e = arch_entries(arch, HW, FPN)
    assert e[0] == Entry("stem", cin=3, cout=8, stride=4, height=128, width=128)
    assert e[1] == Entry("block", "basic", 8, 4, 8, 1, 32, 32)          # stage 0: no projection
    assert e[2] == Entry("block", "basic", 8, 6, 8, 1, 32, 32)
    assert e[3] == Entry("block", "basic", 8, 8, 16, 2, 32, 32)         # stride 2 at 32x32 input
    assert e[5] == Entry("block", "basic", 32, 32, 64, 2, 8, 8)
    assert e[6] == Entry("block", "basic", 64, 32, 64, 1, 4, 4)
    assert [x.cin for x in e[7:]] == [8, 16, 32, 64] and all(x.part == "fpn_lateral" for x in e[7:])
    assert [x.height for x in e[7:]] == [32, 16, 8, 4]


def test_network_input_size_follows_the_transform(default_params):
    cfg = head_config(default_params["model"], 5)
    assert network_input_size(cfg, (128, 128)) == (128, 128)
    assert network_input_size(cfg, (100, 60)) == (128, 96)  # resized to fit, padded to /32


def test_predictor_is_the_sum_of_entries(default_params, space):
    table = synthetic_table(default_params)
    head = base_head(default_params)
    rng = random.Random(1)
    for _ in range(20):
        arch = space.sample(rng)
        parts = table.breakdown(arch)
        expected = sum(linear_ms(e) for e in arch_entries(arch, HW, FPN))
        expected += sum(linear_ms(e) for e in head_entries(HW, head, 5))
        assert parts["total"] == pytest.approx(expected, rel=1e-12)
        assert table.predict(arch) == parts["total"]
        assert parts["backbone"] == pytest.approx(sum(linear_ms(e) for e in arch_entries(arch, HW, FPN)
                                                      if e.part == "block"))


def test_off_grid_widths_are_interpolated(default_params, space):
    """Pruned and slimmed archs have widths between grid values: linear costs come out exact."""
    table = synthetic_table(default_params)
    head = base_head(default_params)
    rng = random.Random(2)
    for _ in range(30):
        arch = space.sample(rng, off_grid=True)
        expected = sum(linear_ms(e) for e in arch_entries(arch, HW, FPN))
        expected += sum(linear_ms(e) for e in head_entries(HW, head, 5))
        assert table.predict(arch) == pytest.approx(expected, rel=1e-9), str(arch)
    # pruned variants of the base: every mid width down to the grid's minimum
    base = preset("r18", 0.25)
    pruned = Arch(base.block, base.stem, tuple(Stage(s.out, tuple(max(m // 3, min(space.mids[i])) for m in s.mids))
                                                for i, s in enumerate(base.stages)))
    assert table.covers(pruned)


def test_the_fpn_grid_follows_channel_blocks(default_params):
    """The FPN width's grid holds every multiple of 8 and the width just past it (the step doubles
    on a wide FPN), so an FPN part whose cost climbs in stairs of 16 channels, as the convs of the
    CPU measured do, is predicted exactly at every width from the least to the base's."""
    from jdnas.latency.space import HeadSpace
    bounds = {"min_head_ratio": 0.25, "actions": ["fpn_prune"]}
    assert HeadSpace.around(Head(64, 256, 128, 128, 100), bounds, [0.5]).fpns == (
        16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57, 64)
    assert HeadSpace.around(Head(256, 256, 128, 128, 100), bounds, []).fpns == (
        64, 65, 96, 97, 128, 129, 160, 161, 192, 193, 224, 225, 256)
    assert HeadSpace.around(Head(64, 256, 128, 128, 100), {**bounds, "actions": []}, [0.5]).fpns == (64,)

    def stairs(e) -> float:
        return linear_ms(e) + (2.0 * -(-e.cin // 16) if e.part == "rpn" else 0.0)

    table = proxy_table(default_params, cost=stairs)
    head = base_head(default_params)
    for w in range(16, 65):
        rpn = head_entries(HW, replace(head, fpn=w), 5)[2]
        assert rpn.part == "rpn" and table.lookup(rpn) == pytest.approx(stairs(rpn)), w


def test_outside_the_space_is_a_clear_error(default_params, space):
    table = synthetic_table(default_params)
    with pytest.raises(NotCovered, match="outside the profiled range"):
        table.predict(Arch.parse("S16:1x16m2-1x32m32-1x64m64-1x128m128"))
    with pytest.raises(NotCovered, match="no entry for block\\(block=bottleneck"):
        table.predict(preset("r50", 0.25))


def test_table_round_trip(tmp_path, default_params, space):
    table = synthetic_table(default_params)
    table.save(tmp_path / "t.csv")
    back = LatencyTable.load(tmp_path / "t.csv")
    assert back.ms.keys() == table.ms.keys()
    assert all(back.ms[e] == pytest.approx(table.ms[e], abs=1e-6) for e in table.ms)
    assert back.settings == table.settings
    arch = preset("r18", 0.25)
    assert back.predict(arch) == pytest.approx(table.predict(arch), abs=1e-4)
    assert back.input_hw() == HW and back.base_head == base_head(default_params)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(JdnasError, match="bad.csv: line 1: not a latency table"):
        LatencyTable.load(tmp_path / "bad.csv")
    with pytest.raises(JdnasError, match="latency table not found"):
        LatencyTable.load(tmp_path / "missing.csv")


def _set(lines: list[str], n: int, field: str, value: str) -> list[str]:
    """`lines` with line n's (1-based) `field` set to `value`."""
    header = lines[0].split(",")
    cells = lines[n - 1].split(",")
    cells[header.index(field)] = value
    return lines[:n - 1] + [",".join(cells)] + lines[n:]


def _first(lines: list[str], part: str) -> int:
    """The line number (1-based) of the first row of `part`."""
    return next(i for i, line in enumerate(lines, start=1) if line.startswith(part + ","))


def _drop_column(lines: list[str], field: str) -> list[str]:
    i = lines[0].split(",").index(field)
    return [",".join(c for j, c in enumerate(line.split(",")) if j != i) for line in lines]


# (how to damage the saved table's lines, the line the error names (None: a line of the part given,
# see _first), the words it must hold). Every case is refused at load with one line naming the
# file, the line and, for a bad cell, the field.
CORRUPT = {
    "ms nan": (lambda ls: _set(ls, 3, "ms", "nan"), 3, "line 3, field ms: nan is not a finite number"),
    "ms inf": (lambda ls: _set(ls, 3, "ms", "inf"), 3, "line 3, field ms: inf is not a finite number"),
    "ms -inf on the glue": (lambda ls: _set(ls, _first(ls, "glue"), "ms", "-inf"), "glue",
                            "field ms: -inf is not a finite number"),
    "ms negative": (lambda ls: _set(ls, 3, "ms", "-1.0"), 3, "line 3, field ms: -1.0 is negative"),
    "ms 1e300": (lambda ls: _set(ls, 3, "ms", "1e300"), 3, "line 3, field ms: 1e300 ms is more than an hour"),
    "ms just over an hour": (lambda ls: _set(ls, 4, "ms", "3600000.5"), 4,
                             "field ms: 3600000.5 ms is more than an hour"),
    "glue below minus an hour": (lambda ls: _set(ls, _first(ls, "glue"), "ms", "-4e6"), "glue",
                                 "field ms: -4e6 ms is more than an hour below zero"),
    "ms not a number": (lambda ls: _set(ls, 3, "ms", "fast"), 3, "line 3, field ms: 'fast' is not a number"),
    "ms empty": (lambda ls: _set(ls, 3, "ms", ""), 3, "line 3, field ms: '' is not a number"),
    "isolated_ms nan": (lambda ls: _set(ls, 5, "isolated_ms", "nan"), 5, "line 5, field isolated_ms: nan is not"),
    "isolated_ms negative": (lambda ls: _set(ls, 5, "isolated_ms", "-0.5"), 5, "field isolated_ms: -0.5 is negative"),
    "a backbone row of other settings": (lambda ls: _set(ls, 7, "settings", "0123456789ab"), 7,
                                         "line 7, field settings: '0123456789ab' differs from the settings 'proxy'"),
    "a head row of other settings": (lambda ls: _set(ls, _first(ls, "roi_heads"), "settings", "cafe"), "roi_heads",
                                     "field settings: 'cafe' differs from the settings 'proxy' of the table's other"),
    "a row without settings": (lambda ls: _set(ls, 9, "settings", ""), 9, "line 9, field settings: '' differs"),
    "missing ms column": (lambda ls: _drop_column(ls, "ms"), 1, "line 1: not a latency table (missing column ms;"),
    "missing settings column": (lambda ls: _drop_column(ls, "settings"), 1, "missing column settings"),
    "unknown column": (lambda ls: [ls[0] + ",note"] + [x + ",hi" for x in ls[1:]], 1, "unknown column 'note'"),
    "a column twice": (lambda ls: [ls[0] + ",ms"] + [x + ",1.0" for x in ls[1:]], 1, "column ms twice"),
    "other columns": (lambda ls: ["a,b", "1,2"], 1, "missing columns part, block"),
    "an entry twice": (lambda ls: ls + [ls[1]], len, "appears twice (also line 2)"),
    "a row cut short": (lambda ls: ls[:2] + [ls[2].rsplit(",", 2)[0]] + ls[3:], 3, "line 3: 10 fields, expected 12"),
    "cin not an integer": (lambda ls: _set(ls, 3, "cin", "8.5"), 3, "line 3, field cin: '8.5' is not an integer"),
    "a negative width": (lambda ls: _set(ls, 3, "cout", "-8"), 3, "line 3, field cout: -8 is out of range"),
    "an unknown part": (lambda ls: _set(ls, 3, "part", "turbo"), 3, "line 3, field part: 'turbo' is not a part"),
    "a channel block of 0": (lambda ls: ls + ["channel_block,,0,0,0,0,0,0,0,0.000000,,"], len,
                             "field cin: a channel block of 0 (1 to 1024)"),
    "header only": (lambda ls: ls[:1], None, "a latency table with no entries"),
    "empty file": (lambda ls: [], None, "not a latency table (empty file"),
    "binary (PNG)": (lambda ls: b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", None, "not a latency table (a binary file"),
    "not UTF-8": (lambda ls: ("\n".join(ls[:3]) + "\n").encode() + b"block,b\xe4sic\n", None, "not UTF-8 CSV text"),
    "a CSV quote left open": (lambda ls: ls[:3] + ['block,"basic' + "x" * 200_000], 4, "line 4: not a latency table"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_damaged_table_is_refused_at_load_with_one_line(tmp_path, default_params, case):
    """A table that would predict NaN, inf, a negative or an absurd latency (so a candidate would
    look perfect, or never fit), that mixes timings of other settings, that is cut short or is not
    a table at all never loads: one line naming the file, the line and the field."""
    corrupt, line, words = CORRUPT[case]
    synthetic_table(default_params).save(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert not lines[2].startswith("glue") and lines[1].endswith(",proxy")
    damaged = corrupt(lines)
    if isinstance(damaged, bytes):
        (tmp_path / "t.csv").write_bytes(damaged)
    else:
        (tmp_path / "t.csv").write_text("\n".join(damaged) + ("\n" if damaged else ""))
    with pytest.raises(JdnasError) as e:
        LatencyTable.load(tmp_path / "t.csv")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and msg.startswith(f"{tmp_path / 't.csv'}: "), msg
    assert words in msg, msg
    if line is not None:
        n = line(damaged) if callable(line) else _first(damaged, line) if isinstance(line, str) else line
        assert f"line {n}" in msg, msg


def test_what_a_table_may_hold(tmp_path, default_params):
    """The checks refuse only what cannot be a latency: a negative glue (a part that overlaps the
    rest), an entry of almost an hour, a table of two settings hashes (the backbone's and the
    head's, as the profiler writes them) load; the profiler's cache, which merges runs of several
    settings on purpose, loads when asked not to check them."""
    synthetic_table(default_params).save(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    glue = _first(lines, "glue")
    lines = _set(_set(lines, glue, "ms", "-0.25"), 3, "ms", "3599999.0")
    head = [i for i, x in enumerate(lines, start=1) if x.split(",")[0] in ("transform", "fpn_top", "rpn", "roi_heads",
                                                                              "glue")]
    for n in head:
        lines = _set(lines, n, "settings", "headhash")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    table = LatencyTable.load(tmp_path / "t.csv")
    assert min(table.ms.values()) == -0.25 and max(table.ms.values()) == 3599999.0
    assert set(table.settings.values()) == {"proxy", "headhash"}
    mixed = _set(lines, 3, "settings", "another_run")
    (tmp_path / "cache.csv").write_text("\n".join(mixed) + "\n")
    with pytest.raises(JdnasError, match="line 3, field settings"):
        LatencyTable.load(tmp_path / "cache.csv")
    assert len(LatencyTable.load(tmp_path / "cache.csv", check_settings=False)) == len(table)
    # not a file: one line each, never a traceback
    with pytest.raises(JdnasError, match="is a directory, not a latency table"):
        LatencyTable.load(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(JdnasError, match="symbolic link that leads nowhere"):
        LatencyTable.load(tmp_path / "loop")


def test_bottleneck_space_around_a_basic_base(default_params):
    p = with_overrides(default_params, {"latency": {"space": {"extra_blocks": ["bottleneck"]}}})
    basic, bottle = spaces_from_params(p)
    assert basic.block == "basic" and bottle.block == "bottleneck"
    assert max(bottle.outs[0]) == 4 * max(bottle.mids[0]) and min(bottle.mids[0]) >= p["search_space"]["min_width"]
    assert bottle.contains(preset("r50", 0.25))


def test_latency_params_are_checked(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"latency": {"clock": "cpu_time", "threads": 2}})
    with pytest.raises(ConfigError, match="latency.threads to 1"):
        load_params([REPO / "params.yaml", bad])
    bad = write_yaml(tmp_path / "bad2.yaml", {"latency": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="latency.device = 'tpu' is not allowed"):
        load_params([REPO / "params.yaml", bad])


def test_measurement_orders_real_blocks():
    """Timing is real: a block 4x as wide (16x the FLOPs) measures clearly slower."""
    torch.set_num_threads(1)
    small = Entry("block", "basic", 8, 8, 8, 1, 32, 32)
    big = Entry("block", "basic", 32, 32, 32, 1, 32, 32)
    ms = measure_all({e: (lambda e=e: backbone_call(e, torch.device("cpu"))) for e in (small, big)},
                     Timer(torch.device("cpu"), "cpu_time"), warmup=2, runs=9, rounds=3, slots={big: 2})
    assert 0 < ms[small] < ms[big]


def test_end_to_end_latency_per_image_of_real_detectors(prepared, smoke_params):
    """`measure_latency` times detectors on real val images, per image, each model in the same
    interleaved rounds: a detector with 4x the channels measures slower; threads are restored."""
    from jdnas.latency.measure import latency_images, measure_latency
    from jdnas.models.arch import preset
    from jdnas.models.detector import build_detector, head_config
    head = head_config(smoke_params["model"], 3)
    images = latency_images(prepared / "val.json", head["max_size"], n=2)
    assert len(images) == 2 and images[0].shape[0] == 3 and max(images[0].shape[1:]) <= head["max_size"]
    torch.manual_seed(0)
    models = {"small": build_detector(preset("tiny", 0.5), head), "big": build_detector(preset("tiny", 2.0), head)}
    threads = torch.get_num_threads()
    ms = measure_latency(models, images, runs=3, threads=1, device=torch.device("cpu"))
    assert set(ms) == {"small", "big"} and 0 < ms["small"] < ms["big"]
    assert torch.get_num_threads() == threads


def test_measure_latency_times_each_image_alone_in_every_round():
    """Each (model, image) call is timed once per round after one untimed call: an image's time
    needs one undisturbed call, not a whole undisturbed pass over the images."""
    from jdnas.latency.measure import measure_latency
    calls: list[tuple[str, int]] = []

    def model(name: str):
        return lambda batch: calls.append((name, int(batch[0][0, 0, 0]))) or [len(batch)]
    images = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    ms = measure_latency({"a": model("a"), "b": model("b")}, images, runs=4, threads=1, device=torch.device("cpu"))
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert sorted(set(calls)) == [(m, i) for m in "ab" for i in range(3)]
    assert all(calls.count(k) == 2 * 4 for k in set(calls))  # one warm-up + one timed call per round
    assert calls[0::2] == calls[1::2]  # each timed call right after its own warm-up


def test_calibration_fit_and_summary_figures():
    from jdnas.latency.profile import fit_context
    from jdnas.latency.validate import summarize
    factor, glue = fit_context([1.0, 2.0, 3.0, 4.0], [1.3 * x + 0.5 for x in (1.0, 2.0, 3.0, 4.0)])
    assert factor == pytest.approx(1.3) and glue == pytest.approx(0.5)
    assert fit_context([2.0, 2.0], [3.0, 3.2]) == pytest.approx((1.0, 1.1))  # no spread: factor 1
    rows = [{"measured_ms": m, "predicted_ms": p} for m, p in [(10, 11), (20, 19), (40, 40), (30, 33)]]
    s = summarize(rows)
    assert s["mape_percent"] == pytest.approx((10 + 5 + 0 + 10) / 4)
    assert s["max_abs_error_percent"] == pytest.approx(10) and s["spearman"] == pytest.approx(1.0)
    rows[0]["predicted_ms"] = 45  # now ranked first instead of last
    assert summarize(rows)["spearman"] == pytest.approx(1 - 6 * (3 ** 2 + 1 + 1 + 1) / (4 * 15))


def test_missing_cuda_is_a_one_line_error(tmp_path, smoke_params, prepared):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from jdnas.latency.profile import profile_latency
    params = with_overrides(smoke_params, {"latency": {"device": "cuda:0"}})
    with pytest.raises(JdnasError, match="latency.device = 'cuda:0' but this machine has no CUDA device"):
        profile_latency(params, prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cuda = write_yaml(tmp_path / "cuda.yaml", {"latency": {"device": "cuda:0"}})
    r = subprocess.run(["jdnas", "profile-latency", "--params", str(REPO / "params.yaml"), "--params", str(cuda),
                        "--data", str(prepared), "--out", str(tmp_path / "cli")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no CUDA device" in r.stderr


@pytest.mark.slow
def test_stage_on_smoke_config_and_rerun_reuses(tmp_path, smoke_params, prepared):
    from jdnas.latency.profile import profile_latency
    # time it here; live timings never decide a test: the accuracy gate (test_latency_gate.py) is off
    smoke_params = with_overrides(smoke_params, {"latency": {"table": None, "max_mape": 1000.0}})
    out = tmp_path / "runs" / "latency" / "cpu"
    first = profile_latency(smoke_params, prepared, out)
    table = LatencyTable.load(out / "table.csv")
    (space,) = spaces_from_params(smoke_params)
    hw = (64, 64)
    assert table.input_hw() == hw and table.base_head == Head.of(smoke_params["model"])
    expected = space_entries(space, hw, [smoke_params["model"]["fpn_channels"]])
    assert expected <= set(table.ms) and {e.part for e in table.ms} == {"stem", "block", "fpn_lateral", *HEAD_PARTS}
    assert first["entries"] == len(table) and first["entries_timed"] > len(table) - 1  # + calibration archs
    assert all(v > 0 for e, v in table.ms.items() if e.part != "glue")
    v = json.loads((out / "validation.json").read_text())
    # calibrated entries: isolated timing x the fitted in-context factor
    factor = v["calibration"]["in_context_factor"]
    for e in expected:
        assert table.ms[e] == pytest.approx(table.isolated[e] * factor, rel=1e-4, abs=1e-6)
    assert v["n"] == smoke_params["latency"]["validation_archs"]
    assert v["mape_percent"] >= 0 and (v["spearman"] is None or -1 <= v["spearman"] <= 1)
    assert {r["kind"] for r in v["archs"]} >= {"random_grid", "random_off_grid", "preset:tiny"}
    for r in v["archs"]:
        assert r["predicted_ms"] == pytest.approx(table.predict(Arch.parse(r["arch"]), Head.parse(r["head"])), abs=1e-3)
    assert v["conditions"]["threads"] == 1 and v["conditions"]["clock"] == "cpu_time"
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same params again: every timing comes from the cache, the table is unchanged
    before = (out / "table.csv").read_bytes()
    again = profile_latency(smoke_params, prepared, out)
    assert again["entries_timed"] == 0
    assert (out / "table.csv").read_bytes() == before
    # one more width ratio: only the new entries are timed
    wider = with_overrides(smoke_params, {"latency": {"space": {"width_ratios": [0.5, 0.75, 1.0]}}})
    grown = profile_latency(wider, prepared, out)
    assert 0 < grown["entries_timed"] < grown["entries"]
    # other timing settings: nothing is reused
    slower = with_overrides(smoke_params, {"latency": {"runs": 4}})
    assert profile_latency(slower, prepared, out)["entries_timed"] == first["entries_timed"]


def test_onnxruntime_parts_compute_what_pytorch_computes(smoke_params):
    """With latency.device onnxruntime every entry times an ONNX export of the part it names: each
    export, run by onnxruntime, gives the PyTorch part's outputs on the same inputs."""
    from jdnas.latency.parts import HeadParts, calibrated_detector, onnx_call
    head = head_config(smoke_params["model"], 3)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = calibrated_detector(preset("tiny", 0.5), head, image, torch.device("cpu"))
    parts = HeadParts(model, image, head["rpn_post_nms_top_n_test"])
    hw = (64, 64)
    entries = {e.part: e for e in head_entries(hw, Head.of(head), 4)}
    for part in ("transform", "fpn_top", "rpn", "roi_heads"):
        module, args = parts.module(entries[part])
        with torch.no_grad():
            ref = module(*args)
        got = onnx_call(module, args, threads=1).fn()
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        assert len(got) == len(ref), part
        for r, g in zip(ref, got):
            assert r.shape == g.shape, part
            assert torch.allclose(r.float(), torch.from_numpy(g).float(), atol=1e-3), part
    block = Entry("block", "basic", 8, 8, 8, 1, 16, 16)
    call = backbone_call(block, torch.device("cpu"), onnx_threads=1)
    assert call.nbytes > 0 and call()[0].shape == (1, 8, 16, 16)


@pytest.mark.slow
def test_stage_times_onnxruntime_when_asked(tmp_path, smoke_params, prepared):
    """latency.device onnxruntime: a table of onnxruntime timings in its own folder, validated
    end to end against exported detectors, and its own cache settings."""
    from jdnas.latency.profile import profile_latency, table_dir
    params = with_overrides(smoke_params, {"latency": {"table": None, "device": "onnxruntime", "runs": 1,
                                                       "validation_archs": 2, "max_mape": 1000.0}})
    assert table_dir(params, tmp_path) == tmp_path / "onnxruntime"
    out = tmp_path / "onnxruntime"
    result = profile_latency(params, prepared, out)
    table = LatencyTable.load(out / "table.csv")
    (space,) = spaces_from_params(params)
    assert space_entries(space, (64, 64), [params["model"]["fpn_channels"]]) <= set(table.ms)
    v = json.loads((out / "validation.json").read_text())
    assert v["conditions"]["device"] == "onnxruntime" and v["conditions"]["onnxruntime"]
    assert result["n"] == 2 and all(r["measured_ms"] > 0 for r in v["archs"])


def test_stage_paths_follow_the_device(default_params):
    stage = STAGES["profile_latency"]
    assert "${latency.device}" in stage.outs[0]
    p = with_overrides(default_params, {"latency": {"device": "cuda:1"}})
    r = stage.resolved(p)
    assert r.outs[0] == "runs/latency/cuda:1/table.csv" and r.metrics == ("runs/latency/cuda:1/validation.json",)
    assert "--out runs/latency/cuda:1" in r.shell(["params.yaml"])
    assert replace(stage, outs=()).resolved(p).outs == ()


@pytest.mark.slow
def test_profile_latency_workflow_second_run_is_a_no_op(tmp_path):
    """Snakemake and DVC each run the stage on the smoke config; the same params again do nothing."""
    import yaml
    from test_workflow import dvc_workspace, run, workspace
    ws = workspace(tmp_path)
    args = ["--cores", "2", "--configfile", "config/smoke.yaml"]
    run(["snakemake", "profile_latency", *args], ws)
    for name in ("table.csv", "validation.json", "validation.png"):
        assert (ws / "runs/latency/cpu" / name).is_file(), name
    assert "profile_latency" in (ws / "logs/profile_latency.log").read_text()
    again = run(["snakemake", "profile_latency", *args], ws)
    assert "Nothing to be done" in again.stdout + again.stderr
    # DVC reads params.yaml only: make it the smoke run, from a clean workspace
    smoke = load_params([ws / "params.yaml", ws / "config/smoke.yaml"])
    (ws / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    shutil.rmtree(ws / "runs")
    shutil.rmtree(ws / "data")
    dvc_workspace(ws)
    first = run(["dvc", "repro", "profile_latency"], ws)
    assert "Running stage 'profile_latency'" in first.stdout
    assert (ws / "runs/latency/cpu/validation.json").is_file()
    second = run(["dvc", "repro", "profile_latency"], ws)
    assert "Running stage" not in second.stdout, second.stdout
    assert "Stage 'profile_latency' didn't change, skipping" in second.stdout


def test_pinned_table_is_used_as_is_and_must_cover_the_space(tmp_path, smoke_params, prepared):
    from jdnas.latency.profile import profile_latency
    pinned = REPO / smoke_params["latency"]["table"]
    out = tmp_path / "pinned"
    live = {"table": str(pinned), "max_mape": 1000.0}  # live timings never decide a test: the gate is off
    result = profile_latency(with_overrides(smoke_params, {"latency": live}), prepared, out)
    assert result["entries_timed"] == 0 and (out / "table.csv").read_bytes() == pinned.read_bytes()
    v = json.loads((out / "validation.json").read_text())
    assert v["calibration"]["pinned"] == str(pinned) and v["n"] == smoke_params["latency"]["validation_archs"]
    # a table of another space is refused with one line naming it
    wider = with_overrides(smoke_params, {"latency": live, "model": {"fpn_channels": 24}})
    with pytest.raises(JdnasError, match="latency.table lacks .* profiled for another space"):
        profile_latency(wider, prepared, tmp_path / "other")


def test_a_channel_block_rounds_off_grid_widths_up_before_interpolating(tmp_path):
    """onnxruntime runs a width at the cost of its next whole channel block: with channel_block 8
    a stem of 12 channels costs what 16 would (interpolated), a grid width stays as timed, and
    the block survives a save and load; with 1 the interpolation is plain."""
    from jdnas.latency.space import stem_entry
    ms = {stem_entry(8, (64, 64)): 1.0, stem_entry(32, (64, 64)): 4.0}
    plain, blocked = LatencyTable(ms), LatencyTable(ms, channel_block=8)
    assert plain.lookup(stem_entry(12, (64, 64))) == pytest.approx(1.5)
    assert blocked.lookup(stem_entry(12, (64, 64))) == pytest.approx(2.0)  # as 16
    assert blocked.lookup(stem_entry(30, (64, 64))) == pytest.approx(4.0)  # as 32
    assert blocked.lookup(stem_entry(8, (64, 64))) == 1.0
    blocked.save(tmp_path / "t.csv")
    back = LatencyTable.load(tmp_path / "t.csv")
    assert back.channel_block == 8 and back.ms == blocked.ms
    plain.save(tmp_path / "p.csv")
    assert LatencyTable.load(tmp_path / "p.csv").channel_block == 1
    assert "channel_block" not in (tmp_path / "p.csv").read_text()
