"""The `train_base` stage: train the base detector from scratch and evaluate it on val.

With `train_base.eval_every` > 0 it also scores minival every so many iterations (console and
TensorBoard) and keeps the weights with the best minival AP, so an overfitting run is seen and
its last, worse weights are not what the rest of the workflow starts from. With
`model.checkpoint` the stage trains nothing: it adopts that detector (`adopt_base`)."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from jdnas.config import val_timing
from jdnas.data.dataset import CocoDetection
from jdnas.engine.device import resolve_device
from jdnas.engine.dist import DistContext, init_distributed, shutdown
from jdnas.engine.loop import evaluate, load_train_state, train_detector
from jdnas.engine.tblog import TrainLog
from jdnas.errors import JdnasError
from jdnas.io import fingerprint, save_torch, write_json
from jdnas.latency.measure import compare_on_val
from jdnas.models.arch import resolve_arch
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import build_detector, head_config, load_detector, save_detector

BEST_FORMAT = "jdnas-best-weights/1"


def measured_latency(model: torch.nn.Module, data_dir: Path, device: torch.device, timing: dict[str, Any]) -> float:
    """The base's latency where it was trained (ms per val image, `timing`: `config.val_timing`;
    evaluate_final and the report time it again beside the students, in one interleaved measurement)."""
    return compare_on_val({"base": model}, data_dir, device, model.head_cfg["max_size"], **timing)["base"]


def adopt_base(params: dict, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The base detector is `model.checkpoint` as given: checked against the data (class count),
    evaluated on val, written as out_dir/model.pt and metrics.json (no training, no compute)."""
    src = params["model"]["checkpoint"]
    model = load_detector(src, resolve_device(params["device"]))
    classes = CocoDetection(data_dir / "train.json").labels.num_classes
    if model.head_cfg["num_classes"] != classes:
        raise JdnasError(f"{src}: model.checkpoint predicts {model.head_cfg['num_classes'] - 1} classes but "
                         f"{data_dir} has {classes - 1}")
    metrics = evaluate(model, data_dir / "val.json", params["eval"]["batch_size"], resolve_device(params["device"]))
    metrics.update({"checkpoint": str(src), "kept_iter": None, "arch": str(model.arch), "params": count_params(model),
                    "flops": count_flops(model), "train_iters": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                    "latency_ms": measured_latency(model, data_dir, resolve_device(params["device"]), val_timing(params))})
    save_detector(out_dir / "model.pt", model.cpu(), stage="train_base", metrics=metrics, source=str(src))
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def train_base(params: dict, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Build the base detector from params, train it, write model.pt and metrics.json (and TensorBoard
    events of the training and the val AP in out_dir/tb); with `model.checkpoint`, adopt that one."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if params["model"]["checkpoint"]:
        return adopt_base(params, data_dir, out_dir)
    ctx, device = init_distributed(params["device"])  # under torchrun (train_base.gpus > 1): DDP
    ok = False
    try:
        metrics = _train_base(params, data_dir, out_dir, ctx, device)
        ok = True
        return metrics
    finally:
        shutdown(ctx, wait=ok)


def _train_base(params: dict, data_dir: Path, out_dir: Path, ctx: DistContext, device: torch.device) -> dict[str, Any]:
    """train_base on this process (one of the DDP ranks under torchrun: rank 0 evaluates and writes)."""
    cfg = params["train_base"]
    train_set = CocoDetection(data_dir / "train.json", max_size=params["model"]["max_size"])
    arch = resolve_arch(params["model"]["base"], params["model"]["width"])
    torch.manual_seed(params["seed"])
    model = build_detector(arch, head_config(params["model"], train_set.labels.num_classes))
    if ctx.active and cfg["sync_bn"]:  # batch statistics over every rank's images (few per GPU)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    fp = fingerprint(str(arch), model.head_cfg, cfg, params["seed"], manifest["splits"]["train"]["sha256"])
    state_path = out_dir / "train_state.pt"
    cpu0 = time.process_time()  # this process's CPU time: the compute unit pipelines are compared in
    best = BestCheckpoint(out_dir, fp)
    with TrainLog(out_dir) if ctx.is_main else contextlib.nullcontext() as log:
        def on_eval(it: int) -> None:
            ap = evaluate(model, data_dir / "minival.json", params["eval"]["batch_size"], device)["AP"]
            log.metrics({"AP": ap}, it, prefix="minival/")
            print(f"train_base: iteration {it}: minival AP {ap:.2f}" + (" (best so far)" if best.offer(it, ap, model)
                                                                       else f" (best {best.ap:.2f} at {best.it})"),
                  file=sys.stderr, flush=True)
        summary = train_detector(model, train_set, cfg, state_path, params["seed"], device, fp, desc="train_base",
                                 log=log, on_eval=on_eval, eval_every=cfg["eval_every"], ctx=ctx)
        if not ctx.is_main:
            return summary
        kept = summary["iters"]
        if cfg["eval_every"] > 0:
            final = evaluate(model, data_dir / "minival.json", params["eval"]["batch_size"], device)["AP"]
            log.metrics({"AP": final}, summary["iters"], prefix="minival/")
            if best.it is not None and best.ap > final:
                model.load_state_dict(best.state_dict())
                kept = best.it
            print(f"train_base: keeping iteration {kept} (minival AP {max(final, best.ap or final):.2f}; "
                  f"last iteration {final:.2f})", file=sys.stderr)
        metrics = evaluate(model, data_dir / "val.json", params["eval"]["batch_size"], device)
        log.metrics(metrics, summary["iters"], prefix="val/")
    metrics.update({"kept_iter": kept, "arch": str(arch), "params": count_params(model), "flops": count_flops(model),
                    "train_iters": summary["iters"], "train_seconds": summary["seconds"],
                    "train_cpu_seconds": round(time.process_time() - cpu0 + summary["resumed_cpu_seconds"], 2)})
    metrics["latency_ms"] = measured_latency(model, data_dir, device, val_timing(params))
    save_detector(out_dir / "model.pt", model.cpu(), stage="train_base", metrics=metrics)
    write_json(out_dir / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)
    best.clear()
    return metrics


class BestCheckpoint:
    """The weights with the best minival AP seen during training (out_dir/best.pt), resumable:
    a rerun after a kill keeps what an earlier process found, if written for the same run."""

    def __init__(self, out_dir: Path, fingerprint: str) -> None:
        self.path, self.fp = out_dir / "best.pt", fingerprint
        self.it: int | None = None
        self.ap: float | None = None
        saved = load_train_state(self.path, fingerprint, BEST_FORMAT, "train_base", quiet=True)
        if saved is not None:
            self.it, self.ap = int(saved["iter"]), float(saved["ap"])

    def offer(self, it: int, ap: float, model: torch.nn.Module) -> bool:
        """Keep the model's weights if `ap` beats the best so far; say whether it did."""
        if self.ap is not None and ap <= self.ap:
            return False
        self.it, self.ap = it, ap
        save_torch(self.path, {"format": BEST_FORMAT, "fingerprint": self.fp, "iter": it, "ap": ap,
                               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
        return True

    def state_dict(self) -> dict:
        return torch.load(self.path, map_location="cpu", weights_only=True)["model"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
