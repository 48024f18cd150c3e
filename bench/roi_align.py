"""RoIAlign on CPU: torchvision's op vs jdnas's fast backward (jdnas/models/roi_align.py).

Prints two tables (one thread, CPU-time clock, median of --repeats):
1. the op alone, forward + backward, at several RoI counts (P2 of a 128-px batch of 8, 64 channels);
2. one training iteration of the default base detector (params.yaml's model, batch 8, 128 px)
   with each pooler, at 128 and 64 sampled RoIs per image.

    .venv/bin/python bench/roi_align.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from jdnas.config import load_params  # noqa: E402
from jdnas.engine.loop import detection_loss, make_optimizer  # noqa: E402
from jdnas.models.arch import resolve_arch  # noqa: E402
from jdnas.models.detector import FPN_LEVELS, build_detector, head_config  # noqa: E402
from jdnas.models.roi_align import FastMultiScaleRoIAlign, roi_align_fast  # noqa: E402
from timing import cpu_ms  # noqa: E402


def op_table(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 32, 32, generator=g, requires_grad=True)
    print(f"{'RoIs':>6} {'torchvision ms':>15} {'jdnas ms':>9} {'speed-up':>9} {'max |grad diff|':>16}")
    for r in (256, 512, 1024):
        xy = torch.rand(r, 2, generator=g) * 100
        rois = torch.cat([torch.randint(0, 8, (r, 1), generator=g).float(), xy, xy + 4 + torch.rand(r, 2) * 50], 1)
        grad = torch.randn(r, 64, 7, 7, generator=g)

        def run(op):
            def step():
                x.grad = None
                (op(x, rois, (7, 7), 0.25, 2, False) * grad).sum().backward()
                return x.grad.clone()
            return step
        ref, ours = run(roi_align), run(roi_align_fast)
        diff = (ref() - ours()).abs().max().item()
        a, b = cpu_ms(ref, repeats, warmup=1)[0], cpu_ms(ours, repeats, warmup=1)[0]
        print(f"{r:>6} {a:>15.1f} {b:>9.1f} {a / b:>8.1f}x {diff:>16.1e}")


def step_table(repeats: int) -> None:
    params = load_params([REPO / "params.yaml"])
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(8)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60], [60, 64, 120, 110], [30, 70, 44, 84]]),
                "labels": torch.tensor([1, 2, 3])} for _ in range(8)]
    print(f"\n{'RoIs/image':>10} {'torchvision s/it':>17} {'jdnas s/it':>11} {'speed-up':>9}")
    for rois in (128, 64):
        times = {}
        for name, pooler in (("torchvision", MultiScaleRoIAlign), ("jdnas", FastMultiScaleRoIAlign)):
            torch.manual_seed(0)
            head = head_config({**params["model"], "box_batch_size_per_image": rois}, 5)
            model = build_detector(resolve_arch(params["model"]["base"], params["model"]["width"]), head).train()
            model.roi_heads.box_roi_pool = pooler(FPN_LEVELS, 7, sampling_ratio=2)
            opt = make_optimizer(model, params["train_base"])

            def step():
                loss = sum(detection_loss(model, images, targets).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name] = cpu_ms(step, repeats, warmup=1)[0] / 1000
        print(f"{rois:>10} {times['torchvision']:>17.3f} {times['jdnas']:>11.3f} "
              f"{times['torchvision'] / times['jdnas']:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    op_table(args.repeats)
    step_table(args.repeats)


if __name__ == "__main__":
    main()
