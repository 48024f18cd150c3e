"""Benchmark: profile the default latency space on this CPU and validate it end to end.

    .venv/bin/python bench/latency_profile.py [--repeat N] [--params FILE ...]

Each repeat runs the profile_latency stage from scratch (no cache) into a temporary folder and
prints one row: stage wall time, entries, MAPE and Spearman of predicted vs measured end-to-end
latency over the random archs, the fitted in-context factor and the load average meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from jdnas.config import load_params, merge
from jdnas.latency.profile import profile_latency

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--params", action="append", default=None, help="params files (default: params.yaml)")
    args = ap.parse_args()
    params = load_params(args.params or [REPO / "params.yaml"])
    params = merge(params, {"latency": {"reuse_entries": False}}, source="bench")
    classes = len(params["data"]["synthetic"]["classes"])
    print(f"{'run':>3} {'seconds':>8} {'entries':>7} {'MAPE %':>7} {'Spearman':>8} {'max err %':>9} "
          f"{'factor':>6} {'load 1m':>7}  base breakdown (ms)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "manifest.json").write_text(json.dumps({"categories": [{"id": i + 1} for i in range(classes)]}))
        for r in range(args.repeat):
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            s = profile_latency(params, data, out)
            seconds = time.perf_counter() - t0
            v = json.loads((out / "validation.json").read_text())
            parts = " ".join(f"{k}={x:.2f}" for k, x in v["base"]["predicted_ms"].items())
            print(f"{r:>3} {seconds:>8.1f} {s['entries']:>7} {s['mape_percent']:>7.2f} {s['spearman']:>8.3f} "
                  f"{s['max_abs_error_percent']:>9.2f} {v['calibration']['in_context_factor']:>6.3f} "
                  f"{os.getloadavg()[0]:>7.2f}  {parts}", flush=True)


if __name__ == "__main__":
    main()
