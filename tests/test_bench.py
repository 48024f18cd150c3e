"""The GPU training benchmark starts and prints its table on the CPU (tiny model): CI checks
that it runs; its figures come from a GPU machine."""
import subprocess
import sys

from conftest import REPO, cli_env


def test_gpu_train_bench_runs_small_on_cpu():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--small", "--device", "cpu"],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| tiny")]
    assert [c[1].strip() for c in rows] == ["torchvision-ref", "jdnas", "jdnas / reference"]
    assert all(float(c[2]) > 0 for c in rows[:2]) and rows[2][2].strip().endswith("x")
