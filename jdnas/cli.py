"""`jdnas <stage> --params params.yaml ...`: a thin command line over the library.

Every subcommand validates its params before any work; a user error prints one line
(`jdnas: error: <file>: <field>: <problem>`) and exits with status 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable

from jdnas.errors import JdnasError


# arguments that name what a command reads, and those that name what it writes
INPUT_ARGS = ("data", "src", "ckpt", "init", "teacher", "base", "supernet", "latency_table", "state",
              "search_summary", "runs", "table", "checkpoint", "split")
OUTPUT_ARGS = ("out", "root")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-") if dest not in ("src", "ckpt", "checkpoint") else dest.upper()


def check_inputs_sacred(args: argparse.Namespace, params: dict | None) -> None:
    """Before any work: refuse an output (--out, --root) that is, contains or lies inside one of the
    command's inputs (its input arguments, the params files, the user's COCO files and folders,
    model.checkpoint, latency.table), naming both. search-step and search read their --root too."""
    from jdnas.io import check_outputs
    outputs = {_flag(k): getattr(args, k) for k in OUTPUT_ARGS if getattr(args, k, None) is not None}
    if not outputs:
        return
    inputs = [(_flag(k), getattr(args, k)) for k in INPUT_ARGS if getattr(args, k, None) is not None]
    inputs += [("--params", f) for f in (args.params or ["params.yaml"] if params is not None else args.params or [])]
    if params is not None:
        if params["data"]["source"] == "coco":
            inputs += [(f"data.coco.{k}", v) for k, v in params["data"]["coco"].items()]
        inputs += [("model.checkpoint", params["model"]["checkpoint"]), ("latency.table", params["latency"]["table"])]
    check_outputs(args.command, outputs, inputs)


def _params(args: argparse.Namespace) -> dict:
    """The validated params; then, for a command that reads prepared data, a check that --data is that.
    A command that writes is refused here, before any work, an output over one of its inputs."""
    from jdnas.config import load_params
    params = load_params(args.params or ["params.yaml"])
    check_inputs_sacred(args, params)
    if getattr(args, "data", None) is not None:
        from jdnas.data.prepare import check_prepared, resolved_params
        check_prepared(args.data)
        params = resolved_params(params, args.data)
    return params


def _runtime(args: argparse.Namespace, params: dict, gpus: int = 1) -> None:
    """Set torch's CPU threads; with `device: cuda`, lease `gpus` free GPUs (see jdnas.engine.gpu) for a
    command that uses them (0: none). A torchrun child uses what its parent leased; `device:
    cuda:N` uses device N as given, leasing nothing."""
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    if gpus and (params["device"] == "cuda" or os.environ.get("JDNAS_GPUS")):
        import time
        from jdnas.engine.gpu import inherited_lease, lease_gpus
        inherited = inherited_lease()
        if inherited is not None:
            print(f"gpu lease: CUDA_VISIBLE_DEVICES={inherited} inherited by rank {os.environ.get('RANK', '0')}",
                  file=sys.stderr, flush=True)
            return
        dev = lease_gpus(gpus)
        print(f"gpu lease: CUDA_VISIBLE_DEVICES={dev} at {time.time():.3f}", file=sys.stderr, flush=True)


def _ddp(args: argparse.Namespace, params: dict, gpus: int, what: str) -> bool:
    """For a command that trains with DDP over `gpus` processes: in the parent (not yet under
    torchrun), lease the `gpus` devices once and run the command again under torchrun, whose
    children inherit them; True there (the children did the work). False in a child or with one GPU."""
    if gpus <= 1 or "WORLD_SIZE" in os.environ:
        return False
    from jdnas.engine.dist import relaunch_with_torchrun
    _runtime(args, params, gpus)
    if relaunch_with_torchrun(gpus, args.argv) != 0:
        raise JdnasError(f"{what}: one of the {gpus} torchrun processes failed (see above)")
    return True


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from jdnas.data.prepare import prepare_data
    manifest = prepare_data(_params(args), args.out)
    print(json.dumps({k: {"images": v["images"], "annotations": v["annotations"]}
                      for k, v in manifest["splits"].items()}))


def cmd_inspect_data(args: argparse.Namespace) -> None:
    from jdnas.config import load_params
    from jdnas.data.inspect import snippet
    from jdnas.data.prepare import check_prepared, data_fit, load_split, split_minival
    from jdnas.data.coco import load_coco
    from jdnas.errors import DataError
    params = load_params(args.params or ["params.yaml"])
    d = params["data"]
    if args.data:
        check_prepared(args.data)
        train, minival, val = (load_split(args.data, s) for s in ("train", "minival", "val"))
        pool = {**train, "images": train["images"] + minival["images"],
                "annotations": train["annotations"] + minival["annotations"]}
    elif d["source"] == "coco":
        c = d["coco"]
        pool = load_coco(c["train_annotations"], c["train_images"], d["out_of_image"], check_images=False)[0]
        val = load_coco(c["val_annotations"], c["val_images"], d["out_of_image"], check_images=False)[0]
        minival = split_minival(pool, d["minival_fraction"], params["seed"])[1]
    else:
        raise DataError("data.source is synthetic: run `jdnas prepare-data` and pass --data data/prepared, "
                        "or give params with data.source: coco")
    fit = data_fit(pool, val, minival, params["model"])
    for split, st in fit["stats"].items():
        print(f"{split}: {st['images']} images, {st['boxes']} boxes")
        for key in ("short_side", "long_side", "object_size", "objects_per_image"):
            print(f"  {key:18s}" + "  ".join(f"{k} {v:g}" for k, v in st[key].items()))
        print("  boxes_per_class   " + ", ".join(f"{k} {v}" for k, v in st["boxes_per_class"].items()))
    print(f"\nminival: {len(minival['images'])} images, {len(minival['annotations'])} boxes")
    print(resize_line(params, fit))
    print("\n# model settings that fit the data (what `auto` becomes); paste into your params file:")
    print(snippet(fit["suggested"]), end="")
    for w in fit["warnings"]:
        print(f"warning: {w}")


def resize_line(params: dict, fit: dict) -> str:
    """Which input sizes `resize` can reach on these data (the search and the latency table alike)."""
    from jdnas.latency.space import resize_inputs
    from jdnas.models.arch import Head
    space, model = params["search_space"], {**params["model"], **fit["model"]}
    if "resize" not in space["actions"]:
        return "resize: off (not in search_space.actions)"
    sizes, p5 = resize_inputs(space, fit["stats"]["train"], Head.of(model))
    why = (f"the 5th-percentile object measures {p5:.1f} px at the input, and must keep "
           f"search_space.resize_min_object = {space['resize_min_object']:g} px")
    if len(sizes) == 1:
        return f"resize: no smaller input on these data ({why})"
    return f"resize: inputs {', '.join(f'{a}/{b}' for a, b in sizes)} (min_size/max_size; {why})"


def cmd_import_torchvision(args: argparse.Namespace) -> None:
    from jdnas.config import explicit_keys
    from jdnas.models.torchvision_import import import_torchvision
    _file_out(args.out, "the jdnas checkpoint (.pt) to write")
    params = _params(args)
    # the head settings the user's params files set; the others are torchvision's own
    given = explicit_keys(args.params or [], "model")
    info = import_torchvision(args.src, args.out, params["model"], from_params=given)
    print(f"import-torchvision: head settings from the params: {', '.join(info['head_from_params']) or 'none'}; "
          f"torchvision's defaults: {', '.join(info['head_from_torchvision']) or 'none'}", file=sys.stderr)
    print(json.dumps(info))


def _file_out(out: str, what: str) -> None:
    """--out must name a file: not an existing folder, nor a path whose parent is a file."""
    p = Path(out)
    if p.is_dir():
        raise JdnasError(f"--out {out}: is a folder: give {what}")
    if p.parent.exists() and not p.parent.is_dir():
        raise JdnasError(f"--out {out}: {p.parent} is a file, not a folder: give {what} in a folder")


def cmd_export(args: argparse.Namespace) -> None:
    from jdnas.models.export import export_checkpoint
    _file_out(args.out, "the .onnx file to write")
    check_inputs_sacred(args, None)
    print(json.dumps(export_checkpoint(args.ckpt, args.out)))


def cmd_train_base(args: argparse.Namespace) -> None:
    from jdnas.baselines.base import train_base
    params = _params(args)
    if _ddp(args, params, params["train_base"]["gpus"], "train-base"):
        return
    _runtime(args, params)
    summary = train_base(params, args.data, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


def cmd_train(args: argparse.Namespace) -> None:
    from jdnas.engine.device import resolve_device
    from jdnas.joint.student import train_student
    params = _params(args)
    _runtime(args, params)
    seed = params["seed"] if args.seed is None else args.seed
    print(json.dumps(train_student(params["train_student"], args.data, args.out, args.init, args.action, args.teacher,
                                   seed=seed, device=resolve_device(params["device"]),
                                   eval_batch=params["eval"]["batch_size"], eval_split=args.eval_split)))


def cmd_train_teacher_pool(args: argparse.Namespace) -> None:
    params = _params(args)
    if _ddp(args, params, params["teacher_pool"]["train"]["gpus"], "train-teacher-pool"):
        return
    from jdnas.joint.teacher_pool import train_teacher_pool
    _runtime(args, params)
    summary = train_teacher_pool(params, args.data, args.out, args.base)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


def cmd_eval_teacher_pool(args: argparse.Namespace) -> None:
    from jdnas.joint.teacher_pool import eval_teacher_pool
    params = _params(args)
    _runtime(args, params)
    for row in eval_teacher_pool(params, args.data, args.supernet, args.out):
        print(json.dumps(row))


def _search_context(args: argparse.Namespace, params: dict):
    from jdnas.joint.search import Context
    return Context(params, args.data, args.supernet, args.latency_table, args.base, args.root)


def cmd_search_step(args: argparse.Namespace) -> None:
    """One search job. A step with nothing to train (jdnas.joint.rounds) only passes files through:
    it reads neither params nor torch."""
    if args.step in ("propose", "candidate", "select") and args.round is not None:
        from jdnas.joint.rounds import pass_through  # light: a step with nothing to train loads no torch
        out = pass_through(args.step, args.round, args.index, Path(args.root))
        if out is not None:
            print(json.dumps(out, default=lambda o: o.__dict__))
            return
    from jdnas.joint import search
    params = _params(args)
    _runtime(args, params, gpus=int(args.step != "history"))  # screening, trials and the lineage train
    if args.step == "history":
        search.write_history(Path(args.root), params["search"], params["device"])
        return
    if args.step in ("propose", "candidate", "select") and args.round is None:
        raise JdnasError(f"search-step {args.step}: --round is required")
    ctx = _search_context(args, params)
    if args.step == "init":
        out = search.init_search(ctx)
    elif args.step == "propose":
        out = search.propose(ctx, args.round)
    elif args.step == "candidate":
        out = search.run_candidate(ctx, args.round, args.index)
    elif args.step == "finish":
        out = search.finish(ctx)
    else:
        out = search.select(ctx, args.round)
    print(json.dumps(out, default=lambda o: o.__dict__))


def cmd_search(args: argparse.Namespace) -> None:
    from jdnas.joint.search import run_search
    params = _params(args)
    _runtime(args, params)
    print(json.dumps(run_search(_search_context(args, params)).__dict__))


def cmd_evaluate_final(args: argparse.Namespace) -> None:
    from jdnas.evaluation.final import evaluate_final, final_line
    params = _params(args)
    _runtime(args, params)
    summary = evaluate_final(params, args.data, args.state, args.base, args.out, args.latency_table)
    print(json.dumps(summary))
    print(final_line(summary), file=sys.stderr)


def cmd_baseline(args: argparse.Namespace) -> None:
    params = _params(args)
    _runtime(args, params)
    if args.pipeline == "naive":
        from jdnas.baselines.naive import run_baseline
        result = run_baseline(params, args.data, args.latency_table, args.supernet, args.out, args.until or "kd")["final"]
    else:
        from jdnas.baselines.matched import run_matched
        where = (args.data, args.latency_table, args.base, args.supernet)
        result = {k: v for k, v in run_matched(args.pipeline, params, *where, args.search_summary, args.out,
                                               args.until).items() if k != "steps"}
    print(json.dumps(result))


def cmd_report(args: argparse.Namespace) -> None:
    from jdnas.evaluation.report import write_report
    params = _params(args)
    _runtime(args, params)
    rows = write_report(args.runs, args.out, params, args.data)
    print(json.dumps(rows))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from jdnas.engine.loop import evaluate
    from jdnas.engine.device import resolve_device
    from jdnas.models.detector import load_detector
    params = _params(args)
    _runtime(args, params)
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


def cmd_profile_latency(args: argparse.Namespace) -> None:
    from jdnas.latency.profile import profile_latency
    params = _params(args)
    # the timings use latency.threads from the params; --threads only says how many cores the job holds
    if params["latency"]["device"] == "cuda":  # time on a GPU no other job of ours is using
        from jdnas.engine.gpu import lease_gpus
        print(f"gpu lease: CUDA_VISIBLE_DEVICES={lease_gpus(1)}", file=sys.stderr, flush=True)
    print(json.dumps(profile_latency(params, args.data, args.out)))


def cmd_predict_latency(args: argparse.Namespace) -> None:
    from jdnas.latency.table import LatencyTable
    from jdnas.models.arch import Head, resolve_arch
    try:
        arch = resolve_arch(args.base, args.width)
        head = Head.parse(args.head) if args.head else None
    except ValueError as e:
        raise JdnasError(f"arch: {e}") from None
    table = LatencyTable.load(args.table)
    head = head or table.base_head
    parts = table.breakdown(arch, head)
    print(json.dumps({"arch": str(arch), "head": str(head), **{k: round(v, 4) for k, v in parts.items()}}))


def cmd_dvc_yaml(args: argparse.Namespace) -> None:
    from jdnas.stages import dvc_yaml
    sys.stdout.write(dvc_yaml(params=_params(args)))


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

    _data_commands(add)
    _stage_commands(add)
    _tool_commands(add)
    return parser


def _data_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Data and checkpoints in and out: prepare, inspect, import, export."""
    p = add("prepare-data", cmd_prepare_data, "stage prepare_data: synthetic or COCO data -> train/minival/val",
            threads=True)
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")

    p = add("inspect-data", cmd_inspect_data, "image and object sizes, objects per image, class counts; the model "
            "settings that fit them (what auto becomes) and warnings where the params disagree")
    p.add_argument("--data", default=None, help="a prepared data folder (default: the raw COCO files in the params)")

    p = add("import-torchvision", cmd_import_torchvision, "convert a torchvision Faster R-CNN ResNet-FPN state_dict "
            "(fasterrcnn_resnet50_fpn, resnet_fpn_backbone 18/34/50/101) into a jdnas checkpoint; input size, "
            "anchors and thresholds from the params' model section")
    p.add_argument("src", help="the torchvision state_dict (.pt / .pth; {'model': state_dict} also read)")
    p.add_argument("--out", required=True, help="the jdnas checkpoint to write (loads with jdnas.load_detector)")
    p.add_argument("--data", default=None, help="prepared data folder: model settings given as auto are taken "
                   "from it (what `jdnas inspect-data` suggests)")

    p = add("export", cmd_export, "export a jdnas checkpoint (base, candidate, final student) to ONNX with a dynamic "
            "image size; onnxruntime's detections are checked against PyTorch's")
    p.add_argument("ckpt", help="a jdnas detector checkpoint (e.g. runs/final/model.pt)")
    p.add_argument("--out", required=True, help="the .onnx file to write")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--supernet", default="runs/teacher_pool/supernet.pt", help="(default: %(default)s)")
    p.add_argument("--latency-table", default="runs/latency/cpu/table.csv", help="(default: %(default)s)")
    p.add_argument("--base", default="runs/base/model.pt", help="base detector (default: %(default)s)")
    p.add_argument("--root", default="runs/search", help="search folder (default: %(default)s)")


def _stage_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The workflow's stages (and `jdnas train`, one student)."""
    p = add("train-base", cmd_train_base, "stage train_base: train and evaluate the base detector", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="runs/base", help="output folder (default: %(default)s)")

    p = add("train", cmd_train, "train a student: morph an initial checkpoint by an action (weights inherited), "
            "train it with KD from a teacher (params: train_student), evaluate", threads=True)
    p.add_argument("--init", required=True, help="initial checkpoint (a model.pt written by jdnas)")
    p.add_argument("--action", default=None,
                   help="student action, e.g. deepen(2), shallow(2,1), shift(1,+1), prune(2,0.25), slim(3,0.25), "
                        "widen(1,0.5) (default: none, train the initial model as is)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint for KD (default: no KD)")
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json")
    p.add_argument("--eval-split", default="minival", choices=["minival", "val"],
                   help="split to evaluate on (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: params seed)")
    p = add("train-teacher-pool", cmd_train_teacher_pool, "stage train_teacher_pool: train the elastic "
            "supernet once (progressive shrinking; DDP via torchrun when teacher_pool.train.gpus > 1)", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="runs/teacher_pool", help="output folder (default: %(default)s)")
    p.add_argument("--base", default="runs/base/model.pt",
                   help="trained detector to start from when teacher_pool.init is base (default: %(default)s)")

    p = add("eval-teacher-pool", cmd_eval_teacher_pool, "stage eval_teacher_pool: AP, size, FLOPs and latency "
            "of a sample of pool members -> pool.csv", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--supernet", default="runs/teacher_pool/supernet.pt", help="(default: %(default)s)")
    p.add_argument("--out", default="runs/teacher_pool/pool.csv", help="(default: %(default)s)")

    p = add("search-step", cmd_search_step, "one job of the joint search (Snakemake runs these): init, "
            "propose, candidate, select, finish, history", threads=True)
    p.add_argument("step", choices=["init", "propose", "candidate", "select", "finish", "history"])
    p.add_argument("--round", type=int, default=None, help="search round r >= 1")
    p.add_argument("--index", type=int, default=0, help="candidate index k (step candidate)")
    _search_args(p)

    p = add("search", cmd_search, "stage search (DVC): every round of the joint search in one process, "
            "resuming from the rounds already on disk", threads=True)
    _search_args(p)

    p = add("evaluate-final", cmd_evaluate_final, "stage evaluate_final: the final student and the base "
            "detector on val (AP, measured latency, params, FLOPs)", threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--state", required=True, help="the last round's state.json")
    p.add_argument("--base", default="runs/base/model.pt", help="base detector (default: %(default)s)")
    p.add_argument("--latency-table", default="runs/latency/cpu/table.csv",
                   help="latency table: predicted latency per part (default: %(default)s)")
    p.add_argument("--out", default="runs/final", help="output folder (default: %(default)s)")

    p = add("baseline", cmd_baseline, "stages baseline_nas, baseline_naive, control, prune_kd: what a user "
            "would otherwise do, on the search's latency target (jdnas/baselines/)", threads=True)
    p.add_argument("--pipeline", default="naive", choices=["naive", "control", "prune_kd"],
                   help="naive: NAS -> retrain -> prune -> KD; control: the base fine-tuned; prune_kd: greedy "
                        "pruning to the target, then KD (default: %(default)s)")
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--latency-table", default="runs/latency/cpu/table.csv", help="(default: %(default)s)")
    p.add_argument("--until", choices=["nas", "retrain", "prune", "kd", "stable", "decay"],
                   help="stop after this step (default: the pipeline's last; stage baseline_nas: retrain; stage "
                        "control_stable: stable, which needs no search summary); a rerun reuses the steps done")
    p.add_argument("--base", default="runs/base/model.pt",
                   help="control, prune_kd: the base detector (naive builds its arch from the params) "
                        "(default: %(default)s)")
    p.add_argument("--supernet", default="runs/teacher_pool/supernet.pt",
                   help="the teacher pool (naive: read by its kd step) (default: %(default)s)")
    p.add_argument("--search-summary", default="runs/search/summary.json",
                   help="control, prune_kd: the search's latency target and measured compute (default: %(default)s)")
    p.add_argument("--out", default="runs/baseline", help="output folder (default: %(default)s)")

    p = add("report", cmd_report, "stage report: reports/report.md, summary.csv and plots from runs/",
            threads=True)
    p.add_argument("--runs", default="runs", help="runs folder (default: %(default)s)")
    p.add_argument("--data", default="data/prepared",
                   help="prepared data: every model is timed on its val images (default: %(default)s)")
    p.add_argument("--out", default="reports", help="output folder (default: %(default)s)")


def _tool_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Tools around the workflow: evaluate a checkpoint, show an Arch, the latency table, dvc.yaml."""
    p = add("evaluate", cmd_evaluate, "COCO AP of a detector checkpoint on a prepared split", threads=True)
    p.add_argument("checkpoint", help="a model.pt written by jdnas")
    p.add_argument("--split", default="data/prepared/val.json", help="prepared split JSON (default: %(default)s)")

    p = add("arch", cmd_arch, "show an Arch (preset or Arch string) with its parameter count and FLOPs")
    p.add_argument("base", help="preset (tiny, r18, r34, r50, r101) or Arch string")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier for presets")
    p.add_argument("--classes", type=int, default=80, help="number of object classes")

    p = add("profile-latency", cmd_profile_latency,
            "stage profile_latency: latency table of the search space on latency.device, validated end to end",
            threads=True)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/latency/<latency.device>)")

    p = add("predict-latency", cmd_predict_latency, "predicted latency (ms, per part) of an Arch from a table")
    p.add_argument("base", help="preset (tiny, r18, r34, r50, r101) or Arch string")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier for presets")
    p.add_argument("--head", default=None, help="Head string, e.g. F64-R256-I128/128-P100 (default: the table's base)")
    p.add_argument("--table", default="runs/latency/cpu/table.csv", help="latency table (default: %(default)s)")

    add("dvc-yaml", cmd_dvc_yaml, "print dvc.yaml, generated from the stage definitions (with a COCO source in "
        "the params, its files are prepare_data's deps)")


TRAINING_COMMANDS = ("train-base", "train", "train-teacher-pool", "search-step", "search", "baseline",
                     "evaluate-final")
# errno -> what it means for the path, and what to do
OS_ERRORS = {
    errno.ENOENT: ("not found", "check the path"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder where a file was expected", "give a file path"),
    errno.EACCES: ("permission denied", "check its owner and mode, or choose another path"),
    errno.EPERM: ("operation not permitted", "check its owner and mode, or choose another path"),
    errno.EROFS: ("on a read-only file system", "choose an output on a writable disk"),
    errno.ELOOP: ("too many levels of symbolic links (a link loop?)", "fix or remove the link"),
    errno.EMLINK: ("too many links", "choose another folder"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENOTEMPTY: ("folder not empty", "remove it or choose another path"),
    errno.EXDEV: ("crosses file systems", "keep the output on one disk"),
}


def os_error_line(e: OSError, command: str | None = None) -> str:
    """One line for an OSError: the path (both, for a rename), what went wrong, what to do."""
    from jdnas.errors import clip
    path = " -> ".join(clip(str(f)) for f in (e.filename, e.filename2) if f is not None)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {path}" if path else ""
        todo = ("free some space and rerun: training resumes from its last checkpoint" if command in TRAINING_COMMANDS
                else "free some space and rerun the command")
        return f"the disk is full{where} ({todo})"
    what, todo = OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "check the path and rerun"))
    return f"{path or 'a file'}: {what} ({todo})"


def main(argv: list[str] | None = None) -> int:
    from jdnas.errors import clip, shorten_line
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to run the same command under torchrun
    command = getattr(args, "command", None)

    def fail(msg: str) -> int:
        print(f"jdnas: error: {shorten_line(msg)}", file=sys.stderr)
        return 2
    try:
        args.fn(args)
    except JdnasError as e:
        return fail(str(e))
    except OSError as e:
        return fail(os_error_line(e, command))
    except UnicodeDecodeError as e:
        return fail(f"a file is not UTF-8 text ({clip(e.reason)} at byte {e.start}): save it as UTF-8")
    except RecursionError:
        return fail("an input is nested too deep to read (RecursionError): params and annotation files are a few "
                    "levels deep")
    except KeyboardInterrupt:
        rerun = "training resumes from its last checkpoint" if command in TRAINING_COMMANDS else "it starts afresh"
        print(f"jdnas: interrupted (Ctrl-C): {command} stopped; what it had not finished was not kept (rerun it: "
              f"{rerun})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
