"""jdnas: Joint-DetNAS, joint architecture search, pruning and distillation for detectors."""
from __future__ import annotations

from typing import Any

__all__ = ["load_detector"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`jdnas.load_detector`, imported on first use: importing the package does not load torch."""
    if name == "load_detector":
        from jdnas.models.detector import load_detector
        return load_detector
    raise AttributeError(f"module 'jdnas' has no attribute {name!r}")
