"""Params schema and validation.

`load_params(files)` deep-merges the YAML files over the schema's defaults and checks every
value before any work starts: an unknown key, a wrong type or an out-of-range value is a
`ConfigError` whose one-line message names the file, the dotted key and what is allowed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from jdnas.errors import ConfigError, JdnasError, clip, short
from jdnas.models.arch import Arch, resolve_arch
from jdnas.models.bounds import (MAX_BATCH, MAX_DETECTIONS, MAX_FPN, MAX_INPUT, MAX_ITERS, MAX_PROPOSALS, MAX_REP,
    MAX_SAMPLES, MAX_SEED, MAX_WIDTH_MULT, MIN_WIDTH_MULT)
from jdnas.models.detector import HEAD_KEYS, check_size, read_checkpoint


@dataclass(frozen=True)
class Opt:
    """One leaf of the schema: its default, a predicate and the words that describe it."""

    default: Any
    check: Callable[[Any], bool]
    allowed: str


def or_auto(opt: Opt) -> Opt:
    """`opt`, or the word auto: derived from the prepared data (jdnas.data.inspect.suggest_model)."""
    return Opt(opt.default, lambda v: v == "auto" or opt.check(v), opt.allowed + ", or auto")


def is_number(v: Any) -> bool:
    """A finite int or float (YAML's .inf and .nan, JSON's NaN and Infinity are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(default: int, lo: int | None = None, hi: int | None = None) -> Opt:
    """An int in [lo, hi]."""
    rng = _range_words(lo, hi)
    return Opt(default, lambda v: isinstance(v, int) and not isinstance(v, bool) and _in(v, lo, hi),
               f"an integer{rng}")


def number(default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Opt:
    """A float in [lo, hi] (or (lo, hi] when lo_open)."""
    def ok(v: Any) -> bool:
        if not is_number(v) or not _in(v, lo, hi):
            return False
        return not (lo_open and lo is not None and v <= lo)
    return Opt(default, ok, f"a number{_range_words(lo, hi, lo_open)}")


def choice(default: str, options: Iterable[str]) -> Opt:
    """One of a fixed set of strings."""
    opts = tuple(options)
    return Opt(default, lambda v: v in opts, "one of " + ", ".join(map(str, opts)))


def flag(default: bool) -> Opt:
    return Opt(default, lambda v: isinstance(v, bool), "true or false")


def text(default: str | None, nullable: bool = False, pattern: Callable[[str], bool] | None = None,
         words: str = "a string") -> Opt:
    """A string (or null when nullable), optionally checked by `pattern`."""
    def ok(v: Any) -> bool:
        if v is None:
            return nullable
        return isinstance(v, str) and (pattern is None or pattern(v))
    return Opt(default, ok, words + (" or null" if nullable else ""))


def numbers(default: list, lo: float | None = None, hi: float | None = None, ints: bool = False,
            min_len: int = 1, max_len: int | None = None) -> Opt:
    """A non-empty list of numbers in [lo, hi] (exactly min_len of them when max_len == min_len)."""
    kind = "integers" if ints else "numbers"
    def ok(v: Any) -> bool:
        return (isinstance(v, list) and min_len <= len(v) <= (max_len or len(v))
                and all(is_number(x) and (not ints or isinstance(x, int)) and _in(x, lo, hi) for x in v))
    count = f"exactly {min_len}" if max_len == min_len else f"at least {min_len}"
    return Opt(default, ok, f"a list of {count} {kind}{_range_words(lo, hi)}")


def ascending(opt: Opt, strict: bool = True) -> Opt:
    """`opt`, whose list must also be in ascending order (strictly: no value twice)."""
    def ok(v: Any) -> bool:
        return opt.check(v) and (not isinstance(v, list)
                                 or all(a < b if strict else a <= b for a, b in zip(v, v[1:])))
    return Opt(opt.default, ok, opt.allowed + (", in increasing order" if strict else ", in non-decreasing order"))


def strings(default: list, options: Iterable[str], min_len: int = 1) -> Opt:
    opts = tuple(options)
    def ok(v: Any) -> bool:
        return isinstance(v, list) and len(v) >= min_len and len(set(v)) == len(v) and all(x in opts for x in v)
    return Opt(default, ok, f"a list of at least {min_len} distinct names from " + ", ".join(opts))


def _in(v: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _range_words(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" > {lo} and <= {hi}" if lo_open else f" in [{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _is_device(v: str) -> bool:
    if v in ("cpu", "cuda"):
        return True
    return v.startswith("cuda:") and v[5:].isdigit()


MORPH_ACTIONS = ("deepen", "shallow", "shift", "prune", "slim", "widen", "fpn_prune", "head_prune", "resize",
                 "proposals")
def _is_hw(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2
                         and all(isinstance(x, int) and not isinstance(x, bool) and x >= 16 for x in v))


SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")


def _is_epochs(v: Any) -> bool:
    parts = v.split() if isinstance(v, str) else []
    try:
        return len(parts) == 2 and parts[1] in ("epoch", "epochs") and 0 < float(parts[0]) < 1e6
    except ValueError:
        return False


def iterations(default: int) -> Opt:
    """An iteration count, or 'N epochs' (passes over the training images, resolved from the prepared data)."""
    return Opt(default, lambda v: (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ITERS)
               or _is_epochs(v), f"an integer >= 1 (at most {MAX_ITERS}) or 'N epochs'")





def train_schema(iters: int, lr: float, batch_size: int = 8) -> dict:
    """Optimiser and schedule settings shared by every training stage."""
    return {
        "iters": iterations(iters),
        "batch_size": integer(batch_size, 1, MAX_BATCH),
        "lr": number(lr, 0.0, 10.0, lo_open=True),
        "momentum": number(0.9, 0.0, 0.999),
        "weight_decay": number(1e-4, 0.0, 1.0),
        "warmup_iters": integer(50, 0, MAX_ITERS),
        "schedule": choice("cosine", ("cosine", "step", "constant")),
        "steps": ascending(numbers([0.7, 0.9], 0.0, 1.0)),  # milestones: fractions of iters, in order
        "clip_grad": number(10.0, 0.0, 1e6),
        "checkpoint_every": integer(100, 1),
        "workers": integer(0, 0, 256),
    }


SCHEMA: dict = {
    "seed": integer(0, 0, MAX_SEED),
    "device": text("cpu", pattern=_is_device, words="cpu, cuda or cuda:N"),
    "data": {
        "source": choice("synthetic", ("synthetic", "coco")),
        "out_of_image": choice("clip", ("clip", "reject")),
        "max_image_pixels": integer(50_000_000, 1, 1_000_000_000),
        "minival_fraction": number(0.15, 0.0, 0.9, lo_open=True),
        "synthetic": {
            "train_images": integer(600, 2, 1_000_000),
            "val_images": integer(150, 1, 1_000_000),
            "image_size": integer(128, 32, 2048),
            "classes": strings(list(SHAPES[:4]), SHAPES, min_len=1),
            "min_objects": integer(1, 1, 1000),
            "max_objects": integer(4, 1, 1000),
            "min_size": integer(10, 4, 2048),
            "max_size": integer(56, 4, 2048),
            "clutter": integer(6, 0, 1000),
        },
        "coco": {
            "train_images": text(None, nullable=True),
            "train_annotations": text(None, nullable=True),
            "val_images": text(None, nullable=True),
            "val_annotations": text(None, nullable=True),
        },
    },
    "model": {
        "base": text("r18", words="a preset (tiny, r18, r34, r50, r101), an Arch string or a checkpoint path"),
        # a detector to start from (jdnas import-torchvision, or another run's model.pt): train_base
        # adopts it instead of training, and its arch and head replace model.base and the head keys
        "checkpoint": text(None, nullable=True, words="a jdnas detector checkpoint (.pt)"),
        "width": number(0.25, MIN_WIDTH_MULT, MAX_WIDTH_MULT),
        "fpn_channels": integer(64, 4, MAX_FPN),
        # auto: from the data (`jdnas inspect-data` prints what auto becomes and why)
        "min_size": or_auto(integer(128, 16, MAX_INPUT)),
        "max_size": or_auto(integer(128, 16, MAX_INPUT)),
        "anchor_sizes": or_auto(ascending(numbers([16, 32, 64, 128, 256], 1, 2 * MAX_INPUT, ints=True, min_len=5,
                                                  max_len=5))),  # P2..P6
        "rpn_pre_nms_top_n_train": integer(600, 1, MAX_PROPOSALS),
        "rpn_post_nms_top_n_train": integer(300, 1, MAX_PROPOSALS),
        "rpn_pre_nms_top_n_test": integer(300, 1, MAX_PROPOSALS),
        "rpn_post_nms_top_n_test": integer(100, 1, MAX_PROPOSALS),
        "rpn_batch_size_per_image": integer(128, 1, MAX_SAMPLES),
        "box_batch_size_per_image": integer(128, 1, MAX_SAMPLES),
        "representation_size": integer(256, 1, MAX_REP),
        "box_detections_per_img": integer(50, 1, MAX_DETECTIONS),
        "box_score_thresh": number(0.01, 0.0, 1.0),
    },
    # scales: input size x one of these per iteration (scale jitter; [1.0]: none)
    # eval_every: minival AP every this many iterations (0: never), logged; the best checkpoint is kept
    # gpus: DDP over this many processes (GPUs with device cuda), sync_bn: BatchNorm statistics over all of them
    "train_base": {**train_schema(iters=1500, lr=0.04), "scales": numbers([1.0], 0.1, 4.0),
                   "eval_every": integer(0, 0), "gpus": integer(1, 1), "sync_bn": flag(False)},
    "eval": {
        "batch_size": integer(16, 1, MAX_BATCH),
    },
    # student training after a morphism action, with KD from a teacher (jdnas train)
    "train_student": {
        **train_schema(iters=300, lr=0.02),
        "warmup_iters": integer(20, 0),
        "scales": numbers([1.0], 0.1, 4.0),
        "kd_loss": choice("fpn_masked", ("fpn", "fpn_masked", "logits")),
        "kd_weight": number(1.0, 0.0),
        "kd_fg_weight": number(1.0, 0.0),
        "kd_bg_weight": number(0.5, 0.0),
        "kd_temperature": number(1.0, 0.0, lo_open=True),
    },
    # the student action space (jdnas.models.morphism.legal_actions); stages 0..3 = C2..C5
    "search_space": {
        "actions": strings(["deepen", "shallow", "shift", "prune", "slim", "fpn_prune", "head_prune", "resize",
                            "proposals"], MORPH_ACTIONS),
        "min_depth": numbers([1, 1, 1, 1], 1, 64, ints=True, min_len=4),
        "max_depth": numbers([4, 6, 12, 4], 1, 64, ints=True, min_len=4),
        "min_width": integer(8, 1, 16384),
        "max_width": integer(1024, 1, 16384),
        "prune_ratios": numbers([0.25, 0.5], 0.0, 1.0),
        "slim_ratios": numbers([0.25], 0.0, 1.0),
        "widen_ratios": numbers([0.5], 0.0),
        "fpn_prune_ratios": numbers([0.25, 0.5], 0.0, 1.0),
        "head_prune_ratios": numbers([0.25, 0.5], 0.0, 1.0),
        "resize_ratios": numbers([0.75], 0.0, 1.0),
        "proposals_ratios": numbers([0.5], 0.0, 1.0),
        "min_head_ratio": number(0.25, 0.0, 1.0, lo_open=True),
        "min_input_ratio": number(0.5, 0.0, 1.0, lo_open=True),
        "resize_min_object": number(12.0, 0.0, 4096.0),
    },
    "latency": {
        "device": text("cpu", pattern=lambda v: v == "onnxruntime" or _is_device(v),
                       words="cpu, cuda, cuda:N or onnxruntime"),
        "threads": integer(1, 1),
        "clock": choice("cpu_time", ("cpu_time", "wall")),
        "warmup": integer(3, 0),
        "runs": integer(40, 1),
        "rounds": integer(8, 1),
        "image_size": Opt(None, _is_hw, "null or [height, width] (integers >= 16)"),
        "reuse_entries": flag(True),
        "table": text(None, nullable=True, words="a path to a table.csv"),
        "validation_archs": integer(30, 0),
        "max_mape": number(5.0, 0.0, 1000.0, lo_open=True),
        "allow_inaccurate": flag(False),
        "channel_block": Opt(None, lambda v: v is None or (type(v) is int and 1 <= v <= 1024),
                             "null or an integer from 1 to 1024"),
        "space": {
            "extra_blocks": strings([], ("basic", "bottleneck"), min_len=0),
            "width_ratios": numbers([0.25, 0.5, 0.75, 1.0, 1.5], 0.0, 16.0),
            "width_divisor": integer(4, 1),
            "head_ratios": numbers([0.5], 0.0, 1.0, min_len=0),
        },
    },
    # hill climbing over (student, teacher) pairs (jdnas.joint.search)
    "search": {
        "rounds": integer(3, 1),
        "cut_rounds": integer(3, 1),
        "candidates": integer(2, 1),
        "cut_candidates": integer(2, 1),
        "teacher_moves": integer(1, 0),
        "grow_margin": number(5.0, 0.0, 100.0),
        "iters": integer(300, 1),
        "round_iters": integer(60, 1),
        "trial_iters": integer(15, 1),
        "cut_trial_iters": integer(60, 1),
        "screen_images": integer(0, 0),
        "screen_bn_batches": integer(2, 0),
        "bootstrap": integer(200, 10),
        "confidence": number(0.9, 0.5, 0.999),
        "patience": integer(2, 1),
        "latency_target": number(0.8, 0.0, 10.0, lo_open=True),
        "penalty": number(50.0, 0.0),
        "latency_tolerance": number(0.08, 0.0, 1.0),
        "latency_margin": number(0.0, 0.0, 0.5),
        "ap_tolerance": number(0.0, 0.0, 100.0),
        "teacher_mutate": number(0.7, 0.0, 1.0),
        "teacher_resample": number(0.3, 0.0, 1.0),
        "continuous": flag(True),
        "screen": flag(True),
        "paired": flag(True),
        "from_pool": flag(True),
    },
    "baseline": {
        "nas_candidates": integer(3, 1),
        "nas_iters": integer(300, 1),
        "prune_iters": integer(200, 1),
        "kd_iters": integer(300, 1),
        "min_iters": integer(10, 1),
    },
    "teacher_pool": {
        "init": choice("base", ("base", "scratch")),
        "space": {
            "base": text("r34", words="a preset (tiny, r18, r34, r50, r101) or an Arch string"),
            "width": number(0.25, MIN_WIDTH_MULT, MAX_WIDTH_MULT),
            "min_depths": numbers([1, 1, 2, 1], 1, 64, ints=True, min_len=4),
            "width_ratios": numbers([0.5, 0.75, 1.0], 0.0, 1.0),
            "out_width_ratios": numbers([1.0], 0.0, 1.0),
        },
        "train": {
            **train_schema(iters=300, lr=0.04),
            "scales": numbers([1.0], 0.1, 4.0),
            "depth_phase_start": number(0.4, 0.0, 1.0),
            "width_phase_start": number(0.7, 0.0, 1.0),
            "sandwich_random": integer(1, 0),
            "distill_weight": number(0.1, 0.0),
            "gpus": integer(1, 1),
        },
        "eval": {
            "sample_size": integer(5, 2),
            "bn_batches": integer(4, 0),
            "bn_batch_size": integer(8, 1, MAX_BATCH),
            "latency_runs": integer(5, 1),
            "latency_threads": integer(1, 1),
        },
    },
}


def defaults(schema: dict = SCHEMA) -> dict:
    """The default params: every leaf's default."""
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def merge(base: dict, override: dict, schema: dict = SCHEMA, source: str = "params",
          prefix: str = "") -> dict:
    """Deep-merge `override` into a copy of `base`, checking every key and value against `schema`."""
    out = copy.deepcopy(base)
    if not isinstance(override, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{source}: unknown key {short(dotted)} (known here: {known})")
        spec = schema[key]
        if isinstance(spec, dict):
            out[key] = merge(out[key], value, spec, source, dotted + ".")
        else:
            if not spec.check(value):
                raise ConfigError(f"{source}: {dotted} = {short(value)} is not allowed: must be {spec.allowed}")
            out[key] = copy.deepcopy(value)
    return out


def check_consistency(p: dict, source: str) -> None:
    """Rules that span several keys."""
    syn = p["data"]["synthetic"]
    if syn["min_objects"] > syn["max_objects"]:
        raise ConfigError(f"{source}: data.synthetic.min_objects must be <= data.synthetic.max_objects")
    if syn["min_size"] > syn["max_size"] or syn["max_size"] > syn["image_size"]:
        raise ConfigError(f"{source}: data.synthetic needs min_size <= max_size <= image_size")
    if p["data"]["source"] == "coco":
        for key, value in p["data"]["coco"].items():
            if value is None:
                raise ConfigError(f"{source}: data.coco.{key} is required when data.source is coco")
    sizes = p["model"]["min_size"], p["model"]["max_size"]
    if "auto" not in sizes and sizes[0] > sizes[1]:
        raise ConfigError(f"{source}: model.min_size must be <= model.max_size")
    space = p["search_space"]
    for key in ("min_depth", "max_depth"):
        if len(space[key]) != 4:
            raise ConfigError(f"{source}: search_space.{key} needs one depth per stage (4 values)")
    if any(lo > hi for lo, hi in zip(space["min_depth"], space["max_depth"])):
        raise ConfigError(f"{source}: search_space.min_depth must be <= max_depth in every stage")
    for key in ("prune_ratios", "slim_ratios", "widen_ratios", "fpn_prune_ratios", "head_prune_ratios",
                "resize_ratios", "proposals_ratios"):
        if any(r <= 0 or (r >= 1 and key != "widen_ratios") for r in space[key]):
            raise ConfigError(f"{source}: search_space.{key} must hold ratios in (0, 1)"
                              + (" (widen: > 0)" if key == "widen_ratios" else ""))
    sc = p["search"]
    if sc["teacher_mutate"] + sc["teacher_resample"] <= 0:
        raise ConfigError(f"{source}: search.teacher_mutate/resample: at least one must be > 0")
    for key in ("trial_iters", "cut_trial_iters"):
        if sc[key] > sc["round_iters"]:
            raise ConfigError(f"{source}: search.{key} must be <= search.round_iters (a finalist's trial is "
                              "the start of the winner's round)")
    lat = p["latency"]
    if lat["device"] in ("cpu", "onnxruntime") and lat["clock"] == "cpu_time" and lat["threads"] != 1:
        raise ConfigError(f"{source}: latency.clock = 'cpu_time' times one thread: set latency.threads to 1 "
                          "or latency.clock to wall")
    if any(r <= 0 for r in lat["space"]["width_ratios"]):
        raise ConfigError(f"{source}: latency.space.width_ratios must all be > 0")
    if "widen" in space["actions"] and max(lat["space"]["width_ratios"]) <= 1:
        raise ConfigError(f"{source}: search_space.actions has widen but latency.space.width_ratios "
                          f"{lat['space']['width_ratios']} has no ratio above 1: the latency table could not "
                          "predict a widened student")
    if space["min_width"] > space["max_width"]:
        raise ConfigError(f"{source}: search_space.min_width must be <= search_space.max_width")
    try:
        base = resolve_arch(p["model"]["base"], p["model"]["width"])
    except ValueError as e:
        raise ConfigError(f"{source}: model.base = {p['model']['base']!r} is not allowed: {e}") from None
    _check_model_size(base, p["model"], f"{source}: model.base = {short(p['model']['base'])}")
    if any(hi < d for hi, d in zip(space["max_depth"], base.depths)):
        raise ConfigError(f"{source}: search_space.max_depth = {space['max_depth']} is below model.base's depths "
                          f"{list(base.depths)}: the search could not hold the base")
    if any(lo > d for lo, d in zip(space["min_depth"], base.depths)):
        raise ConfigError(f"{source}: search_space.min_depth = {space['min_depth']} is above model.base's depths "
                          f"{list(base.depths)}")


def _check_model_size(arch: Any, model: dict, where: str) -> None:
    """The widths, depths and estimated parameter count of the detector `model` describes, before
    anything is built (jdnas.models.detector.check_size)."""
    try:
        check_size(arch, model["fpn_channels"], model["representation_size"], 91, where)
    except JdnasError as e:
        raise ConfigError(str(e)) from None


CHECKPOINT_SUFFIXES = (".pt", ".pth")


def resolve_checkpoint(p: dict, source: str) -> None:
    """A base detector given as a checkpoint (`model.checkpoint`, or `model.base: PATH.pt`): its
    arch and head replace `model.base` and the model section's head keys, so that every stage
    (latency table, pool, search, baselines) works on the detector the run starts from."""
    m = p["model"]
    if m["base"].endswith(CHECKPOINT_SUFFIXES):
        if m["checkpoint"] not in (None, m["base"]):
            raise ConfigError(f"{source}: model.base = {m['base']!r} and model.checkpoint = {m['checkpoint']!r}: "
                              "give the checkpoint once")
        m["checkpoint"] = m["base"]
    if m["checkpoint"] is None:
        return
    try:
        ckpt = read_checkpoint(m["checkpoint"], hint=" (model.checkpoint)")
    except JdnasError as e:
        raise ConfigError(f"{source}: model.checkpoint: {e}") from None
    head = ckpt.get("head")
    missing = [k for k in ("arch", "head", "state_dict") if k not in ckpt]
    missing += [] if missing else [f"head.{k}" for k in HEAD_KEYS if not isinstance(head, dict) or k not in head]
    if missing:
        raise ConfigError(f"{source}: model.checkpoint: {m['checkpoint']}: {missing[0]}: missing from the checkpoint")
    try:
        m["base"] = str(Arch.from_json(ckpt["arch"]))
    except Exception as e:  # noqa: BLE001 - any malformed Arch JSON
        raise ConfigError(f"{source}: model.checkpoint: {m['checkpoint']}: arch: not a valid Arch ({e})") from None
    m.update({k: head[k] for k in HEAD_KEYS})


def check_teacher_pool(p: dict, source: str) -> None:
    """The pool space must fit its largest member; phases must come in order; DDP needs CUDA."""
    space, train = p["teacher_pool"]["space"], p["teacher_pool"]["train"]
    try:
        arch = resolve_arch(space["base"], space["width"])
    except ValueError as e:
        raise ConfigError(f"{source}: teacher_pool.space.base = {space['base']!r} is not allowed: {e}") from None
    _check_model_size(arch, p["model"], f"{source}: teacher_pool.space.base = {short(space['base'])}")
    if len(space["min_depths"]) != len(arch.stages) or any(
            d > s.depth for d, s in zip(space["min_depths"], arch.stages)):
        raise ConfigError(f"{source}: teacher_pool.space.min_depths = {space['min_depths']} is not allowed: must "
                          f"list {len(arch.stages)} depths, each at most the largest member's {list(arch.depths)}")
    for key in ("width_ratios", "out_width_ratios"):
        if any(r <= 0 for r in space[key]):
            raise ConfigError(f"{source}: teacher_pool.space.{key} = {space[key]} is not allowed: ratios must be > 0")
    if train["depth_phase_start"] > train["width_phase_start"]:
        raise ConfigError(f"{source}: teacher_pool.train.depth_phase_start must be <= width_phase_start")
    for key, gpus in (("teacher_pool.train.gpus", train["gpus"]), ("train_base.gpus", p["train_base"]["gpus"])):
        if gpus > 1 and p["device"].startswith("cuda:"):
            raise ConfigError(f"{source}: {key} = {gpus} needs device: cuda (a DDP job leases its {gpus} GPUs; "
                              f"device: {p['device']} pins one)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (safe_load keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(files: Iterable[str | Path]) -> dict:
    """Load and validate params: defaults, then each YAML file in order (later files win)."""
    files = [Path(f) for f in files]
    params = defaults()
    for f in files:
        if not f.is_file():
            raise ConfigError(f"{f}: params file not found")
        try:
            content = yaml.load(f.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{f}: invalid YAML: {clip(str(e).splitlines()[0])}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save the "
                              "params file as UTF-8") from None
        except RecursionError:
            raise ConfigError(f"{f}: invalid YAML: nested too deep (params are a few levels of mappings)") from None
        params = merge(params, content, source=str(f))
    resolve_checkpoint(params, " + ".join(map(str, files)) or "defaults")
    check_consistency(params, " + ".join(map(str, files)) or "defaults")
    check_teacher_pool(params, " + ".join(map(str, files)) or "defaults")
    return params


def section(params: dict, dotted: str) -> Any:
    """params['a']['b'] for 'a.b'."""
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def explicit_keys(files: Iterable[str | Path], top: str) -> set[str]:
    """The keys of section `top` that the params `files` set themselves (not left to the
    defaults): e.g. which head settings an import takes from the user rather than from its source.
    The files are read again; call after `load_params` has validated them."""
    keys: set[str] = set()
    for f in files:
        try:
            content = yaml.load(Path(f).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
            continue  # load_params reported it
        node = content.get(top) if isinstance(content, dict) else None
        if isinstance(node, dict):
            keys |= {str(k) for k in node}
    return keys


def user_data(params: dict) -> list[Path]:
    """The user's annotation files and image folders (none for synthetic data)."""
    if params["data"]["source"] != "coco":
        return []
    c = params["data"]["coco"]
    return [Path(c[k]) for k in ("train_annotations", "train_images", "val_annotations", "val_images")]


def val_timing(params: dict) -> dict[str, Any]:
    """`latency.measure.compare_on_val`'s settings: 4x the pool's `latency_runs` interleaved rounds,
    its threads, the latency clock."""
    ev = params["teacher_pool"]["eval"]
    return {"runs": ev["latency_runs"] * 4, "threads": ev["latency_threads"], "clock": params["latency"]["clock"]}
