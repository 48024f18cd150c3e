"""TensorBoard event files of the training stages: tags, steps, no duplicates after a resume, and
no effect on what training computes."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jdnas.data.dataset import CocoDetection
from jdnas.engine.loop import train_detector
from jdnas.engine.tblog import TrainLog, _after_last_file
from jdnas.models.arch import resolve_arch
from jdnas.models.detector import build_detector, head_config
from conftest import with_overrides

DETECTION_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def scalars(tb: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file in `tb` (TensorBoard's reading, purges applied)."""
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def steps(tb: Path, tag: str) -> list[int]:
    """Every step of `tag` in the order read, duplicates included."""
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_window_means_bound_the_points_per_run(tmp_path):
    with TrainLog(tmp_path, points=2) as log:  # 6 iterations, at most 2 points: windows of 3
        log.start(0, 6)
        for it in range(6):
            log.add(it, {"x": it, **({"y": 10 * it} if it >= 4 else {})})
        log.metrics({"AP": 1.5, "APs": None, "arch": "S8:1x8m8"}, 6)
    tags = scalars(tmp_path / "tb")
    assert tags == {"train/x": {2: 1.0, 5: 4.0}, "train/y": {5: 45.0}, "eval/AP": {6: 1.5}}


def test_a_new_event_file_sorts_after_the_folders_files(tmp_path):
    # TensorBoard reads files in name order; names order by whole second only (then host, pid and
    # a counter that sorts 10 before 9): a writer must not open in the second of an earlier file
    second = int(time.time()) + 1
    (tmp_path / f"events.out.tfevents.{second:010d}.host.99.9").touch()
    _after_last_file(tmp_path)
    assert time.time() >= second + 1
    with TrainLog(tmp_path) as log:
        log.open(None)
        log.writer.add_scalar("x", 1.0, 0)
    names = sorted(f.name for f in (tmp_path / "tb").glob("events.*"))
    with TrainLog(tmp_path) as log:
        log.open(0)
    assert sorted(f.name for f in (tmp_path / "tb").glob("events.*"))[:-1] == names


def test_train_detector_log_survives_a_kill_and_leaves_training_unchanged(prepared, smoke_params, tmp_path):
    torch.set_num_threads(1)
    cfg = {**smoke_params["train_base"], "iters": 6, "checkpoint_every": 2}
    ds = CocoDetection(prepared / "train.json", max_size=64)

    def run(name: str, log: TrainLog | None, stop_after: int | None = None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_detector(resolve_arch(smoke_params["model"]["base"], smoke_params["model"]["width"]),
                               head_config(smoke_params["model"], ds.labels.num_classes))
        train_detector(model, ds, cfg, tmp_path / f"{name}.pt", seed=1, device=torch.device("cpu"),
                       fingerprint="x", stop_after=stop_after, log=log)
        return model

    plain = run("plain", None)
    with TrainLog(tmp_path / "logged") as log:
        logged = run("logged", log)
    # killed after iteration 4 with its last checkpoint at 2: the log holds steps 0..3, the state says 2
    with TrainLog(tmp_path / "killed") as log:
        run("killed", log, stop_after=2)
        shutil.copy(tmp_path / "killed.pt", tmp_path / "at2.pt")
        run("killed", log, stop_after=2)
    shutil.copy(tmp_path / "at2.pt", tmp_path / "killed.pt")
    with TrainLog(tmp_path / "killed") as log:
        resumed = run("killed", log)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, logged.state_dict()[k]) and torch.equal(v, resumed.state_dict()[k]), k

    ref, got = scalars(tmp_path / "logged" / "tb"), scalars(tmp_path / "killed" / "tb")
    assert {f"train/{t}" for t in DETECTION_LOSSES | {"loss", "lr", "img_per_s"}} <= set(ref)
    assert steps(tmp_path / "killed" / "tb", "train/loss") == list(range(6))  # each step once
    for tag in ref:
        if tag != "train/img_per_s":
            assert got[tag] == ref[tag], tag
    assert ref["train/lr"][0] < ref["train/lr"][2]  # warm-up


def test_train_base_logs_losses_and_val_ap(base_ckpt):
    tags = scalars(base_ckpt.parent / "tb")
    assert sorted(tags["train/loss"]) == [0, 1]  # base_ckpt trains 2 iterations
    assert {f"train/{t}" for t in DETECTION_LOSSES | {"lr"}} <= set(tags)
    for m in ("AP", "AP50", "AP75"):
        assert list(tags[f"val/{m}"]) == [2], m


def test_student_logs_kd_loss_and_minival_ap(base_ckpt, prepared, smoke_params, tmp_path):
    from jdnas.joint.student import train_student
    torch.set_num_threads(1)
    params = with_overrides(smoke_params, {"train_student": {"iters": 2}})
    train_student(params["train_student"], prepared, tmp_path / "cand", base_ckpt, "prune(2,0.5)", base_ckpt,
                  seed=params["seed"], device=torch.device("cpu"), eval_batch=params["eval"]["batch_size"])
    tags = scalars(tmp_path / "cand" / "tb")
    assert sorted(tags["train/loss_kd"]) == [0, 1] and "train/loss" in tags
    assert list(tags["minival/AP"]) == [2]


def test_teacher_pool_logs_roles_phases_and_members(base_ckpt, prepared, smoke_params, tmp_path):
    from jdnas.joint.teacher_pool import eval_teacher_pool, phase_starts, train_teacher_pool
    torch.set_num_threads(1)
    params = with_overrides(smoke_params, {"teacher_pool": {"eval": {"sample_size": 2}}})
    train_teacher_pool(params, prepared, tmp_path / "pool", base_ckpt)
    rows = eval_teacher_pool(params, prepared, tmp_path / "pool" / "supernet.pt", tmp_path / "pool" / "pool.csv")
    tags = scalars(tmp_path / "pool" / "tb")
    iters = params["teacher_pool"]["train"]["iters"]
    depth_start, width_start = phase_starts(params["teacher_pool"]["train"])
    assert sorted(tags["train/loss_largest"]) == list(range(iters))
    assert sorted(tags["train/loss_smallest"]) == sorted(tags["train/loss_distill"]) == list(range(depth_start, iters))
    assert [tags["train/phase"][i] for i in (0, depth_start, width_start)] == [0, 1, 2]
    assert "train/lr" in tags
    for i, row in enumerate(rows):
        assert tags[f"pool/{i}_{row['role']}/AP"] == pytest.approx({iters: row["AP"]})
