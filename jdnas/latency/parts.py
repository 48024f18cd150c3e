"""What each table entry runs when it is timed, and the end-to-end detector call it predicts.

Every callable runs in eval mode on fixed random inputs of the entry's shape. The fixed parts
run on a reference detector (the base arch) whose batch-norm statistics were set on the
profiling image, so the RPN and RoI heads see features of realistic scale and their
data-dependent work (NMS, score thresholds) matches what a real forward does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from jdnas.latency.measure import Call
from jdnas.latency.space import Entry, stage_outputs
from jdnas.models.arch import Arch
from jdnas.models.backbone import BLOCKS, Stem
from jdnas.models.detector import Detector, build_detector


def _randn(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device)


def backbone_call(e: Entry, device: torch.device) -> Call:
    """The module of a stem / block / FPN lateral entry applied to a random input of its shape."""
    if e.part == "block":
        module: nn.Module = BLOCKS[e.block](e.cin, e.mid, e.cout, e.stride)
    elif e.part == "stem":
        module = Stem(e.cout)
    elif e.part == "fpn_lateral":
        module = FeaturePyramidNetwork([e.cin], e.cout).inner_blocks[0]
    else:
        raise ValueError(f"not a backbone entry: {e}")
    module = module.to(device).eval()
    x = _randn(1, e.cin, e.height, e.width, device=device)
    return Call(lambda: module(x), module, x)


@torch.no_grad()
def calibrated_detector(arch: Arch, head_cfg: dict[str, Any], image: torch.Tensor,
                        device: torch.device) -> Detector:
    """A detector in eval mode whose backbone BN statistics come from one pass over `image`."""
    model = build_detector(arch, head_cfg).to(device)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics exactly
    images, _ = model.transform([image])
    model.backbone.train()
    model.backbone(images.tensors)
    return model.eval()


def detector_call(model: Detector, image: torch.Tensor) -> Call:
    """The end-to-end forward: what the table's sum predicts."""
    return Call(lambda: model([image]), model, image)


class HeadParts:
    """Callables for the fixed parts, on a reference detector and the profiling image."""

    @torch.inference_mode()
    def __init__(self, model: Detector, image: torch.Tensor, proposals: int) -> None:
        self.model, self.image = model, image
        self.images, _ = model.transform([image])
        self.features = model.backbone(self.images.tensors)
        props, _ = model.rpn(self.images, self.features)
        self.proposals = [_exactly(props[0], proposals, self.images.image_sizes[0])]
        self.detections, _ = model.roi_heads(self.features, self.proposals, self.images.image_sizes)
        self.original_sizes = [tuple(image.shape[-2:])]

    def call(self, e: Entry) -> Callable[[], object]:
        m = self.model
        if e.part == "transform":
            def run() -> object:
                m.transform([self.image])
                return m.transform.postprocess([dict(d) for d in self.detections], self.images.image_sizes,
                                               self.original_sizes)
            return run
        if e.part == "fpn_top":
            return _fpn_top_call(e, self.features["0"].device)
        if e.part == "rpn":
            return lambda: m.rpn(self.images, self.features)
        if e.part == "roi_heads":
            return lambda: m.roi_heads(self.features, self.proposals, self.images.image_sizes)
        raise ValueError(f"not a fixed part: {e}")


def _exactly(boxes: torch.Tensor, n: int, image_size: tuple[int, int]) -> torch.Tensor:
    """`n` proposals: the RPN's, cut or padded with random boxes inside the image."""
    if len(boxes) >= n:
        return boxes[:n]
    g = torch.Generator().manual_seed(0)
    h, w = image_size
    xy = torch.rand(n - len(boxes), 2, generator=g) * torch.tensor([w * 0.75, h * 0.75])
    wh = torch.rand(n - len(boxes), 2, generator=g) * torch.tensor([w * 0.25, h * 0.25]) + 2
    extra = torch.cat([xy, xy + wh], dim=1).to(boxes.device)
    return torch.cat([boxes, extra])


def _fpn_top_call(e: Entry, device: torch.device) -> Callable[[], object]:
    """The FPN without its lateral convs (timed separately, per stage width): top-down
    upsample-and-add, the 3x3 output convs and the max-pool level, as torchvision runs them."""
    fpn = FeaturePyramidNetwork([e.cout] * 4, e.cout, extra_blocks=LastLevelMaxPool())
    fpn.inner_blocks = nn.ModuleList([nn.Identity() for _ in range(4)])
    fpn = fpn.to(device).eval()
    sizes = stage_outputs((e.height * 4, e.width * 4))
    x = OrderedDict((str(i), _randn(1, e.cout, h, w, device=device)) for i, (h, w) in enumerate(sizes))
    return lambda: fpn(x)
