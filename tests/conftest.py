"""Shared fixtures: small params, a prepared synthetic dataset, paths."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

from jdnas.config import load_params, merge

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def smoke_params() -> dict:
    """params.yaml + config/smoke.yaml, as the smoke workflow sees them."""
    return load_params([REPO / "params.yaml", REPO / "config" / "smoke.yaml"])


def with_overrides(params: dict, override: dict) -> dict:
    return merge(copy.deepcopy(params), override, source="test")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, smoke_params) -> Path:
    """A prepared synthetic dataset (smoke size), shared read-only by the tests."""
    from jdnas.data.prepare import prepare_data
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data(smoke_params, out)
    return out


@pytest.fixture(scope="session")
def base_ckpt(prepared, smoke_params, tmp_path_factory) -> Path:
    """A (barely) trained smoke base detector: model.pt."""
    import torch
    from jdnas.base_detector import train_base
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base")
    train_base(with_overrides(smoke_params, {"train_base": {"iters": 2}}), prepared, out)
    return out / "model.pt"


def cli_env() -> dict:
    """Environment for subprocesses: the venv's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_yaml(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path
