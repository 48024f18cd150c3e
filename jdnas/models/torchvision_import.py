"""`jdnas import-torchvision`: a torchvision Faster R-CNN (ResNet-FPN) state_dict -> a jdnas checkpoint.

The layout is that of `fasterrcnn_resnet50_fpn` and of `FasterRCNN(resnet_fpn_backbone(...))`
at depths 18/34/50/101: `backbone.body.{conv1,bn1,layer1..4}` (ResNet, frozen BN), then the
FPN, RPN and RoI heads, which jdnas builds from the same torchvision parts under the same names.
The backbone's Arch (block type, stem width, per-block mid widths, stage widths), the FPN width,
the box head's width and the class count are read from the tensors; the rest of the head
(input size, anchors, thresholds) comes from the params' `model` section. Frozen BN becomes
plain BN with the same statistics, so the two detectors compute the same function in eval mode.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch

from jdnas.errors import JdnasError
from jdnas.models.arch import Arch, Stage
from jdnas.models.detector import build_detector, check_size, check_state_dict, head_config, save_detector
from jdnas.models.keys import BODY, BOX_FC6, FPN_INNER, PREDICTOR, RPN_HEADS

# torchvision's own head settings (fasterrcnn_resnet50_fpn's defaults): what an import keeps
# unless the params set a key (the FPN and box-head widths are read from the tensors)
TORCHVISION_HEAD: dict[str, Any] = {
    "min_size": 800, "max_size": 1333, "anchor_sizes": [32, 64, 128, 256, 512],
    "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000,
    "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 512,
    "box_detections_per_img": 100, "box_score_thresh": 0.05,
}


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise JdnasError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, unpicklable content
        raise JdnasError(f"{path}: not a readable state_dict ({type(e).__name__})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # torchvision's reference scripts save {"model": state_dict, ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise JdnasError(f"{path}: not a state_dict (a mapping of names to tensors; got {type(obj).__name__})")
    check_state_dict(obj, str(path))  # NaN / inf / integer weights: a poisoned source
    return obj


def arch_of(sd: dict[str, torch.Tensor], src: Path) -> Arch:
    """The backbone Arch a torchvision ResNet body's tensors describe."""
    if f"{BODY}conv1.weight" not in sd:
        raise JdnasError(f"{src}: {BODY}conv1.weight: missing (not a torchvision ResNet-FPN Faster R-CNN)")
    block = "bottleneck" if f"{BODY}layer1.0.conv3.weight" in sd else "basic"
    stages = []
    for i in range(1, 5):
        idx = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{BODY}layer{i}\.(\d+)\.", k))})
        if not idx or idx != list(range(len(idx))):
            raise JdnasError(f"{src}: {BODY}layer{i}: missing or with gaps (not a 4-stage ResNet)")
        last = "conv3" if block == "bottleneck" else "conv2"
        mids = tuple(int(sd[f"{BODY}layer{i}.{j}.conv1.weight"].shape[0]) for j in idx)
        stages.append(Stage(int(sd[f"{BODY}layer{i}.{idx[-1]}.{last}.weight"].shape[0]), mids))
    return Arch(block, int(sd[f"{BODY}conv1.weight"].shape[0]), tuple(stages))


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names -> jdnas names (the body's ResNet only: the rest is named alike)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(BODY):
            rest = k[len(BODY):]
            rest = re.sub(r"^conv1\.", "stem.conv.", rest)
            rest = re.sub(r"^bn1\.", "stem.bn.", rest)
            rest = re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", rest)
            k = BODY + rest
        out[k] = v
    return out


def import_torchvision(src: str | Path, dst: str | Path, model_params: dict[str, Any],
                       from_params: Iterable[str] | None = None) -> dict[str, Any]:
    """Convert `src` (a torchvision Faster R-CNN ResNet-FPN state_dict) into a jdnas checkpoint at
    `dst` that `load_detector` reads; nothing is written unless every tensor finds its place.

    Head settings: those named in `from_params` come from `model_params`, the others are
    torchvision's own (`TORCHVISION_HEAD`); `from_params=None` takes every one from the params."""
    src = Path(src)
    keys = [k for k in TORCHVISION_HEAD]
    given = set(keys) if from_params is None else set(from_params) & set(keys)
    model_params = {**model_params, **{k: v for k, v in TORCHVISION_HEAD.items() if k not in given}}
    sd = _load(src)
    arch = arch_of(sd, src)
    for key in (FPN_INNER.format(s=0), BOX_FC6, PREDICTOR[0], RPN_HEADS[0]):
        if key not in sd:
            raise JdnasError(f"{src}: {key}: missing (not a torchvision ResNet-FPN Faster R-CNN)")
    anchors_per_place = int(sd[RPN_HEADS[0]].shape[0])
    if anchors_per_place != 3:
        raise JdnasError(f"{src}: rpn.head.cls_logits.weight: {anchors_per_place} anchors per place, jdnas uses 3 "
                         "(aspect ratios 0.5, 1, 2)")
    head = head_config({**model_params, "fpn_channels": int(sd[FPN_INNER.format(s=0)].shape[0]),
                        "representation_size": int(sd[BOX_FC6].shape[0])},
                       int(sd[PREDICTOR[0]].shape[0]))
    if "auto" in (head["min_size"], head["max_size"], head["anchor_sizes"]):
        raise JdnasError("params: model.min_size, max_size and anchor_sizes must be numbers to import a detector "
                         "(auto needs the data: pass --data data/prepared after `jdnas prepare-data`)")
    check_size(arch, head["fpn_channels"], head["representation_size"], head["num_classes"], f"{src}: arch")
    model = build_detector(arch, head)
    converted = convert_state_dict(sd)
    target = model.state_dict()
    for k, v in target.items():
        if k.endswith("num_batches_tracked") and k not in converted:
            converted[k] = torch.zeros_like(v)  # frozen BN has none
    extra = sorted(set(converted) - set(target))
    missing = sorted(set(target) - set(converted))
    if extra or missing:
        first = f"unexpected key {extra[0]}" if extra else f"missing key {missing[0]}"
        raise JdnasError(f"{src}: {first} (not the layout of torchvision's ResNet-FPN Faster R-CNN)")
    for k, v in target.items():
        if tuple(converted[k].shape) != tuple(v.shape):
            raise JdnasError(f"{src}: {k}: shape {tuple(converted[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(converted)
    save_detector(dst, model.eval(), stage="import_torchvision", source=str(src))
    return {"arch": str(arch), "fpn_channels": head["fpn_channels"], "representation_size": head["representation_size"],
            "classes": head["num_classes"] - 1, "out": str(dst),
            "head_from_params": [k for k in keys if k in given],
            "head_from_torchvision": [k for k in keys if k not in given]}
