"""The elastic teacher pool's supernet (DESIGN §6): one set of weights, many detectors.

- Dynamic ops subclass the torch ops (`DynamicConv2d(nn.Conv2d)`, `DynamicBatchNorm2d`), so the
  supernet's state_dict has exactly the keys and shapes of a static detector of its largest
  member: the largest member loads without any conversion, and every other member is a
  prefix slice of each tensor.
- A dynamic conv takes its input width from its input and its output width from `active_out`;
  a dynamic BN takes its width from its input. The static blocks' `forward` therefore runs
  unchanged on any member; the backbone only has to stop each stage after its active depth.
- `PoolSpace` says which members exist (elastic depth per stage: the first d blocks; elastic
  mid width: the first k channels; optionally elastic stage output width) and how to sample them.
- `Supernet.set_active(arch)` makes the shared detector compute member `arch`;
  `Supernet.extract(arch)` returns a static `Detector` with sliced weights.
- `sort_channels` re-orders channels by importance (without changing what the largest member
  computes) so that "the first k channels" are the most important ones.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jdnas.models.arch import Arch, Stage
from jdnas.models.backbone import Bottleneck, ResNetBackbone
from jdnas.models.detector import Detector, build_detector

PHASES = ("full", "depth", "width")


# --- dynamic ops ---------------------------------------------------------------------------
class DynamicConv2d(nn.Conv2d):
    """A Conv2d that uses the first `x.shape[1]` input and the first `active_out` output channels."""

    active_out: int | None = None

    @classmethod
    def from_static(cls, conv: nn.Conv2d) -> "DynamicConv2d":
        if conv.groups != 1:
            raise ValueError("DynamicConv2d supports groups=1 only")
        dyn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, 1, conv.bias is not None, conv.padding_mode)
        dyn.load_state_dict(conv.state_dict())
        return dyn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out_channels if self.active_out is None else self.active_out
        weight = self.weight[:out, : x.shape[1]]
        bias = None if self.bias is None else self.bias[:out]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d over the first `x.shape[1]` channels (running statistics sliced in place)."""

    @classmethod
    def from_static(cls, bn: nn.BatchNorm2d) -> "DynamicBatchNorm2d":
        dyn = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        dyn.load_state_dict(bn.state_dict())
        return dyn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_buffers = not self.training or self.track_running_stats
        mean = self.running_mean[:k] if use_buffers and self.running_mean is not None else None
        var = self.running_var[:k] if use_buffers and self.running_var is not None else None
        bn_training = self.training or (mean is None and var is None)
        weight = None if self.weight is None else self.weight[:k]
        bias = None if self.bias is None else self.bias[:k]
        return F.batch_norm(x, mean, var, weight, bias, bn_training, factor, self.eps)


def dynamize(module: nn.Module) -> nn.Module:
    """Replace every plain Conv2d / BatchNorm2d below `module` by its dynamic twin (weights kept)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, DynamicConv2d.from_static(child))
        elif type(child) is nn.BatchNorm2d:
            setattr(module, name, DynamicBatchNorm2d.from_static(child))
        else:
            dynamize(child)
    return module


class ElasticBackbone(ResNetBackbone):
    """`ResNetBackbone` of the largest member with dynamic ops; runs the first d blocks per stage."""

    def __init__(self, arch: Arch) -> None:
        super().__init__(arch)
        dynamize(self)
        self.active_depths = list(arch.depths)

    def forward(self, x: torch.Tensor) -> "dict[str, torch.Tensor]":
        x = self.stem(x)
        feats = {}
        for i, (stage, depth) in enumerate(zip(self.stages, self.active_depths)):
            for block in stage[:depth]:
                x = block(x)
            feats[str(i)] = x
        return feats


# --- the space ------------------------------------------------------------------------------
def scaled(channels: int, ratio: float) -> int:
    """Channels kept at a width ratio (at least one)."""
    return max(1, int(round(channels * ratio)))


@dataclass(frozen=True)
class PoolSpace:
    """Members of the pool: sub-networks of `max_arch` that keep the first blocks and channels.

    Depth choices of stage s are `min_depths[s]..max depth`; mid width ratios are drawn per
    block from `width_ratios`; stage output width ratios per stage from `out_width_ratios`
    (only those that keep the stage's shortcut structure: a member must have a projection on
    a block exactly where the largest member has one).
    """

    max_arch: Arch
    min_depths: tuple[int, ...]
    width_ratios: tuple[float, ...] = (1.0,)
    out_width_ratios: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.min_depths) != len(self.max_arch.stages):
            raise ValueError(f"min_depths needs {len(self.max_arch.stages)} entries, got {len(self.min_depths)}")
        for s, (lo, stage) in enumerate(zip(self.min_depths, self.max_arch.stages)):
            if not 1 <= lo <= stage.depth:
                raise ValueError(f"min_depths[{s}] = {lo} must be in [1, {stage.depth}] (the stage's depth)")
        for name in ("width_ratios", "out_width_ratios"):
            ratios = getattr(self, name)
            if not ratios or any(not 0 < r <= 1 for r in ratios):
                raise ValueError(f"{name} must be a non-empty list of ratios in (0, 1]")

    # --- choices ---
    def depth_choices(self, s: int) -> list[int]:
        return list(range(self.min_depths[s], self.max_arch.stages[s].depth + 1))

    def width_choices(self) -> list[float]:
        return sorted(set(self.width_ratios) | {1.0})

    def out_choices(self, s: int) -> list[float]:
        """Output width ratios of stage s that keep its first block's shortcut type."""
        m = self.max_arch
        if s > 0:  # stride 2: always a projection
            return sorted(set(self.out_width_ratios) | {1.0})
        has_proj = m.stem != m.stages[0].out
        ok = [r for r in set(self.out_width_ratios) | {1.0} if (scaled(m.stages[0].out, r) != m.stem) == has_proj]
        return sorted(ok)

    @property
    def elastic_out(self) -> bool:
        return any(len(self.out_choices(s)) > 1 for s in range(len(self.max_arch.stages)))

    # --- members ---
    def member(self, depths: Sequence[int], mid_ratios: Sequence[Sequence[float]] | float = 1.0,
               out_ratios: Sequence[float] | float = 1.0) -> Arch:
        """The member with these stage depths, per-block mid ratios and per-stage output ratios."""
        stages = []
        for s, (d, stage) in enumerate(zip(depths, self.max_arch.stages)):
            ratios = mid_ratios if isinstance(mid_ratios, (int, float)) else mid_ratios[s]
            ratios = [ratios] * d if isinstance(ratios, (int, float)) else list(ratios)
            out_r = out_ratios if isinstance(out_ratios, (int, float)) else out_ratios[s]
            mids = tuple(scaled(stage.mids[i], r) for i, r in zip(range(d), ratios))
            stages.append(Stage(scaled(stage.out, out_r), mids))
        return Arch(self.max_arch.block, self.max_arch.stem, tuple(stages))

    def largest(self) -> Arch:
        return self.max_arch

    def smallest(self, phase: str = "width") -> Arch:
        """The smallest member that `phase` trains (depth phase: minimum depths at full width)."""
        if phase == "full":
            return self.max_arch
        if phase == "depth":
            return self.member(self.min_depths)
        return self.member(self.min_depths, self.width_choices()[0],
                           [self.out_choices(s)[0] for s in range(len(self.min_depths))])

    def middle(self) -> Arch:
        """The member at the middle choice of every dimension (upper middle for depth, lower for widths)."""
        n = len(self.min_depths)
        depths = [self.depth_choices(s)[len(self.depth_choices(s)) // 2] for s in range(n)]
        wc = self.width_choices()
        outs = [self.out_choices(s)[(len(self.out_choices(s)) - 1) // 2] for s in range(n)]
        return self.member(depths, wc[(len(wc) - 1) // 2], outs)

    def sample(self, rng: random.Random, phase: str = "width") -> Arch:
        """A random member among those that `phase` trains (full: the largest only)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase == "full":
            return self.max_arch
        n = len(self.min_depths)
        depths = [rng.choice(self.depth_choices(s)) for s in range(n)]
        if phase == "depth":
            return self.member(depths)
        wc = self.width_choices()
        mids = [[rng.choice(wc) for _ in range(d)] for d in depths]
        outs = [rng.choice(self.out_choices(s)) for s in range(n)]
        return self.member(depths, mids, outs)

    def contains(self, arch: Arch) -> bool:
        """True if `arch` is a sub-network of the largest member that the supernet can compute."""
        m = self.max_arch
        if arch.block != m.block or arch.stem != m.stem:
            return False
        for a, b in zip(arch.stages, m.stages):
            if a.depth > b.depth or a.out > b.out or any(x > y for x, y in zip(a.mids, b.mids)):
                return False
        return (arch.stem != arch.stages[0].out) == (m.stem != m.stages[0].out)

    # --- serialisation ---
    def to_json(self) -> dict[str, Any]:
        return {"max_arch": self.max_arch.to_json(), "min_depths": list(self.min_depths),
                "width_ratios": list(self.width_ratios), "out_width_ratios": list(self.out_width_ratios)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "PoolSpace":
        return cls(Arch.from_json(obj["max_arch"]), tuple(int(d) for d in obj["min_depths"]),
                   tuple(float(r) for r in obj["width_ratios"]), tuple(float(r) for r in obj["out_width_ratios"]))


# --- the supernet ---------------------------------------------------------------------------
def slice_prefix(tensor: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The leading block of `tensor` with the given shape (a member's share of a weight)."""
    return tensor[tuple(slice(0, n) for n in shape)]


class Supernet:
    """A Faster R-CNN + FPN whose backbone is elastic; `model` is a real `Detector`.

    `model.state_dict()` has the keys and shapes of `build_detector(space.max_arch, head_cfg)`:
    it is a checkpoint of the largest member as it stands.
    """

    def __init__(self, space: PoolSpace, head_cfg: dict[str, Any]) -> None:
        self.space = space
        self.head_cfg = dict(head_cfg)
        self.model: Detector = build_detector(space.max_arch, head_cfg)
        static_body = self.model.backbone.body
        body = ElasticBackbone(space.max_arch)
        body.load_state_dict(static_body.state_dict())  # same initial weights as the static build
        self.model.backbone.body = body
        for inner in self.model.backbone.fpn.inner_blocks:  # lateral 1x1 convs read C2..C5
            inner[0] = DynamicConv2d.from_static(inner[0])
        self.active = space.max_arch
        self.meta: dict[str, Any] = {}  # what the checkpoint says about the training run

    @property
    def body(self) -> ElasticBackbone:
        return self.model.backbone.body

    def set_active(self, arch: Arch) -> None:
        """Make `model` compute member `arch` (ValueError if the pool does not hold it)."""
        if not self.space.contains(arch):
            raise ValueError(f"{arch} is not a member of the pool around {self.space.max_arch}")
        body = self.body
        body.active_depths = list(arch.depths)
        for stage_spec, blocks in zip(arch.stages, body.stages):
            for mid, block in zip(stage_spec.mids, blocks):
                block.conv1.active_out = mid
                if isinstance(block, Bottleneck):
                    block.conv2.active_out = mid
                    block.conv3.active_out = stage_spec.out
                else:
                    block.conv2.active_out = stage_spec.out
                if block.downsample is not None:
                    block.downsample[0].active_out = stage_spec.out
        self.active = arch

    def extract(self, arch: Arch) -> Detector:
        """A static detector of member `arch` with the supernet's weights sliced (no BN recalibration).

        It loads and runs without the supernet (`save_detector` / `load_detector`). The global
        torch RNG is left as it was.
        """
        if not self.space.contains(arch):
            raise ValueError(f"{arch} is not a member of the pool around {self.space.max_arch}")
        with torch.random.fork_rng(devices=[]):
            static = build_detector(arch, self.head_cfg)
        full = self.model.state_dict()
        sliced = {k: slice_prefix(full[k], v.shape).detach().cpu().clone() for k, v in static.state_dict().items()}
        static.load_state_dict(sliced)
        return static.train(self.model.training)

    def inherit(self, arch: Arch, state: dict[str, torch.Tensor]) -> None:
        """Start from a trained detector of `arch` (a sub-network of the pool): the largest member
        then computes exactly what that detector computes, and so does every member containing it.

        Its tensors go into the leading slice of the supernet's; blocks it lacks get a zero
        last-BN gain (an identity residual, as `deepen` does); mid channels it lacks keep their
        random weights but the convs reading them get zero input weights, so they start silent
        yet still receive gradients.
        """
        if not self.space.contains(arch):
            raise ValueError(f"cannot inherit {arch}: not a sub-network of the pool around {self.space.max_arch}")
        if arch.widths != self.space.max_arch.widths:
            raise ValueError(f"cannot inherit {arch}: its stage output widths {arch.widths} differ from the pool's "
                             f"{self.space.max_arch.widths}")
        own = self.model.state_dict()
        missing = [k for k in state if k not in own]
        if missing:
            raise ValueError(f"cannot inherit {arch}: the supernet has no tensor {missing[0]!r}")
        with torch.no_grad():
            for k, v in state.items():
                if v.dim() != own[k].dim() or any(a > b for a, b in zip(v.shape, own[k].shape)):
                    raise ValueError(f"cannot inherit {arch}: {k} has shape {tuple(v.shape)}, "
                                     f"larger than the supernet's {tuple(own[k].shape)}")
                slice_prefix(own[k], v.shape).copy_(v)
            for s, (spec, blocks) in enumerate(zip(arch.stages, self.body.stages)):
                for i, block in enumerate(blocks):
                    if i >= spec.depth:
                        block.last_bn.weight.zero_()
                        block.last_bn.bias.zero_()
                        continue
                    readers = [block.conv2] if not isinstance(block, Bottleneck) else [block.conv2, block.conv3]
                    for conv in readers:
                        conv.weight[:, spec.mids[i]:].zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


# --- channel importance ---------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """Channels that must move together: producers' output rows (conv + BN), consumers' input columns."""

    producers: list[tuple[nn.Conv2d, nn.BatchNorm2d]]
    consumers: list[nn.Conv2d]

    def importance(self) -> torch.Tensor:
        """Sum over producers of L1(filter) x |BN gamma| per channel."""
        total = 0
        for conv, bn in self.producers:
            total = total + conv.weight.detach().abs().flatten(1).sum(1) * bn.weight.detach().abs()
        return total


def _permute(t: torch.Tensor, dim: int, idx: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    t.data = t.data.index_select(dim, idx.to(t.device))
    if optimizer is not None and isinstance(t, nn.Parameter) and t in optimizer.state:
        for key, value in optimizer.state[t].items():
            if torch.is_tensor(value) and value.shape == t.shape:
                optimizer.state[t][key] = value.index_select(dim, idx.to(value.device))


def apply_permutation(group: ChannelGroup, idx: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-order a group's channels: the network computes the same function (eval mode)."""
    for conv, bn in group.producers:
        _permute(conv.weight, 0, idx, optimizer)
        if conv.bias is not None:
            _permute(conv.bias, 0, idx, optimizer)
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None:
                _permute(t, 0, idx, optimizer)
    for conv in group.consumers:
        _permute(conv.weight, 1, idx, optimizer)


def channel_groups(supernet: Supernet, stage_widths: bool) -> list[ChannelGroup]:
    """The mid-width groups of every block and, when `stage_widths`, the output width of every stage."""
    body = supernet.body
    groups = []
    for blocks in body.stages:
        for b in blocks:
            groups.append(ChannelGroup([(b.conv1, b.bn1)], [b.conv2]))
            if isinstance(b, Bottleneck):
                groups.append(ChannelGroup([(b.conv2, b.bn2)], [b.conv3]))
    if stage_widths:
        inner = supernet.model.backbone.fpn.inner_blocks
        for s, blocks in enumerate(body.stages):
            if len(supernet.space.out_choices(s)) < 2:
                continue
            producers = [(b.conv3, b.bn3) if isinstance(b, Bottleneck) else (b.conv2, b.bn2) for b in blocks]
            producers += [(b.downsample[0], b.downsample[1]) for b in blocks if b.downsample is not None]
            consumers = [b.conv1 for b in list(blocks)[1:]] + [inner[s][0]]
            if s + 1 < len(body.stages):
                nxt = body.stages[s + 1][0]
                consumers += [nxt.conv1] + ([nxt.downsample[0]] if nxt.downsample is not None else [])
            groups.append(ChannelGroup(producers, consumers))
    return groups


@torch.no_grad()
def sort_channels(supernet: Supernet, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Sort every elastic channel group by importance, most important first; returns groups moved.

    The largest member computes the same function afterwards (eval mode); optimizer state
    (momentum) moves with its parameters.
    """
    moved = 0
    for group in channel_groups(supernet, supernet.space.elastic_out):
        idx = torch.argsort(group.importance(), descending=True, stable=True)
        if not torch.equal(idx, torch.arange(len(idx), device=idx.device)):
            apply_permutation(group, idx, optimizer)
            moved += 1
    return moved
