"""Loss values and step times of a training loop without a host sync per step.

Reading a CUDA loss (`.item()`, `isfinite` in an `if`) or timing a step (`synchronize`) makes the
CPU wait for the GPU, so the next step's kernels are not queued while this one runs. A
`StepMeter` keeps each step's loss tensors on the device and reads them all with one transfer
every `read_every` steps (and at every step the loop names, e.g. before a checkpoint): the
finiteness check, the log and the progress bar run then, over the steps read. Time is measured
over the same windows. On the CPU reading costs nothing, so every step is read as it ends.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from jdnas.errors import JdnasError


@dataclass
class Step:
    """One step as read: its iteration, loss values and throughput."""

    it: int
    values: dict[str, float]
    img_per_s: float


class StepMeter:
    """Steps' loss tensors and times, read in windows (see the module doc)."""

    def __init__(self, device: torch.device, desc: str, hint: str, read_every: int = 20, seconds: float = 0.0,
                 cpu_seconds: float = 0.0) -> None:
        """`seconds` and `cpu_seconds`: what earlier processes spent (a resumed run) to count on from."""
        self.cuda = device.type == "cuda"
        self.every = read_every if self.cuda else 1
        self.desc, self.hint = desc, hint
        self.seconds, self.cpu_seconds = seconds, cpu_seconds
        self._pending: list[tuple[int, list[str], torch.Tensor, int]] = []
        self._t0: float | None = None
        self._c0 = 0.0

    def begin(self) -> None:
        """A step starts (its batch is loaded): the window's clock starts if it has not."""
        self._c0 = time.process_time()
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def end(self, it: int, losses: dict[str, torch.Tensor], images: int, read: bool = False) -> list[Step]:
        """Step `it` is queued with its loss tensors. Returns the steps read now (none between
        reads): every `read_every`-th step, or at once with `read`. A non-finite loss among them
        is a one-line error naming the step and the loss."""
        self.cpu_seconds += time.process_time() - self._c0
        names = list(losses)
        self._pending.append((it, names, torch.stack([v.detach().float().reshape(()) for v in losses.values()]),
                              images))
        if not read and len(self._pending) < self.every:
            return []
        flat = torch.cat([p[2] for p in self._pending]).tolist()  # the one host sync of the window
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self.seconds += dt
        rate = sum(p[3] for p in self._pending) / max(dt, 1e-9)
        steps, i = [], 0
        for step_it, step_names, _, _ in self._pending:
            values = dict(zip(step_names, flat[i:i + len(step_names)]))
            i += len(step_names)
            for name, v in values.items():
                if not math.isfinite(v):
                    raise JdnasError(f"{self.desc}: {name} became {v} at iteration {step_it} ({self.hint})")
            steps.append(Step(step_it, values, rate))
        self._pending, self._t0 = [], None
        return steps
