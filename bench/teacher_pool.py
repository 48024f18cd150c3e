"""Benchmark: the pool's promise, measured.

Trains the elastic supernet once (progressive shrinking, sandwich rule, in-place distillation),
takes its largest, smallest and middle members (sliced weights + BN recalibration), and
compares them with the same three architectures each trained alone from the same
initialisation for the same iterations, batch size and schedule. Prints the six APs (val
split) and the compute each side spent, in process CPU-seconds (all threads counted).

    python bench/teacher_pool.py                      # params.yaml sizes (CPU, ~15-20 min shared)
    python bench/teacher_pool.py --iters 160 --params params.yaml --params my.yaml
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from jdnas.config import load_params
from jdnas.data.dataset import CocoDetection
from jdnas.data.prepare import prepare_data
from jdnas.engine.device import resolve_device
from jdnas.engine.loop import evaluate, train_detector
from jdnas.joint.teacher_pool import TeacherPool, pool_space, train_supernet
from jdnas.models.complexity import count_params
from jdnas.models.detector import build_detector, head_config
from jdnas.models.elastic import Supernet


class CpuClock:
    """Process CPU-seconds (every thread) and wall seconds spent inside a `with` block."""

    def __enter__(self) -> "CpuClock":
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", action="append", help="params files (default: params.yaml)")
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default: teacher_pool.train.iters)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/jdnas_bench_pool", help="scratch folder (data, states)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params or ["params.yaml"])
    cfg = copy.deepcopy(params["teacher_pool"]["train"])
    if args.iters:
        cfg["iters"] = args.iters
    cfg["checkpoint_every"] = cfg["iters"]  # one state write at the end; no resume in a benchmark
    work = Path(args.work)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare_data(params, data)
    device = resolve_device(params["device"])
    seed = params["seed"]
    train_set = CocoDetection(data / "train.json", max_size=params["model"]["max_size"])
    head = head_config(params["model"], train_set.labels.num_classes)
    space = pool_space(params["teacher_pool"]["space"])
    members = {"largest": space.largest(), "middle": space.middle(), "smallest": space.smallest()}
    print(f"space: largest {space.largest()}, min depths {space.min_depths}, width ratios "
          f"{space.width_choices()}; {cfg['iters']} iters x batch {cfg['batch_size']} "
          f"(phases at {cfg['depth_phase_start']}/{cfg['width_phase_start']}, sandwich n={cfg['sandwich_random']}), "
          f"{args.threads} threads", flush=True)

    # --- pool side: one supernet, three members taken from it ---
    for stale in work.glob("*.pt"):
        stale.unlink()
    torch.manual_seed(seed)
    supernet = Supernet(space, head)
    with CpuClock() as pool_train:
        train_supernet(supernet, train_set, cfg, work / "pool_state.pt", seed, device, desc="supernet")
    supernet.model.cpu()
    ev = params["teacher_pool"]["eval"]
    pool = TeacherPool(supernet, train_set, ev["bn_batches"], ev["bn_batch_size"], seed, device)
    results: dict[str, dict] = {}
    extract_cpu = 0.0
    for role, arch in members.items():
        with CpuClock() as c:
            teacher = pool.teacher(arch)
        extract_cpu += c.cpu
        ap_pool = evaluate(teacher, data / "val.json", params["eval"]["batch_size"], device)
        results[role] = {"arch": str(arch), "params": count_params(teacher), "pool_AP": ap_pool["AP"],
                         "pool_AP50": ap_pool["AP50"]}
        print(json.dumps({role: results[role]}), flush=True)

    # --- alone: the same three architectures, each trained from scratch for the same iterations ---
    alone_cpu, alone_wall = {}, {}
    for role, arch in members.items():
        torch.manual_seed(seed)
        model = build_detector(arch, head)
        with CpuClock() as c:
            train_detector(model, train_set, cfg, work / f"alone_{role}.pt", seed, device, desc=f"alone {role}")
        alone_cpu[role], alone_wall[role] = c.cpu, c.wall
        m = evaluate(model, data / "val.json", params["eval"]["batch_size"], device)
        results[role].update({"alone_AP": m["AP"], "alone_AP50": m["AP50"]})
        print(json.dumps({role: results[role], "cpu_s": round(c.cpu, 1)}), flush=True)

    # --- table ---
    print()
    print("| member | arch | params | AP from pool | AP alone | AP50 from pool | AP50 alone |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for role, r in results.items():
        print(f"| {role} | `{r['arch']}` | {r['params']:,} | {r['pool_AP']:.2f} | {r['alone_AP']:.2f} | "
              f"{r['pool_AP50']:.2f} | {r['alone_AP50']:.2f} |")
    print()
    pool_total = pool_train.cpu + extract_cpu
    print(f"| compute (process CPU-seconds, {args.threads} threads) | CPU-s | wall s |")
    print("| --- | ---: | ---: |")
    print(f"| pool: supernet training ({cfg['iters']} iters) | {pool_train.cpu:.0f} | {pool_train.wall:.0f} |")
    print(f"| pool: 3 extractions + BN recalibration ({ev['bn_batches']} batches each) | {extract_cpu:.1f} | |")
    print(f"| pool total (3 members; each further member costs one more extraction) | {pool_total:.0f} | |")
    for role, c in alone_cpu.items():
        print(f"| alone: {role} ({cfg['iters']} iters) | {c:.0f} | {alone_wall[role]:.0f} |")
    print(f"| alone total (3 members) | {sum(alone_cpu.values()):.0f} | {sum(alone_wall.values()):.0f} |")
    print("\n(evaluation on val is not counted on either side: the same 3 evaluations each)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
