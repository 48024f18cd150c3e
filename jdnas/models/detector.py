"""Faster R-CNN + FPN from torchvision's parts, on a backbone built from an `Arch`.

Head sizes come from the `model` params section, so a CPU run can be small and a COCO run
standard. A checkpoint holds the Arch JSON and the head config beside the state_dict and
loads with `torch.load(weights_only=True)`; `load_detector(path)` rebuilds it in one call.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from jdnas.errors import JdnasError, short
from jdnas.io import save_torch
from jdnas.models.arch import Arch
from jdnas.models.backbone import ResNetBackbone
from jdnas.models.bounds import HEAD_RANGES, MAX_CLASSES, MAX_DEPTH, MAX_INPUT, MAX_PARAMS, MAX_WIDTH
from jdnas.models.roi_align import FastMultiScaleRoIAlign
from jdnas.seeding import step_seed

CHECKPOINT_FORMAT = "jdnas-detector/1"
# model params that describe the head (everything but the base arch choice)
HEAD_KEYS = (
    "fpn_channels", "min_size", "max_size", "anchor_sizes",
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
    "representation_size", "box_detections_per_img", "box_score_thresh",
)
FPN_LEVELS = ["0", "1", "2", "3"]
SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads the batch to a multiple of this


def snap_size(size: float) -> int:
    """An input size rounded to the padding multiple (a size in between would be padded up anyway)."""
    return max(SIZE_DIVISIBLE, int(round(size / SIZE_DIVISIBLE)) * SIZE_DIVISIBLE)




def estimate_params(arch: Arch, fpn_channels: int, representation_size: int, num_classes: int = 91) -> int:
    """An upper estimate of a detector's parameter count, from its sizes alone (nothing built)."""
    conv = arch.stem * 3 * 49
    cin = arch.stem
    for st in arch.stages:
        for mid in st.mids:
            if arch.block == "bottleneck":
                conv += cin * mid + mid * mid * 9 + mid * st.out
            else:
                conv += cin * mid * 9 + mid * st.out * 9
            conv += cin * st.out  # a projection shortcut (counted on every block: an upper estimate)
            cin = st.out
    f, r = int(fpn_channels), int(representation_size)
    fpn = sum(out * f + f * f * 9 for out in arch.widths)
    rpn = f * f * 9 + f * 15
    box = f * 49 * r + r * r + r * int(num_classes) * 5
    return int(conv + fpn + rpn + box)


def check_arch(arch: Arch, where: str) -> None:
    """A JdnasError naming `where` if the Arch's widths or depths are beyond what jdnas builds."""
    widths = (arch.stem, *(s.out for s in arch.stages), *(m for s in arch.stages for m in s.mids))
    if max(widths) > MAX_WIDTH:
        raise JdnasError(f"{where}: a width of {max(widths)} channels is above the limit {MAX_WIDTH}")
    if max(arch.depths) > MAX_DEPTH:
        raise JdnasError(f"{where}: a stage of {max(arch.depths)} blocks is above the limit {MAX_DEPTH}")


def check_size(arch: Arch, fpn_channels: int, representation_size: int, num_classes: int, where: str) -> None:
    """`check_arch`, then the whole detector's estimated parameter count against MAX_PARAMS."""
    check_arch(arch, where)
    n = estimate_params(arch, fpn_channels, representation_size, num_classes)
    if n > MAX_PARAMS:
        raise JdnasError(f"{where}: about {n / 1e9:.1f}G parameters ({4 * n / 2**30:.0f} GiB of weights), above the "
                         f"limit of {MAX_PARAMS / 1e9:.0f}G: lower the widths, fpn_channels or representation_size")


def check_head(head: Any, where: str) -> dict[str, Any]:
    """A checkpoint's head config checked against the params' bounds (jdnas.models.bounds), before
    anything is built; returns it with lists for tuples."""
    if not isinstance(head, dict):
        raise JdnasError(f"{where}: head: not a mapping")
    head = {k: list(v) if isinstance(v, tuple) else v for k, v in head.items()}
    for k in (*HEAD_KEYS, "num_classes"):
        if k not in head:
            raise JdnasError(f"{where}: head: missing key '{k}'")
    for k, (lo, hi) in HEAD_RANGES.items():
        if not _int_in(head[k], lo, hi):
            raise JdnasError(f"{where}: head.{k} = {short(head[k])} is not allowed: must be an integer in [{lo}, {hi}]")
    anchors = head["anchor_sizes"]
    if not (isinstance(anchors, list) and len(anchors) == 5 and all(_int_in(a, 1, 2 * MAX_INPUT) for a in anchors)
            and all(a < b for a, b in zip(anchors, anchors[1:]))):
        raise JdnasError(f"{where}: head.anchor_sizes = {short(anchors)} is not allowed: must be 5 increasing integers "
                         f"in [1, {2 * MAX_INPUT}]")
    t = head["box_score_thresh"]
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0):
        raise JdnasError(f"{where}: head.box_score_thresh = {short(t)} is not allowed: must be a number in [0.0, 1.0]")
    n = head["num_classes"]
    if not _int_in(n, 2, MAX_CLASSES + 1):
        raise JdnasError(f"{where}: head.num_classes = {short(n)} is not allowed: must be an integer in "
                         f"[2, {MAX_CLASSES + 1}] (background included)")
    if head["min_size"] > head["max_size"]:
        raise JdnasError(f"{where}: head.min_size = {head['min_size']} is above head.max_size = {head['max_size']}")
    return head


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_state_dict(sd: Any, where: str) -> None:
    """Weights must be tensors of a floating dtype (integer buffers only for BatchNorm's
    num_batches_tracked) whose every value is finite: a NaN, inf or int64 weight is a poisoned
    checkpoint. The first bad tensor is named."""
    if not isinstance(sd, dict):
        raise JdnasError(f"{where}: state_dict: not a mapping of names to tensors (got {type(sd).__name__})")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise JdnasError(f"{where}: state_dict: entry {str(k)[:100]!r} is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            if k.endswith("num_batches_tracked") and not v.is_complex():
                continue
            raise JdnasError(f"{where}: state_dict: {k}: dtype {str(v.dtype).replace('torch.', '')}, expected a "
                             "floating-point weight (a damaged or foreign checkpoint)")
        if v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            kind = "NaN" if bool(torch.isnan(v).any()) else "inf"
            raise JdnasError(f"{where}: state_dict: {k}: {bad} of {v.numel()} values are non-finite ({kind}): a "
                             "poisoned checkpoint (a diverged training?); use an earlier checkpoint or retrain")


def head_config(model_params: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The head part of the `model` params plus the class count (background included)."""
    cfg = {k: model_params[k] for k in HEAD_KEYS}
    cfg["num_classes"] = int(num_classes)
    return cfg


class BackboneWithFPN(nn.Module):
    """Backbone body + torchvision FPN on C2..C5 (+ max-pool P6): levels "0".."3", "pool"."""

    def __init__(self, arch: Arch, fpn_channels: int) -> None:
        super().__init__()
        self.body = ResNetBackbone(arch)
        self.fpn = FeaturePyramidNetwork(self.body.out_channels_list, fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "dict[str, torch.Tensor]":
        return self.fpn(self.body(x))


class Detector(FasterRCNN):
    """torchvision FasterRCNN that remembers its Arch and head config."""

    arch: Arch
    head_cfg: dict[str, Any]


def build_detector(arch: Arch, head_cfg: dict[str, Any]) -> Detector:
    """A Faster R-CNN + FPN detector with the given backbone Arch and head config."""
    c = head_cfg
    backbone = BackboneWithFPN(arch, c["fpn_channels"])
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in c["anchor_sizes"][:5]),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    pooler = FastMultiScaleRoIAlign(featmap_names=FPN_LEVELS, output_size=7, sampling_ratio=2)
    rep = c["representation_size"]
    model = Detector(
        backbone,
        num_classes=None,
        min_size=c["min_size"], max_size=c["max_size"],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=c["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=c["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=c["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=c["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=c["rpn_batch_size_per_image"],
        box_roi_pool=pooler,
        box_head=TwoMLPHead(c["fpn_channels"] * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, c["num_classes"]),
        box_batch_size_per_image=c["box_batch_size_per_image"],
        box_detections_per_img=c["box_detections_per_img"],
        box_score_thresh=c["box_score_thresh"],
    )
    model.arch = arch
    model.head_cfg = dict(c)
    return model


def set_input_size(model: Detector, head_cfg: dict[str, Any]) -> Detector:
    """Make `model` resize its inputs as `head_cfg` says (a teacher at its student's resolution)."""
    model.transform.min_size = (int(head_cfg["min_size"]),)
    model.transform.max_size = int(head_cfg["max_size"])
    model.head_cfg = {**model.head_cfg, "min_size": head_cfg["min_size"], "max_size": head_cfg["max_size"]}
    return model


@contextlib.contextmanager
def jittered_input(models: Sequence[Detector], scales: Sequence[float], seed: int, it: int) -> Iterator[float]:
    """Scale jitter for one training iteration: every model (a student and its teacher alike) resizes
    its inputs to min/max size x a scale drawn from `scales` by (seed, it), snapped like `resize`,
    so a detector trained this way loses little AP when the search lowers its input size. The
    draw depends on the iteration only: a resumed run sees the same sizes."""
    r = random.Random(step_seed(seed, it, "scale jitter")).choice(list(scales)) if len(scales) > 1 else scales[0]
    saved = [(m.transform.min_size, m.transform.max_size) for m in models]
    if r != 1.0:
        for m in models:
            m.transform.min_size = (snap_size(m.head_cfg["min_size"] * r),)
            m.transform.max_size = snap_size(m.head_cfg["max_size"] * r)
    try:
        yield r
    finally:
        for m, (lo, hi) in zip(models, saved):
            m.transform.min_size, m.transform.max_size = lo, hi


def checkpoint_dict(model: Detector, **meta: Any) -> dict[str, Any]:
    """What a detector checkpoint holds: format tag, Arch JSON, head config, weights, meta."""
    return {"format": CHECKPOINT_FORMAT, "arch": model.arch.to_json(), "head": dict(model.head_cfg),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}


def save_detector(path: str | Path, model: Detector, **meta: Any) -> None:
    """Write a loadable detector checkpoint atomically."""
    save_torch(path, checkpoint_dict(model, **meta))


def read_checkpoint(path: str | Path, fmt: str = CHECKPOINT_FORMAT, hint: str = "") -> dict[str, Any]:
    """Load a jdnas checkpoint of format `fmt` with weights_only=True; a clear error if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise JdnasError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise JdnasError(f"{path}: checkpoint not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise JdnasError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise JdnasError(f"{path}: format: not a {fmt} checkpoint")
    if "state_dict" in ckpt:
        check_state_dict(ckpt["state_dict"], str(path))
    if fmt == CHECKPOINT_FORMAT and "head" in ckpt and "arch" in ckpt:
        ckpt["head"] = check_head(ckpt["head"], str(path))
        try:
            arch = Arch.from_json(ckpt["arch"])
        except Exception as e:  # noqa: BLE001 - any malformed Arch JSON
            raise JdnasError(f"{path}: arch: not a valid Arch ({type(e).__name__}: {str(e)[:200]})") from None
        h = ckpt["head"]
        check_size(arch, h["fpn_channels"], h["representation_size"], h["num_classes"], f"{path}: arch")
    return ckpt


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> Detector:
    """Rebuild a detector from a checkpoint written by `save_detector`, in eval mode."""
    ckpt = read_checkpoint(path)
    for key in ("arch", "head", "state_dict"):
        if key not in ckpt:
            raise JdnasError(f"{path}: {key}: missing from the checkpoint")
    try:
        arch = Arch.from_json(ckpt["arch"])
    except Exception as e:  # noqa: BLE001 - any malformed Arch JSON
        raise JdnasError(f"{path}: arch: not a valid Arch ({type(e).__name__}: {str(e)[:200]})") from None
    head = check_head(ckpt["head"], str(path))
    check_size(arch, head["fpn_channels"], head["representation_size"], head["num_classes"], f"{path}: arch")
    try:
        model = build_detector(arch, head)
    except Exception as e:  # noqa: BLE001 - a head value of the wrong type or range
        raise JdnasError(f"{path}: head: cannot build a detector from it ({type(e).__name__}: {e})") from None
    try:
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # a tensor whose shape disagrees with the arch
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise JdnasError(f"{path}: state_dict: does not match its arch and head ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        which = (f"missing '{result.missing_keys[0]}'" if result.missing_keys
                 else f"unexpected '{result.unexpected_keys[0]}'")
        raise JdnasError(f"{path}: state_dict: does not match its arch and head ({which})")
    return model.to(device).eval()
