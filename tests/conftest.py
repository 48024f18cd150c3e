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
# tests and CI never start DVC's analytics daemon (it tries to reach the network): here and in
# every subprocess a test starts (they inherit os.environ; cli_env sets it too)
os.environ["DVC_NO_ANALYTICS"] = "1"
# `make test` runs two pytest workers (pytest-xdist) on what may be a 2-core machine: one OpenMP
# thread per process (workers and the jobs they start), or the threads wait on each other
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list) -> None:
    """Slow tests first, so two workers share them and the quick ones fill in behind; under
    pytest-xdist (`-n 2 --dist loadgroup`) the tests that share test_workflow's smoke DAG run
    (module-scoped) go to one worker, which runs the DAG once."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke_run"))


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
    from jdnas.baselines.base import train_base
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base")
    train_base(with_overrides(smoke_params, {"train_base": {"iters": 2}}), prepared, out)
    return out / "model.pt"


def cli_env() -> dict:
    """Environment for subprocesses: the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "JDNAS_GPU_LEASED"}  # a lease is never inherited here
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def write_yaml(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def linear_ms(e) -> float:
    """A made-up cost, linear in every width: linear interpolation must reproduce it exactly."""
    return (0.1 + 0.01 * e.cin + 0.02 * e.mid + 0.03 * e.cout + 0.001 * e.height + 0.004 * e.hidden
            + (0.5 if e.stride == 2 else 0.0))


def proxy_table(params: dict, classes: int = 5, cost=linear_ms):
    """A latency table over the params' whole search space with a made-up cost per entry: tests
    of everything that reads a table, without live timings."""
    from dataclasses import replace
    from jdnas.latency import LatencyTable
    from jdnas.latency.space import grid_entries, head_entries, head_space_from_params, network_input_size, \
        spaces_from_params
    from jdnas.models.detector import head_config
    heads = head_space_from_params(params)
    cfg = head_config(params["model"], classes)
    image = (params["model"]["min_size"],) * 2
    rungs = [(h, network_input_size(h.apply(cfg), image))
             for h in (replace(heads.base, min_size=a, max_size=b) for a, b in heads.sizes)]
    entries = grid_entries(spaces_from_params(params), heads, rungs, classes)
    entries |= {head_entries(hw, h, classes)[-1] for h, hw in rungs}
    return LatencyTable({e: cost(e) for e in entries}, {e: "proxy" for e in entries})


@pytest.fixture(scope="session")
def supernet_ckpt(prepared, smoke_params, base_ckpt, tmp_path_factory) -> Path:
    """A (barely) trained smoke teacher pool: supernet.pt."""
    from jdnas.joint.teacher_pool import train_teacher_pool
    out = tmp_path_factory.mktemp("pool")
    train_teacher_pool(smoke_params, prepared, out, base_ckpt)
    return out / "supernet.pt"
