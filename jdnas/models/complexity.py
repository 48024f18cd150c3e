"""Parameter count and FLOPs of a detector.

FLOPs are counted by torch's FlopCounterMode (multiply-add = 2 FLOPs) on one image of the
configured size: backbone + FPN + RPN head, plus the box head on a fixed number of proposals
(`rpn_post_nms_top_n_test`), so the figure does not depend on what the RPN happens to emit.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from jdnas.models.detector import Detector


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: Detector) -> int:
    """FLOPs of one forward pass at max_size x max_size with a fixed proposal count."""
    cfg = model.head_cfg
    device = next(model.parameters()).device
    size = cfg["max_size"]
    x = torch.zeros(1, 3, size, size, device=device)
    n_props = cfg["rpn_post_nms_top_n_test"]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            feats = model.backbone(x)
            model.rpn.head(list(feats.values()))
            # RoIAlign itself is not counted (FlopCounterMode has no formula for it; it is cheap)
            pooled = torch.zeros(n_props, cfg["fpn_channels"], 7, 7, device=device)
            model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
