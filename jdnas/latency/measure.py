"""Timing on the target device: CUDA events after warm-up on GPU; on CPU a fixed thread count and
either wall time or the thread's CPU time (robust when other processes share the cores).

`measure_all` times many callables in `rounds` passes, each pass in a fresh random order, and
reports the fastest of all timed calls per callable: other processes on the machine only ever
add time to a call (cache and memory contention count even on the thread's CPU-time clock), so
the fastest call is the least disturbed one. The median moved with the load: beside a training
job the default table's validation MAPE was 5.3% by the median and 1.9% by the minimum
(docs/results.md).
"""
from __future__ import annotations

import math
import platform
import random
import time
from pathlib import Path
from typing import Callable, Hashable, Mapping

import torch

from jdnas.data.dataset import CocoDetection
from jdnas.errors import JdnasError

Builder = Callable[[], Callable[[], object]]  # builds the modules and inputs, returns the call to time


class Call:
    """A call to time, with the bytes its modules and input tensors hold (to bound what is kept)."""

    def __init__(self, fn: Callable[[], object], *holders: torch.nn.Module | torch.Tensor) -> None:
        self.fn = fn
        tensors = [t for h in holders for t in (list(h.parameters()) + list(h.buffers())
                                                if isinstance(h, torch.nn.Module) else [h])]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self) -> object:
        return self.fn()


def target_device(name: str) -> torch.device:
    """torch.device for `latency.device` (onnxruntime runs on the CPU); a one-line error when this
    machine lacks it."""
    if name in ("cpu", "onnxruntime"):
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise JdnasError(f"params: latency.device = {name!r} but this machine has no CUDA device "
                             "(profile on a machine that has it, or use cpu)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise JdnasError(f"params: latency.device = {name!r} but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise JdnasError(f"params: latency.device = {name!r} is not allowed: must be cpu, cuda, cuda:N or onnxruntime")


def device_name(device: torch.device) -> str:
    """What the hardware is: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Timer:
    """Times one call in milliseconds on a device."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.device = device
        self.clock = {"wall": time.perf_counter, "cpu_time": time.thread_time}[clock]

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = self.clock()
        fn()
        return (self.clock() - t0) * 1e3

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.inference_mode()
def measure_all(builders: dict[Hashable, Builder], timer: Timer, warmup: int, runs: int, rounds: int = 1,
                seed: int = 0, progress: Callable[[int, int], None] | None = None,
                slots: dict[Hashable, int] | None = None, keep_bytes: int = 0) -> dict[Hashable, float]:
    """Milliseconds of each builder's call, its fastest timed call: `runs` timed calls
    (split over `rounds` shuffled passes), each batch of timed calls preceded by `warmup` untimed ones.

    `slots[key]` > 1 gives a key that many separate places in every pass (and as many times
    the timed calls): for the entries every prediction shares, whose error no arch escapes.
    Built calls (`Call`) are kept for the next passes while they hold at most `keep_bytes` in
    all; the others are built again each time.
    """
    rng = random.Random(seed)
    per_slot = max(1, math.ceil(runs / rounds))
    samples: dict[Hashable, list[float]] = {k: [] for k in builders}
    order = [k for k in builders for _ in range((slots or {}).get(k, 1))]
    kept: dict[Hashable, Callable[[], object]] = {}
    held = 0
    done, total = 0, len(order) * rounds
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            fn = kept.get(key)
            if fn is None:
                fn = builders[key]()
                size = getattr(fn, "nbytes", None)
                if size is not None and held + size <= keep_bytes:
                    kept[key], held = fn, held + size
            for _ in range(warmup):
                fn()
            timer.sync()
            samples[key].extend(timer(fn) for _ in range(per_slot))
            done += 1
            if progress:
                progress(done, total)
    return {k: min(v) for k, v in samples.items()}


def latency_images(split: str | Path, max_size: int, n: int = 8) -> list[torch.Tensor]:
    """The first `n` images of a prepared split, loaded as for evaluation: what end-to-end latency
    is measured on (a trained detector's RoI-head cost depends on the proposals real images give)."""
    data = CocoDetection(split, max_size=max_size)
    return [data[i][0] for i in range(min(n, len(data)))]


@torch.inference_mode()
def measure_latency(models: Mapping[str, Callable[[list], object]], images: list[torch.Tensor], runs: int,
                    threads: int, device: torch.device, clock: str = "cpu_time") -> dict[str, float]:
    """Milliseconds per image of each model's eval forward over `images`: the sum over images of
    each image's fastest call, divided by their number (a detector, or any callable taking a list
    of images, such as `jdnas.models.export.OnnxDetector`).

    Every (model, image) call is timed once in each of `runs` shuffled rounds after one untimed
    call, so load from other jobs falls on all models alike, and an image's time needs only one
    undisturbed call, not a whole pass over the images undisturbed (timing whole passes, one
    student measured 0.54x and then 0.65x the base on a quiet VM; per image 0.625x and 0.628x:
    docs/results.md). On CPU with `threads` torch threads and, with one thread, `clock`
    (its CPU time by default; wall time with more threads, whose work the calling thread's CPU
    time would miss).
    """
    images = [x.to(device) for x in images]
    for m in models.values():
        if isinstance(m, torch.nn.Module):
            m.to(device).eval()
    builders = {(name, i): (lambda m=m, x=x: (lambda: m([x]))) for name, m in models.items()
                for i, x in enumerate(images)}
    old_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        timer = Timer(device, clock if device.type == "cpu" and threads == 1 else "wall")
        ms = measure_all(builders, timer, warmup=1, runs=runs, rounds=runs)
    finally:
        torch.set_num_threads(old_threads)
    return {name: round(sum(ms[name, i] for i in range(len(images))) / len(images), 3) for name in models}


def compare_on_val(models: Mapping[str, Callable[[list], object]], data_dir: str | Path, device: torch.device,
                   max_size: int, *, runs: int, threads: int, clock: str) -> dict[str, float]:
    """Every model timed in the same `runs` interleaved rounds on the prepared val images: what
    differs between their latencies is then the models, not the machine's load. Used where
    models are compared: evaluate_final and the report (settings: `config.val_timing`)."""
    images = latency_images(Path(data_dir) / "val.json", max_size)
    return measure_latency(models, images, runs, threads, device, clock)
