"""What each table entry runs when it is timed, and the end-to-end detector call it predicts.

Every callable runs in eval mode on fixed random inputs of the entry's shape. The fixed parts
run on a reference detector (the base arch) whose batch-norm statistics were set on the
profiling image, so the RPN and RoI heads see features of realistic scale and their
data-dependent work (NMS, score thresholds) matches what a real forward does.

With `onnx_threads` set (`latency.device: onnxruntime`), each part is exported to ONNX at its
input shapes and the call times onnxruntime running it instead of eager PyTorch: the table then
predicts the latency the detector is deployed with.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from jdnas.latency.measure import Call
from jdnas.latency.space import Entry, stage_outputs
from jdnas.models.arch import Arch
from jdnas.models.backbone import BLOCKS, Stem
from jdnas.models.detector import Detector, build_detector
from jdnas.models.export import module_session


def _randn(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device)


def onnx_call(module: nn.Module, args: Sequence[torch.Tensor], threads: int) -> Call:
    """`module(*args)` exported to ONNX and run by onnxruntime on the same inputs."""
    sess = module_session(module.cpu(), tuple(a.cpu() for a in args), threads)
    used = {i.name for i in sess.get_inputs()}
    feeds = {f"x{i}": a.cpu().numpy() for i, a in enumerate(args) if f"x{i}" in used}
    return Call(lambda: sess.run(None, feeds), module, *args)


def backbone_call(e: Entry, device: torch.device, onnx_threads: int | None = None) -> Call:
    """The module of a stem / block / FPN lateral entry applied to a random input of its shape
    (in eager PyTorch, or under onnxruntime with `onnx_threads`)."""
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
    if onnx_threads:
        return onnx_call(module, (x,), onnx_threads)
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


def detector_call(model: Detector, image: torch.Tensor, onnx_threads: int | None = None) -> Call:
    """The end-to-end forward: what the table's sum predicts."""
    if onnx_threads:
        return onnx_call(_Listed(model), (image,), onnx_threads)
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

    def call(self, e: Entry, onnx_threads: int | None = None) -> Callable[[], object]:
        """The part's call in eager PyTorch, or its export under onnxruntime with `onnx_threads`."""
        if onnx_threads:
            return onnx_call(*self.module(e), onnx_threads)
        m = self.model
        if e.part == "transform":
            def run() -> object:
                m.transform([self.image])
                return m.transform.postprocess([dict(d) for d in self.detections], self.images.image_sizes,
                                               self.original_sizes)
            return run
        if e.part == "fpn_top":
            fpn, x = _fpn_top(e, self.features["0"].device)
            return lambda: fpn(x)
        if e.part == "rpn":
            return lambda: m.rpn(self.images, self.features)
        if e.part == "roi_heads":
            return lambda: m.roi_heads(self.features, self.proposals, self.images.image_sizes)
        raise ValueError(f"not a fixed part: {e}")

    def module(self, e: Entry) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The part as a module of plain tensors, with its inputs: what is exported to ONNX."""
        m, feats = self.model, tuple(self.features.values())
        sizes, names = self.images.image_sizes, list(self.features)
        if e.part == "transform":
            return _TransformPart(m, self.original_sizes), (self.image, self.detections[0]["boxes"])
        if e.part == "fpn_top":
            fpn, x = _fpn_top(e, feats[0].device)
            return _Keyed(fpn, list(x)), tuple(x.values())
        if e.part == "rpn":
            rpn = _Keyed(lambda f, im: m.rpn(ImageList(im, sizes), f)[0][0], names, m.rpn)
            return rpn, (*feats, self.images.tensors)
        if e.part == "roi_heads":
            def roi(f: OrderedDict, props: torch.Tensor) -> tuple[torch.Tensor, ...]:
                d = m.roi_heads(f, [props], sizes)[0][0]
                return d["boxes"], d["scores"], d["labels"]
            return _Keyed(roi, names, m.roi_heads), (*feats, self.proposals[0])
        raise ValueError(f"not a fixed part: {e}")


class _Keyed(nn.Module):
    """`fn(OrderedDict(names -> first len(names) tensors), *rest)` as a module of plain tensors."""

    def __init__(self, fn: Callable, names: list[str], owner: nn.Module | None = None) -> None:
        super().__init__()
        self.fn, self.names = fn, names
        self.owner = owner if owner is not None else fn  # registered: its weights are the export's

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.fn(OrderedDict(zip(self.names, xs)), *xs[len(self.names):])
        return tuple(out.values()) if isinstance(out, OrderedDict) else out


class _TransformPart(nn.Module):
    """Resize and normalise an image, and map detections back to its size (the transform entry)."""

    def __init__(self, model: Detector, original_sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.transform, self.original_sizes = model.transform, original_sizes

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = self.transform([image])
        out = self.transform.postprocess([{"boxes": boxes}], images.image_sizes, self.original_sizes)
        return images.tensors, out[0]["boxes"]


class _Listed(nn.Module):
    """A detector called on one image tensor (ONNX export takes tensors, not lists)."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.model([image])[0]
        return d["boxes"], d["labels"], d["scores"]


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


def _fpn_top(e: Entry, device: torch.device) -> tuple[nn.Module, OrderedDict]:
    """The FPN without its lateral convs (timed separately, per stage width): top-down
    upsample-and-add, the 3x3 output convs and the max-pool level, as torchvision runs them;
    with its input."""
    fpn = FeaturePyramidNetwork([e.cout] * 4, e.cout, extra_blocks=LastLevelMaxPool())
    fpn.inner_blocks = nn.ModuleList([nn.Identity() for _ in range(4)])
    fpn = fpn.to(device).eval()
    sizes = stage_outputs((e.height * 4, e.width * 4))
    x = OrderedDict((str(i), _randn(1, e.cout, h, w, device=device)) for i, (h, w) in enumerate(sizes))
    return fpn, x
