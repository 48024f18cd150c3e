"""Screening moves before training them (DESIGN §8): each child scored with no training at all.

A child inherits its parent's weights, gets its BatchNorm statistics recalibrated on a few
training batches (slicing and removing blocks shift the statistics of every layer after the
cut), and is evaluated on a fixed subset of minival. The joint search ranks its moves with it
and `prune_kd` its cuts, so both pay the same price for the same information.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from jdnas.data.dataset import CocoDetection
from jdnas.data.prepare import image_root
from jdnas.engine.loop import evaluate
from jdnas.joint.teacher_pool import recalibrate_bn
from jdnas.models.detector import Detector
from jdnas.models.morphism import Action, morph_detector


def subset_json(gt_json: str | Path, n: int, out: str | Path) -> Path:
    """The first `n` images (by id; 0: all) of a prepared split and their annotations, as `out`."""
    gt = json.loads(Path(gt_json).read_text())
    images = sorted(gt["images"], key=lambda im: im["id"])[:n] if n > 0 else gt["images"]
    keep = {im["id"] for im in images}
    obj = {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
           "jdnas": {**gt.get("jdnas", {}), "image_root": str(image_root(gt_json, gt).resolve())}}
    Path(out).write_text(json.dumps(obj))
    return Path(out)


def cut_gain(saved_ms: float, ap_lost: float) -> float:
    """How a cut ranks: predicted latency saved per screen AP lost (a loss under 0.1 AP counts as
    0.1, so free cuts rank by what they save)."""
    return saved_ms / max(ap_lost, 0.1)


class Screen:
    """Scores detectors on a fixed minival subset after BN recalibration on fixed training batches."""

    def __init__(self, train_set: CocoDetection, gt_json: str | Path, images: int, bn_batches: int,
                 bn_batch_size: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.train_set, self.device, self.seed = train_set, device, seed
        self.bn_batches, self.bn_batch_size, self.batch_size = bn_batches, bn_batch_size, batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="jdnas-screen-")
        self.gt = subset_json(gt_json, images, Path(self._tmp.name) / "screen.json")

    def score(self, model: Detector) -> float:
        """AP of a copy of `model` with recalibrated BN statistics (the model is untouched)."""
        return self._recalibrated_ap(copy.deepcopy(model))

    def _recalibrated_ap(self, model: Detector) -> float:
        recalibrate_bn(model, self.train_set, self.bn_batches, self.bn_batch_size, self.seed, self.device)
        return float(evaluate(model, self.gt, self.batch_size, self.device)["AP"])

    def actions(self, model: Detector, actions: Iterable[Action], seed: int = 0) -> list[dict[str, Any]]:
        """`{"action", "model", "ap"}` per action: the child (weights inherited, BN statistics
        recalibrated) and its screen AP."""
        rows = []
        for a in actions:
            child = morph_detector(model, a, seed=seed)
            rows.append({"action": a, "model": child, "ap": self._recalibrated_ap(child)})
        return rows

    def greedy_cut(self, model: Detector, ap: float, latency_ms: float, goal_ms: float,
                   cuts: Callable[[Detector, float], dict[Action, float]], tolerance: float, seed: int = 0,
                   first: list[dict[str, Any]] | None = None) -> tuple[Detector, list[dict[str, Any]]]:
        """Cut `model` (screen AP `ap`, predicted `latency_ms`) one action at a time until the
        predicted latency reaches `goal_ms`, each step screening every cut of the current child
        (`cuts(model, latency_ms)`: action -> predicted latency) and taking the most latency saved
        per screen AP lost (`cut_gain`); while some cut saves more than
        `tolerance` of the latency, only those qualify. `first`: this screen's rows for `model`'s
        cuts, already scored. The child and its plan, `{"action", "screen_ap", "latency_ms"}` per step."""
        plan: list[dict[str, Any]] = []
        while latency_ms > goal_ms:
            options = cuts(model, latency_ms)
            big = {a: ms for a, ms in options.items() if ms < latency_ms * (1 - tolerance)}
            options = big or options
            if not options:
                break
            if first is not None:
                rows = [x for x in first if x["action"] in options]
                first = None
            else:
                rows = self.actions(model, list(options), seed=seed)
            best = max(rows, key=lambda x: (cut_gain(latency_ms - options[x["action"]], ap - x["ap"]),
                                            str(x["action"])))
            model, ap, latency_ms = best["model"], best["ap"], options[best["action"]]
            plan.append({"action": best["action"], "screen_ap": ap, "latency_ms": latency_ms})
        return model, plan

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "Screen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
