"""How a training iteration's cost grows with the input size (the README's guide for own data).

Times `train_detector` iterations of the default base (params.yaml's model, batch 8, one
thread, CPU-time clock) on random images at several input sizes and prints a table: CPU-seconds
per iteration and the ratio to 128 px.

    .venv/bin/python bench/input_size.py [--sizes 128 256 512] [--iters 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jdnas.config import load_params  # noqa: E402
from jdnas.engine.loop import detection_loss, make_optimizer  # noqa: E402
from jdnas.models.arch import resolve_arch  # noqa: E402
from jdnas.models.detector import build_detector, head_config  # noqa: E402


def iteration_cpu_seconds(size: int, iters: int, batch: int) -> float:
    params = load_params([REPO / "params.yaml"])
    model_params = {**params["model"], "min_size": size, "max_size": size}
    torch.manual_seed(0)
    model = build_detector(resolve_arch(params["model"]["base"], params["model"]["width"]),
                           head_config(model_params, 5)).train()
    opt = make_optimizer(model, params["train_base"])
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]]) * size,
                "labels": torch.tensor([1, 2])} for _ in range(batch)]
    for i in range(iters + 1):
        if i == 1:  # the first iteration warms up allocators
            t0 = time.process_time()
        loss = sum(detection_loss(model, images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.process_time() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [(s, iteration_cpu_seconds(s, args.iters, args.batch)) for s in args.sizes]
    base = rows[0][1]
    print(f"{'input px':>8} {'CPU-s / iteration':>18} {'x ' + str(rows[0][0]) + ' px':>10}")
    for s, sec in rows:
        print(f"{s:>8} {sec:>18.3f} {sec / base:>10.1f}")


if __name__ == "__main__":
    main()
