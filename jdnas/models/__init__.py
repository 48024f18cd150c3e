"""Arch spec, static ResNet-like backbone and the Faster R-CNN + FPN builder."""
from jdnas.models.arch import PRESET_NAMES, Arch, Stage, preset, resolve_arch
from jdnas.models.detector import Detector, build_detector, head_config, load_detector, save_detector

__all__ = ["Arch", "Stage", "preset", "resolve_arch", "PRESET_NAMES", "Detector", "build_detector",
           "head_config", "load_detector", "save_detector"]
