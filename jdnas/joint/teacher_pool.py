"""The elastic teacher pool (DESIGN §6): train the supernet once, then take any teacher from it.

- `train_supernet`: integrated progressive shrinking in one resumable run. Phases by iteration
  (full network, then elastic depth, then elastic width; channels sorted by importance when
  the width phase starts); every iteration trains the largest, the smallest and n random
  members of the current phase (sandwich rule, gradients accumulated, one optimizer step);
  the smaller members also match the largest member's FPN features (in-place distillation).
- `TeacherPool.teacher(arch)`: a static detector with sliced weights and batch-norm
  statistics recalibrated on a few training batches.
- Stages `train_teacher_pool` (-> supernet.pt) and `eval_teacher_pool` (-> pool.csv); both log
  to TensorBoard in the pool's folder (`tb/`: losses per sandwich role, lr, phase; members' AP).
"""
from __future__ import annotations

import contextlib
import csv
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from jdnas.data.dataset import CocoDetection, IterationSampler, collate
from jdnas.engine.device import resolve_device
from jdnas.engine.dist import DistContext, check_in_sync, init_distributed, shutdown
from jdnas.engine.loop import LoopHooks, autocast, evaluate, train_loop
from jdnas.engine.step_meter import Step
from jdnas.engine.tblog import TrainLog
from jdnas.errors import JdnasError
from jdnas.io import atomic_path, file_sha256, fingerprint, save_torch
from jdnas.latency.measure import latency_images, measure_latency
from jdnas.models.arch import Arch, resolve_arch
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import Detector, check_head, check_size, head_config, jittered_input, read_checkpoint
from jdnas.models.elastic import PHASES, PoolSpace, Supernet, sort_channels
from jdnas.seeding import step_seed

SUPERNET_FORMAT = "jdnas-supernet/1"
CSV_COLUMNS = ("arch", "role", "AP", "AP50", "params", "flops", "latency_ms")


# --- schedule -------------------------------------------------------------------------------
def pool_space(space_params: dict[str, Any]) -> PoolSpace:
    """The pool space described by the `teacher_pool.space` params."""
    return PoolSpace(resolve_arch(space_params["base"], space_params["width"]), tuple(space_params["min_depths"]),
                     tuple(space_params["width_ratios"]), tuple(space_params["out_width_ratios"]))


def phase_starts(cfg: dict[str, Any]) -> tuple[int, int]:
    """First iteration of the elastic-depth phase and of the elastic-width phase."""
    return round(cfg["depth_phase_start"] * cfg["iters"]), round(cfg["width_phase_start"] * cfg["iters"])


def phase_at(it: int, cfg: dict[str, Any]) -> str:
    """'full', 'depth' or 'width': what iteration `it` trains."""
    depth_start, width_start = phase_starts(cfg)
    return "full" if it < depth_start else "depth" if it < width_start else "width"


def sandwich(space: PoolSpace, it: int, cfg: dict[str, Any], seed: int) -> list[tuple[str, Arch]]:
    """Members trained at iteration `it`: the largest first, then the smallest and n random ones.

    The full phase trains the largest member only. The draw depends on (seed, it) alone, so a
    resumed run and every DDP rank train the same members.
    """
    phase = phase_at(it, cfg)
    members = [("largest", space.largest())]
    if phase == "full":
        return members
    rng = random.Random(step_seed(seed, it, "sandwich"))
    members.append(("smallest", space.smallest(phase)))
    members += [("random", space.sample(rng, phase)) for _ in range(cfg["sandwich_random"])]
    return members


def fpn_distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over FPN levels of the relative squared error ||s - t||^2 / ||t||^2 to the largest member.

    Relative, so the term stays O(1) whatever the scale of the (un-normalised) FPN features.
    """
    total = 0.0
    for k, t in teacher.items():
        t = t.float()
        total = total + F.mse_loss(student[k].float(), t) / t.pow(2).mean().clamp_min(1e-8)
    return total / len(teacher)


class _LastOutput:
    """Keeps the last output of a module (a forward hook): the FPN features of each member."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.output: Any = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.output = output

    def close(self) -> None:
        self.handle.remove()


# --- training -------------------------------------------------------------------------------
class _Sandwich(LoopHooks):
    """The sandwich rule as `train_loop`'s step and hooks: the members' forward and backward
    passes with in-place distillation, the channel sort when the width phase starts (kept in
    the training state as `channels_sorted`), the phase in the log and on the bar."""

    hidden = ("loss_distill",)

    def __init__(self, supernet: Supernet, cfg: dict[str, Any], seed: int, device: torch.device,
                 ctx: DistContext, desc: str) -> None:
        self.supernet, self.cfg, self.seed, self.device, self.ctx, self.desc = supernet, cfg, seed, device, ctx, desc
        self.channels_sorted = False
        self.recorder = _LastOutput(supernet.model.backbone)

    def before_step(self, it: int, optimizer: torch.optim.Optimizer) -> None:
        if phase_at(it, self.cfg) == "width" and not self.channels_sorted:
            moved = sort_channels(self.supernet, optimizer)
            self.channels_sorted = True
            if self.ctx.is_main:
                print(f"{self.desc}: width phase at iteration {it}: sorted {moved} channel groups by importance",
                      file=sys.stderr)

    def step(self, it: int, images: list, targets: list, forward: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Largest, smallest and random members, gradients accumulated; under DDP they are averaged
        in the last pass's backward only (`no_sync` before). Returns the loss per role (mean over
        the random members) and the distillation loss."""
        cfg, supernet = self.cfg, self.supernet
        teacher_feats = None
        losses_of: dict[str, list[torch.Tensor]] = defaultdict(list)
        members = sandwich(supernet.space, it, cfg, self.seed)
        for i, (role, arch) in enumerate(members):
            supernet.set_active(arch)
            sync = i == len(members) - 1 or not self.ctx.active
            with autocast(self.device), jittered_input([supernet.model], cfg["scales"], self.seed, it), \
                    (contextlib.nullcontext() if sync else forward.no_sync()):
                losses = forward(images, targets)
                feats = self.recorder.output
                if teacher_feats is None:
                    teacher_feats = {k: v.detach() for k, v in feats.items()}
                elif cfg["distill_weight"] > 0:
                    losses["loss_distill"] = cfg["distill_weight"] * fpn_distill_loss(feats, teacher_feats)
                loss = sum(losses.values())
                loss.backward()
            losses_of[f"loss_{role}"].append(loss.detach())
            if "loss_distill" in losses:
                losses_of["loss_distill"].append(losses["loss_distill"].detach())
        supernet.set_active(supernet.space.largest())
        return {k: torch.stack(v).mean() for k, v in losses_of.items()}

    def state(self) -> dict[str, Any]:
        return {"channels_sorted": self.channels_sorted}

    def load_state(self, state: dict[str, Any]) -> None:
        self.channels_sorted = bool(state["channels_sorted"])

    def log_values(self, step: Step) -> dict[str, float]:
        return {"phase": PHASES.index(phase_at(step.it, self.cfg))}

    def postfix(self, step: Step, shown: dict[str, str]) -> dict[str, str]:
        return {"phase": phase_at(step.it, self.cfg), **shown}


def train_supernet(supernet: Supernet, dataset: CocoDetection, cfg: dict[str, Any], state_path: str | Path,
                   seed: int, device: torch.device, fingerprint: str = "", ctx: DistContext = DistContext(),
                   desc: str = "train_teacher_pool", stop_after: int | None = None,
                   log: TrainLog | None = None) -> dict[str, Any]:
    """Progressive shrinking with sandwich sampling and in-place distillation, resumable.

    State (weights, optimizer, iteration, RNG, whether channels were sorted) is written to
    `state_path` every `checkpoint_every` iterations (rank 0 only) and resumed when its
    `fingerprint` matches. `log` (rank 0's) receives each iteration's loss per sandwich role (mean
    over the random members), distillation loss, lr and phase (0 full, 1 depth, 2 width). Returns
    iterations done, wall and CPU seconds (resumed runs included).
    """
    if ctx.active and cfg["batch_size"] < ctx.world:
        raise JdnasError(f"teacher_pool.train.batch_size = {cfg['batch_size']} is smaller than the {ctx.world} "
                         "DDP processes: every process needs at least one image")
    model = supernet.model.to(device)
    rule = _Sandwich(supernet, cfg, seed, device, ctx, desc)
    try:
        # a member leaves some weights unused, so DDP looks for them
        out = train_loop(model, dataset, cfg, state_path, seed, device, rule.step, rule, fingerprint=fingerprint,
                         desc=desc, hint="lower teacher_pool.train.lr", stop_after=stop_after, log=log, ctx=ctx,
                         find_unused_parameters=True)
    finally:
        rule.recorder.close()
    check_in_sync([p for p in model.parameters() if p.requires_grad], ctx)
    return {"iters": out["iters"], "seconds": out["seconds"], "cpu_seconds": out["cpu_seconds"],
            "channels_sorted": rule.channels_sorted,
            "last_losses": {k.replace("loss_", ""): v for k, v in out["last_losses"].items()}}


# --- checkpoints ----------------------------------------------------------------------------
def save_supernet(path: str | Path, supernet: Supernet, **meta: Any) -> None:
    """supernet.pt: format tag, pool space, head config and the shared weights (atomic)."""
    save_torch(path, {"format": SUPERNET_FORMAT, "space": supernet.space.to_json(), "head": supernet.head_cfg,
                      "state_dict": {k: v.detach().cpu() for k, v in supernet.state_dict().items()}, "meta": meta})


def load_supernet(path: str | Path) -> Supernet:
    """Rebuild a Supernet from supernet.pt (loaded with weights_only=True)."""
    ckpt = read_checkpoint(path, SUPERNET_FORMAT, " (run the train_teacher_pool stage)")
    for key in ("space", "head", "state_dict"):
        if key not in ckpt:
            raise JdnasError(f"{path}: {key}: missing from the supernet checkpoint")
    head = check_head(ckpt["head"], str(path))
    try:
        space = PoolSpace.from_json(ckpt["space"])
    except Exception as e:  # noqa: BLE001 - a malformed space
        raise JdnasError(f"{path}: space: not a valid pool space ({type(e).__name__}: {str(e)[:200]})") from None
    check_size(space.max_arch, head["fpn_channels"], head["representation_size"], head["num_classes"],
               f"{path}: space.max_arch")
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG alone
            supernet = Supernet(space, head)
    except Exception as e:  # noqa: BLE001 - a malformed space or head
        raise JdnasError(f"{path}: space/head: cannot build the supernet ({type(e).__name__}: {e})") from None
    try:
        supernet.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise JdnasError(f"{path}: state_dict: does not match its space ({str(e).splitlines()[0]})") from None
    supernet.meta = ckpt.get("meta", {})
    return supernet


# --- extraction -----------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(model: Detector, dataset: CocoDetection, batches: int, batch_size: int, seed: int,
                   device: torch.device) -> Detector:
    """Recompute every BatchNorm's running statistics from `batches` training batches (no flips).

    Statistics are plain averages over the batches (momentum None); the backbone runs in train
    mode on the detector's own transform of the images. Returns the model in eval mode.
    """
    model.to(device)
    if batches <= 0:
        return model.eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    sampler = IterationSampler(len(dataset), batch_size, batches, seed, flip=False)
    try:
        for images, _ in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
            image_list, _ = model.transform([im.to(device) for im in images])
            model.backbone(image_list.tensors)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    return model.eval()


class TeacherPool:
    """Teachers on demand: `teacher(arch)` = extract + BN recalibration on training batches."""

    def __init__(self, supernet: Supernet, train_set: CocoDetection, bn_batches: int, bn_batch_size: int,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.supernet, self.train_set = supernet, train_set
        self.bn_batches, self.bn_batch_size, self.seed = bn_batches, bn_batch_size, seed
        self.device = torch.device(device)

    @classmethod
    def load(cls, supernet: str | Path | Supernet, data_dir: str | Path, bn_batches: int, bn_batch_size: int,
             seed: int, device: torch.device) -> "TeacherPool":
        """The pool of a trained supernet (or its supernet.pt), recalibrating on the prepared train split."""
        if not isinstance(supernet, Supernet):
            supernet = load_supernet(supernet)
        train_set = CocoDetection(Path(data_dir) / "train.json", max_size=supernet.head_cfg["max_size"])
        return cls(supernet, train_set, bn_batches, bn_batch_size, seed, device)

    @property
    def space(self) -> PoolSpace:
        return self.supernet.space

    def teacher(self, arch: Arch) -> Detector:
        """Member `arch` as a static detector with recalibrated BN statistics, in eval mode."""
        model = self.supernet.extract(arch)
        return recalibrate_bn(model, self.train_set, self.bn_batches, self.bn_batch_size, self.seed, self.device)

    def twin(self, model: Detector) -> Detector | None:
        """The member with `model`'s architecture and head, BN recalibrated, in `model`'s mode; None
        where the pool has none. A pool trained from the base (`teacher_pool.init: base`) holds the
        base's twin: the base trained further, distilled in place from the largest member."""
        if not (self.space.contains(model.arch) and self.supernet.head_cfg == model.head_cfg):
            return None
        return self.teacher(model.arch).train(model.training)


# --- measurements ---------------------------------------------------------------------------
def sample_members(space: PoolSpace, n: int, seed: int) -> list[tuple[str, Arch]]:
    """`n` distinct members: the largest, the smallest, the middle one, then random ones."""
    chosen: dict[Arch, str] = {}
    for role, arch in (("largest", space.largest()), ("smallest", space.smallest()), ("middle", space.middle())):
        if len(chosen) < n:
            chosen.setdefault(arch, role)
    rng = random.Random(seed)
    tries = 0
    while len(chosen) < n and tries < 100 * n:
        chosen.setdefault(space.sample(rng), "random")
        tries += 1
    return [(role, arch) for arch, role in chosen.items()]


# --- stages ---------------------------------------------------------------------------------
def _manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def train_teacher_pool(params: dict, data_dir: str | Path, out_dir: str | Path,
                       base: str | Path | None = None) -> dict[str, Any]:
    """Stage train_teacher_pool: train the supernet, write `supernet.pt` (rank 0).

    With `teacher_pool.init: base` the supernet starts from the trained base detector `base`
    (`Supernet.inherit`), so on a short CPU schedule the teachers start as good as the base
    rather than from scratch.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ctx, device = init_distributed(params["device"])
    tp = params["teacher_pool"]
    cfg, space = tp["train"], pool_space(tp["space"])
    ok = False
    try:
        train_set = CocoDetection(data_dir / "train.json", max_size=params["model"]["max_size"])
        torch.manual_seed(params["seed"])
        supernet = Supernet(space, head_config(params["model"], train_set.labels.num_classes))
        base_sha = ""
        if tp["init"] == "base":
            if base is None or not Path(base).is_file():
                raise JdnasError(f"teacher_pool.init is base but the base detector {base} does not exist")
            ckpt = read_checkpoint(base)
            try:
                supernet.inherit(Arch.from_json(ckpt["arch"]), ckpt["state_dict"])
            except ValueError as e:
                raise JdnasError(f"{base}: {e} (set teacher_pool.init: scratch or a pool space around it)") from None
            base_sha = file_sha256(base)
        fp = fingerprint(space.to_json(), supernet.head_cfg, {k: v for k, v in cfg.items() if k != "gpus"},
                         params["seed"], _manifest(data_dir)["splits"]["train"]["sha256"], ctx.world, base_sha)
        state_path = out_dir / "train_state.pt"
        with TrainLog(out_dir) if ctx.is_main else contextlib.nullcontext() as log:
            summary = train_supernet(supernet, train_set, cfg, state_path, params["seed"], device, fp, ctx, log=log)
        summary.update({"largest": str(space.largest()), "smallest": str(space.smallest()), "world_size": ctx.world})
        if ctx.is_main:
            save_supernet(out_dir / "supernet.pt", supernet, stage="train_teacher_pool", **summary)
            state_path.unlink(missing_ok=True)
        ok = True
        return summary
    finally:
        shutdown(ctx, wait=ok)


def eval_teacher_pool(params: dict, data_dir: str | Path, supernet_path: str | Path,
                      out_csv: str | Path) -> list[dict[str, Any]]:
    """Stage eval_teacher_pool: AP, AP50, size, FLOPs and latency of a sample of members -> pool.csv.

    Each member's AP, AP50 and latency also go to TensorBoard (`pool/<i>_<role>/...`, i = its row in
    pool.csv) beside the supernet's training curves, at the supernet's last iteration.
    """
    data_dir = Path(data_dir)
    ev = params["teacher_pool"]["eval"]
    pool = TeacherPool.load(supernet_path, data_dir, ev["bn_batches"], ev["bn_batch_size"], params["seed"],
                            resolve_device(params["device"]))
    rows = []
    images = latency_images(data_dir / "val.json", pool.supernet.head_cfg["max_size"])
    for role, arch in sample_members(pool.space, ev["sample_size"], params["seed"]):
        model = pool.teacher(arch)
        metrics = evaluate(model, data_dir / "val.json", params["eval"]["batch_size"], pool.device)
        rows.append({"arch": str(arch), "role": role, "AP": metrics["AP"], "AP50": metrics["AP50"],
                     "params": count_params(model), "flops": count_flops(model),
                     "latency_ms": measure_latency({"m": model}, images, ev["latency_runs"], ev["latency_threads"],
                                                   pool.device, params["latency"]["clock"])["m"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with atomic_path(out_csv) as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    with TrainLog(Path(out_csv).parent) as log:
        for i, row in enumerate(rows):
            log.metrics({k: row[k] for k in ("AP", "AP50", "latency_ms")}, int(pool.supernet.meta.get("iters", 0)),
                        prefix=f"pool/{i}_{row['role']}/")
    return rows
