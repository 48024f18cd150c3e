import json
import subprocess
import sys

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
