"""Benchmark: profile the default latency space on this CPU and validate it end to end.

    .venv/bin/python bench/latency_profile.py [--repeat N] [--load N] [--keep DIR] [--params FILE ...]

Each repeat runs the profile_latency stage from scratch (no cache) into a temporary folder and
prints one row: stage wall time, entries, MAPE and Spearman of predicted vs measured end-to-end
latency over the random archs (and the MAPE of those whose head is not the base's), the fitted
in-context factors (backbone / head), the glue and the load average meanwhile.

`--load N` starts N CPU-bound processes (`yes > /dev/null`) beside the profiler for the whole
run and stops them afterwards: the busy-machine condition the table must hold under.
`--keep DIR` copies each run's validation.json and table.csv to DIR/run<r>/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from jdnas.config import load_params, merge
from jdnas.data.prepare import prepare_data, resolved_params
from jdnas.latency.profile import profile_latency
from jdnas.latency.validate import summarize

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def cpu_load(n: int) -> Iterator[None]:
    """`n` CPU-bound processes (`yes > /dev/null`) for the duration of the block."""
    procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--load", type=int, default=0, help="CPU-bound processes started beside the profiler")
    ap.add_argument("--keep", type=Path, default=None, help="copy each run's validation.json / table.csv here")
    ap.add_argument("--params", action="append", default=None, help="params files (default: params.yaml)")
    args = ap.parse_args()
    params = load_params(args.params or [REPO / "params.yaml"])
    params = merge(params, {"latency": {"reuse_entries": False, "allow_inaccurate": True}}, source="bench")
    print(f"# load: {args.load} extra CPU-bound process(es) on {os.cpu_count()} CPUs", flush=True)
    print(f"{'run':>3} {'seconds':>8} {'entries':>7} {'MAPE %':>7} {'Spearman':>8} {'max err %':>9} "
          f"{'MAPE other heads %':>18} {'factor b/h':>10} {'glue':>5} {'load 1m':>7}  base breakdown (ms)")
    with tempfile.TemporaryDirectory() as tmp, cpu_load(args.load):
        data = Path(tmp) / "data"  # the params' data, prepared: the grid's input sizes depend on its objects
        prepare_data(params, data)
        params = resolved_params(params, data)  # `auto` model values, as the CLI fills them in
        for r in range(args.repeat):
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            s = profile_latency(params, data, out)
            seconds = time.perf_counter() - t0
            v = json.loads((out / "validation.json").read_text())
            base_head = v["archs"][-1]["head"] if v["archs"] else None  # presets run at the base's head
            other = summarize([a for a in v["archs"] if a["kind"].startswith("random") and a["head"] != base_head])
            cal = v["calibration"]
            factors = f"{cal['in_context_factor']:.2f}/{cal.get('head_context_factor', 1.0):.2f}"
            glue = next(iter(cal["glue_ms"].values()))
            parts = " ".join(f"{k}={x:.2f}" for k, x in v["base"]["predicted_ms"].items())
            print(f"{r:>3} {seconds:>8.1f} {s['entries']:>7} {s['mape_percent']:>7.2f} {s['spearman']:>8.3f} "
                  f"{s['max_abs_error_percent']:>9.2f} {other['mape_percent'] or 0:>18.2f} {factors:>10} "
                  f"{glue:>5.2f} {os.getloadavg()[0]:>7.2f}  {parts}", flush=True)
            if args.keep:
                dest = args.keep / f"run{r}"
                dest.mkdir(parents=True, exist_ok=True)
                for name in ("validation.json", "table.csv"):
                    shutil.copy(out / name, dest / name)


if __name__ == "__main__":
    main()
