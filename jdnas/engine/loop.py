"""Training and evaluation loops for detectors.

- `train_loop`: the one training loop (detectors' and the supernet's): SGD with warm-up and a
  step/cosine/constant schedule, gradient clipping, pinned batches, no host sync per step,
  optional DDP under torchrun, a progress bar, periodic training state checkpoints and exact
  resume after a kill (same batches, same optimizer and RNG state), and TensorBoard scalars
  through a `TrainLog`. A caller's step runs each iteration's forward and backward passes;
  `LoopHooks` add state, logged values and work before a step.
- `train_detector`: a detector's own (or KD) losses as that step, in bf16 autocast +
  channels_last on CUDA; logs each loss term, total loss, lr and images/s.
- `evaluate`: COCO bbox AP with pycocotools' COCOeval.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from jdnas.data.dataset import CocoDetection, batches_for, eval_loader
from jdnas.engine.dist import DistContext, barrier
from jdnas.engine.step_meter import Step, StepMeter
from jdnas.engine.tblog import TrainLog
from jdnas.io import save_torch
from jdnas.models.detector import Detector, jittered_input
from jdnas.seeding import derive_seed

STATE_FORMAT = "jdnas-train-state/1"
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

LossFn = Callable[[Detector, list, list], dict[str, torch.Tensor]]
# step(it, images, targets, forward): forward and backward passes; returns the detached terms to log
TrainStep = Callable[[int, list, list, torch.nn.Module], dict[str, torch.Tensor]]
Replan = Callable[[int, float, float], int]  # (iterations done, seconds, CPU-seconds) -> schedule length
REPLAN_CAP = 2  # a replanned schedule is at most this many times the planned one


def lr_factor(it: int, cfg: dict[str, Any]) -> float:
    """Learning-rate multiplier at iteration `it`: linear warm-up, then the schedule."""
    warm = cfg["warmup_iters"]
    w = min(1.0, 0.001 + (1 - 0.001) * it / warm) if warm > 0 and it < warm else 1.0
    progress = it / max(1, cfg["iters"])
    if cfg["schedule"] == "cosine":
        s = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg["schedule"] == "step":
        s = 0.1 ** sum(progress >= f for f in cfg["steps"])
    else:
        s = 1.0
    return w * s


def schedule_for(cfg: dict[str, Any], iters: int) -> dict[str, Any]:
    """A training section with `iters` iterations (warm-up and checkpoints scaled to fit)."""
    return {**cfg, "iters": iters, "warmup_iters": min(cfg["warmup_iters"], iters // 5),
            "checkpoint_every": max(1, min(cfg["checkpoint_every"], iters))}


def make_optimizer(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.optim.SGD:
    """SGD; no weight decay on norms and biases; the fused kernel when the weights are on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    cuda = all(p.is_cuda for p in decay + no_decay) and bool(decay + no_decay)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg["lr"], momentum=cfg["momentum"], fused=True if cuda else None)


def detection_loss(model: Detector, images: list, targets: list) -> dict[str, torch.Tensor]:
    """The detector's own losses (torchvision returns them in train mode)."""
    return model(images, targets)


def to_device(images: list, targets: list, device: torch.device) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


class _LogLines:
    """A file for tqdm that writes each refresh as its own line: in a log file, `tail -f` and
    `grep` see the progress instead of one ever-growing carriage-return line."""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            sys.stderr.write(s + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    """A progress bar on a terminal; a progress line every 15 s in a log."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=tty,
                mininterval=0.5 if tty else 15.0, file=sys.stderr if tty else _LogLines())


def load_train_state(path: Path, fingerprint: str, format_tag: str, desc: str, quiet: bool = False) -> dict | None:
    """The training state saved at `path` if it was written for this run (same format and
    fingerprint), else None: a state for other params is ignored with a message, one a crash left
    unreadable is set aside as `<name>.corrupt` with a warning; training then starts afresh (a
    rerun never stays stuck on it)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or unpicklable content
        if not quiet:
            aside = path.with_name(path.name + ".corrupt")
            path.replace(aside)  # kept for a look, out of the way of the next save
            print(f"{desc}: warning: {path} is unreadable ({type(e).__name__}): moved to {aside}; starting afresh",
                  file=sys.stderr)
        return None
    if isinstance(state, dict) and state.get("format") == format_tag and state.get("fingerprint") == fingerprint:
        return state
    if not quiet:
        print(f"{desc}: ignoring {path} (written for other params)", file=sys.stderr)
    return None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on the CPU: what a step's forward passes run under."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class LoopHooks:
    """What a run adds to `train_loop` beside its step; each does nothing here."""

    hidden: tuple[str, ...] = ()  # logged terms kept off the bar and the summary's last_losses

    def before_step(self, it: int, optimizer: torch.optim.Optimizer) -> None:
        """Iteration `it` starts (its batch on the device, before lr, zero_grad and the step)."""

    def state(self) -> dict[str, Any]:
        """Extra fields of the saved training state."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """A saved state (with those fields) is resumed."""

    def log_values(self, step: Step) -> dict[str, float]:
        """Extra values logged with a step's losses and lr."""
        return {}

    def postfix(self, step: Step, shown: dict[str, str]) -> dict[str, str]:
        """The progress bar's postfix from a step's losses as shown (`loss_` stripped)."""
        return shown


def _restore(state: dict, model: torch.nn.Module, extra: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
             hooks: LoopHooks, device: torch.device, is_main: bool) -> tuple[float, float]:
    """Weights, optimizer, hooks' state and (rank 0) the RNG from a training state; the seconds
    and CPU-seconds it had spent."""
    model.load_state_dict(state["model"])
    if extra is not None:
        extra.load_state_dict(state["extra"])
    optimizer.load_state_dict(state["optimizer"])
    hooks.load_state(state)
    if is_main:
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # torchvision's samplers draw on the GPU
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    return float(state["seconds"]), float(state.get("cpu_seconds", 0.0))


def train_loop(model: torch.nn.Module, dataset: CocoDetection, cfg: dict[str, Any], state_path: str | Path,
               seed: int, device: torch.device, step: TrainStep, hooks: LoopHooks = LoopHooks(),
               fingerprint: str = "", desc: str = "train", hint: str = "lower the lr in params",
               extra: torch.nn.Module | None = None, stop_after: int | None = None, log: TrainLog | None = None,
               on_eval: Callable[[int], None] | None = None, eval_every: int = 0, ctx: DistContext = DistContext(),
               first: int = 0, until: int | None = None, momentum: dict[str, torch.Tensor] | None = None,
               find_unused_parameters: bool = False, replan: Replan | None = None) -> dict[str, Any]:
    """The one training loop (see `train_detector` for the arguments it shares): SGD on `model` (on
    `device` already) and `extra`, `step(it, images, targets, forward)` running the forward and
    backward passes of each iteration and returning the detached terms to log; `hooks` add to it.

    Under DDP `forward` is the wrapper (`find_unused_parameters` for steps that leave weights
    unused); rank 0 trains from `seed` (or the resumed RNG), every other rank from a seed derived
    from its rank and start, so ranks draw different samples.

    `replan(it, seconds, cpu_seconds)`, called at each checkpoint with what training has spent
    so far, returns the schedule's new length (at most `REPLAN_CAP` x cfg's; kept in the training
    state): a compute budget that holds while the price of an iteration drifts with the machine's
    load. In the schedule's first half the length may grow or shrink; past it only shrink (a
    longer schedule would raise the decayed lr again). Not for a segment (`first`/`until`).
    """
    state_path = Path(state_path)
    cfg = dict(cfg)  # its iters may be replanned
    cap = REPLAN_CAP * cfg["iters"]
    trained = model if extra is None else torch.nn.ModuleList([model, extra.to(device)])
    optimizer = make_optimizer(trained, cfg)
    named = named_parameters(model, extra)
    load_momentum(optimizer, named, momentum or {})
    state = load_train_state(state_path, fingerprint, STATE_FORMAT, desc, quiet=not ctx.is_main)
    start = first if state is None else int(state["iter"])
    # RPN / RoI sampling draw from torch's global generator
    torch.manual_seed(seed if ctx.is_main else derive_seed(seed, "rank", ctx.rank, start))
    seconds, cpu_seconds = 0.0, 0.0
    if state is not None:
        seconds, cpu_seconds = _restore(state, model, extra, optimizer, hooks, device, ctx.is_main)
        cfg["iters"] = int(state.get("iters", cfg["iters"]))
        print(f"{desc}: resuming from {state_path} at iteration {start}/{cfg['iters']}", file=sys.stderr)

    def save(it: int) -> None:
        if ctx.is_main:
            save_torch(state_path, {"format": STATE_FORMAT, "fingerprint": fingerprint, "iter": it, "iters": cfg["iters"],
                                    "seconds": meter.seconds, "cpu_seconds": meter.cpu_seconds,
                                    "rng": torch.get_rng_state(),
                                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    **({"extra": extra.state_dict()} if extra is not None else {}), **hooks.state()})
            if log is not None:
                log.flush()
        barrier(ctx)

    def bounds() -> tuple[int, int]:
        """(where the schedule stops, where this call stops)."""
        end = cfg["iters"] if until is None else min(until, cfg["iters"])
        return end, end if stop_after is None else min(end, start + stop_after)

    end, total = bounds()
    loader = batches_for(dataset, cfg["batch_size"], max(total, cap) if replan else total, seed, start,
                         cfg["workers"], ctx=ctx, pin_memory=device.type == "cuda")
    params = [p for p in trained.parameters() if p.requires_grad]
    forward = model
    if ctx.active:  # gradients averaged in buckets, overlapped with the (last) backward pass
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    trained.train()
    bar = progress_bar(cfg["iters"], start, desc) if ctx.is_main else None
    if log is not None:
        log.start(start, cfg["iters"])
    meter = StepMeter(device, desc, hint, seconds=seconds, cpu_seconds=cpu_seconds)
    it, last = start, {}
    try:
        for images, targets in loader:
            if it >= total:  # a replanned, shorter schedule
                break
            meter.begin()
            images, targets = to_device(images, targets, device)
            hooks.before_step(it, optimizer)
            for g in optimizer.param_groups:
                g["lr"] = cfg["lr"] * lr_factor(it, cfg)
            optimizer.zero_grad(set_to_none=True)
            losses = step(it, images, targets, forward)
            if cfg["clip_grad"] > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad"])
            optimizer.step()
            it += 1
            evals = on_eval is not None and eval_every > 0 and it % eval_every == 0 and it < end
            saves = it % cfg["checkpoint_every"] == 0 or it == total
            for s in meter.end(it - 1, losses, len(images) * ctx.world, read=evals or saves):
                if log is not None:
                    log.add(s.it, {**s.values, "lr": cfg["lr"] * lr_factor(s.it, cfg), **hooks.log_values(s)})
                last = {k: round(v, 4) for k, v in s.values.items() if k not in hooks.hidden}
                if bar is not None:
                    bar.set_postfix(hooks.postfix(s, {k.replace("loss_", ""): f"{v:.3f}" for k, v in last.items()}),
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if evals and ctx.is_main:
                with torch.random.fork_rng(devices=[]):
                    model.eval()
                    on_eval(it)
                    trained.train()
            if saves and replan is not None and it < total:
                asked = min(cap, max(it + 1, replan(it, meter.seconds, meter.cpu_seconds)))
                cfg["iters"] = asked if 2 * it <= cfg["iters"] else min(cfg["iters"], asked)
                end, total = bounds()
                if bar is not None:
                    bar.total = cfg["iters"]
                    bar.refresh()
            if saves:
                save(it)
    finally:
        if bar is not None:
            bar.close()
    return {"iters": it, "seconds": round(meter.seconds, 2), "cpu_seconds": round(meter.cpu_seconds, 2),
            "resumed_cpu_seconds": cpu_seconds, "last_losses": last, "momentum": momentum_of(optimizer, named)}


class _Throughput(LoopHooks):
    """train_detector's additions: images/s in the log and on the bar, the total loss off the bar."""

    hidden = ("loss",)

    def log_values(self, step: Step) -> dict[str, float]:
        return {"img_per_s": step.img_per_s}

    def postfix(self, step: Step, shown: dict[str, str]) -> dict[str, str]:
        return {**shown, "img/s": f"{step.img_per_s:.1f}"}


def train_detector(model: Detector, dataset: CocoDetection, cfg: dict[str, Any], state_path: str | Path,
                   seed: int, device: torch.device, fingerprint: str = "", loss_fn: LossFn = detection_loss,
                   desc: str = "train", stop_after: int | None = None,
                   extra: torch.nn.Module | None = None, log: TrainLog | None = None,
                   on_eval: Callable[[int], None] | None = None, eval_every: int = 0,
                   ctx: DistContext = DistContext(), first: int = 0, until: int | None = None,
                   momentum: dict[str, torch.Tensor] | None = None, replan: Replan | None = None) -> dict[str, Any]:
    """Train `model` for cfg['iters'] iterations, checkpointing to `state_path` and resuming from it.

    A saved state is resumed only if its `fingerprint` (arch, params, data) matches; otherwise
    training starts afresh. `stop_after` ends the run early after that many iterations of this
    call (used by tests and by callers that train in slices). `extra` holds trainable modules
    that live beside the model (e.g. KD adapters used by `loss_fn`): they are optimised and
    checkpointed with it. `log` receives each iteration's loss terms, total loss, lr and
    images/s (TensorBoard; it never changes training). `on_eval(it)` runs every `eval_every`
    iterations with the model in eval mode and the RNG state saved (it never changes training
    either; rank 0 only). Under torchrun (`ctx` active) each rank trains on its share of every
    batch and `loss_fn` gets the DistributedDataParallel wrapper; rank 0 writes the state.
    Losses are read, checked and logged without a host sync per step (`StepMeter`).
    Returns a summary with the iterations
    done, the training seconds and CPU-seconds spent in total (resumed runs included), and the
    CPU-seconds earlier processes had spent (`resumed_cpu_seconds`: a caller timing its own
    process adds them, so a killed and resumed job counts all it spent).

    A segment of a longer schedule (a search lineage): `first` is where training starts when no
    state is resumed and `until` where it stops (exclusive; default cfg['iters']), the lr following
    cfg's schedule over all cfg['iters']; `momentum` seeds SGD's buffers by parameter name (KD
    modules as `extra.<name>`; a missing or misshapen one starts at zero), and the summary returns
    them (`momentum`), so the next segment continues where this one stopped. `replan`: see `train_loop`.
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    def step(it: int, images: list, targets: list, forward: torch.nn.Module) -> dict[str, torch.Tensor]:
        with autocast(device), jittered_input([model], cfg.get("scales", [1.0]), seed, it):
            losses = loss_fn(forward, images, targets)
        loss = sum(losses.values())
        loss.backward()
        return {**{k: v.detach() for k, v in losses.items()}, "loss": loss.detach()}

    return train_loop(model, dataset, cfg, state_path, seed, device, step, _Throughput(), fingerprint=fingerprint,
                      desc=desc, extra=extra, stop_after=stop_after, log=log, on_eval=on_eval, eval_every=eval_every, ctx=ctx,
                      first=first, until=until, momentum=momentum, replan=replan)


def named_parameters(model: torch.nn.Module, extra: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The trained parameters by name: the model's own names, KD modules' as `extra.<name>`."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if extra is not None:
        named.update({f"extra.{k}": p for k, p in extra.named_parameters() if p.requires_grad})
    return named


def momentum_of(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGD's momentum buffers by parameter name (on the CPU), for a segment that continues them."""
    out = {}
    for k, p in named.items():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[k] = buf.detach().cpu().clone()
    return out


def load_momentum(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor]) -> None:
    """Seed SGD's momentum buffers by name; given any, every other parameter starts at zero (the
    same first step as no buffer: dampening 0), so no step mixes seeded and unseeded groups."""
    if not buffers:
        return
    for k, p in named.items():
        b = buffers.get(k)
        ok = b is not None and tuple(b.shape) == tuple(p.shape)
        optimizer.state[p]["momentum_buffer"] = b.to(p.device, p.dtype).clone() if ok else torch.zeros_like(p)


@torch.no_grad()
def predict(model: Detector, dataset: CocoDetection, batch_size: int, device: torch.device) -> list[dict]:
    """COCO-format detections (xywh in original image pixels, category ids) for a dataset. On
    CUDA, images are decoded by up to 4 worker processes into pinned memory while the GPU runs; on
    the CPU, in this process (workers would take cores from the other jobs)."""
    model.to(device).eval()
    results = []
    cuda = device.type == "cuda"
    loader = eval_loader(dataset, batch_size, min(4, os.cpu_count() or 1) if cuda else 0, pin_memory=cuda)
    for images, targets in tqdm(loader, desc="evaluate", leave=False, file=sys.stderr,
                                disable=not sys.stderr.isatty()):
        outputs = model([im.to(device, non_blocking=True) for im in images])
        for out, tgt in zip(outputs, targets):
            boxes = out["boxes"].float().cpu() / tgt["scale"]
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                results.append({"image_id": int(tgt["image_id"]), "category_id": dataset.labels.label_to_cat[label],
                                "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


def coco_metrics(gt_json: str | Path, detections: list[dict]) -> dict[str, float | None]:
    """COCOeval bbox stats in percent: AP, AP50, AP75, APs, APm, APl (None where undefined)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (round(100 * float(v), 3) if v >= 0 else None) for k, v in zip(METRIC_NAMES, ev.stats[:6])}


def evaluate(model: Detector, gt_json: str | Path, batch_size: int, device: torch.device) -> dict[str, Any]:
    """COCO AP of `model` on a prepared split."""
    dataset = CocoDetection(gt_json, max_size=model.head_cfg["max_size"])
    return coco_metrics(gt_json, predict(model, dataset, batch_size, device))
