"""TensorBoard event files of the training stages, in `<stage output folder>/tb`.

`TrainLog` is a thin wrapper over `torch.utils.tensorboard.SummaryWriter`: training loops feed
it their scalars every iteration and it writes their means over windows of iterations (at most
`points` per run, so a long GPU run keeps small files); the stage then logs its final metrics
(AP, AP50, ...) at the last step. A resumed run opens the writer with `purge_step` = the
iteration it resumes from, so TensorBoard drops what the killed run wrote past its checkpoint
instead of showing it twice. TensorBoard reads a folder's event files in name order, and a
name's only ordered part is its whole second (the writer counter after the pid sorts 10 before
9), so a writer opened in the second of an earlier file waits for the next second: otherwise the
later file can be read first and its events purged. Logging reads Python floats only: it never
changes training.
`tensorboard --logdir runs` shows every stage.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping


def _after_last_file(folder: Path) -> None:
    """Wait until the clock's whole second is past every event file's in `folder`, so a file
    opened now sorts after them."""
    seconds = [int(f.name.split(".")[3]) for f in folder.glob("events.out.tfevents.*")
               if f.name.split(".")[3].isdigit()]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))


class TrainLog:
    """Scalars of one stage's run -> `<out_dir>/tb` (opened on first use; a context manager)."""

    def __init__(self, out_dir: str | Path, points: int = 1000) -> None:
        self.dir = Path(out_dir) / "tb"
        self.points = points
        self.writer: Any = None
        self.every, self.total = 1, 0
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def open(self, step: int | None) -> None:
        """Start writing at `step`: events an earlier run wrote at `step` or later are discarded
        (None: nothing is discarded)."""
        from torch.utils.tensorboard import SummaryWriter
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        _after_last_file(self.dir)
        self.writer = SummaryWriter(str(self.dir), purge_step=step)

    def start(self, step: int, total: int) -> None:
        """A training loop begins (or resumes) at iteration `step` of `total`."""
        self.open(step)
        self.every, self.total = max(1, total // self.points), total
        self._sums.clear()
        self._counts.clear()

    def add(self, it: int, values: Mapping[str, float], prefix: str = "train/") -> None:
        """Scalars of iteration `it` (0-based); each one's mean over the window is written at the
        window's last iteration (a scalar missing from some iterations is averaged over the others)."""
        for k, v in values.items():
            self._sums[prefix + k] += float(v)
            self._counts[prefix + k] += 1
        if (it + 1) % self.every == 0 or it + 1 == self.total:
            for tag, total in self._sums.items():
                self.writer.add_scalar(tag, total / self._counts[tag], it)
            self._sums.clear()
            self._counts.clear()

    def metrics(self, values: Mapping[str, Any], step: int, prefix: str = "eval/") -> None:
        """Final numbers (e.g. AP, AP50, AP75, APs/m/l) at `step`; non-numeric and None values are skipped."""
        if self.writer is None:
            # no purge: the final numbers add to what the training wrote
            self.open(None)
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
