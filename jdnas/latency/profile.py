"""The `profile_latency` stage: build the table for the params' space on the target device,
then validate it end to end on random detectors of the space (random backbone and head) and on
the presets. With `latency.table` set, that table is checked to cover the space and used as is
(validated here all the same).

Calibration: a part timed on its own runs with its weights and input hot in cache; inside a
whole forward it runs slower (on the 2-core shared CPU it was developed on: the backbone 1.1x
when idle, up to 1.5x under load; the parts outside it, whose cost follows the head, 1.0-1.3x).
So calibration detectors are also timed end to end, in the same interleaved rounds: the base,
the space's smallest and largest and two random archs, at the base's head, at the space's
smallest head and at random grid heads (the base's input size). A least-squares fit of
`end-to-end = backbone factor x sum(backbone entries) + head factor x sum(head parts) + glue`
sets the two in-context factors and the glue. A glue fitted at the base's head alone would
absorb the base head's in-context slowdown and charge it to every smaller head. The table's
`ms` column holds the calibrated values (its `isolated_ms` the timings on their own), so a
prediction stays a plain sum of `ms` entries. With a single head in the space the head factor
cannot be told from the glue: it stays 1 (the glue then holds that head's slowdown).

Accuracy gate: a table whose validation MAPE over the random detectors is above
`latency.max_mape` (percent) gets one more pass: the entries the worst predictions read are
re-timed with every validation detector, each re-timed value the faster of its two passes, and
the table refitted. Still above, the stage stops with one line (naming the MAPE, the bound and
what to do), or, with `latency.allow_inaccurate: true`, keeps the table with a loud warning on stderr.
validation.json records `max_mape`, `meets_max_mape` and `retried` (and the first pass's figures).
A refused table is not written, and its timings are not cached (the rerun times them afresh).

Outputs in `runs/latency/<device>/`: `table.csv`, `validation.json`, `validation.png`
(`refused_validation.json`, not a stage output, keeps the validation of a refused table: the
workflow tools delete a failed stage's outputs).
Measurements are also merged into `cache.csv` beside them (not a stage output, so the
workflow tools leave it alone): a later run with the same device and timing settings measures
only the entries it lacks, e.g. after the space grows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch

from jdnas.data.prepare import prepared_bounds, typical_image
from jdnas.errors import JdnasError
from jdnas.io import write_json
from jdnas.latency.measure import Timer, device_name, measure_all, target_device
from jdnas.latency.parts import HeadParts, backbone_call, calibrated_detector, detector_call
from jdnas.latency.space import (FIXED_PARTS, HEAD_PARTS, Entry, LatencySpace, arch_entries, e2e_entry,
                                 grid_entries, head_entries, head_space_from_params, network_input_size,
                                 spaces_from_params)
from jdnas.latency.table import BREAKDOWN, DECIMALS, LatencyTable
from jdnas.latency.validate import fmt, plot_validation, summarize, validation_archs
from jdnas.models.arch import Arch, Head, resolve_arch
from jdnas.models.detector import head_config
from jdnas.seeding import derive_seed

CACHE = "cache.csv"
REFUSED = "refused_validation.json"  # a refused table's validation (the workflow tools delete a failed stage's outputs)
# The parts outside the backbone (the RPN's and the box head's NMS, the RoI pooling) cost what
# their random weights make them select: up to 30% apart between three random inits of one
# detector (at F32: RPN 3.3-4.1 ms, the whole detector 12.4-16.2 ms).
# So each is timed on several inits (draws) and its entry is their mean; end to end alike.
DRAWS = 3  # fixed parts are in every prediction, calibration detectors set the factors: 3 inits each
VALIDATION_DRAWS = 2  # the validation's measured side is its ground truth: 2 inits each
KEEP_BYTES = 1 << 30  # built modules kept between passes (the rest are rebuilt each pass)
FACTOR_RANGE = (0.5, 3.0)  # plausible in-context factors (outside: clamped, with a warning)
RETRY_SHARE = 3  # a retry re-times the entries of at most a third of the validation detectors (the worst)
BACKBONE_PARTS = ("stem", "block", "fpn_lateral")  # x the backbone's in-context factor (FIXED_PARTS: the head's)


def table_dir(params: dict, root: str | Path = "runs/latency") -> Path:
    """Where the table for the params' target device lives: runs/latency/<latency.device>."""
    return Path(root) / params["latency"]["device"]


def num_classes(data_dir: str | Path) -> int:
    """Class count (background included) of the prepared data: the RoI heads' output size."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        raise JdnasError(f"{manifest}: not found (run the prepare_data stage first)")
    return len(json.loads(manifest.read_text())["categories"]) + 1


class Profiler:
    """Settings of one profiling run: device, timer, head config, profiling image."""

    def __init__(self, params: dict, classes: int) -> None:
        cfg = params["latency"]
        self.cfg = cfg
        self.seed = params["seed"]
        self.device = target_device(cfg["device"])
        # onnxruntime: every part and detector is exported and timed in an onnxruntime session
        self.onnx_threads = cfg["threads"] if cfg["device"] == "onnxruntime" else None
        if self.device.type == "cpu":
            torch.set_num_threads(cfg["threads"])
        self.timer = Timer(self.device, cfg["clock"])
        # onnxruntime's convolutions pack channels in blocks of 8 (see jdnas.latency.table)
        self.channel_block = cfg["channel_block"] or (8 if cfg["device"] == "onnxruntime" else 1)
        self.head_cfg = head_config(params["model"], classes)
        self.classes = classes
        model = params["model"]
        self.image_hw = tuple(cfg["image_size"] or (model["min_size"], model["min_size"]))
        self.head_space = head_space_from_params(params)
        self._hw: dict[tuple[int, int], tuple[int, int]] = {}
        self.base_head = self.head_space.base
        self.input_hw = self.hw(self.base_head)
        self.base = resolve_arch(model["base"], model["width"])
        self.base_width = model["width"]
        self._parts: dict[tuple[Head, int], HeadParts] = {}
        g = torch.Generator().manual_seed(self.seed)
        self.image = torch.rand(3, *self.image_hw, generator=g).to(self.device)
        self.conditions = {
            "device": cfg["device"], "device_name": device_name(self.device), "torch": torch.__version__,
            "threads": cfg["threads"] if self.device.type == "cpu" else None,
            "clock": cfg["clock"] if self.device.type == "cpu" else "cuda_events",
            "warmup": cfg["warmup"], "runs": cfg["runs"], "rounds": cfg["rounds"],
        }
        if self.onnx_threads:
            import onnxruntime
            self.conditions["onnxruntime"] = onnxruntime.__version__
        self.head_conditions = {**self.conditions, "head": self.head_cfg, "image": list(self.image_hw),
                                "weight_draws": DRAWS}

    def settings(self, e: Entry) -> str:
        """Hash of what an entry's measurement depends on (a cached one is reused only if equal)."""
        what = self.head_conditions if e.part in HEAD_PARTS + ("e2e",) else self.conditions
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]

    def measure(self, builders: dict, desc: str, seed_offset: int = 0) -> dict:
        """Time `builders` in shuffled passes; a key `(kind, what, draw)` is one init of `(kind, what)`,
        and the result holds `(kind, what)`: the mean over its draws."""
        step = max(1, len(builders) * self.cfg["rounds"] // 10)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                print(f"{desc}: {done}/{total}", file=sys.stderr, flush=True)
        torch.manual_seed(self.seed + seed_offset)  # the backbone entries' random weights and inputs
        timed = measure_all(builders, self.timer, self.cfg["warmup"], self.cfg["runs"], self.cfg["rounds"],
                            self.seed + seed_offset, progress, None, KEEP_BYTES)
        draws: dict = {}
        for k, v in timed.items():
            draws.setdefault(k[:2], []).append(v)
        return {k: sum(v) / len(v) for k, v in draws.items()}

    def hw(self, head: Head) -> tuple[int, int]:
        """The network input size of a head's min/max size for the profiling image."""
        key = (head.min_size, head.max_size)
        if key not in self._hw:
            self._hw[key] = network_input_size(head.apply(self.head_cfg), self.image_hw)
        return self._hw[key]

    def rungs(self) -> list[Head]:
        """The base head at every input size of the space, largest first."""
        return [replace(self.base_head, min_size=a, max_size=b) for a, b in self.head_space.sizes]

    def detector(self, arch: Arch, head: Head | None = None, draw: int = 0) -> Any:
        """A detector of `arch` at `head` with the random init numbered `draw` (the same on every run)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "latency weights", draw))
            return calibrated_detector(arch, (head or self.base_head).apply(self.head_cfg), self.image, self.device)

    def detector_call(self, arch: Arch, head: Head | None = None, draw: int = 0) -> Any:
        """The end-to-end call of a detector of `arch` (at `head`, init `draw`) on the profiling image."""
        return detector_call(self.detector(arch, head, draw), self.image, self.onnx_threads)

    def detector_calls(self, kind: str, what: Any, arch: Arch, head: Head, draws: int) -> dict:
        """Builders of `detector_call` on `draws` inits, keyed `(kind, what, draw)`."""
        return {(kind, what, d): (lambda d=d: self.detector_call(arch, head, d)) for d in range(draws)}

    def parts(self, e: Entry, draw: int = 0) -> HeadParts:
        """The reference detector's parts (the base arch) for the head an entry is timed at."""
        head = self.base_head
        if e.part == "transform":
            head = replace(head, min_size=e.cin, max_size=e.cout)
        elif e.part == "rpn":
            head = next(replace(h, fpn=e.cin) for h in self.rungs() if self.hw(h) == (e.height, e.width))
        elif e.part == "roi_heads":
            head = replace(head, fpn=e.cin, proposals=e.mid, rep=e.hidden)
        if (head, draw) not in self._parts:
            self._parts[head, draw] = HeadParts(self.detector(self.base, head, draw), self.image, head.proposals)
        return self._parts[head, draw]


def calibration_detectors(prof: Profiler, spaces: list[LatencySpace]) -> list[tuple[Arch, Head]]:
    """Detectors timed end to end to calibrate the table, all at the base's input size: the base
    arch at the base's head and at the space's smallest head; per space its smallest and its
    largest arch at both heads, and two random archs at random grid heads (their own seeds: not
    the validation archs). Backbone and head cost vary independently over them, so the fit can
    tell the backbone's in-context factor from the head's and both from the glue."""
    rng, heads_rng = random.Random(prof.seed + 1), random.Random(prof.seed + 2)
    big, small = prof.base_head, prof.head_space.smallest
    pairs = [(prof.base, big), (prof.base, small)]
    for space in spaces:
        lo, hi = space.smallest(), space.largest()
        pairs += [(lo, big), (hi, big), (lo, small), (hi, small)]
        pairs += [(space.sample(rng), prof.head_space.sample_grid(heads_rng)) for _ in range(2)]
    return list(dict.fromkeys(pairs))


def needed_entries(prof: Profiler, spaces: list[LatencySpace], calibration: list[tuple[Arch, Head]]) -> set[Entry]:
    """Every timing the table needs: at every input size, the spaces' backbone entries and the
    parts outside the backbone over the head grid, and the base end to end (its glue); the
    calibration detectors' entries and end-to-end timings at the base's size."""
    rungs = [(h, prof.hw(h)) for h in prof.rungs()]
    needed = grid_entries(spaces, prof.head_space, rungs, prof.classes)
    for rung, hw in rungs if calibration else []:
        needed |= set(arch_entries(prof.base, hw, rung.fpn)) | {e2e_entry(prof.base, rung, hw)}
    for arch, head in calibration:
        needed |= set(arch_entries(arch, prof.input_hw, head.fpn))
        needed |= {e for e in head_entries(prof.input_hw, head, prof.classes) if e.part in FIXED_PARTS}
        needed.add(e2e_entry(arch, head, prof.input_hw))
    return needed


def entry_builders(prof: Profiler, entries: Iterable[Entry]) -> dict:
    """What to time for each entry: keyed ("entry", e), or ("entry", e, draw) for the parts whose
    cost follows their random weights (the fixed parts and whole detectors: DRAWS inits each)."""
    builders: dict = {}
    for e in entries:
        if e.part == "e2e":
            arch, head = e.block.split("|")
            builders.update(prof.detector_calls("entry", e, Arch.parse(arch), Head.parse(head), DRAWS))
        elif e.part in FIXED_PARTS:
            builders.update({("entry", e, d): (lambda e=e, d=d: prof.parts(e, d).call(e, prof.onnx_threads))
                             for d in range(DRAWS)})
        else:
            builders[("entry", e)] = lambda e=e: backbone_call(e, prof.device, prof.onnx_threads)
    return builders


def _clamped(factor: float, what: str) -> float:
    lo, hi = FACTOR_RANGE
    if not lo <= factor <= hi:
        print(f"profile_latency: {what} {factor:.2f} is implausible (noisy timings?): clamped to [{lo}, {hi}]",
              file=sys.stderr)
    return min(hi, max(lo, factor))


def fit_context(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = factor * x + glue; factor 1 when x barely varies, kept within [0.5, 3]."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    var = sum((a - mx) ** 2 for a in x) / n
    if n < 2 or var < (0.02 * mx) ** 2:
        return 1.0, my - mx
    factor = _clamped(sum((a - mx) * (b - my) for a, b in zip(x, y)) / n / var, "in-context factor")
    return factor, my - factor * mx


def fit_context2(b: list[float], h: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = fb * b + fh * h + glue (backbone and head in-context factors, glue).
    An axis that barely varies (or moves with the other) keeps factor 1 and the 1-D fit is
    used on the other; a factor outside [0.5, 3] is clamped and the rest refitted."""
    n = len(y)
    mb, mh, my = sum(b) / n, sum(h) / n, sum(y) / n
    sbb = sum((u - mb) ** 2 for u in b)
    shh = sum((v - mh) ** 2 for v in h)
    sbh = sum((u - mb) * (v - mh) for u, v in zip(b, h))
    b_varies = n >= 2 and sbb / n >= (0.02 * mb) ** 2
    h_varies = n >= 2 and shh / n >= (0.02 * mh) ** 2
    det = sbb * shh - sbh ** 2
    if b_varies and h_varies and n >= 3 and det > 0.05 * sbb * shh:
        sby = sum((u - mb) * (w - my) for u, w in zip(b, y))
        shy = sum((v - mh) * (w - my) for v, w in zip(h, y))
        fb, fh = (shh * sby - sbh * shy) / det, (sbb * shy - sbh * sby) / det
        lo, hi = FACTOR_RANGE
        if not lo <= fb <= hi:
            fb = _clamped(fb, "backbone in-context factor")
            fh, g = fit_context(h, [w - fb * u for u, w in zip(b, y)])
        elif not lo <= fh <= hi:
            fh = _clamped(fh, "head in-context factor")
            fb, g = fit_context(b, [w - fh * v for v, w in zip(h, y)])
        else:
            g = my - fb * mb - fh * mh
        return fb, fh, g
    if h_varies and not b_varies:
        fh, g = fit_context(h, [w - u for u, w in zip(b, y)])
        return 1.0, fh, g
    fb, g = fit_context(b, [w - v for v, w in zip(h, y)])
    return fb, 1.0, g


def finish_table(prof: Profiler, raw: dict[Entry, float], calibration: list[tuple[Arch, Head]]
                 ) -> tuple[LatencyTable, dict[str, Any]]:
    """The calibrated table from raw timings (see the module doc), and the calibration's figures.
    The in-context factors are fitted at the base's input size; the glue at every other input
    size is what the base's end-to-end timing there leaves over the sum of its calibrated parts."""
    isolated = {e: v for e, v in raw.items() if e.part != "e2e"}
    rungs = [(h, prof.hw(h)) for h in prof.rungs()]
    glues = {h: head_entries(hw, h, prof.classes)[-1] for h, hw in rungs}
    plain = LatencyTable({**isolated, **dict.fromkeys(glues.values(), 0.0)}, channel_block=prof.channel_block)

    def split(arch: Arch, head: Head) -> tuple[float, float]:
        """(backbone entries, fixed parts) of a detector, from the isolated timings."""
        hw = plain.input_hw(head)
        return (sum(plain.lookup(e) for e in arch_entries(arch, hw, head.fpn)),
                sum(plain.lookup(e) for e in head_entries(hw, head, prof.classes) if e.part in FIXED_PARTS))

    base = prof.base_head
    sums, fixed = zip(*(split(a, h) for a, h in calibration))
    measured = [raw[e2e_entry(a, h, prof.input_hw)] for a, h in calibration]
    fb, fh, g = fit_context2(list(sums), list(fixed), measured)
    ms = {e: v * (fb if e.part in BACKBONE_PARTS else fh if e.part in FIXED_PARTS else 1.0)
          for e, v in isolated.items()}
    for head, hw in rungs:
        body, rest = split(prof.base, head)
        ms[glues[head]] = g if head == base else raw[e2e_entry(prof.base, head, hw)] - fb * body - fh * rest
    table = LatencyTable(ms, {e: prof.settings(e) for e in ms}, isolated=isolated, channel_block=prof.channel_block)
    info = {"in_context_factor": round(fb, 4), "head_context_factor": round(fh, 4),
            "glue_ms": {f"{h.min_size}/{h.max_size}": round(ms[glues[h]], 4) for h, _ in rungs},
            "archs": [{"arch": str(a), "head": str(h), "measured_ms": round(m, 4),
                       "predicted_ms": round(table.predict(a, h), 4)} for (a, h), m in zip(calibration, measured)]}
    return table, info


def reusable(prof: Profiler, needed: set[Entry], cache: LatencyTable | None) -> dict[Entry, float]:
    """Cached timings of needed entries measured under the same settings."""
    if cache is None:
        return {}
    return {e: cache.ms[e] for e in needed if e in cache.ms and cache.settings.get(e) == prof.settings(e)}


def load_cache(path: Path) -> LatencyTable | None:
    if not path.is_file():
        return None
    try:
        return LatencyTable.load(path, check_settings=False)  # it merges runs of several settings on purpose
    except JdnasError as e:
        print(f"profile_latency: ignoring cache ({e})", file=sys.stderr)
        return None


def time_table(prof: Profiler, spaces: list[LatencySpace], cache: LatencyTable | None = None,
               extra: dict | None = None) -> tuple[LatencyTable, dict[str, Any], dict[Entry, float], dict]:
    """Time what the table needs (reusing matching cached timings) together with the `extra`
    builders, interleaved. Returns the table, its calibration, the raw timings, the extra timings."""
    calibration = calibration_detectors(prof, spaces)
    needed = needed_entries(prof, spaces, calibration)
    reused = reusable(prof, needed, cache)
    missing = sorted(needed - set(reused))
    builders = entry_builders(prof, missing)
    builders.update(extra or {})
    timed = prof.measure(builders, "profile_latency")
    # fresh timings at the precision the cache keeps: a rerun from the cache builds the same table
    raw = {**reused, **{k[1]: round(v, DECIMALS) for k, v in timed.items() if k[0] == "entry"}}
    table, info = finish_table(prof, raw, calibration)
    info["entries_timed"], info["entries_reused"] = len(missing), len(reused)
    return table, info, raw, {k: v for k, v in timed.items() if k[0] != "entry"}


def build_table(prof: Profiler, spaces: list[LatencySpace], cache: LatencyTable | None = None
                ) -> tuple[LatencyTable, dict[str, Any]]:
    """The calibrated table for `spaces` on the profiler's device, without validation."""
    table, info, _, _ = time_table(prof, spaces, cache)
    return table, info


def space_grid(prof: Profiler, spaces: list[LatencySpace]) -> LatencyTable:
    """Every entry a table for `spaces` holds (at 0 ms): what a pinned table must cover."""
    return LatencyTable(dict.fromkeys(needed_entries(prof, spaces, []), 0.0)
                        | {head_entries(prof.hw(h), h, prof.classes)[-1]: 0.0 for h in prof.rungs()})


def validation_set(prof: Profiler, spaces: list[LatencySpace], grid: LatencyTable | None = None
                   ) -> list[tuple[str, Arch, Head]]:
    """The detectors the table is validated on (random archs and heads of the space, then the
    presets it covers), drawn from the profiler's seed: the same for a timed and a pinned table."""
    grid = grid or space_grid(prof, spaces)
    return validation_archs(spaces, prof.head_space, prof.cfg["validation_archs"], prof.seed, prof.base_width,
                            grid.covers)


def validation_rows(archs: list[tuple[str, Arch, Head]], measured: dict[int, float], table: LatencyTable
                    ) -> list[dict]:
    return [{"kind": kind, "arch": str(arch), "head": str(head), "measured_ms": round(measured[i], 4),
             "predicted_ms": round(table.predict(arch, head), 4)} for i, (kind, arch, head) in enumerate(archs)]


def _error(row: dict) -> float:
    return abs(row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"] * 100


def _random_metrics(rows: list[dict]) -> dict[str, Any]:
    """The gated figures: MAPE, Spearman and worst error over the random detectors (not the presets)."""
    return summarize([r for r in rows if r["kind"].startswith("random")])


def _above(metrics: dict, bound: float) -> bool:
    return metrics["mape_percent"] is not None and metrics["mape_percent"] > bound


def worst_archs(rows: list[dict], bound: float) -> list[int]:
    """The random detectors whose error is above the bound, worst first: at most a third of them
    (at least one), so a retry re-times the entries behind the worst predictions, not the table."""
    random_rows = [(i, r) for i, r in enumerate(rows) if r["kind"].startswith("random")]
    cap = max(1, math.ceil(len(random_rows) / RETRY_SHARE))
    return [i for i, r in sorted(random_rows, key=lambda ir: -_error(ir[1])) if _error(r) > bound][:cap]


def retry_pass(prof: Profiler, spaces: list[LatencySpace], archs: list[tuple[str, Arch, Head]],
               validate: dict, table: LatencyTable, calibration: dict[str, Any], raw: dict[Entry, float] | None,
               measured: dict[int, float], worst: list[int]
               ) -> tuple[LatencyTable, dict[str, Any], dict[Entry, float] | None, dict[int, float], int]:
    """The one extra pass of a table whose validation MAPE is above `latency.max_mape`: the timed
    entries the worst detectors' predictions read (a timed table; a pinned one is fixed) and every
    validation detector again, interleaved in one pass. Each re-timed value is the faster of its
    two passes (as within a pass: a busy spell only adds time), the table is refitted from the
    updated timings. Returns the table, its calibration, the timings, the
    validation measurements and how many entries were re-timed."""
    entries: set[Entry] = set()
    if raw is not None:
        for i in worst:
            _, arch, head = archs[i]
            entries |= table.entries_used(arch, head) & raw.keys()  # the glue is computed, not timed
    builders = entry_builders(prof, sorted(entries))
    builders.update(validate)
    what = (f"re-timing {len(entries)} entries behind the {len(worst)} worst predictions and re-validating"
            if raw is not None else "pinned table (fixed): re-validating")
    print(f"profile_latency: {what} {len(validate)} detectors (one extra pass)", file=sys.stderr, flush=True)
    timed = prof.measure(builders, "profile_latency (retry)", seed_offset=1)
    measured = {i: min(m, timed[("arch", i)]) for i, m in measured.items()}
    if raw is None:
        return table, calibration, raw, measured, 0
    raw = {**raw, **{k[1]: round(min(raw[k[1]], v), DECIMALS) for k, v in timed.items() if k[0] == "entry"}}
    table, info = finish_table(prof, raw, calibration_detectors(prof, spaces))
    return table, {**calibration, **info}, raw, measured, len(entries)


def inaccurate_message(metrics: dict, cfg: dict, out: Path, retried: bool, allowed: bool = False) -> str:
    """The one line of a table above `latency.max_mape`: its figures, the bound, what to do."""
    remedy = (f"profile on a quieter machine or raise latency.rounds (now {cfg['rounds']}) for a better one"
              if allowed else f"profile on a quieter machine, raise latency.rounds (now {cfg['rounds']}), or set "
              "latency.allow_inaccurate: true to use it anyway")
    return (f"profile_latency: the table's validation MAPE is {metrics['mape_percent']:.1f}% (worst "
            f"{metrics['max_abs_error_percent']:.1f}%, over {metrics['n']} random detectors), above "
            f"latency.max_mape = {cfg['max_mape']:g}%" + (" after one more pass" if retried else "")
            + f": {remedy} (see {out / REFUSED})")


def update_cache(prof: Profiler, cache: LatencyTable | None, cache_path: Path, raw: dict[Entry, float],
                 accepted: bool) -> None:
    """cache.csv after a run: an accepted table's timings merged in (a rerun of the same settings
    reuses them); a refused one's dropped (a quieter rerun times them afresh)."""
    cached = {**(cache.ms if cache else {})}
    cached_settings = {**(cache.settings if cache else {})}
    if accepted:
        cached.update(raw)
        cached_settings.update({e: prof.settings(e) for e in raw})
    else:
        cached = {e: v for e, v in cached.items() if e not in raw}
    if cached:
        LatencyTable(cached, {e: cached_settings[e] for e in cached}).save(cache_path)
    elif cache is not None:
        cache_path.unlink(missing_ok=True)


def plot_title(prof: Profiler, result: dict[str, Any], max_mape: float) -> str:
    """validation.png's title: device, threads, clock and load; MAPE against the gate, Spearman."""
    c = prof.conditions
    how = c["clock"]
    if prof.device.type == "cpu":
        load = result["conditions"]["load_average"]
        how = f"{c['threads']} thread(s), {c['clock']}" + (f", load {load[0]} on {os.cpu_count()} CPUs" if load else "")
    verdict = {None: "not checked", True: f"<= max {max_mape:g}%",
               False: f"ABOVE max {max_mape:g}%"}[result["meets_max_mape"]]
    return (f"{c['device']} ({c['device_name']}), {how}\n"
            f"random archs: MAPE {result['mape_percent']}% ({verdict}{', retried' if result['retried'] else ''}), "
            f"Spearman {fmt(result['spearman'])} (n={result['n']})")


def enforce_gate(result: dict[str, Any], cfg: dict[str, Any], out: Path, accepted: bool) -> None:
    """Stop with one line on a table above `latency.max_mape` (its validation kept as
    refused_validation.json), or warn loudly where `allow_inaccurate` keeps it; say when the
    table was not validated at all."""
    if result["meets_max_mape"] is None:
        print("profile_latency: latency.validation_archs = 0: the table is not validated (latency.max_mape "
              "not checked)", file=sys.stderr, flush=True)
    elif not result["meets_max_mape"]:
        if not accepted:
            _drop_stale(out / "table.csv", cfg["table"])
            write_json(out / REFUSED, result)
            raise JdnasError(inaccurate_message(result, cfg, out, result["retried"]))
        message = inaccurate_message(result, cfg, out, result["retried"], allowed=True)
        bar = "!" * 78
        print(f"{bar}\nWARNING (latency.allow_inaccurate: true, the table is used anyway): "
              f"{message.removeprefix('profile_latency: ')}\n"
              "Every predicted latency (the search's target, its decisions) carries this error.\n"
              f"{bar}", file=sys.stderr, flush=True)


def profile_latency(params: dict, data_dir: str | Path, out_dir: str | Path | None = None,
                    spaces: list[LatencySpace] | None = None) -> dict[str, Any]:
    """The stage: table.csv, validation.json and validation.png in `out_dir`.

    The table is kept only if its validation MAPE over the random detectors is at most
    `latency.max_mape` (percent); above it, one more pass re-times the entries behind the worst
    predictions and re-validates (`retry_pass`); still above, the stage stops with one line
    (validation.json and the plot are written, table.csv is not), or with
    `latency.allow_inaccurate: true` warns on stderr and keeps it. validation.json records the
    bound, `meets_max_mape` and whether it retried. A pinned table (`latency.table`) is gated alike
    (its retry re-validates only)."""
    start = time.perf_counter()
    cfg = params["latency"]
    target_device(cfg["device"])  # a device this machine lacks fails first, before any work
    out = Path(out_dir) if out_dir else table_dir(params)
    model = params["model"]  # the grid covers the input sizes `resize` can reach on these data,
    params = {**params, "search_space": prepared_bounds(params["search_space"], data_dir, model["min_size"],
                                                        model["max_size"]),  # each timed on the data's image
              "latency": {**cfg, "image_size": cfg["image_size"] or typical_image(data_dir)}}
    prof = Profiler(params, num_classes(data_dir))
    spaces = spaces if spaces is not None else spaces_from_params(params)
    cache_path = out / CACHE
    cache = load_cache(cache_path) if cfg["reuse_entries"] else None

    # the validation archs are timed in the same shuffled passes as the table's entries, so both
    # see the same machine conditions (a busy spell does not bias one against the other)
    grid = space_grid(prof, spaces)
    archs = validation_set(prof, spaces, grid)
    extra = {k: b for i, (_, a, h) in enumerate(archs)
             for k, b in prof.detector_calls("arch", i, a, h, VALIDATION_DRAWS).items()}
    raw = None
    if cfg["table"]:
        table = pinned_table(cfg["table"], grid)
        calibration = {"pinned": cfg["table"], "entries_timed": 0, "entries_reused": len(table)}
        timed = prof.measure(extra, "profile_latency (pinned table: validation)")
    else:
        table, calibration, raw, timed = time_table(prof, spaces, cache, extra)
    timed_now, reused_now = calibration.pop("entries_timed"), calibration.pop("entries_reused")
    measured = {i: timed[("arch", i)] for i in range(len(archs))}
    rows = validation_rows(archs, measured, table)
    metrics = _random_metrics(rows)

    gate: dict[str, Any] = {"max_mape": cfg["max_mape"], "allow_inaccurate": cfg["allow_inaccurate"],
                            "retried": False}
    if _above(metrics, cfg["max_mape"]):
        worst = worst_archs(rows, cfg["max_mape"])
        print(f"profile_latency: validation MAPE {metrics['mape_percent']:.1f}% is above latency.max_mape = "
              f"{cfg['max_mape']:g}%", file=sys.stderr, flush=True)
        first = {**metrics, "worst_archs": [rows[i]["arch"] + " " + rows[i]["head"] for i in worst]}
        table, calibration, raw, measured, retimed = retry_pass(prof, spaces, archs, extra, table, calibration, raw,
                                                                measured, worst)
        rows = validation_rows(archs, measured, table)
        metrics = _random_metrics(rows)
        gate.update(retried=True, entries_retimed=retimed, archs_revalidated=len(archs), first_pass=first)
    gate["meets_max_mape"] = None if metrics["mape_percent"] is None else not _above(metrics, cfg["max_mape"])
    accepted = gate["meets_max_mape"] is not False or cfg["allow_inaccurate"]

    if raw is not None:
        update_cache(prof, cache, cache_path, raw, accepted)

    base = table.breakdown(prof.base)
    result = {
        **metrics,
        **gate,
        "grid": summarize([r for r in rows if r["kind"] == "random_grid"]),
        "off_grid": summarize([r for r in rows if r["kind"] == "random_off_grid"]),
        "all_with_presets": summarize(rows),
        "conditions": {**prof.conditions, "input_size": list(prof.input_hw), "image_size": list(prof.image_hw),
                       "load_average": _load_average()},
        "entries": len(table), "entries_timed": timed_now, "entries_reused": reused_now,
        "calibration": calibration,
        # false when every entry came from the cache: the validation then ran later than the table
        "validation_interleaved_with_table": timed_now > 0,
        "base": {"arch": str(prof.base), "predicted_ms": {k: round(v, 4) for k, v in base.items()}},
        "spaces": [s.to_json() for s in spaces],
        "head_space": prof.head_space.to_json(),
        "archs": rows,
    }
    plot_validation(rows, out / "validation.png", plot_title(prof, result, cfg["max_mape"]))
    result["seconds"] = round(time.perf_counter() - start, 2)  # the whole stage, wall clock
    write_json(out / "validation.json", result)
    enforce_gate(result, cfg, out, accepted)
    (out / REFUSED).unlink(missing_ok=True)
    table.save(out / "table.csv")
    return {k: result[k] for k in ("n", "mape_percent", "spearman", "max_abs_error_percent", "entries",
                                   "entries_timed", "seconds", "meets_max_mape")}


def _drop_stale(path: Path, pinned: str | None) -> None:
    """An earlier run's table.csv beside a validation.json that refused this one would pass for
    this run's table: remove it (never the pinned table itself, should it be given as this path)."""
    if pinned and Path(pinned).resolve() == path.resolve():
        return
    path.unlink(missing_ok=True)


def pinned_table(path: str | Path, grid: LatencyTable) -> LatencyTable:
    """The table `latency.table` names, checked to hold every entry of the space's grid: a run that
    pins it decides the same on any machine."""
    table = LatencyTable.load(path)
    missing = sorted(set(grid.ms) - set(table.ms))
    if missing:
        raise JdnasError(f"{path}: latency.table lacks {missing[0]}" + (f" and {len(missing) - 1} more entries"
                         if len(missing) > 1 else "") + ": it was profiled for another space or device")
    return table


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


__all__ = ["profile_latency", "table_dir", "build_table", "Profiler", "BREAKDOWN"]
