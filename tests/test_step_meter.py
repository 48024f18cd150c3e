"""StepMeter: loss tensors read in windows, non-finite losses caught with the step that made them."""
import math

import pytest
import torch

from jdnas.engine.step_meter import StepMeter
from jdnas.errors import JdnasError


def test_cpu_reads_every_step():
    meter = StepMeter(torch.device("cpu"), "train", "lower the lr")
    meter.begin()
    steps = meter.end(0, {"a": torch.tensor(1.5), "b": torch.tensor(2.0)}, images=4)
    assert [(s.it, s.values) for s in steps] == [(0, {"a": 1.5, "b": 2.0})]
    assert steps[0].img_per_s > 0 and meter.seconds > 0


def test_windows_are_read_together_and_on_demand():
    """As on CUDA (every 3rd step here): nothing is read in between, then every pending step."""
    meter = StepMeter(torch.device("cpu"), "train", "lower the lr")
    meter.every = 3
    got = []
    for it in range(7):
        meter.begin()
        got.append([s.it for s in meter.end(it, {"loss": torch.tensor(float(it))}, 2, read=it == 4)])
    assert got == [[], [], [0, 1, 2], [], [3, 4], [], []]
    meter.begin()
    assert [s.values["loss"] for s in meter.end(7, {"loss": torch.tensor(7.0)}, 2)] == [5.0, 6.0, 7.0]


def test_a_non_finite_loss_is_a_one_line_error_naming_the_step():
    meter = StepMeter(torch.device("cpu"), "train_base", "lower the lr in params")
    meter.every = 2
    meter.begin()
    meter.end(10, {"loss_box": torch.tensor(0.3)}, 2)
    meter.begin()
    with pytest.raises(JdnasError) as e:
        meter.end(11, {"loss_box": torch.tensor(math.nan)}, 2)
    assert str(e.value) == "train_base: loss_box became nan at iteration 11 (lower the lr in params)"
