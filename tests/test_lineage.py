"""A lineage trained in segments (the search's rounds) is one training run (DESIGN §8)."""
import copy

import torch

from jdnas.data.dataset import CocoDetection
from jdnas.joint.lineage import Lineage, Recipe, apply_moves, train_segment
from jdnas.models.detector import load_detector
from jdnas.models.morphism import Action


def test_a_lineage_trained_in_segments_is_one_run(prepared, smoke_params, base_ckpt, tmp_path, monkeypatch):
    """A segment hands on all a run carries (the schedule's position, SGD momentum, the KD adapters
    and their momentum, the batch order) but torch's global RNG, which each segment seeds afresh:
    with it carried over, two segments are one run to the last bit."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    teacher = load_detector(base_ckpt)
    # the FPN cut gives the student identity KD adapters: trained, and carried between segments
    start = apply_moves(Lineage(load_detector(base_ckpt)), [Action.parse("fpn_prune(0.25)")])
    assert start.adapters
    data = CocoDetection(prepared / "train.json", max_size=teacher.head_cfg["max_size"])
    recipe = Recipe.of(smoke_params["train_student"], 6)

    one, _ = train_segment(copy.deepcopy(start), teacher, data, recipe, 6, 0, tmp_path / "a.pt", cpu, "a")
    half, _ = train_segment(copy.deepcopy(start), teacher, data, recipe, 3, 0, tmp_path / "b.pt", cpu, "b")
    assert half.it == 3 and half.momentum and any(k.startswith("extra.adapters") for k in half.momentum)
    rng = torch.get_rng_state()
    monkeypatch.setattr(torch, "manual_seed", lambda seed: torch.set_rng_state(rng))
    two, _ = train_segment(half, teacher, data, recipe, 6, 0, tmp_path / "c.pt", cpu, "b")

    assert two.it == one.it == 6
    a, b = one.model.state_dict(), two.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(one.adapters[k], two.adapters[k]) for k in one.adapters)
    assert all(torch.equal(one.momentum[k], two.momentum[k]) for k in one.momentum)
