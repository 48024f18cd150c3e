"""The fast-backward RoIAlign gives torchvision's outputs and gradients."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from jdnas.models.roi_align import FastMultiScaleRoIAlign, roi_align_fast


def _rois(n: int, r: int, h: int, w: int, stride: float, gen: torch.Generator) -> torch.Tensor:
    """Random boxes in image pixels, some partly or wholly outside the map, some under a pixel."""
    b = torch.randint(0, n, (r, 1), generator=gen).double()
    xy = torch.rand(r, 2, generator=gen, dtype=torch.float64) * torch.tensor([w, h]) * stride * 1.3 - 2 * stride
    wh = torch.rand(r, 2, generator=gen, dtype=torch.float64) * 12 * stride + 0.05
    return torch.cat([b, xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_gradient_matches_torchvision(aligned: bool, sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    x = torch.randn(3, 5, 11, 14, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = _rois(3, 40, 11, 14, 4.0, gen)
    g = torch.randn(40, 5, 7, 7, dtype=torch.float64, generator=gen)
    want = roi_align(x, rois, (7, 7), 0.25, sampling_ratio, aligned)
    (want_grad,) = torch.autograd.grad((want * g).sum(), x)
    got = roi_align_fast(x, rois, (7, 7), 0.25, sampling_ratio, aligned)
    (got_grad,) = torch.autograd.grad((got * g).sum(), x)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_multiscale_pooler_matches_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = OrderedDict((str(i), torch.randn(2, 4, 32 >> i, 40 >> i, generator=gen, requires_grad=True))
                        for i in range(4))
    sizes = torch.tensor([[2.0, 2.0], [30.0, 30.0], [90.0, 70.0], [150.0, 120.0]])
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=gen) * 60
        wh = sizes[torch.randint(0, 4, (30,), generator=gen)]
        boxes.append(torch.cat([xy, xy + wh], 1))
    shapes = [(128, 160)] * 2
    g = torch.randn(60, 4, 7, 7, generator=gen)
    results = []
    for cls in (MultiScaleRoIAlign, FastMultiScaleRoIAlign):
        pool = cls(list(feats), 7, sampling_ratio=2)
        out = pool(feats, boxes, shapes)
        grads = torch.autograd.grad((out * g).sum(), list(feats.values()), allow_unused=True,
                                    materialize_grads=True)
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_rois_and_no_grad_take_torchvision_path() -> None:
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    empty = roi_align_fast(x, torch.zeros(0, 5), (7, 7), 1.0, 2)
    assert empty.shape == (0, 2, 7, 7)
    with torch.no_grad():
        out = roi_align_fast(x, torch.tensor([[0.0, 1, 1, 6, 6]]), (7, 7), 1.0, 2)
    assert out.grad_fn is None
