"""ONNX export of a jdnas detector, and the exported model run under onnxruntime.

The graph takes one image (float [3, height, width] in [0, 1], any size: the detector's own
transform resizes it) and returns `boxes` [N, 4] (xyxy, input pixels), `labels` [N] and
`scores` [N], like the PyTorch model in eval mode. torchvision's detection ops export with the
TorchScript-based exporter (opset 17); the result is checked against PyTorch on export.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from jdnas.errors import JdnasError
from jdnas.io import atomic_path
from jdnas.models.detector import Detector, load_detector

OPSET = 17
OUTPUTS = ("boxes", "labels", "scores")


def session(model: str | Path | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session with `threads` intra-op threads (1: it runs on the calling
    thread, so that thread's CPU time is its cost) for an ONNX file or serialized model."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable models
        where = "the exported model" if isinstance(model, bytes) else model
        raise JdnasError(f"{where}: not a loadable ONNX model ({type(e).__name__})") from None


def _export(module: nn.Module, args: tuple, f: str | Path | io.BytesIO, input_names: list[str] | None = None,
            output_names: list[str] | None = None, dynamic_axes: dict | None = None) -> None:
    """torch.onnx.export with the TorchScript-based exporter (torchvision's detection ops export
    with it), outside inference mode (tracing needs it off)."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on data-dependent shapes: expected here
        torch.onnx.export(module, args, f if isinstance(f, io.BytesIO) else str(f), opset_version=OPSET,
                          dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)


def module_session(module: nn.Module, args: tuple, threads: int = 1) -> Any:
    """`module` exported at the shapes of `args` (tensors), in memory, as an onnxruntime session:
    what the latency table times a part with when it profiles for onnxruntime. Input i is named
    `x{i}`; the exporter drops inputs the graph does not use."""
    buf = io.BytesIO()
    _export(module.eval(), args, buf, input_names=[f"x{i}" for i in range(len(args))])
    return session(buf.getvalue(), threads)


class OnnxDetector:
    """An exported detector under onnxruntime (CPU, `threads` intra-op threads), called like the
    PyTorch model in eval mode: a list of images in, one dict of boxes/labels/scores per image out."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.session = session(path, threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [dict(zip(OUTPUTS, (torch.from_numpy(a) for a in self.session.run(None, {self.input: x.numpy()}))))
                for x in images]


def export_onnx(model: Detector, out: str | Path, check_images: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Write `model` as ONNX to `out` (atomically). On `check_images` (default: two random images of
    different sizes), compare onnxruntime's detections with PyTorch's: returns the largest box
    difference (px) and score difference over detections both keep, and whether every image gave
    the same number of detections."""
    model = model.cpu().eval()
    size = int(model.head_cfg["min_size"])
    gen = torch.Generator().manual_seed(0)
    images = list(check_images) or [torch.rand(3, size, size, generator=gen),
                                    torch.rand(3, size * 3 // 4, size, generator=gen)]
    with atomic_path(out) as tmp:
        _export(model, ([images[0]],), tmp, ["image"], list(OUTPUTS),
                {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUTS}})
        check = compare(model, OnnxDetector(tmp), images)
    return {"path": str(out), "opset": OPSET, **check}


@torch.no_grad()
def compare(model: Detector, onnx: OnnxDetector, images: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Largest |box| and |score| difference between PyTorch and onnxruntime on `images`, and
    whether they keep the same detections (count and labels) on every image."""
    box_diff = score_diff = 0.0
    same = True
    for x in images:
        ref, got = model([x])[0], onnx([x])[0]
        if len(ref["boxes"]) != len(got["boxes"]) or not torch.equal(ref["labels"], got["labels"]):
            same = False
            continue
        if len(ref["boxes"]):
            box_diff = max(box_diff, float((ref["boxes"] - got["boxes"]).abs().max()))
            score_diff = max(score_diff, float((ref["scores"] - got["scores"]).abs().max()))
    return {"max_box_diff_px": box_diff, "max_score_diff": score_diff, "same_detections": same}


def export_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """`jdnas export`: any jdnas checkpoint (base, candidate, final student) to ONNX, checked."""
    return export_onnx(load_detector(ckpt), out)
