"""Student morphism: actions that map (parent Arch, parent state_dict) to (child Arch, child state_dict).

DESIGN §5. Every action is a pure function over a full-detector state_dict (keys
`backbone.body.*`, `backbone.fpn.*`, `rpn.*`, `roi_heads.*`); the child inherits every weight
it can, and the FPN / RPN / RoI heads are carried over (the FPN lateral conv is sliced when a
stage's output width changes). Stages are numbered 0..3 (outputs C2..C5), blocks from 0.

| action            | string          | change                                                      |
| deepen(s)         | `deepen(2)`     | add a block at the end of stage s (zero last-BN gamma: same function) |
| shallow(s, i)     | `shallow(2,1)`  | remove block i >= 1 of stage s                              |
| shift(s, +-1)     | `shift(1,+1)`   | +1: stage s gains a block, stage s+1 loses its last; -1: the reverse |
| prune(s, r)       | `prune(2,0.25)` | remove fraction r of each block's mid channels in stage s   |
| slim(s, r)        | `slim(3,0.25)`  | remove fraction r of stage s's output channels              |
| widen(s, r)       | `widen(1,0.5)`  | Net2Wider: add fraction r mid channels (same function)      |
| fpn_prune(r)      | `fpn_prune(0.5)`| remove fraction r of the FPN's channels (all levels; RPN head and box head follow) |
| head_prune(r)     | `head_prune(0.5)`| remove fraction r of the box head's hidden units (fc6, fc7) |
| resize(r)         | `resize(0.75)`  | scale the input size by r (snapped to the padding multiple, 32) |
| proposals(r)      | `proposals(0.5)`| remove fraction r of the test-time proposals                |

The last four act on the `Head` (`jdnas.models.arch.Head`), the first six on the backbone `Arch`.
Backbone channels are ranked by importance = L1 norm of the filter x |BN gamma|; where no BN
follows (FPN, RPN head, box head) by the L1 norm of the weights writing a channel x that of the
weights reading it. The most important are kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from jdnas.models.arch import Arch, Head, Stage
from jdnas.models.backbone import BLOCKS, _init_weights
from jdnas.models.detector import build_detector, snap_size
from jdnas.models.keys import BODY, BOX, FPN, FPN_INNER, PREDICTOR, RPN_CONV, RPN_HEADS

StateDict = dict[str, Tensor]
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
BACKBONE_KINDS = ("deepen", "shallow", "shift", "prune", "slim", "widen")
HEAD_KINDS = ("fpn_prune", "head_prune", "resize", "proposals")  # no stage: they act on the Head
KINDS = BACKBONE_KINDS + HEAD_KINDS
# the argument each kind takes after the stage (or alone, for head kinds), in its string form
_ARG = {"deepen": None, "shallow": "index", "shift": "step", "prune": "ratio", "slim": "ratio", "widen": "ratio",
        "fpn_prune": "ratio", "head_prune": "ratio", "resize": "ratio", "proposals": "ratio"}
# (producer conv, its BN, consumer conv) for each mid-channel link of a block
_MID_LINKS = {"basic": (("conv1", "bn1", "conv2"),),
              "bottleneck": (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))}
_LAST = {"basic": ("conv2", "bn2"), "bottleneck": ("conv3", "bn3")}
WIDEN_NOISE = 1e-2  # widen: relative size of the +-noise that breaks the copies' symmetry


# --- the action value --------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """One student action: a small hashable value with a string form (`prune(2,0.25)`,
    `fpn_prune(0.5)`) that parses back."""

    kind: str
    stage: int | None = None    # backbone kinds: 0..3; head kinds: None
    index: int | None = None    # shallow: the block removed
    step: int | None = None     # shift: +1 (stage s gains a block from s+1) or -1 (s gives one to s+1)
    ratio: float | None = None  # prune / slim / *_prune / proposals: fraction removed; widen: added; resize: scale

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action {self.kind!r}; actions: {', '.join(KINDS)}")
        if self.on_head:
            if self.stage is not None:
                raise ValueError(f"{self.kind} takes a ratio only (no stage)")
        elif self.stage is None or not 0 <= self.stage < 4:
            raise ValueError(f"{self.kind}: stage must be 0..3, got {self.stage}")
        arg = _ARG[self.kind]
        given = {k for k in ("index", "step", "ratio") if getattr(self, k) is not None}
        if given != ({arg} if arg else set()):
            raise ValueError(f"{self.kind} takes {_takes(self.kind)}")
        if self.kind == "shallow" and self.index < 1:
            raise ValueError("shallow: the first block of a stage (index 0) carries stride and projection; "
                             "remove an index >= 1")
        if self.kind == "shift" and (self.step not in (1, -1) or self.stage > 2):
            raise ValueError("shift takes a stage 0..2 and a step of +1 or -1")
        if self.kind in ("prune", "slim", "fpn_prune", "head_prune", "proposals", "resize") and not 0 < self.ratio < 1:
            raise ValueError(f"{self.kind}: ratio must be in (0, 1), got {self.ratio}")
        if self.kind == "widen" and not self.ratio > 0:
            raise ValueError(f"widen: ratio must be > 0, got {self.ratio}")

    @property
    def on_head(self) -> bool:
        return self.kind in HEAD_KINDS

    def __str__(self) -> str:
        arg = _ARG[self.kind]
        if arg is None:
            return f"{self.kind}({self.stage})"
        value = getattr(self, arg)
        text = f"{value:+d}" if arg == "step" else repr(value)
        return f"{self.kind}({text})" if self.on_head else f"{self.kind}({self.stage},{text})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Inverse of `str(action)`; ValueError with the reason on a malformed string."""
        m = re.fullmatch(r"\s*(\w+)\(\s*([+-]?[\d.eE+-]+)\s*(?:,\s*([+-]?[\d.eE+-]+)\s*)?\)\s*", text)
        if not m or m.group(1) not in KINDS:
            raise ValueError(f"not an action (expected e.g. deepen(2), shallow(2,1), shift(1,+1), prune(2,0.25), "
                             f"slim(3,0.25), widen(1,0.5), fpn_prune(0.5), head_prune(0.5), resize(0.75), "
                             f"proposals(0.5)): {text!r}")
        kind, first, second = m.group(1), m.group(2), m.group(3)
        arg = _ARG[kind]
        head = kind in HEAD_KINDS
        if (second is not None) if head else ((arg is None) != (second is None) or not first.isdigit()):
            raise ValueError(f"{kind} takes {_takes(kind)}: {text!r}")
        stage, raw = (None, first) if head else (int(first), second)
        if arg is None:
            return cls(kind, stage)
        try:
            value: Any = float(raw) if arg == "ratio" else int(raw)
        except ValueError:
            raise ValueError(f"{kind}: bad {arg} {raw!r} in {text!r}") from None
        return cls(kind, stage, **{arg: value})


def _takes(kind: str) -> str:
    """What an action kind takes, in words."""
    arg = _ARG[kind]
    return "a ratio only" if kind in HEAD_KINDS else ("stage, " + arg if arg else "a stage only")


# --- importance and tensor surgery ----------------------------------------------------------
def channel_importance(conv_weight: Tensor, bn_gamma: Tensor) -> Tensor:
    """Per output channel: L1 norm of its filter x |BN gamma|."""
    return conv_weight.detach().abs().flatten(1).sum(1) * bn_gamma.detach().abs()


def top_channels(importance: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` most important channels, in ascending channel order."""
    return torch.topk(importance, keep, sorted=False).indices.sort().values


def kept_count(channels: int, ratio: float) -> int:
    """Channels left after removing `ratio` of them (rounded; at least 1)."""
    return max(1, channels - int(round(ratio * channels)))


def _bp(stage: int, block: int) -> str:
    return f"{BODY}stages.{stage}.{block}."


def _take(t: Tensor, idx: Tensor, dim: int, groups: int | None) -> Tensor:
    """`t` indexed by `idx` along `dim`; with `groups`, along the groups of a (groups, -1) view of `dim`."""
    idx = idx.to(t.device)
    if groups is None:
        return t[(slice(None),) * dim + (idx,)]
    return t.unflatten(dim, (groups, -1))[(slice(None),) * dim + (idx,)].flatten(dim, dim + 1)


class _Surgery:
    """A child state_dict under construction plus its followers, each cut exactly as the weights are."""

    def __init__(self, sd: Mapping[str, Tensor], followers: Sequence[Mapping[str, Tensor]] = ()) -> None:
        """Start from copies of the parent dicts (followers checked against the weights' keys and shapes)."""
        for n, f in enumerate(followers):
            bad = [k for k, v in f.items() if k not in sd or tuple(v.shape) != tuple(sd[k].shape)]
            if bad:
                raise ValueError(f"follower {n}: {bad[0]!r} is not a state_dict key of the same shape "
                                 f"(followers hold a subset of the state_dict's keys, shaped like the weights)")
        self.parent, self.parents = sd, list(followers)
        self.sd, self.followers = dict(sd), [dict(f) for f in followers]

    def __getitem__(self, key: str) -> Tensor:
        """The child's current weight `key` (importance reads these, never the followers)."""
        return self.sd[key]

    def _dicts(self) -> tuple[StateDict, ...]:
        return (self.sd, *self.followers)

    def take(self, key: str, idx: Tensor, dim: int = 0, groups: int | None = None) -> None:
        """Keep indices `idx` along `dim` of `key` (see `_take` for `groups`) in the weights and every follower."""
        for d in self._dicts():
            if key in d:
                d[key] = _take(d[key], idx, dim, groups)

    def rename(self, old: str, new: str) -> None:
        """Move `old` to `new` everywhere (a follower lacking `old` ends up lacking `new`)."""
        for d in self._dicts():
            if old in d:
                d[new] = d.pop(old)
            else:
                d.pop(new, None)

    def drop(self, key: str) -> None:
        """Delete `key` from the weights and every follower."""
        for d in self._dicts():
            d.pop(key, None)

    def put(self, key: str, value: Tensor) -> None:
        """Set a weight computed anew: the followers lose `key` (it starts fresh)."""
        self.sd[key] = value
        for f in self.followers:
            f.pop(key, None)

    def result(self) -> tuple[StateDict, list[StateDict]]:
        """The child state_dict and followers, owning their tensors (see `_own`)."""
        return _own(self.sd, self.parent), [_own(f, p) for f, p in zip(self.followers, self.parents)]


def _slice_out(s: _Surgery, conv: str, bn: str, idx: Tensor) -> None:
    """Keep output channels `idx` of conv `conv` and its BN `bn` (key prefixes, no trailing dot)."""
    s.take(f"{conv}.weight", idx)
    for t in BN_TENSORS:
        s.take(f"{bn}.{t}", idx)


def _slice_in(s: _Surgery, weight_key: str, idx: Tensor) -> None:
    """Keep input channels `idx` of a conv / linear weight."""
    s.take(weight_key, idx, 1)


def _block_keys(sd: Mapping[str, Tensor], stage: int, block: int) -> list[str]:
    p = _bp(stage, block)
    return [k for k in sd if k.startswith(p)]


def _has_projection(sd: Mapping[str, Tensor], stage: int, block: int) -> bool:
    return f"{_bp(stage, block)}downsample.0.weight" in sd


def _renumber(s: _Surgery, stage: int, old: int, new: int) -> None:
    """Rename block `old` of `stage` to block `new`."""
    for k in _block_keys(s.sd, stage, old):
        s.rename(k, _bp(stage, new) + k[len(_bp(stage, old)):])


def _check(arch: Arch, sd: Mapping[str, Tensor]) -> None:
    for s, spec in enumerate(arch.stages):
        for i in range(spec.depth):
            if f"{_bp(s, i)}conv1.weight" not in sd:
                raise ValueError(f"state_dict lacks block {s}.{i} of {arch} (expected full-detector keys "
                                 f"'{BODY}stages.S.I.*')")
        if f"{_bp(s, spec.depth)}conv1.weight" in sd:
            raise ValueError(f"state_dict has more blocks in stage {s} than {arch}")


def _run(fn: Any, sd: Mapping[str, Tensor], *args: Any) -> tuple[Any, StateDict]:
    """Run a surgery action `fn(s, *args)` on `sd` alone -> (its result, the child state_dict)."""
    s = _Surgery(sd)
    out = fn(s, *args)
    return out, s.result()[0]


# --- the actions ---------------------------------------------------------------------------
# Each public action is a thin wrapper over a `_name(s: _Surgery, ...)` that cuts the weights
# (and so the followers) in place and returns the child Arch / Head.
def deepen(arch: Arch, sd: Mapping[str, Tensor], stage: int, seed: int = 0) -> tuple[Arch, StateDict]:
    """Add a block at the end of `stage` whose last BN has gamma = beta = 0: the function is unchanged."""
    return _run(_deepen, sd, arch, stage, seed)


def _deepen(s: _Surgery, arch: Arch, stage: int, seed: int) -> Arch:
    """deepen on a surgery: the new block's tensors are put (followers get no entry)."""
    _check(arch, s.sd)
    spec = arch.stages[stage]
    mid = spec.mids[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = BLOCKS[arch.block](spec.out, mid, spec.out, 1)
        _init_weights(block)
    torch.nn.init.zeros_(block.last_bn.weight)
    ref = s[f"{_bp(stage, 0)}conv1.weight"]
    for k, v in block.state_dict().items():
        dtype = v.dtype if k.endswith("num_batches_tracked") else ref.dtype
        s.put(_bp(stage, spec.depth) + k, v.to(device=ref.device, dtype=dtype))
    return arch.with_stage(stage, Stage(spec.out, spec.mids + (mid,)))


def shallow(arch: Arch, sd: Mapping[str, Tensor], stage: int, index: int) -> tuple[Arch, StateDict]:
    """Remove block `index` (>= 1) of `stage`; the blocks after it move up."""
    return _run(_shallow, sd, arch, stage, index)


def _shallow(s: _Surgery, arch: Arch, stage: int, index: int) -> Arch:
    """shallow on a surgery: the block's keys are dropped, the later blocks renamed."""
    _check(arch, s.sd)
    spec = arch.stages[stage]
    if not 1 <= index < spec.depth:
        raise ValueError(f"shallow({stage},{index}): stage {stage} of {arch} has blocks 0..{spec.depth - 1} "
                         f"and block 0 cannot be removed")
    for k in _block_keys(s.sd, stage, index):
        s.drop(k)
    for i in range(index + 1, spec.depth):
        _renumber(s, stage, i, i - 1)
    mids = spec.mids[:index] + spec.mids[index + 1:]
    return arch.with_stage(stage, Stage(spec.out, mids))


def shift(arch: Arch, sd: Mapping[str, Tensor], stage: int, step: int, seed: int = 0) -> tuple[Arch, StateDict]:
    """Move the split between `stage` and `stage + 1` by one block: shallow (last block) + deepen."""
    return _run(_shift, sd, arch, stage, step, seed)


def _shift(s: _Surgery, arch: Arch, stage: int, step: int, seed: int) -> Arch:
    """shift on a surgery: _shallow then _deepen."""
    if step not in (1, -1) or not 0 <= stage < 3:
        raise ValueError("shift takes a stage 0..2 and a step of +1 or -1")
    giver, taker = (stage + 1, stage) if step == 1 else (stage, stage + 1)
    depth = arch.stages[giver].depth
    if depth < 2:
        raise ValueError(f"shift({stage},{step:+d}): stage {giver} of {arch} has a single block to give")
    return _deepen(s, _shallow(s, arch, giver, depth - 1), taker, seed)


def prune(arch: Arch, sd: Mapping[str, Tensor], stage: int, ratio: float) -> tuple[Arch, StateDict]:
    """Remove `ratio` of the mid channels of every block in `stage`, keeping the most important."""
    return _run(_prune, sd, arch, stage, ratio)


def _prune(s: _Surgery, arch: Arch, stage: int, ratio: float) -> Arch:
    """prune on a surgery."""
    _check(arch, s.sd)
    spec = arch.stages[stage]
    mids = []
    for i, mid in enumerate(spec.mids):
        keep = kept_count(mid, ratio)
        p = _bp(stage, i)
        for producer, bn, consumer in _MID_LINKS[arch.block]:
            imp = channel_importance(s[f"{p}{producer}.weight"], s[f"{p}{bn}.weight"])
            idx = top_channels(imp, keep)
            _slice_out(s, p + producer, p + bn, idx)
            _slice_in(s, f"{p}{consumer}.weight", idx)
        mids.append(keep)
    return arch.with_stage(stage, Stage(spec.out, tuple(mids)))


def slim_width(arch: Arch, stage: int, ratio: float) -> int:
    """Output width of `stage` after slim(stage, ratio).

    Stage 0's first block has a projection exactly when its input (the stem) differs in width;
    a slimmed width equal to the stem's would drop that projection, so one more channel is kept.
    """
    out = arch.stages[stage].out
    keep = kept_count(out, ratio)
    if stage == 0 and arch.stem != out and keep == arch.stem:
        keep = keep + 1 if keep + 1 < out else keep - 1
    return max(1, keep)


def slim(arch: Arch, sd: Mapping[str, Tensor], stage: int, ratio: float) -> tuple[Arch, StateDict]:
    """Remove `ratio` of `stage`'s output channels: the same channels on every block's residual path,
    the next stage's first block input and the FPN lateral conv (and the stem when it feeds stage 0's
    identity shortcut)."""
    return _run(_slim, sd, arch, stage, ratio)


def _slim_importance(arch: Arch, sd: Mapping[str, Tensor], stage: int, stem_in_path: bool) -> Tensor:
    """Importance of `stage`'s output channels: summed over every conv + BN writing the residual path."""
    spec = arch.stages[stage]
    last_conv, last_bn = _LAST[arch.block]
    imp = torch.zeros(spec.out, device=sd[FPN_INNER.format(s=stage)].device)
    for i in range(spec.depth):
        p = _bp(stage, i)
        imp = imp + channel_importance(sd[f"{p}{last_conv}.weight"], sd[f"{p}{last_bn}.weight"])
        if _has_projection(sd, stage, i):
            imp = imp + channel_importance(sd[f"{p}downsample.0.weight"], sd[f"{p}downsample.1.weight"])
    if stem_in_path:
        imp = imp + channel_importance(sd[f"{BODY}stem.conv.weight"], sd[f"{BODY}stem.bn.weight"])
    return imp


def _slim(s: _Surgery, arch: Arch, stage: int, ratio: float) -> Arch:
    """slim on a surgery."""
    _check(arch, s.sd)
    spec = arch.stages[stage]
    keep = slim_width(arch, stage, ratio)
    last_conv, last_bn = _LAST[arch.block]
    sd = s.sd  # importance reads the weights before any cut; key tests stay valid after (no key moves)
    stem_in_path = stage == 0 and not _has_projection(sd, 0, 0)
    idx = top_channels(_slim_importance(arch, sd, stage, stem_in_path), keep)
    for i in range(spec.depth):
        p = _bp(stage, i)
        _slice_out(s, p + last_conv, p + last_bn, idx)
        if _has_projection(sd, stage, i):
            _slice_out(s, f"{p}downsample.0", f"{p}downsample.1", idx)
        if i > 0 or stem_in_path:
            _slice_in(s, f"{p}conv1.weight", idx)
    if stem_in_path:
        _slice_out(s, f"{BODY}stem.conv", f"{BODY}stem.bn", idx)
    if stage < 3:
        p = _bp(stage + 1, 0)
        _slice_in(s, f"{p}conv1.weight", idx)
        if _has_projection(sd, stage + 1, 0):
            _slice_in(s, f"{p}downsample.0.weight", idx)
    _slice_in(s, FPN_INNER.format(s=stage), idx)
    child = arch.with_stage(stage, Stage(keep, spec.mids))
    if stem_in_path:
        child = Arch(child.block, keep, child.stages)
    return child


def widen(arch: Arch, sd: Mapping[str, Tensor], stage: int, ratio: float, seed: int = 0,
          noise: float = WIDEN_NOISE) -> tuple[Arch, StateDict]:
    """Net2Wider: add `ratio` x mid channels to every block of `stage` by copying the most important
    ones; the consumer's weights are split between the copies (plus a small +-noise that cancels,
    to break their symmetry), so the function is unchanged."""
    return _run(_widen, sd, arch, stage, ratio, seed, noise)


def _widen(s: _Surgery, arch: Arch, stage: int, ratio: float, seed: int, noise: float) -> Arch:
    """widen on a surgery: every tensor it changes is put (computed anew: followers drop it)."""
    _check(arch, s.sd)
    spec = arch.stages[stage]
    gen = torch.Generator().manual_seed(seed)
    mids = []
    for i, mid in enumerate(spec.mids):
        add = max(1, int(round(ratio * mid)))
        p = _bp(stage, i)
        for producer, bn, consumer in _MID_LINKS[arch.block]:
            imp = channel_importance(s[f"{p}{producer}.weight"], s[f"{p}{bn}.weight"])
            order = torch.argsort(imp.cpu(), descending=True)
            src = order[torch.arange(add) % mid]                 # channels copied, most important first
            mapping = torch.cat([torch.arange(mid), src]).to(imp.device)
            counts = torch.bincount(mapping, minlength=mid).to(s[f"{p}{consumer}.weight"].dtype)
            for k in [f"{p}{producer}.weight"] + [f"{p}{bn}.{t}" for t in BN_TENSORS]:
                s.put(k, s[k][mapping])
            w = s[f"{p}{consumer}.weight"]
            w = w[:, mapping] / counts[mapping].view(1, -1, *([1] * (w.ndim - 2)))
            eps = noise * w[:, mid:].std() * torch.randn(w[:, mid:].shape, generator=gen).to(w)
            w[:, mid:] += eps
            w.index_add_(1, src.to(w.device), -eps)
            s.put(f"{p}{consumer}.weight", w)
        mids.append(mid + add)
    return arch.with_stage(stage, Stage(spec.out, tuple(mids)))


# --- head actions ------------------------------------------------------------------------------


def _l1_rows(w: Tensor) -> Tensor:
    return w.detach().abs().flatten(1).sum(1)


def _fpn_levels(sd: Mapping[str, Tensor]) -> list[int]:
    return sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{FPN}inner_blocks.")})


def fpn_prune(head: Head, sd: Mapping[str, Tensor], ratio: float) -> tuple[Head, StateDict]:
    """Remove `ratio` of the FPN's channels: the same channels at every level (their top-down sums
    line up); the RPN head's conv (whose width is the FPN's) and the box head's fc6 input follow.
    A channel's importance is the L1 norm of the filters writing it (lateral and output convs)
    x that of the weights reading it (RPN conv, fc6): a channel nothing downstream reads is free
    to drop, however large its filters."""
    (child, _), out = _run(_fpn_prune, sd, head, ratio)
    return child, out


def _fpn_importance(head: Head, sd: Mapping[str, Tensor]) -> Tensor:
    """Per FPN channel: L1 of the filters writing it x L1 of the weights reading it (see fpn_prune)."""
    fc6 = sd[f"{BOX}fc6.weight"]
    fc6_in = fc6.detach().abs().view(fc6.shape[0], head.fpn, -1).sum((0, 2))
    writes = sum(_l1_rows(sd[f"{FPN}inner_blocks.{i}.0.weight"]) + _l1_rows(sd[f"{FPN}layer_blocks.{i}.0.weight"])
                 for i in _fpn_levels(sd))
    reads = _l1_rows(sd[f"{RPN_CONV}.weight"].transpose(0, 1)) / head.fpn + fc6_in / fc6.shape[0]
    return writes * reads


def _fpn_prune(s: _Surgery, head: Head, ratio: float) -> tuple[Head, Tensor]:
    """fpn_prune on a surgery -> (child Head, the kept parent FPN channels, ascending)."""
    keep = kept_count(head.fpn, ratio)
    idx = top_channels(_fpn_importance(head, s.sd), keep)
    for i in _fpn_levels(s.sd):
        for block in ("inner_blocks", "layer_blocks"):
            p = f"{FPN}{block}.{i}.0."
            s.take(p + "weight", idx)
            if block == "layer_blocks":
                s.take(p + "weight", idx, 1)
            s.take(p + "bias", idx)
    s.take(f"{RPN_CONV}.weight", idx, 1)
    ridx = top_channels(_l1_rows(s[f"{RPN_CONV}.weight"]) * sum(_l1_rows(s[k].transpose(0, 1)) for k in RPN_HEADS),
                        keep)
    s.take(f"{RPN_CONV}.weight", ridx)
    s.take(f"{RPN_CONV}.bias", ridx)
    for k in RPN_HEADS:
        s.take(k, ridx, 1)
    s.take(f"{BOX}fc6.weight", idx, 1, groups=head.fpn)
    return replace(head, fpn=keep), idx


def head_prune(head: Head, sd: Mapping[str, Tensor], ratio: float) -> tuple[Head, StateDict]:
    """Remove `ratio` of the box head's hidden units in fc6 and fc7, each unit ranked by the L1
    norm of its incoming weights x that of its outgoing weights."""
    return _run(_head_prune, sd, head, ratio)


def _head_prune(s: _Surgery, head: Head, ratio: float) -> Head:
    """head_prune on a surgery."""
    keep = kept_count(head.rep, ratio)
    idx6 = top_channels(_l1_rows(s[f"{BOX}fc6.weight"]) * _l1_rows(s[f"{BOX}fc7.weight"].t()), keep)
    s.take(f"{BOX}fc6.weight", idx6)
    s.take(f"{BOX}fc6.bias", idx6)
    s.take(f"{BOX}fc7.weight", idx6, 1)
    idx7 = top_channels(_l1_rows(s[f"{BOX}fc7.weight"]) * sum(_l1_rows(s[k].t()) for k in PREDICTOR), keep)
    s.take(f"{BOX}fc7.weight", idx7)
    s.take(f"{BOX}fc7.bias", idx7)
    for k in PREDICTOR:
        s.take(k, idx7, 1)
    return replace(head, rep=keep)


def child_head(action: Action, head: Head) -> Head:
    """The Head after a head action (weights aside)."""
    if action.kind == "fpn_prune":
        return replace(head, fpn=kept_count(head.fpn, action.ratio))
    if action.kind == "head_prune":
        return replace(head, rep=kept_count(head.rep, action.ratio))
    if action.kind == "proposals":
        return replace(head, proposals=kept_count(head.proposals, action.ratio))
    if action.kind == "resize":
        small = snap_size(head.min_size * action.ratio)
        return replace(head, min_size=small, max_size=max(small, int(round(head.max_size * small / head.min_size))))
    raise ValueError(f"{action} is not a head action")


def child(action: Action, arch: Arch, head: Head) -> tuple[Arch, Head]:
    """The (Arch, Head) of the student after `action` (weights aside)."""
    return (arch, child_head(action, head)) if action.on_head else (child_arch(action, arch), head)


def _parse(action: Action | str) -> Action:
    return Action.parse(action) if isinstance(action, str) else action


def _head_action(a: Action, head: Head, s: _Surgery) -> tuple[Head, Tensor | None]:
    """A head action on a surgery -> (child Head, the kept FPN channels for fpn_prune, else None)."""
    child = child_head(a, head)
    if child == head:
        raise ValueError(f"{a}: leaves {head} unchanged")
    if a.kind == "fpn_prune":
        return _fpn_prune(s, head, a.ratio)
    if a.kind == "head_prune":
        return _head_prune(s, head, a.ratio), None
    return child, None


def _backbone_action(a: Action, arch: Arch, s: _Surgery, seed: int) -> Arch:
    """A backbone action on a surgery -> the child Arch."""
    if a.on_head:
        raise ValueError(f"{a} acts on the head: use apply_head_action")
    if a.kind == "deepen":
        return _deepen(s, arch, a.stage, seed)
    if a.kind == "shallow":
        return _shallow(s, arch, a.stage, a.index)
    if a.kind == "shift":
        return _shift(s, arch, a.stage, a.step, seed)
    if a.kind == "prune":
        return _prune(s, arch, a.stage, a.ratio)
    if a.kind == "slim":
        return _slim(s, arch, a.stage, a.ratio)
    return _widen(s, arch, a.stage, a.ratio, seed, WIDEN_NOISE)


def apply_head_action(action: Action | str, head: Head, sd: Mapping[str, Tensor]) -> tuple[Head, StateDict]:
    """Apply a head action to (Head, full-detector state_dict): FPN and box-head widths slice the
    weights; resize and proposals change no weight (the fine-tune adapts)."""
    (child, _), out = _run(lambda s: _head_action(_parse(action), head, s), sd)
    return child, out


def _own(out: StateDict, parent: Mapping[str, Tensor]) -> StateDict:
    """The child holds its own tensors: nothing it shares with the parent's state_dict can be mutated
    (under any key: shallow's renamed blocks included)."""
    ids = {id(v) for v in parent.values()}
    return {k: v.clone() if id(v) in ids else v for k, v in out.items()}


def apply_action(action: Action | str, arch: Arch, sd: Mapping[str, Tensor], seed: int = 0) -> tuple[Arch, StateDict]:
    """Apply one action to (arch, full-detector state_dict) -> (child arch, child state_dict)."""
    return _run(lambda s: _backbone_action(_parse(action), arch, s, seed), sd)


def apply_with_followers(action: Action | str, arch: Arch, head: Head, sd: Mapping[str, Tensor],
                         followers: Sequence[Mapping[str, Tensor]] = (), seed: int = 0,
                         ) -> tuple[Arch, Head, StateDict, list[StateDict], Tensor | None]:
    """Any action on (arch, head, state_dict) carrying `followers` along -> (child arch, child head,
    child state_dict, the followers cut alike, the kept parent FPN channels for fpn_prune or None).

    A follower is a dict keyed like (a subset of) the state_dict, each tensor shaped like its weight
    (e.g. SGD momentum buffers by parameter name). Every slice, rename and deletion of a weight is
    applied to it; a weight computed anew (deepen's block, widen's changed tensors) leaves it without
    that key. Importance reads the weights only; the child owns all its tensors."""
    a = _parse(action)
    s = _Surgery(sd, followers)
    idx = None
    if a.on_head:
        head, idx = _head_action(a, head, s)
    else:
        arch = _backbone_action(a, arch, s, seed)
    out, fol = s.result()
    return arch, head, out, fol, idx


def morph_detector(model: Any, action: Action | str, seed: int = 0) -> Any:
    """A new detector built from `model` by `action`, with inherited weights."""
    a = Action.parse(action) if isinstance(action, str) else action
    if a.on_head:
        head, sd = apply_head_action(a, Head.of(model.head_cfg), model.state_dict())
        child = build_detector(model.arch, head.apply(model.head_cfg))
    else:
        arch, sd = apply_action(a, model.arch, model.state_dict(), seed)
        child = build_detector(arch, model.head_cfg)
    child.load_state_dict(sd)
    return child


# --- the legal action space ----------------------------------------------------------------
def child_arch(action: Action, arch: Arch) -> Arch:
    """The child Arch of an action, computed without weights."""
    s = arch.stages[action.stage]
    if action.kind == "deepen":
        return arch.with_stage(action.stage, Stage(s.out, s.mids + (s.mids[-1],)))
    if action.kind == "shallow":
        return arch.with_stage(action.stage, Stage(s.out, s.mids[:action.index] + s.mids[action.index + 1:]))
    if action.kind == "shift":
        giver, taker = (action.stage + 1, action.stage) if action.step == 1 else (action.stage, action.stage + 1)
        g = arch.stages[giver]
        arch = arch.with_stage(giver, Stage(g.out, g.mids[:-1]))
        t = arch.stages[taker]
        return arch.with_stage(taker, Stage(t.out, t.mids + (t.mids[-1],)))
    if action.kind == "prune":
        return arch.with_stage(action.stage, Stage(s.out, tuple(kept_count(m, action.ratio) for m in s.mids)))
    if action.kind == "widen":
        return arch.with_stage(action.stage, Stage(s.out, tuple(m + max(1, int(round(action.ratio * m)))
                                                                for m in s.mids)))
    keep = slim_width(arch, action.stage, action.ratio)
    child = arch.with_stage(action.stage, Stage(keep, s.mids))
    if action.stage == 0 and arch.stem == s.out:
        child = Arch(child.block, keep, child.stages)
    return child


def is_legal(action: Action, arch: Arch, bounds: Mapping[str, Any], head: Head | None = None,
             base_head: Head | None = None) -> bool:
    """Whether `action` is enabled by `bounds` (the `search_space` params) and keeps the student
    within them; head actions need the student's `head` and the base's (their bounds are ratios
    of the base's)."""
    if action.kind not in bounds["actions"]:
        return False
    if action.on_head:
        return head is not None and base_head is not None and _head_legal(action, head, base_head, bounds)
    depths, s = arch.depths, action.stage
    lo, hi = bounds["min_depth"], bounds["max_depth"]
    if action.kind in ("deepen", "shallow", "shift"):
        if action.kind == "shallow" and not 1 <= action.index < depths[s]:
            return False
        if action.kind == "shift" and arch.stages[action.stage + (1 if action.step == 1 else 0)].depth < 2:
            return False
        child = child_arch(action, arch)
        return child != arch and all(lo[i] <= d <= hi[i] for i, d in enumerate(child.depths)
                                     if d != depths[i])
    ratios = bounds[f"{action.kind}_ratios"]
    if action.ratio not in ratios:
        return False
    child = child_arch(action, arch)
    if child == arch:
        return False
    if action.kind == "prune":
        return min(child.stages[s].mids) >= bounds["min_width"]
    if action.kind == "slim":
        return child.stages[s].out >= bounds["min_width"] and child.stem >= bounds["min_width"]
    return max(child.stages[s].mids) <= bounds["max_width"]


def _head_legal(action: Action, head: Head, base: Head, bounds: Mapping[str, Any]) -> bool:
    if action.ratio not in bounds[f"{action.kind}_ratios"]:
        return False
    child = child_head(action, head)
    lo = bounds["min_head_ratio"]
    return child != head and (child.fpn >= lo * base.fpn and child.rep >= lo * base.rep
                              and child.proposals >= lo * base.proposals
                              and child.min_size >= bounds["min_input_ratio"] * base.min_size)


def legal_actions(arch: Arch, bounds: Mapping[str, Any], head: Head | None = None,
                  base_head: Head | None = None) -> list[Action]:
    """Every enabled action that keeps the student within the search-space bounds, in a stable
    order: backbone actions, then (given the student's and the base's Head) head actions."""
    candidates: list[Action] = []
    for s in range(4):
        candidates.append(Action("deepen", s))
        candidates += [Action("shallow", s, index=i) for i in range(1, arch.stages[s].depth)]
        if s < 3:
            candidates += [Action("shift", s, step=1), Action("shift", s, step=-1)]
        for kind in ("prune", "slim", "widen"):
            candidates += [Action(kind, s, ratio=float(r)) for r in bounds[f"{kind}_ratios"]]
    if head is not None:
        candidates += [Action(kind, ratio=float(r)) for kind in HEAD_KINDS for r in bounds[f"{kind}_ratios"]]
    return [a for a in candidates if is_legal(a, arch, bounds, head, base_head)]
