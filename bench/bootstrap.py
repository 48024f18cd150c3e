"""The paired per-image bootstrap (jdnas/joint/bootstrap.py) on a finished run's finalists: what
one `search_select` decision costs.

Reads the detections two finalists of a round left on minival (`runs/search/round_<r>/cand_<k>/
detections.json`) and prints, per resample count, the CPU time of matching and of the bootstrap
(median of --repeats, one thread) and the interval it gives:

    .venv/bin/python bench/bootstrap.py [--run .] [--round 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import table  # noqa: E402
from timing import cpu_ms  # noqa: E402
from jdnas.joint.bootstrap import image_matches, paired_bootstrap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=REPO, help="a finished run's folder (data/, runs/search/)")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gt = args.run / "data" / "prepared" / "minival.json"
    rnd = args.run / "runs" / "search" / f"round_{args.round}"
    found = sorted(rnd.glob("cand_*/detections.json"))
    if len(found) < 2:
        sys.exit(f"bench/bootstrap.py: {rnd} holds detections of {len(found)} finalist(s); two are needed")
    dets = [json.loads(p.read_text()) for p in found[:2]]
    match_ms, matches = cpu_ms(lambda: [image_matches(gt, d) for d in dets], args.repeats)
    a, b = matches
    rows = []
    for n in (50, 200, 1000):
        ms, r = cpu_ms(lambda n=n: paired_bootstrap(a, b, n=n, seed=0), args.repeats)
        rows.append([n, f"{ms:.0f}", f"{r['delta']:+.2f}", f"[{r['low']:+.2f}, {r['high']:+.2f}]"])
    print(f"{found[0].parent.name} vs {found[1].parent.name} of {rnd} on {a.n_images} minival images; "
          f"matching both: {match_ms:.0f} ms CPU")
    print(table(rows, ["resamples", "bootstrap ms CPU", "ΔAP", "interval"]))


if __name__ == "__main__":
    main()
