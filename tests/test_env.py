"""envs/jdnas.yaml (the conda env of `snakemake --sdm conda`) installs what pyproject.toml pins."""
from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO


def pins(lines: list[str]) -> dict[str, str]:
    """name -> the normalised requirement (extras, version specifiers, markers) of requirement lines."""
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower(): str(r) for r in reqs}


def conda_env() -> dict:
    return yaml.safe_load((REPO / "envs" / "jdnas.yaml").read_text())


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (pip,) = [d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pins(pip) == pins(project["dependencies"])


def test_conda_env_python_satisfies_requires_python():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (python,) = [d.split("=", 1)[1] for d in conda_env()["dependencies"] if isinstance(d, str)
                 and d.startswith("python=")]
    assert SpecifierSet(project["requires-python"]).contains(python + ".0"), python
