"""Does KD pay? A small student trained with and without KD from a larger trained detector.

    .venv/bin/python bench/kd.py [--threads 1] [--seeds 2] [--iters 300]

Teacher: the parent of bench/common.py (r18 x 0.25, 600 iterations). Student: tiny x 0.25 with a
narrower FPN (32 channels, so the 1x1 adapters are exercised), trained from scratch for the same
number of iterations with the train_base recipe, without KD and with each KD loss
(train_student.kd_* params: weight, fg/bg weights, temperature). Prints val AP per seed and mean.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import PARENT_ITERS, bench_params, parent, table, train_and_eval

from jdnas.joint.distill import KD_LOSSES, Distiller, Teacher
from jdnas.models.arch import preset
from jdnas.models.complexity import count_params
from jdnas.models.detector import build_detector

STUDENT = ("tiny", 0.25)
STUDENT_FPN = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--losses", nargs="+", default=list(KD_LOSSES), choices=KD_LOSSES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    params = bench_params()
    teacher_model, teacher_metrics = parent(params)
    kd = params["train_student"]
    print(f"# teacher {teacher_model.arch}: AP {teacher_metrics['AP']} ({PARENT_ITERS} it, "
          f"{count_params(teacher_model)} params); kd_weight {kd['kd_weight']}, fg/bg {kd['kd_fg_weight']}/"
          f"{kd['kd_bg_weight']}, T {kd['kd_temperature']}", flush=True)
    teacher = Teacher(teacher_model)
    head = {**teacher_model.head_cfg, "fpn_channels": STUDENT_FPN}
    results: dict[str, list[float]] = {}
    n_params = 0
    for seed in range(args.seeds):
        for kind in ["none", *args.losses]:
            torch.manual_seed(seed)
            student = build_detector(preset(*STUDENT), head)
            n_params = count_params(student)
            if kind == "none":
                ap_, secs = train_and_eval(student, params, "train_base", args.iters, seed)
            else:
                d = Distiller(student, teacher, kind, kd["kd_weight"], kd["kd_fg_weight"], kd["kd_bg_weight"],
                              kd["kd_temperature"], seed)
                ap_, secs = train_and_eval(student, params, "train_base", args.iters, seed, d.loss_fn, d)
            results.setdefault(kind, []).append(ap_)
            print(f"# seed {seed} {kind:10s}: AP {ap_:.2f} ({secs:.0f} s)", flush=True)
    base = statistics.mean(results["none"])
    rows = [[kind, *[f"{a:.2f}" for a in aps], f"{statistics.mean(aps):.2f}",
             "" if kind == "none" else f"{statistics.mean(aps) - base:+.2f}"] for kind, aps in results.items()]
    print()
    print(f"teacher {teacher_model.arch}: val AP {teacher_metrics['AP']:.2f}; student "
          f"{build_detector(preset(*STUDENT), head).arch} (FPN {STUDENT_FPN}), {n_params} params, "
          f"{args.iters} iterations each\n")
    print(table(rows, ["KD loss", *[f"AP seed {s}" for s in range(args.seeds)], "mean AP", "vs no KD"]))
    print(f"\n# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
