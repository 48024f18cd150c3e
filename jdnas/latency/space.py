"""What a latency table must cover: the search space's widths and depths, and its entries.

An entry is one distinct thing the table times: a backbone block configuration (block type,
cin, mid, cout, stride, input resolution), the stem, an FPN lateral conv (keyed by stage width),
or a fixed part (rest of the FPN, RPN, RoI heads at a fixed proposal count, the resize /
post-processing transform, and the glue between them). An Arch's latency is the sum of its
entries, so the table needs each distinct entry once, however many archs reuse it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from jdnas.models.arch import NUM_STAGES, Arch, Stage, resolve_arch
from jdnas.models.backbone import STAGE_STRIDES

EXPANSION = {"basic": 1, "bottleneck": 4}  # output width / mid width of the presets
FIXED_PARTS = ("transform", "fpn_top", "rpn", "roi_heads")  # timed on their own
HEAD_PARTS = FIXED_PARTS + ("glue",)                          # in every prediction


@dataclass(frozen=True, order=True)
class Entry:
    """One timed configuration; fields a part does not use stay 0 / empty."""

    part: str            # stem | block | fpn_lateral | transform | fpn_top | rpn | roi_heads | glue | e2e
    block: str = ""      # block type (part == block); the Arch string (part == e2e)
    cin: int = 0
    mid: int = 0         # mid width (block); proposal count (rpn, roi_heads)
    cout: int = 0        # output width; class count (roi_heads)
    stride: int = 0
    height: int = 0      # input resolution of the part
    width: int = 0

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
               block: str | None = None) -> "LatencySpace":
        """Widths = the base arch's widths x each ratio (rounded to `divisor`), depths up to max_depth.

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
            return tuple(sorted({max(divisor, round(w * r / divisor) * divisor) for r in ratios}))

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
    """The spaces the `latency.space` params describe, around the base arch (model.base, model.width)."""
    cfg = params["latency"]["space"]
    base = resolve_arch(params["model"]["base"], params["model"]["width"])
    blocks = [base.block] + [b for b in cfg["extra_blocks"] if b != base.block]
    return [LatencySpace.around(base, cfg["width_ratios"], cfg["max_depth"], cfg["width_divisor"], block)
            for block in blocks]


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


def space_entries(space: LatencySpace, input_hw: tuple[int, int], fpn_channels: int) -> set[Entry]:
    """Every distinct backbone entry an arch of the space can need (its grid widths)."""
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
            entries.add(lateral_entry(cout, fpn_channels, out_hw))
        prev = space.outs[s]
    return entries


def e2e_entry(arch: Arch, input_hw: tuple[int, int]) -> Entry:
    """An end-to-end timing of one arch's detector (calibrates the table; not summed by predictions)."""
    return Entry("e2e", str(arch), height=input_hw[0], width=input_hw[1])


def head_entries(input_hw: tuple[int, int], head_cfg: dict[str, Any]) -> list[Entry]:
    """The fixed parts: transform, FPN top-down + output convs + pool, RPN, RoI heads, and the
    glue (what a whole forward costs beyond the sum of its parts)."""
    h, w = input_hw
    c2 = stage_outputs(input_hw)[0]
    fpn, props = head_cfg["fpn_channels"], head_cfg["rpn_post_nms_top_n_test"]
    return [
        Entry("transform", height=h, width=w),
        Entry("fpn_top", cout=fpn, height=c2[0], width=c2[1]),
        Entry("rpn", cin=fpn, mid=props, height=h, width=w),
        Entry("roi_heads", cin=fpn, mid=props, cout=head_cfg["num_classes"], height=h, width=w),
        Entry("glue", height=h, width=w),
    ]
