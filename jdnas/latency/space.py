"""What a latency table must cover: the search space's widths, depths, head settings and input
sizes (all derived from the `search_space` bounds), and its entries.

An entry is one distinct thing the table times: a backbone block configuration (block type,
cin, mid, cout, stride, input resolution), the stem, an FPN lateral conv (keyed by stage width
and FPN width), or a part outside the backbone (the rest of the FPN, the RPN, the RoI heads at a
proposal count and box-head width, the resize / post-processing transform, and the glue between
them), each at every input size the search can reach. A detector's latency is the sum of its
entries, so the table needs each distinct entry once, however many detectors reuse it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from jdnas.data.inspect import data_bounds, input_scale
from jdnas.latency.grid import complete_grid
from jdnas.models.arch import NUM_STAGES, Arch, Head, Stage, resolve_arch
from jdnas.models.backbone import STAGE_STRIDES
from jdnas.models.morphism import Action, child_head

EXPANSION = {"basic": 1, "bottleneck": 4}  # output width / mid width of the presets
FIXED_PARTS = ("transform", "fpn_top", "rpn", "roi_heads")  # timed on their own
HEAD_PARTS = FIXED_PARTS + ("glue",)                          # in every prediction


@dataclass(frozen=True, order=True)
class Entry:
    """One timed configuration; fields a part does not use stay 0 / empty."""

    part: str            # stem | block | fpn_lateral | transform | fpn_top | rpn | roi_heads | glue | e2e
    block: str = ""      # block type (part == block); "Arch|Head" strings (part == e2e)
    cin: int = 0         # input width; FPN width (rpn, roi_heads); min_size (transform)
    mid: int = 0         # mid width (block); proposal count (roi_heads)
    cout: int = 0        # output width; FPN width (fpn_lateral, fpn_top); class count (roi_heads); max_size (transform)
    stride: int = 0
    height: int = 0      # input resolution of the part
    width: int = 0
    hidden: int = 0      # box-head width (roi_heads)

    def __str__(self) -> str:
        fields = [f"{k}={v}" for k, v in vars(self).items() if k != "part" and v not in (0, "")]
        return f"{self.part}({', '.join(fields)})"


@dataclass(frozen=True)
class LatencySpace:
    """One block type's space: stem widths, per-stage output and mid widths, per-stage max depth."""

    block: str
    stems: tuple[int, ...]
    outs: tuple[tuple[int, ...], ...]
    mids: tuple[tuple[int, ...], ...]
    max_depth: tuple[int, ...]

    @classmethod
    def around(cls, base: Arch, ratios: Iterable[float], max_depth: Iterable[int], divisor: int = 1,
               block: str | None = None, min_width: int = 1, max_width: int | None = None) -> "LatencySpace":
        """Widths = the base arch's widths x each ratio (rounded to `divisor`), depths up to max_depth.
        `min_width` (the search's smallest legal width) is the lowest grid point of every axis and
        `max_width` (the largest `widen` may make; None: no widen) the highest, so the grid covers
        every width the search can make.

        For a block type other than the base's, the base's mid widths carry over and output
        widths follow the presets' expansion (bottleneck out = 4 x mid, basic out = mid).
        """
        block = block or base.block
        ratios = sorted(set(ratios))
        base_mids = [max(s.mids) for s in base.stages]
        if block == base.block:
            base_outs = list(base.widths)
        else:
            base_outs = [m * EXPANSION[block] for m in base_mids]

        def widths(w: int) -> tuple[int, ...]:
            points = {max(divisor, round(w * r / divisor) * divisor) for r in ratios}
            if min_width < max(points):
                points = {p for p in points if p > min_width} | {min_width}
            if max_width is not None and max_width > min(points):
                points = {p for p in points if p < max_width} | {max_width}
            return tuple(sorted(points))

        depth = tuple(max(int(d), b) if block == base.block else int(d)
                      for d, b in zip(max_depth, base.depths))
        return cls(block, widths(base.stem), tuple(widths(w) for w in base_outs),
                   tuple(widths(w) for w in base_mids), depth)

    def contains(self, arch: Arch) -> bool:
        """Whether every width and depth of `arch` lies on this space's grid."""
        return (arch.block == self.block and arch.stem in self.stems
                and all(s.out in outs and set(s.mids) <= set(mids) and s.depth <= d
                        for s, outs, mids, d in zip(arch.stages, self.outs, self.mids, self.max_depth)))

    def sample(self, rng: random.Random, off_grid: bool = False) -> Arch:
        """A random arch of the space; `off_grid` draws every width as any integer in the grid's
        range (as pruning and slimming produce) instead of a grid value."""
        def pick(values: tuple[int, ...]) -> int:
            return rng.randint(min(values), max(values)) if off_grid else rng.choice(values)
        stages = []
        for outs, mids, d in zip(self.outs, self.mids, self.max_depth):
            depth = rng.randint(1, d)
            stages.append(Stage(pick(outs), tuple(pick(mids) for _ in range(depth))))
        return Arch(self.block, pick(self.stems), tuple(stages))

    def smallest(self) -> Arch:
        """Every width at its minimum, one block per stage."""
        return Arch(self.block, min(self.stems), tuple(Stage(min(o), (min(m),)) for o, m in zip(self.outs, self.mids)))

    def largest(self) -> Arch:
        """Every width at its maximum, every stage at its maximum depth."""
        return Arch(self.block, max(self.stems),
                    tuple(Stage(max(o), (max(m),) * d) for o, m, d in zip(self.outs, self.mids, self.max_depth)))

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "stems": list(self.stems), "outs": [list(o) for o in self.outs],
                "mids": [list(m) for m in self.mids], "max_depth": list(self.max_depth)}


def spaces_from_params(params: dict) -> list[LatencySpace]:
    """The backbone spaces the table covers, around the base arch (model.base, model.width): widths
    from `latency.space`, bounded below by `search_space.min_width`; depths up to
    `search_space.max_depth` (one source for both: what the search can make, the table covers)."""
    cfg, bounds = params["latency"]["space"], params["search_space"]
    base = resolve_arch(params["model"]["base"], params["model"]["width"])
    blocks = [base.block] + [b for b in cfg["extra_blocks"] if b != base.block]
    widen = "widen" in bounds["actions"]  # only widen makes a width above the base's
    ratios = [r for r in cfg["width_ratios"] if r <= 1 or widen]
    return [LatencySpace.around(base, ratios, bounds["max_depth"], cfg["width_divisor"], block,
                                bounds["min_width"], bounds["max_width"] if widen else None) for block in blocks]


# The FPN width's grid holds every multiple m of FPN_STEP channels and m + 1 (FPN_STEPS multiples at
# most: the step doubles on wide FPNs). The FPN, RPN and lateral convs run channels in blocks (16 on
# the AVX-512 CPU measured), so their cost climbs in stairs, one step up just past a block: between
# grid points 32 and 64 a linear interpolation put the base with a 56-channel FPN at 0.93x the base,
# measured 0.97x; with 48 and 56 on the grid, a 49-channel FPN at 0.86x, measured 0.92x (docs/results.md).
FPN_STEP, FPN_STEPS = 8, 8


@dataclass(frozen=True)
class HeadSpace:
    """The grid of the searched head settings the table covers: FPN widths, box-head widths and
    proposal counts (interpolated between grid values), and the input sizes (exact rungs)."""

    fpns: tuple[int, ...]
    reps: tuple[int, ...]
    proposals: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]   # (min_size, max_size), largest first

    @classmethod
    def around(cls, base: Head, bounds: dict, ratios: Iterable[float]) -> "HeadSpace":
        """Grids from the search bounds: from the smallest legal value (`min_head_ratio` x the base's)
        to the base's, through the `ratios` in between, and for the FPN width the block steps
        (FPN_STEP); sizes: every size `resize` can reach."""
        lo = bounds["min_head_ratio"]
        acts = set(bounds["actions"])

        def grid(value: int, kind: str, step: int = 0) -> tuple[int, ...]:
            if kind not in acts:
                return (value,)
            least = max(1, math.ceil(lo * value - 1e-9))
            points = {least, value} | {round(value * r) for r in ratios if lo < r < 1}
            if step:  # every multiple m of the step (doubled until at most FPN_STEPS of them) and m + 1
                while (value - least) / step > FPN_STEPS:
                    step *= 2
                points |= {w for m in range(-(-least // step) * step, value, step) for w in (m, m + 1)}
            return tuple(sorted(points))

        sizes, todo = {(base.min_size, base.max_size)}, [base]
        while todo and "resize" in acts:
            h = todo.pop()
            for r in bounds["resize_ratios"]:
                c = child_head(Action("resize", ratio=float(r)), h)
                if c.min_size >= bounds["min_input_ratio"] * base.min_size and (c.min_size, c.max_size) not in sizes:
                    sizes.add((c.min_size, c.max_size))
                    todo.append(c)
        return cls(grid(base.fpn, "fpn_prune", FPN_STEP), grid(base.rep, "head_prune"),
                   grid(base.proposals, "proposals"), tuple(sorted(sizes, reverse=True)))

    @property
    def base(self) -> Head:
        """The largest head of the space (the base's)."""
        return Head(max(self.fpns), max(self.reps), *self.sizes[0], max(self.proposals))

    @property
    def smallest(self) -> Head:
        """The smallest head of the space at the base's input size: every grid axis at its minimum."""
        return Head(min(self.fpns), min(self.reps), *self.sizes[0], min(self.proposals))

    def sample(self, rng: random.Random) -> Head:
        """A random head of the space (widths any integer in range, as pruning makes them)."""
        return Head(rng.randint(min(self.fpns), max(self.fpns)), rng.randint(min(self.reps), max(self.reps)),
                    *rng.choice(self.sizes), rng.randint(min(self.proposals), max(self.proposals)))

    def sample_grid(self, rng: random.Random) -> Head:
        """A random head with grid values on every axis, at the base's input size."""
        return Head(rng.choice(self.fpns), rng.choice(self.reps), *self.sizes[0], rng.choice(self.proposals))

    def to_json(self) -> dict[str, Any]:
        return {"fpns": list(self.fpns), "reps": list(self.reps), "proposals": list(self.proposals),
                "sizes": [list(s) for s in self.sizes]}


def head_space_from_params(params: dict) -> HeadSpace:
    """The head grid of the params' search space around the base's head (the `model` params)."""
    return HeadSpace.around(Head.of(params["model"]), params["search_space"], params["latency"]["space"]["head_ratios"])


def resize_inputs(bounds: dict, stats: dict, head: Head) -> tuple[list[tuple[int, int]], float]:
    """The (min_size, max_size) inputs `resize` can reach from `head` on data with train statistics
    `stats` (the base's first: the latency grid's rule), and the 5th-percentile object's size in
    pixels at the base's input."""
    lo, hi = head.min_size, head.max_size
    sizes = list(HeadSpace.around(head, data_bounds(bounds, stats, lo, hi), []).sizes)
    return sizes, stats["object_size"]["p5"] * input_scale(stats, lo, hi)


# --- resolutions -----------------------------------------------------------------------
def half(size: tuple[int, int]) -> tuple[int, int]:
    """Output size of a stride-2 conv / pool with 'same' padding (k=1, 3 or 7)."""
    return (size[0] + 1) // 2, (size[1] + 1) // 2


def stage_inputs(input_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Input resolution of each stage's first block (after the stride-4 stem, then strides 1, 2, 2, 2)."""
    hw = half(half(input_hw))
    sizes = []
    for stride in STAGE_STRIDES:
        sizes.append(hw)
        if stride == 2:
            hw = half(hw)
    return sizes


def stage_outputs(input_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Resolution of C2..C5 (the FPN's inputs)."""
    ins = stage_inputs(input_hw)
    return [half(hw) if stride == 2 else hw for hw, stride in zip(ins, STAGE_STRIDES)]


def network_input_size(head_cfg: dict[str, Any], image_hw: tuple[int, int]) -> tuple[int, int]:
    """The tensor size the detector's backbone sees for an image of `image_hw`: torchvision's
    GeneralizedRCNNTransform resizes to the min/max size, then pads to a multiple of 32."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    t = GeneralizedRCNNTransform(head_cfg["min_size"], head_cfg["max_size"], [0.0] * 3, [1.0] * 3)
    with torch.no_grad():
        batch, _ = t.eval()([torch.zeros(3, *image_hw)])
    return int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1])


# --- entries ---------------------------------------------------------------------------
def block_entry(block: str, cin: int, mid: int, cout: int, stride: int, hw: tuple[int, int]) -> Entry:
    return Entry("block", block, cin, mid, cout, stride, hw[0], hw[1])


def stem_entry(width: int, input_hw: tuple[int, int]) -> Entry:
    return Entry("stem", cin=3, cout=width, stride=4, height=input_hw[0], width=input_hw[1])


def lateral_entry(cin: int, fpn_channels: int, hw: tuple[int, int]) -> Entry:
    return Entry("fpn_lateral", cin=cin, cout=fpn_channels, height=hw[0], width=hw[1])


def arch_entries(arch: Arch, input_hw: tuple[int, int], fpn_channels: int) -> list[Entry]:
    """The backbone entries of one arch, one per module instance: stem, every block, 4 laterals."""
    entries = [stem_entry(arch.stem, input_hw)]
    cin = arch.stem
    for stage, stride, hw in zip(arch.stages, STAGE_STRIDES, stage_inputs(input_hw)):
        for i, mid in enumerate(stage.mids):
            entries.append(block_entry(arch.block, cin, mid, stage.out, stride, hw) if i == 0 else
                           block_entry(arch.block, stage.out, mid, stage.out, 1, half(hw) if stride == 2 else hw))
            cin = stage.out
    for width, hw in zip(arch.widths, stage_outputs(input_hw)):
        entries.append(lateral_entry(width, fpn_channels, hw))
    return entries


def space_entries(space: LatencySpace, input_hw: tuple[int, int], fpn_widths: Iterable[int]) -> set[Entry]:
    """Every distinct backbone entry an arch of the space can need (its grid widths), with the
    FPN laterals for every FPN width of `fpn_widths`."""
    entries = {stem_entry(w, input_hw) for w in space.stems}
    prev = space.stems
    for s in range(NUM_STAGES):
        stride, hw = STAGE_STRIDES[s], stage_inputs(input_hw)[s]
        out_hw = stage_outputs(input_hw)[s]
        for cout in space.outs[s]:
            for mid in space.mids[s]:
                entries.update(block_entry(space.block, cin, mid, cout, stride, hw) for cin in prev)
                if space.max_depth[s] > 1:
                    entries.add(block_entry(space.block, cout, mid, cout, 1, out_hw))
            entries.update(lateral_entry(cout, fpn, out_hw) for fpn in fpn_widths)
        prev = space.outs[s]
    return entries


def e2e_entry(arch: Arch, head: Head, input_hw: tuple[int, int]) -> Entry:
    """An end-to-end timing of one detector (calibrates and validates the table; never summed)."""
    return Entry("e2e", f"{arch}|{head}", height=input_hw[0], width=input_hw[1])


def head_entries(input_hw: tuple[int, int], head: Head, num_classes: int) -> list[Entry]:
    """The parts outside the backbone for a head at a network input size: the resize and
    post-processing transform, the FPN's top-down path + output convs + pool, the RPN, the RoI
    heads (timed at the largest input: their cost follows the proposals, not the map size),
    and the glue (what a whole forward costs beyond the sum of its parts)."""
    h, w = input_hw
    c2 = stage_outputs(input_hw)[0]
    return [
        Entry("transform", cin=head.min_size, cout=head.max_size, height=h, width=w),
        Entry("fpn_top", cout=head.fpn, height=c2[0], width=c2[1]),
        Entry("rpn", cin=head.fpn, height=h, width=w),
        Entry("roi_heads", cin=head.fpn, mid=head.proposals, cout=num_classes, hidden=head.rep),
        Entry("glue", height=h, width=w),
    ]


def grid_entries(spaces: list[LatencySpace], heads: HeadSpace, rungs: list[tuple[Head, tuple[int, int]]],
                 num_classes: int) -> set[Entry]:
    """Every entry a detector of the spaces can need (the glue and end-to-end timings aside): at
    every input size (`rungs`: the base head at each size, with its network input size), the
    backbone entries and the fixed parts over the head grid."""
    needed: set[Entry] = set()
    for rung, hw in rungs:
        for fpn in heads.fpns:
            for p in heads.proposals:
                for rep in heads.reps:
                    head = Head(fpn, rep, rung.min_size, rung.max_size, p)
                    needed |= {e for e in head_entries(hw, head, num_classes) if e.part in FIXED_PARTS}
        for space in spaces:
            needed |= space_entries(space, hw, heads.fpns)
    return complete_grid(needed)
