"""jdnas: Joint-DetNAS, joint architecture search, pruning and distillation for detectors."""
from jdnas.models.detector import load_detector

__all__ = ["load_detector"]
__version__ = "0.1.0"
