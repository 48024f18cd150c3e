"""`jdnas train` end to end on a checkpoint written by `jdnas train-base` (smoke config)."""
from __future__ import annotations

import json

import pytest

from jdnas.cli import main
from jdnas.models.arch import Arch
from jdnas.models.detector import load_detector, read_checkpoint
from jdnas.models.morphism import Action, child_arch
from conftest import REPO


def _train(args, prepared):
    params = ["--params", str(REPO / "params.yaml"), "--params", str(REPO / "config" / "smoke.yaml")]
    return main(["train", *params, "--threads", "1", "--data", str(prepared), *args])


def test_train_cli_morphs_distils_and_evaluates(base_ckpt, prepared, tmp_path, capsys):
    assert _train(["--init", str(base_ckpt), "--action", "prune(2,0.5)", "--teacher", str(base_ckpt),
                   "--out", str(tmp_path / "s")], prepared) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert printed == metrics
    parent = load_detector(base_ckpt)
    assert metrics["arch"] == str(child_arch(Action.parse("prune(2,0.5)"), parent.arch))
    assert metrics["parent_arch"] == str(parent.arch) and metrics["action"] == "prune(2,0.5)"
    assert metrics["teacher_arch"] == str(parent.arch) and metrics["kd_loss"] == "fpn_masked"
    assert metrics["split"] == "minival" and metrics["train_iters"] == 4 and metrics["AP"] is not None
    assert {"loss_kd", "loss_classifier", "loss_objectness"} <= set(metrics["last_losses"])
    model = load_detector(tmp_path / "s" / "model.pt")
    assert model.arch == Arch.parse(metrics["arch"])
    assert read_checkpoint(tmp_path / "s" / "model.pt")["meta"]["stage"] == "train_student"
    assert not (tmp_path / "s" / "train_state.pt").exists()
    # the student is a new init for the next action, without a teacher
    assert _train(["--init", str(tmp_path / "s" / "model.pt"), "--action", "deepen(1)", "--out",
                   str(tmp_path / "s2"), "--eval-split", "val"], prepared) == 0
    m2 = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert m2["kd_loss"] is None and "loss_kd" not in m2["last_losses"] and m2["split"] == "val"
    assert Arch.parse(m2["arch"]).depths[1] == model.arch.depths[1] + 1


@pytest.mark.parametrize("action, words", [("shallow(1,1)", "has blocks 0..0"), ("grow(1)", "not an action")])
def test_train_cli_rejects_bad_actions_in_one_line(base_ckpt, prepared, tmp_path, capsys, action, words):
    assert _train(["--init", str(base_ckpt), "--action", action, "--out", str(tmp_path / "x")], prepared) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jdnas: error: --action") and words in err[-1]
    assert not (tmp_path / "x" / "model.pt").exists()
