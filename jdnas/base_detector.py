"""The `train_base` stage: train the base detector from scratch and evaluate it on val."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from jdnas.data.dataset import CocoDetection
from jdnas.engine import evaluate, resolve_device, train_detector
from jdnas.io import write_json
from jdnas.models.arch import resolve_arch
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import build_detector, head_config, save_detector
from jdnas.tblog import TrainLog


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (what a resumable state was written for)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_base(params: dict, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Build the base detector from params, train it, write model.pt and metrics.json (and TensorBoard
    events of the training and the val AP in out_dir/tb)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = resolve_device(params["device"])
    cfg = params["train_base"]
    train_set = CocoDetection(data_dir / "train.json", max_size=params["model"]["max_size"])
    arch = resolve_arch(params["model"]["base"], params["model"]["width"])
    torch.manual_seed(params["seed"])
    model = build_detector(arch, head_config(params["model"], train_set.labels.num_classes))
    manifest = json.loads((data_dir / "manifest.json").read_text())
    fp = fingerprint(str(arch), model.head_cfg, cfg, params["seed"], manifest["splits"]["train"]["sha256"])
    state_path = out_dir / "train_state.pt"
    cpu0 = time.process_time()  # this process's CPU time: the compute unit pipelines are compared in
    with TrainLog(out_dir) as log:
        summary = train_detector(model, train_set, cfg, state_path, params["seed"], device, fp, desc="train_base",
                                 log=log)
        metrics = evaluate(model, data_dir / "val.json", params["eval"]["batch_size"], device)
        log.metrics(metrics, summary["iters"], prefix="val/")
    metrics.update({"arch": str(arch), "params": count_params(model), "flops": count_flops(model),
                    "train_iters": summary["iters"], "train_seconds": summary["seconds"],
                    "train_cpu_seconds": round(time.process_time() - cpu0 + summary["resumed_cpu_seconds"], 2)})
    save_detector(out_dir / "model.pt", model.cpu(), stage="train_base", metrics=metrics)
    write_json(out_dir / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)
    return metrics
