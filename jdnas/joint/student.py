"""`jdnas train`: a student from an initial checkpoint, optionally morphed by one action, trained with
KD from a teacher checkpoint (total loss = detection loss + kd_weight x KD loss) and evaluated.

This is the per-candidate job of the search (DESIGN §8 step 2) and the fine-tune / KD steps of
the naive pipeline. Training resumes after a kill, like every training stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jdnas.data.dataset import CocoDetection
from jdnas.engine.loop import Replan, detection_loss, evaluate, train_detector
from jdnas.engine.tblog import TrainLog
from jdnas.errors import JdnasError
from jdnas.io import file_sha256, fingerprint, weights_sha256, write_json
from jdnas.joint.distill import Distiller, Teacher
from jdnas.models.arch import Head
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import Detector, load_detector, save_detector, set_input_size
from jdnas.models.morphism import Action, morph_detector


def teacher_sha256(teacher: str | Path | Detector | None) -> str | None:
    """What a resumable student state records of its teacher: the checkpoint's or the weights' hash."""
    if teacher is None:
        return None
    return (weights_sha256(teacher) if isinstance(teacher, Detector) else file_sha256(teacher))[:16]


def parse_action(text: str | None) -> Action | None:
    if text is None or text.strip() in ("", "none"):
        return None
    try:
        return Action.parse(text)
    except ValueError as e:
        raise JdnasError(f"--action: {e}") from None


def train_student(recipe: dict[str, Any], data_dir: str | Path, out_dir: str | Path, init: str | Path,
                  action: str | Action | None = None, teacher: str | Path | Detector | None = None, *,
                  seed: int, device: torch.device, eval_batch: int, eval_split: str = "minival",
                  replan: Replan | None = None) -> dict[str, Any]:
    """Load `init`, apply `action` with weight inheritance, train with KD from `teacher` (if given)
    by `recipe` (the `train_student` keys), evaluate on `eval_split`; write model.pt and
    metrics.json to `out_dir` (TensorBoard events in out_dir/tb); return the metrics. `teacher`: a
    checkpoint, or a detector held in memory. `replan`: a compute budget (see `engine.train_loop`)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cfg = recipe
    act = parse_action(action) if not isinstance(action, Action) else action
    parent = load_detector(init)
    parent_arch = parent.arch
    if act is None:
        model = parent
    else:
        try:
            model = morph_detector(parent, act, seed=seed)
        except ValueError as e:
            raise JdnasError(f"--action {act}: {e}") from None
    model.train()
    train_set = CocoDetection(data_dir / "train.json", max_size=model.head_cfg["max_size"])
    if train_set.labels.num_classes != model.head_cfg["num_classes"]:
        raise JdnasError(f"{init}: predicts {model.head_cfg['num_classes'] - 1} classes but {data_dir} has "
                         f"{train_set.labels.num_classes - 1}")
    distiller, loss_fn, teacher_arch = None, detection_loss, None
    if teacher is not None and cfg["kd_weight"] > 0:
        t_model = teacher if isinstance(teacher, Detector) else load_detector(teacher)
        t_model = set_input_size(t_model, model.head_cfg)  # the teacher sees the student's input
        teacher_arch = str(t_model.arch)
        distiller = Distiller(model, Teacher(t_model, device), cfg["kd_loss"], cfg["kd_weight"],
                              cfg["kd_fg_weight"], cfg["kd_bg_weight"], cfg["kd_temperature"], seed)
        loss_fn = distiller.loss_fn
    manifest = json.loads((data_dir / "manifest.json").read_text())
    fp = fingerprint(file_sha256(init)[:16], str(act), teacher_sha256(teacher), cfg, seed,
                     manifest["splits"]["train"]["sha256"])
    state_path = out_dir / "train_state.pt"
    split = data_dir / f"{eval_split}.json"
    if not split.is_file():
        raise JdnasError(f"{split}: split not found (expected train/minival/val in {data_dir})")
    with TrainLog(out_dir) as log:
        summary = train_detector(model, train_set, cfg, state_path, seed, device, fp, loss_fn=loss_fn,
                                 desc="train_student", extra=distiller, log=log, replan=replan)
        metrics = evaluate(model, split, eval_batch, device)
        log.metrics(metrics, summary["iters"], prefix=f"{eval_split}/")
    metrics.update({"split": eval_split, "arch": str(model.arch), "head": str(Head.of(model.head_cfg)),
                    "parent_arch": str(parent_arch),
                    "action": None if act is None else str(act), "teacher_arch": teacher_arch,
                    "kd_loss": cfg["kd_loss"] if distiller else None,
                    "params": count_params(model), "flops": count_flops(model),
                    "train_iters": summary["iters"], "train_seconds": summary["seconds"],
                    "resumed_cpu_seconds": summary["resumed_cpu_seconds"], "last_losses": summary["last_losses"]})
    save_detector(out_dir / "model.pt", model.cpu(), stage="train_student", metrics=metrics)
    write_json(out_dir / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)
    return metrics
