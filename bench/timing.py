"""The benches' clock: the median CPU time of repeated calls (one thread; CPU time holds up when
other jobs share the cores, where wall time would not)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def cpu_ms(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, Any]:
    """Median CPU milliseconds of `fn` over `repeats` calls after `warmup` untimed ones, and the
    last call's result."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return 1000 * statistics.median(times), out
