"""Training throughput: jdnas's training loop vs a torchvision-reference-style loop, same model.

Both train the same Faster R-CNN + FPN (jdnas's detector, COCO head: 81 classes, 512 sampled
RoIs, 2000 proposals) on the same in-memory batches of random images with random boxes, under
bf16 autocast on CUDA:
- `torchvision-ref`: the loop of torchvision's detection reference (references/detection/engine.py):
  NCHW, `foreach` SGD, the losses reduced and read with `.item()` every iteration, a finiteness
  check on the host every iteration;
- `jdnas`: `jdnas.engine.loop.train_detector` as the workflow runs it (channels_last, fused SGD on
  CUDA, losses read every 20 iterations, pinned batches).
Columns: images/s over the timed iterations (after warm-up), peak GPU memory, and the eval
latency of one image (batch 1, median of 20) of the same untrained weights in each loop's
memory format.

    .venv/bin/python bench/gpu_train.py                          # R50-FPN and R101-FPN, 800x1216, batch 8
    .venv/bin/python bench/gpu_train.py --small --device cpu     # a tiny model on the CPU (CI: it starts)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jdnas.config import load_params  # noqa: E402
from jdnas.data.dataset import collate  # noqa: E402
from jdnas.engine.loop import lr_factor, make_optimizer, train_detector  # noqa: E402
from jdnas.models.arch import resolve_arch  # noqa: E402
from jdnas.models.detector import build_detector, head_config  # noqa: E402


class RandomBoxes(torch.utils.data.Dataset):
    """`n` random images of `hw` with 1-10 random boxes each (fixed seed), held in memory."""

    def __init__(self, n: int, hw: tuple[int, int], classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        h, w = hw
        self.items = []
        for _ in range(n):
            k = int(torch.randint(1, 11, (), generator=g))
            xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
            wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2]) + 8
            labels = torch.randint(1, classes, (k,), generator=g)
            self.items.append((torch.rand(3, h, w, generator=g), {"boxes": torch.cat([xy, xy + wh], 1), "labels": labels}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple:
        return self.items[key[0] if isinstance(key, tuple) else key]


def reference_loop(model, data, cfg: dict, device: torch.device, iters: int) -> None:
    """The torchvision detection reference's train_one_epoch, reduced to one process."""
    optimizer = make_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg["batch_size"], shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    amp = device.type == "cuda"
    model.train()
    done = 0
    while done < iters:
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            for g in optimizer.param_groups:
                g["lr"] = cfg["lr"] * lr_factor(done, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss_dict = model(images, targets)
                losses = sum(loss for loss in loss_dict.values())
            loss_value = sum(v.item() for v in loss_dict.values())  # reduce_dict + MetricLogger
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            done += 1
            if done == iters:
                return


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> tuple[float, float]:
    """Seconds of `run()` and the peak GPU memory (GiB) it reached."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - t0, peak


@torch.no_grad()
def latency_ms(model, image: torch.Tensor, device: torch.device, runs: int = 20) -> float:
    model.eval()
    times = []
    for i in range(runs + 3):
        sync(device)
        t0 = time.perf_counter()
        model([image])
        sync(device)
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="r50,r101")
    ap.add_argument("--size", default="800x1216", help="image HxW")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per loop")
    ap.add_argument("--small", action="store_true", help="tiny model, 128 px, batch 2, 2+3 iterations")
    args = ap.parse_args()
    device = torch.device(args.device)
    coco = load_params([REPO / "params.yaml", REPO / "config" / "coco_r101.yaml"])["model"]
    h, w = (int(x) for x in args.size.split("x"))
    models, width = args.models.split(","), 1.0
    if args.small:
        h = w = 128
        models, width, args.batch, args.warmup, args.iters = ["tiny"], 0.5, 2, 2, 3
        coco = {**coco, "fpn_channels": 32, "representation_size": 64, "rpn_pre_nms_top_n_train": 200,
                "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64}
    coco = {**coco, "min_size": min(h, w), "max_size": max(h, w)}
    data = RandomBoxes(max(16, 2 * args.batch), (h, w), 81)
    cfg = {"iters": args.warmup + args.iters, "batch_size": args.batch, "lr": 0.02, "momentum": 0.9,
           "weight_decay": 1e-4, "warmup_iters": 0, "schedule": "constant", "steps": [0.7, 0.9], "clip_grad": 0.0,
           "checkpoint_every": 10 ** 9, "workers": 0, "scales": [1.0]}
    print(f"# {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {h}x{w}, batch {args.batch}, bf16 autocast: {device.type == 'cuda'}, "
          f"{args.iters} timed iterations after {args.warmup}")
    print("| model | loop | images/s | peak GPU memory (GiB) | eval latency, batch 1 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name in models:
        arch = resolve_arch(name, width)
        results = {}
        for loop in ("torchvision-ref", "jdnas"):
            torch.manual_seed(0)
            model = build_detector(arch, head_config(coco, 81)).to(device)
            if loop == "torchvision-ref":
                reference_loop(model, data, cfg, device, args.warmup)
                secs, peak = timed(lambda: reference_loop(model, data, cfg, device, args.iters), device)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    warm = {**cfg, "iters": args.warmup}
                    train_detector(model, data, warm, Path(tmp) / "w.pt", 0, device, desc="warm-up")
                    secs, peak = timed(lambda: train_detector(model, data, {**cfg, "iters": args.iters},
                                                              Path(tmp) / "s.pt", 1, device, desc="jdnas"), device)
            rate = args.iters * args.batch / secs
            results[loop] = rate
            # the same untrained weights for both (trained ones differ in how many boxes they keep),
            # in the loop's memory format
            torch.manual_seed(0)
            fresh = build_detector(arch, head_config(coco, 81)).to(device)
            if loop == "jdnas" and device.type == "cuda":
                fresh.to(memory_format=torch.channels_last)
            lat = latency_ms(fresh, data[0][0].to(device), device)
            print(f"| {name} | {loop} | {rate:.2f} | {peak:.2f} | {lat:.1f} |", flush=True)
        print(f"| {name} | jdnas / reference | {results['jdnas'] / results['torchvision-ref']:.2f}x | | |")


if __name__ == "__main__":
    main()
