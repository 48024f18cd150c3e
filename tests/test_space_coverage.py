"""One source of truth: the latency table covers every detector the search space can produce."""
import random

import pytest

from jdnas.models.arch import PRESET_NAMES, Head, preset
from jdnas.models.morphism import child, legal_actions
from conftest import proxy_table, with_overrides

WALKS, STEPS = 25, 12


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_random_legal_action_sequences_stay_predictable(name, smoke_params):
    """From every preset, WALKS random walks of STEPS legal actions (every kind enabled, widen too):
    the table built from the same params predicts every child. 5 presets x 25 x 12 = 1500 steps."""
    base = preset(name, 0.25)
    p = with_overrides(smoke_params, {
        "model": {"base": name, "width": 0.25, "fpn_channels": 32, "representation_size": 64, "min_size": 128,
                  "max_size": 160, "rpn_post_nms_top_n_test": 40},
        "search_space": {"actions": ["deepen", "shallow", "shift", "prune", "slim", "widen", "fpn_prune",
                                     "head_prune", "resize", "proposals"],
                         "max_depth": [d + 1 for d in base.depths], "max_width": 4 * max(base.widths)},
        "latency": {"space": {"width_ratios": [0.25, 0.5, 1.0, 2.0, 4.0]}}})
    table = proxy_table(p)
    bounds, base_head = p["search_space"], Head.of(p["model"])
    assert table.base_head == base_head
    rng = random.Random(name)
    for _ in range(WALKS):
        arch, head = base, base_head
        for _ in range(STEPS):
            actions = legal_actions(arch, bounds, head, base_head)
            assert actions
            for a in actions:
                assert table.covers(*child(a, arch, head)), (str(arch), str(head), str(a))
            arch, head = child(rng.choice(actions), arch, head)
