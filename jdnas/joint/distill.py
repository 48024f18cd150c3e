"""Knowledge distillation for detectors (DESIGN §7).

Losses, selected by `train_student.kd_loss`:
- `fpn`: per FPN level, MSE between a 1x1 adapter of the student feature and the teacher's;
- `fpn_masked` (default): the same, averaged separately inside and outside the ground-truth
  boxes and weighted (`kd_fg_weight`, `kd_bg_weight`);
- `logits`: KL(teacher || student) of the RoI class scores on the student's sampled proposals.

The student runs its ordinary torchvision forward; forward hooks record what KD needs (the
resized image batch, the FPN features, the sampled proposals, the class logits), so the
teacher sees exactly the student's input. The teacher runs under no_grad (bf16 autocast on
CUDA). Adapters are a 1x1 conv where widths differ, identity where they agree.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdnas.errors import JdnasError
from jdnas.models.detector import FPN_LEVELS, Detector

KD_LOSSES = ("fpn", "fpn_masked", "logits")


# --- losses -----------------------------------------------------------------------------------
def make_adapters(student_channels: int, teacher_channels: int, levels: list[str] = FPN_LEVELS,
                  seed: int = 0) -> nn.ModuleDict:
    """One 1x1 conv per FPN level mapping student to teacher channels; identity when they agree.
    Initialised from `seed` alone (not torch's global RNG), so a resumed job rebuilds the same."""
    gen = torch.Generator().manual_seed(seed)

    def one() -> nn.Module:
        if student_channels == teacher_channels:
            return nn.Identity()
        conv = nn.Conv2d(student_channels, teacher_channels, 1)
        bound = (3.0 / student_channels) ** 0.5   # kaiming-uniform, gain 1
        with torch.no_grad():
            conv.weight.copy_(torch.rand(conv.weight.shape, generator=gen) * 2 * bound - bound)
            conv.bias.zero_()
        return conv
    return nn.ModuleDict({lvl: one() for lvl in levels})


def standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance per sample and channel over the map (as in PKD, Cao et al. 2022).

    The KD error then measures feature *patterns*, not magnitudes: a teacher whose FPN features
    are 20x larger than the student's (an elastic-pool member, say) would otherwise give an
    error of hundreds that swamps the detection loss and wrecks an inherited student.
    """
    x = x.float()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def _error(student: Tensor, teacher: Tensor) -> Tensor:
    """(N, h, w): squared error of standardized features, averaged over channels."""
    return (standardize(student) - standardize(teacher)).pow(2).mean(1)


def fpn_loss(student: dict[str, Tensor], teacher: dict[str, Tensor], adapters: nn.ModuleDict) -> Tensor:
    """Mean over levels of the MSE between standardized adapted-student and teacher features."""
    return torch.stack([_error(adapters[lvl](student[lvl]), teacher[lvl]).mean() for lvl in adapters]).mean()


def box_masks(boxes: list[Tensor], batch_hw: tuple[int, int], feat_hw: tuple[int, int]) -> Tensor:
    """(N, h, w) bool: feature pixels whose centre lies in a box (half-open), plus the pixel holding
    each box's centre so that no box is smaller than the map can see. Boxes are xyxy in the
    pixels of the (padded) batch of size `batch_hw`."""
    (H, W), (h, w) = batch_hw, feat_hw
    sy, sx = H / h, W / w
    device = boxes[0].device if boxes else torch.device("cpu")
    cy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * sy
    cx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * sx
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool, device=device)
    for n, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        b = b.float()
        inside_y = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])   # (B, h)
        inside_x = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])   # (B, w)
        masks[n] = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)
        ky = ((b[:, 1] + b[:, 3]) / 2 / sy).long().clamp(0, h - 1)
        kx = ((b[:, 0] + b[:, 2]) / 2 / sx).long().clamp(0, w - 1)
        masks[n, ky, kx] = True
    return masks


def fpn_masked_loss(student: dict[str, Tensor], teacher: dict[str, Tensor], adapters: nn.ModuleDict,
                    boxes: list[Tensor], batch_hw: tuple[int, int], fg_weight: float, bg_weight: float) -> Tensor:
    """Per level: fg_weight x mean squared error over pixels inside boxes + bg_weight x that outside;
    averaged over levels (the squared error of a pixel, on standardized features, is averaged over
    channels)."""
    losses = []
    for lvl in adapters:
        err = _error(adapters[lvl](student[lvl]), teacher[lvl])  # (N, h, w)
        fg = box_masks(boxes, batch_hw, tuple(err.shape[-2:])).float()
        bg = 1.0 - fg
        losses.append(fg_weight * (err * fg).sum() / fg.sum().clamp(min=1.0)
                      + bg_weight * (err * bg).sum() / bg.sum().clamp(min=1.0))
    return torch.stack(losses).mean()


def logits_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the class distributions at temperature T, times T^2, mean over RoIs."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


# --- the teacher ----------------------------------------------------------------------------
class Teacher:
    """A frozen detector in eval mode whose backbone + FPN (and box head) run under no_grad,
    with bf16 autocast on CUDA. Not an nn.Module, so its weights never reach an optimizer."""

    def __init__(self, model: Detector, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def features(self, batch: Tensor) -> dict[str, Tensor]:
        """FPN features (float32) of an already resized and normalised image batch."""
        with self._autocast():
            feats = self.model.backbone(batch)
        return {k: v.float() for k, v in feats.items()}

    @torch.no_grad()
    def class_logits(self, feats: dict[str, Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> Tensor:
        """RoI class logits (float32) on given proposals."""
        rh = self.model.roi_heads
        with self._autocast():
            x = rh.box_head(rh.box_roi_pool(feats, proposals, image_sizes))
            logits, _ = rh.box_predictor(x)
        return logits.float()


def check_compatible(student: Detector, teacher: Detector) -> None:
    """Teacher and student must see the same resized input and predict the same classes."""
    s, t = student.transform, teacher.transform
    if (s.min_size, s.max_size) != (t.min_size, t.max_size):
        raise JdnasError(f"teacher: resizes to min_size/max_size {t.min_size}/{t.max_size} but the student "
                         f"to {s.min_size}/{s.max_size}; their FPN maps would not line up")
    if list(s.image_mean) != list(t.image_mean) or list(s.image_std) != list(t.image_std):
        raise JdnasError("teacher: normalises images differently from the student")
    if student.head_cfg["num_classes"] != teacher.head_cfg["num_classes"]:
        raise JdnasError(f"teacher: predicts {teacher.head_cfg['num_classes']} classes, the student "
                         f"{student.head_cfg['num_classes']}")


# --- student + teacher ------------------------------------------------------------------------
class _Recorder:
    """Forward hooks on the student that keep what KD needs from one training forward."""

    def __init__(self, model: Detector, want_logits: bool) -> None:
        self.data: dict[str, Any] = {}
        self.handles = [
            model.transform.register_forward_hook(self._on("transform")),
            model.backbone.register_forward_hook(self._on("features")),
        ]
        if want_logits:
            self.handles += [
                model.roi_heads.box_roi_pool.register_forward_hook(self._on_inputs("roi_pool")),
                model.roi_heads.box_predictor.register_forward_hook(self._on("predictor")),
            ]

    def _on(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.data[name] = output
        return hook

    def _on_inputs(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.data[name] = inputs
        return hook

    def __enter__(self) -> dict[str, Any]:
        return self.data

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


class Distiller(nn.Module):
    """Holds the adapters (its trainable parameters) and computes detection + weighted KD losses.

    `loss_fn(model, images, targets)` is a drop-in `engine.train_detector` loss hook; pass the
    Distiller as `extra` so the adapters are optimised and checkpointed with the student.
    """

    def __init__(self, student: Detector, teacher: Teacher, kind: str = "fpn_masked", weight: float = 1.0,
                 fg_weight: float = 1.0, bg_weight: float = 0.5, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if kind not in KD_LOSSES:
            raise JdnasError(f"kd_loss: {kind!r} is not one of {', '.join(KD_LOSSES)}")
        check_compatible(student, teacher.model)
        self.teacher, self.kind, self.weight = teacher, kind, weight
        self.fg_weight, self.bg_weight, self.temperature = fg_weight, bg_weight, temperature
        channels = (student.backbone.out_channels, teacher.model.backbone.out_channels)
        self.adapters = make_adapters(*channels, seed=seed) if kind != "logits" else nn.ModuleDict()

    def loss_fn(self, model: Detector, images: list, targets: list) -> dict[str, Tensor]:
        """The student's detection losses plus `loss_kd` = weight x KD loss."""
        with _Recorder(model, want_logits=self.kind == "logits") as rec:
            losses = model(images, targets)
        image_list, targets_t = rec["transform"]
        t_feats = self.teacher.features(image_list.tensors)
        if self.kind == "fpn":
            kd = fpn_loss(rec["features"], t_feats, self.adapters)
        elif self.kind == "fpn_masked":
            kd = fpn_masked_loss(rec["features"], t_feats, self.adapters, [t["boxes"] for t in targets_t],
                                 tuple(image_list.tensors.shape[-2:]), self.fg_weight, self.bg_weight)
        else:
            _, proposals, image_sizes = rec["roi_pool"]
            student_logits, _ = rec["predictor"]
            teacher_logits = self.teacher.class_logits(t_feats, proposals, image_sizes)
            kd = logits_loss(student_logits, teacher_logits, self.temperature)
        return {**losses, "loss_kd": self.weight * kd}
