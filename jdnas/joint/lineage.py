"""One student trained along one schedule (DESIGN §8): what a search hands from round to round.

A lineage is the student detector plus where it stands in the search's lr schedule, its SGD
momentum (by parameter name) and its KD adapters. A move (one or more morphism actions) maps
all three to the child with the weights' own channel indices, so the child continues the
schedule instead of restarting it: no second warm-up, no momentum lost, no random adapter.
On disk: `<dir>/student.pt` (a detector checkpoint, `jdnas.load_detector` reads it alone) and
`<dir>/lineage.pt` (the rest).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jdnas.data.dataset import CocoDetection
from jdnas.engine.loop import detection_loss, train_detector
from jdnas.errors import JdnasError
from jdnas.io import save_torch
from jdnas.joint.distill import Distiller, Teacher
from jdnas.models.arch import Head
from jdnas.models.detector import FPN_LEVELS, Detector, build_detector, load_detector, save_detector, set_input_size
from jdnas.models.morphism import Action, apply_with_followers

LINEAGE_FORMAT = "jdnas-lineage/1"
ADAPTER = re.compile(r"adapters\.([^.]+)\.(weight|bias)")
KD_KEYS = ("kd_loss", "kd_weight", "kd_fg_weight", "kd_bg_weight", "kd_temperature")


@dataclass
class Lineage:
    """A student at iteration `it` of its schedule, with the optimizer and KD state it trains on."""

    model: Detector
    it: int = 0
    teacher: str = ""                                            # the teacher's genome (jdnas.joint.search)
    momentum: dict[str, Tensor] = field(default_factory=dict)    # SGD buffers; KD adapters' as extra.adapters.*
    adapters: dict[str, Tensor] = field(default_factory=dict)    # Distiller.state_dict()


def parse_moves(text: str) -> list[Action]:
    """`prune(2,0.25)+fpn_prune(0.25)` -> its actions; `none` or "" -> []."""
    text = text.strip()
    if text in ("", "none"):
        return []
    try:
        return [Action.parse(t) for t in re.split(r"(?<=\))\s*\+", text)]  # not shift(0,+1)'s sign
    except ValueError as e:
        raise JdnasError(f"move {text!r}: {e}") from None


def moves_text(moves: list[Action]) -> str:
    return "+".join(map(str, moves)) or "none"


def save_lineage(d: str | Path, lin: Lineage, **meta: Any) -> None:
    """`d/student.pt` (the detector, with `meta`) and `d/lineage.pt`, each written atomically."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    save_detector(d / "student.pt", lin.model.cpu(), teacher=lin.teacher, iteration=lin.it, **meta)
    save_torch(d / "lineage.pt", {"format": LINEAGE_FORMAT, "it": lin.it, "teacher": lin.teacher,
                                  "momentum": lin.momentum, "adapters": lin.adapters})


def load_lineage(d: str | Path) -> Lineage:
    """The lineage saved in `d`; a detector checkpoint alone (a base) starts one at iteration 0."""
    d = Path(d)
    model = load_detector(d / "student.pt")
    path = d / "lineage.pt"
    if not path.is_file():
        return Lineage(model)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JdnasError(f"{path}: unreadable lineage state ({type(e).__name__}); delete it to rerun its round") \
            from None
    if not isinstance(state, dict) or state.get("format") != LINEAGE_FORMAT:
        raise JdnasError(f"{path}: not a jdnas lineage state (format {LINEAGE_FORMAT})")
    return Lineage(model, int(state["it"]), str(state["teacher"]), dict(state["momentum"]), dict(state["adapters"]))


def _split_momentum(momentum: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    model = {k: v for k, v in momentum.items() if not k.startswith("extra.")}
    extra = {k[len("extra."):]: v for k, v in momentum.items() if k.startswith("extra.")}
    return model, extra


def _slice_adapters(tensors: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """Adapters (and their momentum) after the student's FPN kept channels `idx`: each 1x1 conv
    keeps the input columns of those channels."""
    out = {}
    for k, v in tensors.items():
        m = ADAPTER.fullmatch(k)
        out[k] = v[:, idx].clone() if m and m.group(2) == "weight" else v.clone()
    return out


def _identity_adapters(levels: list[str], idx: Tensor, channels: int) -> dict[str, Tensor]:
    """Identity adapters after the FPN kept `idx` of its `channels`: the 1x1 convs that put the
    kept channels where they were (the same adapted features, less the dropped channels)."""
    eye = torch.eye(channels)[:, idx].reshape(channels, len(idx), 1, 1)
    return {**{f"adapters.{lvl}.weight": eye.clone() for lvl in levels},
            **{f"adapters.{lvl}.bias": torch.zeros(channels) for lvl in levels}}


def apply_moves(lin: Lineage, moves: list[Action], seed: int = 0) -> Lineage:
    """The child lineage after `moves`: weights inherited (jdnas.models.morphism), momentum and KD
    adapters sliced with the weights' channel indices; what an action creates anew starts fresh."""
    model, momentum = lin.model, dict(lin.momentum)
    adapters = dict(lin.adapters)
    for a in moves:
        head = Head.of(model.head_cfg)
        mom_model, mom_extra = _split_momentum(momentum)
        arch, child_head, sd, (mom_model,), idx = apply_with_followers(a, model.arch, head, model.state_dict(),
                                                                      [mom_model], seed)
        if idx is not None:  # the FPN lost channels: the adapters' inputs follow
            if adapters:
                adapters, mom_extra = _slice_adapters(adapters, idx), _slice_adapters(mom_extra, idx)
            else:  # identity adapters (student and teacher FPN widths agreed)
                adapters, mom_extra = _identity_adapters(FPN_LEVELS, idx, head.fpn), {}
        model = build_detector(arch, child_head.apply(model.head_cfg))
        model.load_state_dict(sd)
        momentum = {**mom_model, **{f"extra.{k}": v for k, v in mom_extra.items()}}
    return replace(lin, model=model, momentum=momentum, adapters=adapters)


@dataclass(frozen=True)
class Recipe:
    """How a lineage trains: the lr schedule over the whole lineage (`cfg['iters']` = its length)
    and the KD settings (`train_student`'s keys)."""

    cfg: dict
    kd: dict

    @classmethod
    def of(cls, train_student: dict, iters: int) -> "Recipe":
        cfg = {**train_student, "iters": iters}
        return cls(cfg, {k: train_student[k] for k in KD_KEYS})


def train_segment(lin: Lineage, teacher: Detector | None, dataset: CocoDetection, recipe: Recipe, until: int,
                  seed: int, state_path: Path, device: torch.device, fingerprint: str,
                  desc: str = "search") -> tuple[Lineage, dict[str, Any]]:
    """Train the lineage's student from `lin.it` to `until` with KD from `teacher` (None or
    kd_weight 0: none), resuming from `state_path` after a kill; the lineage at `until` and the
    training summary."""
    model = lin.model
    kd = recipe.kd
    distiller, loss_fn = None, detection_loss
    if teacher is not None and kd["kd_weight"] > 0:
        t = Teacher(set_input_size(teacher, model.head_cfg), device)  # the teacher sees the student's input
        distiller = Distiller(model, t, kd["kd_loss"], kd["kd_weight"], kd["kd_fg_weight"], kd["kd_bg_weight"],
                              kd["kd_temperature"], seed)
        own = distiller.state_dict()
        if lin.adapters and all(k in own and own[k].shape == v.shape for k, v in lin.adapters.items()) \
                and set(lin.adapters) == set(own):
            distiller.load_state_dict(lin.adapters)
        loss_fn = distiller.loss_fn
    model.train()
    summary = train_detector(model, dataset, recipe.cfg, state_path, seed, device, fingerprint, loss_fn=loss_fn,
                             desc=desc, extra=distiller, first=lin.it, until=until, momentum=lin.momentum)
    momentum = summary.pop("momentum")
    if distiller is None:  # the adapters and their momentum wait for the next segment with KD
        momentum.update({k: v for k, v in lin.momentum.items() if k.startswith("extra.")})
    adapters = {k: v.cpu() for k, v in distiller.state_dict().items()} if distiller is not None else lin.adapters
    return replace(lin, model=model, it=summary["iters"], momentum=momentum, adapters=adapters), summary
