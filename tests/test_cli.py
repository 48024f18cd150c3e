import json
import subprocess

import pytest

from jdnas.cli import build_parser, main
from conftest import REPO, cli_env


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help():
    r = subprocess.run(["jdnas", "--help"], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0
    for name in _subcommands():
        assert name in r.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_arch_command(capsys):
    assert main(["arch", "r18", "--width", "0.25", "--classes", "4", "--params", str(REPO / "params.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "S16:2x16m16-2x32m32-2x64m64-2x128m128" and out["params"] > 0 and out["flops"] > 0


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["arch", "r999", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdnas: error: arch:")
    assert main(["train-base", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: params file not found" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["train-base", "--out", "o"], ["profile-latency", "--out", "o"],
                                 ["eval-teacher-pool", "--supernet", "s.pt", "--out", "o.csv"]])
def test_data_that_is_not_a_prepared_folder_is_one_line(tmp_path, capsys, cmd):
    assert main([*cmd, "--data", str(tmp_path / "nothing"), "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing/manifest.json: not found (--data must be a folder written by" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk raises a RuntimeError that does not say why: the CLI says it."""
    import shutil
    from collections import namedtuple
    import torch
    from jdnas.models.arch import resolve_arch
    from jdnas.models.detector import build_detector, head_config, save_detector
    from jdnas.config import load_params

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    model = build_detector(resolve_arch("tiny", 0.25), head_config(load_params([REPO / "params.yaml"])["model"], 3))

    def cmd(args):
        save_detector(tmp_path / "out" / "model.pt", model)
    import jdnas.cli as cli
    monkeypatch.setattr(cli, "cmd_arch", cmd)
    assert main(["arch", "r18", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdnas: error: the disk is full writing ") and "model.pt" in err[0]
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written left behind
