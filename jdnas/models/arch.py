"""`Arch`: the hashable description of a ResNet-like backbone (DESIGN §4).

Short form, for logs and params: `B64:3x256m64-4x512m128-6x1024m256-3x2048m512`
  - block type (`B` bottleneck, `S` basic) and stem width,
  - per stage: depth x output width, then mid width; a stage whose blocks were pruned to
    different mid widths lists them all (`3x256m64,48,64`).
`Arch.parse(str(a)) == a` for every Arch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

BLOCK_LETTERS = {"basic": "S", "bottleneck": "B"}
LETTER_BLOCKS = {v: k for k, v in BLOCK_LETTERS.items()}
NUM_STAGES = 4


@dataclass(frozen=True)
class Stage:
    """One backbone stage: output width and the mid width of each of its blocks."""

    out: int
    mids: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.mids)

    def __str__(self) -> str:
        uniform = len(set(self.mids)) == 1
        mids = str(self.mids[0]) if uniform else ",".join(map(str, self.mids))
        return f"{self.depth}x{self.out}m{mids}"


@dataclass(frozen=True)
class Arch:
    """A backbone: block type, stem width and four stages (outputs C2..C5, strides 4..32)."""

    block: str
    stem: int
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if self.block not in BLOCK_LETTERS:
            raise ValueError(f"block must be one of {sorted(BLOCK_LETTERS)}, got {self.block!r}")
        if len(self.stages) != NUM_STAGES:
            raise ValueError(f"an Arch has {NUM_STAGES} stages, got {len(self.stages)}")
        if self.stem < 1 or any(s.out < 1 or s.depth < 1 or min(s.mids) < 1 for s in self.stages):
            raise ValueError("every width and depth must be >= 1")

    # --- views -------------------------------------------------------------------------
    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(s.out for s in self.stages)

    def with_stage(self, index: int, stage: Stage) -> "Arch":
        """A copy with stage `index` replaced."""
        stages = list(self.stages)
        stages[index] = stage
        return replace(self, stages=tuple(stages))

    # --- serialisation -----------------------------------------------------------------
    def __str__(self) -> str:
        return f"{BLOCK_LETTERS[self.block]}{self.stem}:" + "-".join(map(str, self.stages))

    @classmethod
    def parse(cls, text: str) -> "Arch":
        """Inverse of `str(arch)`; ValueError with the reason on a malformed string."""
        m = re.fullmatch(r"([SB])(\d+):(.+)", text.strip())
        if not m:
            raise ValueError(f"not an Arch string (expected e.g. 'S16:2x16m16-2x32m32-2x64m64-2x128m128'): {text!r}")
        stages = []
        for part in m.group(3).split("-"):
            sm = re.fullmatch(r"(\d+)x(\d+)m(\d+(?:,\d+)*)", part)
            if not sm:
                raise ValueError(f"bad stage {part!r} in Arch string {text!r} (expected DxOUTmMID)")
            depth, out = int(sm.group(1)), int(sm.group(2))
            mids = tuple(int(x) for x in sm.group(3).split(","))
            if len(mids) == 1:
                mids = mids * depth
            if len(mids) != depth:
                raise ValueError(f"stage {part!r} lists {len(mids)} mid widths for depth {depth}")
            stages.append(Stage(out, mids))
        return cls(LETTER_BLOCKS[m.group(1)], int(m.group(2)), tuple(stages))

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "stem": self.stem,
                "stages": [{"out": s.out, "mids": list(s.mids)} for s in self.stages]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Arch":
        return cls(obj["block"], int(obj["stem"]),
                   tuple(Stage(int(s["out"]), tuple(int(m) for m in s["mids"])) for s in obj["stages"]))


# --- presets ---------------------------------------------------------------------------
# name: (block, depths, stem width, stage mid widths); bottleneck outputs are 4x mid.
_PRESETS: dict[str, tuple[str, tuple[int, ...], int, tuple[int, ...]]] = {
    "tiny": ("basic", (1, 1, 1, 1), 32, (32, 64, 128, 256)),
    "r18": ("basic", (2, 2, 2, 2), 64, (64, 128, 256, 512)),
    "r34": ("basic", (3, 4, 6, 3), 64, (64, 128, 256, 512)),
    "r50": ("bottleneck", (3, 4, 6, 3), 64, (64, 128, 256, 512)),
    "r101": ("bottleneck", (3, 4, 23, 3), 64, (64, 128, 256, 512)),
}
PRESET_NAMES = tuple(_PRESETS)


def scale_width(channels: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of `divisor` (at least `divisor`)."""
    return max(divisor, int(round(channels / divisor)) * divisor)


def preset(name: str, width: float = 1.0) -> Arch:
    """A ResNet-like preset (`tiny`, `r18`, `r34`, `r50`, `r101`) at a width multiplier."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESET_NAMES)}")
    block, depths, stem, mids = _PRESETS[name]
    expansion = 4 if block == "bottleneck" else 1
    stages = []
    for depth, mid in zip(depths, mids):
        m = scale_width(mid * width)
        stages.append(Stage(m * expansion, (m,) * depth))
    return Arch(block, scale_width(stem * width), tuple(stages))


def resolve_arch(base: str, width: float = 1.0) -> Arch:
    """A preset name (scaled by `width`) or an Arch string (taken as is)."""
    if base in _PRESETS:
        return preset(base, width)
    return Arch.parse(base)


# --- the searched head -----------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    """The searched settings outside the backbone (DESIGN §4): FPN width, box-head width
    (`representation_size`), input resolution (`min_size`/`max_size`) and test-time proposals
    (`rpn_post_nms_top_n_test`). At small inputs they are most of a detector's latency.

    Short form `F64-R256-I128/128-P100`; `Head.parse(str(h)) == h`.
    """

    fpn: int
    rep: int
    min_size: int
    max_size: int
    proposals: int

    # head-config key of each field
    KEYS = {"fpn": "fpn_channels", "rep": "representation_size", "min_size": "min_size",
            "max_size": "max_size", "proposals": "rpn_post_nms_top_n_test"}

    def __post_init__(self) -> None:
        if min(self.fpn, self.rep, self.min_size, self.max_size, self.proposals) < 1:
            raise ValueError(f"every head width and size must be >= 1: {self}")

    def __str__(self) -> str:
        return f"F{self.fpn}-R{self.rep}-I{self.min_size}/{self.max_size}-P{self.proposals}"

    @classmethod
    def parse(cls, text: str) -> "Head":
        m = re.fullmatch(r"F(\d+)-R(\d+)-I(\d+)/(\d+)-P(\d+)", text.strip())
        if not m:
            raise ValueError(f"not a Head string (expected e.g. 'F64-R256-I128/128-P100'): {text!r}")
        return cls(*(int(x) for x in m.groups()))

    @classmethod
    def of(cls, head_cfg: dict[str, Any]) -> "Head":
        """The searched part of a detector's head config."""
        return cls(**{f: int(head_cfg[k]) for f, k in cls.KEYS.items()})

    def apply(self, head_cfg: dict[str, Any]) -> dict[str, Any]:
        """A copy of `head_cfg` with these settings (test-time pre-NMS proposals kept >= proposals)."""
        cfg = {**head_cfg, **{k: getattr(self, f) for f, k in self.KEYS.items()}}
        cfg["rpn_pre_nms_top_n_test"] = max(int(head_cfg["rpn_pre_nms_top_n_test"]), self.proposals)
        return cfg
