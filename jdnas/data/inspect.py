"""What a dataset looks like, and model settings that fit it (`jdnas inspect-data`, prepare_data).

`data_stats` summarises a COCO dict: image sizes, object sizes (sqrt of box area, original
pixels), objects per image and class counts. `suggest_model` derives from them the settings a
detector needs to see those objects, by one rule (documented on the function) that the
`auto` values of `model.min_size`, `model.max_size` and `model.anchor_sizes` also use.
`check_fit` lists where the params disagree with the data.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from jdnas.models.detector import snap_size

AUTO_KEYS = ("min_size", "max_size", "anchor_sizes")
MAX_SHORT, MAX_LONG = 800, 1333   # the usual COCO input: larger images are scaled down to this
MIN_MINIVAL_IMAGES, MIN_MINIVAL_BOXES = 20, 200
# a base trained from scratch on fewer images learns little (a 20-image set: 1.6 val AP after 100
# epochs; the default synthetic set's 510: 75 val AP); start from a trained detector instead
MIN_SCRATCH_IMAGES = 100


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {k: round(float(np.percentile(a, q)), 1) for k, q in
            (("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100))}


def data_stats(data: dict) -> dict[str, Any]:
    """Image size, object size and objects-per-image percentiles, and boxes per class."""
    per_image = Counter(a["image_id"] for a in data["annotations"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_class = Counter(a["category_id"] for a in data["annotations"])
    return {
        "images": len(data["images"]),
        "boxes": len(data["annotations"]),
        "short_side": _pcts([min(im["width"], im["height"]) for im in data["images"]]),
        "long_side": _pcts([max(im["width"], im["height"]) for im in data["images"]]),
        "object_size": _pcts([math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in data["annotations"]]),
        "objects_per_image": _pcts([per_image.get(im["id"], 0) for im in data["images"]]),
        "boxes_per_class": {names[c]: per_class.get(c, 0) for c in sorted(names)},
    }


def input_scale(stats: dict, min_size: int, max_size: int) -> float:
    """The factor the detector resizes a median image by (torchvision's rule: the short side to
    min_size unless the long side would exceed max_size)."""
    return min(min_size / stats["short_side"]["median"], max_size / stats["long_side"]["median"])


def resize_floor(stats: dict, min_size: int, max_size: int, smallest_px: float) -> float:
    """The lowest input ratio (x min_size/max_size) at which the train split's 5th-percentile
    object still measures `smallest_px` pixels: below it `resize` makes objects vanish, which
    fine-tuning does not win back (the default synthetic set: objects from 10 px, so none)."""
    p5 = stats["object_size"]["p5"] * input_scale(stats, min_size, max_size)
    return smallest_px / max(p5, 1e-6)


def data_bounds(bounds: dict[str, Any], stats: dict, min_size: int, max_size: int) -> dict[str, Any]:
    """The search-space bounds with `min_input_ratio` raised to what the data allow (resize_floor),
    at most to 1: every other action keeps the input size, and stays legal."""
    floor = resize_floor(stats, min_size, max_size, bounds["resize_min_object"])
    return {**bounds, "min_input_ratio": min(1.0, max(bounds["min_input_ratio"], floor))}


def suggest_model(stats: dict, detections_per_img: int, sizes: tuple[Any, Any] = ("auto", "auto"),
                  val: dict | None = None) -> dict[str, Any]:
    """Model settings for data like `stats`:

    - input size: the median image at its own resolution (objects keep their pixels), scaled down
      to at most 800 x 1333 like COCO, snapped to a multiple of 32;
    - anchor sizes: five sizes doubling from level to level (P2..P6), centred on the geometric
      middle of the 5th..95th percentile object sizes at the input size (`sizes`, the params'
      min_size/max_size, where they are fixed; the suggested one where `auto`), the smallest at
      least 8 px, twice the stride of P2;
    - box_detections_per_img: at least the most objects any image has, in train or `val`.
    """
    short, long_ = stats["short_side"]["median"], stats["long_side"]["median"]
    scale = min(1.0, MAX_SHORT / short, MAX_LONG / long_)
    min_size, max_size = snap_size(short * scale), snap_size(long_ * scale)
    fixed = (min_size if sizes[0] == "auto" else sizes[0], max_size if sizes[1] == "auto" else sizes[1])
    s = input_scale(stats, *fixed)
    middle = math.sqrt(max(1.0, stats["object_size"]["p5"] * s) * max(1.0, stats["object_size"]["p95"] * s))
    first = 2 ** max(3, round(math.log2(middle / 4)))  # the middle of [a, 16a] is 4a; a >= 2 x P2's stride
    most = max(int(x["objects_per_image"]["max"]) for x in [stats] + ([val] if val else []))
    return {"min_size": min_size, "max_size": max_size, "anchor_sizes": [first * 2 ** k for k in range(5)],
            "box_detections_per_img": max(detections_per_img, int(math.ceil(most / 10) * 10))}


def resolve_auto(model: dict, suggested: dict) -> dict:
    """`model` params with every `auto` value replaced by the suggestion for the data."""
    return {k: (suggested[k] if v == "auto" and k in AUTO_KEYS else v) for k, v in model.items()}


def check_fit(stats: dict, model: dict, minival: dict | None = None, val: dict | None = None,
              from_scratch: bool = False) -> list[str]:
    """Where the (resolved) model params and the data disagree, one sentence each."""
    warnings = []
    if from_scratch and stats["images"] < MIN_SCRATCH_IMAGES:
        warnings.append(f"only {stats['images']} training images for a base trained from scratch (fewer than "
                        f"{MIN_SCRATCH_IMAGES}: a 20-image set reached 1.6 val AP): start from a trained detector "
                        "(jdnas import-torchvision, then model.base: PATH.pt)")
    s = input_scale(stats, model["min_size"], model["max_size"])
    smallest = stats["object_size"]["p5"] * s
    if smallest < model["anchor_sizes"][0] / 2:
        warnings.append(f"the smallest 5% of objects are under {smallest:.0f} px after resizing (x{s:.2f}), less than "
                        f"half the smallest anchor ({model['anchor_sizes'][0]}): raise model.min_size/max_size or "
                        "lower model.anchor_sizes")
    for name, x in (("a training image", stats), ("a val image", val)):
        most = int(x["objects_per_image"]["max"]) if x else 0
        if most > model["box_detections_per_img"]:
            warnings.append(f"{name} has {most} objects but model.box_detections_per_img is "
                            f"{model['box_detections_per_img']}: the rest can never be detected")
    if minival is not None and (minival["images"] < MIN_MINIVAL_IMAGES or minival["boxes"] < MIN_MINIVAL_BOXES):
        warnings.append(f"minival has {minival['images']} images and {minival['boxes']} boxes (fewer than "
                        f"{MIN_MINIVAL_IMAGES} / {MIN_MINIVAL_BOXES}): the search's decisions rest on noisy AP; "
                        "raise data.minival_fraction")
    return warnings


def snippet(suggested: dict) -> str:
    """The suggestion as a params YAML snippet to paste."""
    lines = ["model:"] + [f"  {k}: {v}" for k, v in suggested.items()]
    return "\n".join(lines) + "\n"
