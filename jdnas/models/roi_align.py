"""RoIAlign with a fast CPU backward: the same numbers as torchvision's, 5-8x less backward time.

torchvision's CPU `roi_align` backward recomputes every sample's bilinear weights once per
channel and scatters them one scalar at a time; on the CPU-sized default run it was 42% of a
training iteration. Here the forward is torchvision's kernel, and the backward builds the
op's (sparse) interpolation matrix once per call and applies its transpose to all channels in
one sparse matmul. Only CPU tensors that need a gradient take this path; CUDA, inference
and tracing/export use torchvision's op as is.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_weights(start: Tensor, size: Tensor, bins: int, grid: int, limit: int) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis, as torchvision's CPU kernel computes them.

    Returns (index, weight), each [R, bins, grid, 2]: the low and high neighbour of every
    sample point and its weight (0 for a sample outside [-1, limit])."""
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)
    sub = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5) / grid
    binsize = (size / bins)[:, None, None]
    pos = start[:, None, None] + (steps[None, :, None] + sub[None, None, :]) * binsize
    valid = ((pos >= -1.0) & (pos <= limit)).to(pos.dtype)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    top = low >= limit - 1
    low = torch.where(top, torch.full_like(low, limit - 1), low)
    high = torch.where(top, low, low + 1)
    frac = torch.where(top, torch.zeros_like(pos), pos - low.to(pos.dtype))
    index = torch.stack([low, high], dim=-1)
    weight = torch.stack([1 - frac, frac], dim=-1) * valid[..., None]
    return index, weight


def interpolation_matrix(rois: Tensor, shape: torch.Size, output_size: tuple[int, int], spatial_scale: float,
                         sampling_ratio: int, aligned: bool) -> Tensor:
    """The sparse matrix M with roi_align(x) = M @ x: rows (roi, bin_y, bin_x), columns (image, y, x);
    returned transposed ([N*H*W, R*PH*PW], COO) for the backward."""
    n, _, h, w = shape
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:] * spatial_scale - offset
    rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    g = sampling_ratio
    yi, yw = _axis_weights(boxes[:, 1], rh, ph, g, h)          # [R, PH, g, 2]
    xi, xw = _axis_weights(boxes[:, 0], rw, pw, g, w)          # [R, PW, g, 2]
    r = rois.shape[0]
    # broadcast to [R, PH, PW, gy, gx, cy, cx]
    yi, yw = yi[:, :, None, :, None, :, None], yw[:, :, None, :, None, :, None]
    xi, xw = xi[:, None, :, None, :, None, :], xw[:, None, :, None, :, None, :]
    batch = rois[:, 0].long()[:, None, None, None, None, None, None]
    cols = (batch * h + yi) * w + xi
    vals = yw * xw / (g * g)
    rows = torch.arange(r * ph * pw, device=rois.device).view(r, ph, pw, 1, 1, 1, 1)
    shape7 = (r, ph, pw, g, g, 2, 2)
    cols, vals, rows = cols.expand(shape7), vals.expand(shape7), rows.expand(shape7)
    return torch.sparse_coo_tensor(torch.stack([cols.reshape(-1), rows.reshape(-1)]), vals.reshape(-1),
                                   (n * h * w, r * ph * pw), check_invariants=False)


class _RoIAlign(torch.autograd.Function):
    """torchvision's roi_align forward; backward by one sparse matmul over all channels."""

    @staticmethod
    def forward(ctx, x: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (x.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        (rois,) = ctx.saved_tensors
        shape = ctx.args[0]
        n, c, h, w = shape
        m = interpolation_matrix(rois.to(grad.dtype), *ctx.args)
        g = grad.permute(0, 2, 3, 1).reshape(-1, c)
        gx = torch.sparse.mm(m, g).view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return gx, None, None, None, None, None


def roi_align_fast(x: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                   sampling_ratio: int, aligned: bool = False) -> Tensor:
    """`torchvision.ops.roi_align` (rois as [K, 5]); on CPU with a gradient and a fixed
    sampling_ratio > 0, the fast backward."""
    if x.device.type == "cpu" and x.requires_grad and sampling_ratio > 0 and rois.shape[0] > 0:
        return _RoIAlign.apply(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, scales and outputs) over `roi_align_fast`."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
            return super().forward(x, boxes, image_shapes)
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                out[idx] = roi_align_fast(feat, rois[idx], tuple(self.output_size), scale,
                                          self.sampling_ratio).to(out.dtype)
        return out
