"""Does weight inheritance pay? AP of a child after `prune` / `shallow`, inherited vs from scratch.

    .venv/bin/python bench/inheritance.py [--threads 1]

Trains (or reuses, see bench/common.py) the parent r18 x 0.25 on the synthetic data with the
train_base recipe (600 iterations of batch 8, cosine), applies each action, and trains the child
(a) from the inherited weights with the train_student recipe and (b) from random init with the
parent's recipe, each iteration count being its own full schedule. Prints val AP per count and
the fewest iterations each needed to reach the parent's AP.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import PARENT_ITERS, bench_params, parent, table, train_and_eval

from jdnas.models.complexity import count_params
from jdnas.models.detector import build_detector
from jdnas.models.morphism import Action, morph_detector

ACTIONS = ("prune(3,0.5)", "shallow(3,1)")
INHERITED_ITERS = (0, 25, 50, 100, 200)
SCRATCH_ITERS = (200, 400, PARENT_ITERS)


def first_reaching(results: dict[int, float], target: float) -> tuple[int | None, int]:
    """The first iteration count whose AP reaches `target`, and the count before it (the true
    number of iterations needed lies in (before, first])."""
    before = 0
    for n, ap in sorted(results.items()):
        if ap >= target:
            return n, before
        before = n
    return None, before


def speedup(inh: tuple[int | None, int], scr: tuple[int | None, int]) -> str:
    """How many times fewer iterations the inherited child needed, with the range the grids allow."""
    (ni, ni_lo), (ns, ns_lo) = inh, scr
    if ni is None:
        return "n/a (inherited never reached it)"
    if ni == 0:
        return "no training needed" + ("" if ns is not None else f"; scratch never in {max(SCRATCH_ITERS)}")
    if ns is None:
        return f"> {max(SCRATCH_ITERS) / ni:.0f}x (scratch never reached it in {max(SCRATCH_ITERS)})"
    hi = f"{ns / ni_lo:.0f}x" if ni_lo else "inf"
    return f"{ns / ni:.1f}x (grid range {ns_lo / ni:.1f}x-{hi})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    params = bench_params()
    par, par_metrics = parent(params)
    target = par_metrics["AP"]
    print(f"# parent {par.arch}: AP {target} after {PARENT_ITERS} iterations, {count_params(par)} params", flush=True)
    rows, summary = [], []
    for text in ACTIONS:
        action = Action.parse(text)
        inherited, scratch = {}, {}
        for n in INHERITED_ITERS:
            child = morph_detector(par, action, seed=args.seed)
            inherited[n], secs = train_and_eval(child, params, "train_student", n, args.seed)
            print(f"# {action} inherited {n:4d} it: AP {inherited[n]:.2f} ({secs:.0f} s)", flush=True)
        for n in SCRATCH_ITERS:
            torch.manual_seed(args.seed)
            child = build_detector(morph_detector(par, action).arch, par.head_cfg)
            scratch[n], secs = train_and_eval(child, params, "train_base", n, args.seed)
            print(f"# {action} scratch   {n:4d} it: AP {scratch[n]:.2f} ({secs:.0f} s)", flush=True)
        arch = morph_detector(par, action).arch
        for n in sorted(set(inherited) | set(scratch)):
            rows.append([str(action), n, f"{inherited[n]:.2f}" if n in inherited else "",
                         f"{scratch[n]:.2f}" if n in scratch else ""])
        for frac in (1.0, 0.9):
            ni, ns = first_reaching(inherited, frac * target), first_reaching(scratch, frac * target)
            summary.append([str(action), str(arch), count_params(morph_detector(par, action)), f"{frac:.0%}",
                            "never" if ni[0] is None else f"({ni[1]}, {ni[0]}]",
                            "never" if ns[0] is None else f"({ns[1]}, {ns[0]}]", speedup(ni, ns)])
    print()
    print(f"parent {par.arch}: val AP {target:.2f} ({PARENT_ITERS} it, {count_params(par)} params)\n")
    print(table(rows, ["action", "iters", "AP inherited", "AP scratch"]))
    print()
    print(table(summary, ["action", "child", "params", "target (x parent AP)", "iters inherited",
                          "iters scratch", "fewer iterations"]))
    print(f"\n# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
