"""`jdnas <stage> --params params.yaml ...`: a thin command line over the library.

Every subcommand validates its params before any work; a user error prints one line
(`jdnas: error: <file>: <field>: <problem>`) and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from jdnas.errors import JdnasError


def _params(args: argparse.Namespace) -> dict:
    from jdnas.config import load_params
    return load_params(args.params or ["params.yaml"])


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from jdnas.data.prepare import prepare_data
    manifest = prepare_data(_params(args), args.out)
    print(json.dumps({k: {"images": v["images"], "annotations": v["annotations"]}
                      for k, v in manifest["splits"].items()}))


def cmd_train_base(args: argparse.Namespace) -> None:
    from jdnas.base_detector import train_base
    params = _params(args)
    _threads(args)
    print(json.dumps(train_base(params, args.data, args.out)))


def cmd_train_teacher_pool(args: argparse.Namespace) -> None:
    import os
    params = _params(args)
    gpus = params["teacher_pool"]["train"]["gpus"]
    if gpus > 1 and "WORLD_SIZE" not in os.environ:  # DDP: run this command again under torchrun
        from jdnas.dist import relaunch_with_torchrun
        if relaunch_with_torchrun(gpus, args.argv) != 0:
            raise JdnasError(f"train-teacher-pool: one of the {gpus} torchrun processes failed (see above)")
        return
    from jdnas.teacher_pool import train_teacher_pool
    _threads(args)
    summary = train_teacher_pool(params, args.data, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


def cmd_eval_teacher_pool(args: argparse.Namespace) -> None:
    from jdnas.teacher_pool import eval_teacher_pool
    params = _params(args)
    _threads(args)
    for row in eval_teacher_pool(params, args.data, args.supernet, args.out):
        print(json.dumps(row))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from jdnas.engine import evaluate, resolve_device
    from jdnas.models.detector import load_detector
    params = _params(args)
    _threads(args)
    device = resolve_device(params["device"])
    print(json.dumps(evaluate(load_detector(args.checkpoint, device), args.split, params["eval"]["batch_size"], device)))


def cmd_arch(args: argparse.Namespace) -> None:
    from jdnas.models.arch import resolve_arch
    from jdnas.models.complexity import count_flops, count_params
    from jdnas.models.detector import build_detector, head_config
    try:
        arch = resolve_arch(args.base, args.width)
    except ValueError as e:
        raise JdnasError(f"arch: {e}") from None
    params = _params(args)
    model = build_detector(arch, head_config(params["model"], args.classes + 1))
    print(json.dumps({"arch": str(arch), "params": count_params(model), "flops": count_flops(model)}))


def cmd_dvc_yaml(args: argparse.Namespace) -> None:
    from jdnas.stages import dvc_yaml
    sys.stdout.write(dvc_yaml())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdnas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help: str, threads: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", action="append", metavar="YAML",
                       help="params file; repeat to override (default: params.yaml)")
        if threads:
            p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        p.set_defaults(fn=fn)
        return p

    p = add("prepare-data", cmd_prepare_data, "stage prepare_data: synthetic or COCO data -> train/minival/val",
            threads=True)
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")

    p = add("train-base", cmd_train_base, "stage train_base: train and evaluate the base detector", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="runs/base", help="output folder (default: %(default)s)")

    p = add("train-teacher-pool", cmd_train_teacher_pool, "stage train_teacher_pool: train the elastic "
            "supernet once (progressive shrinking; DDP via torchrun when teacher_pool.train.gpus > 1)", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="runs/teacher_pool", help="output folder (default: %(default)s)")

    p = add("eval-teacher-pool", cmd_eval_teacher_pool, "stage eval_teacher_pool: AP, size, FLOPs and latency "
            "of a sample of pool members -> pool.csv", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--supernet", default="runs/teacher_pool/supernet.pt", help="(default: %(default)s)")
    p.add_argument("--out", default="runs/teacher_pool/pool.csv", help="(default: %(default)s)")

    p = add("evaluate", cmd_evaluate, "COCO AP of a detector checkpoint on a prepared split", threads=True)
    p.add_argument("checkpoint", help="a model.pt written by jdnas")
    p.add_argument("--split", default="data/prepared/val.json", help="prepared split JSON (default: %(default)s)")

    p = add("arch", cmd_arch, "show an Arch (preset or Arch string) with its parameter count and FLOPs")
    p.add_argument("base", help="preset (tiny, r18, r34, r50, r101) or Arch string")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier for presets")
    p.add_argument("--classes", type=int, default=80, help="number of object classes")

    add("dvc-yaml", cmd_dvc_yaml, "print dvc.yaml, generated from the stage definitions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to run the same command under torchrun
    try:
        args.fn(args)
    except JdnasError as e:
        print(f"jdnas: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
