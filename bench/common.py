"""Shared pieces of the morphism / KD benchmarks: CPU-sized params, cached data and parent.

The data are params.yaml's synthetic set (600 train / 150 val images, 128 px, 4 classes);
the head is trimmed (32 sampled RoIs per image, 100 RPN proposals) because RoIAlign's backward
dominates a CPU step. The parent (also the KD teacher) is `jdnas train-base`'s recipe on
r18 x 0.25; data and parent are cached under `runs/bench/` and shared by both benchmarks.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jdnas.baselines.base import train_base  # noqa: E402
from jdnas.config import load_params, merge  # noqa: E402
from jdnas.data.dataset import CocoDetection  # noqa: E402
from jdnas.data.prepare import prepare_data  # noqa: E402
from jdnas.engine.loop import evaluate, train_detector  # noqa: E402
from jdnas.models.detector import Detector, load_detector  # noqa: E402

ROOT = REPO / "runs" / "bench"
PARENT_ITERS = 600
BENCH_OVERRIDES: dict[str, Any] = {
    "model": {"base": "r18", "width": 0.25, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300,
              "rpn_post_nms_top_n_train": 100, "representation_size": 128},
    "train_base": {"iters": PARENT_ITERS, "batch_size": 8, "lr": 0.04, "warmup_iters": 50,
                   "checkpoint_every": 100},
    "train_student": {"batch_size": 8, "lr": 0.02, "warmup_iters": 20, "checkpoint_every": 100},
}
DEVICE = torch.device("cpu")


def bench_params() -> dict:
    return merge(load_params([REPO / "params.yaml"]), BENCH_OVERRIDES, source="bench")


def data_dir(params: dict) -> Path:
    """The prepared synthetic data (built once)."""
    out = ROOT / "data"
    if not (out / "manifest.json").is_file():
        prepare_data(params, out)
    return out


def parent(params: dict) -> tuple[Detector, dict]:
    """The trained parent / teacher (r18 x 0.25, PARENT_ITERS iterations) and its val metrics."""
    out = ROOT / "parent"
    if not (out / "metrics.json").is_file():
        t0 = time.time()
        train_base(params, data_dir(params), out)
        print(f"# parent trained in {time.time() - t0:.0f} s", flush=True)
    return load_detector(out / "model.pt"), json.loads((out / "metrics.json").read_text())


def train_and_eval(model: Detector, params: dict, section: str, iters: int, seed: int = 0,
                   loss_fn: Any = None, extra: torch.nn.Module | None = None) -> tuple[float, float]:
    """Train `model` for `iters` iterations (a full schedule of that length) with the recipe of
    params[section]; return (val AP, seconds)."""
    data = data_dir(params)
    cfg = {**params[section], "iters": max(1, iters), "checkpoint_every": 10 ** 9}
    t0 = time.time()
    if iters > 0:
        ds = CocoDetection(data / "train.json", max_size=model.head_cfg["max_size"])
        kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
        with tempfile.TemporaryDirectory() as tmp:
            train_detector(model, ds, cfg, Path(tmp) / "state.pt", seed, DEVICE, desc=f"{section}:{iters}",
                           extra=extra, **kw)
    ap = evaluate(model, data / "val.json", params["eval"]["batch_size"], DEVICE)["AP"]
    return ap, time.time() - t0


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [fmt(r) for r in cells[1:]])
