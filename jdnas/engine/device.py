"""The torch device a params `device` names, checked against the machine."""
from __future__ import annotations

import torch

from jdnas.errors import JdnasError


def resolve_device(name: str) -> torch.device:
    """torch.device for a params `device`; a clear error when the machine lacks it."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise JdnasError(f"params: device = {name!r} but this machine has no CUDA device (use cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise JdnasError(f"params: device = {name!r} but only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(name)
