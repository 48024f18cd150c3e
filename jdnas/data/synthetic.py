"""Built-in synthetic detection data: coloured shapes on cluttered backgrounds, COCO format.

Deterministic from a seed. Every class draws its colour, size and rotation from the same
distributions, so only shape tells the classes apart; objects range from small to large,
overlap (later ones occlude earlier ones) and sit among clutter strokes that belong to no class.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

MAX_OVERLAP = 0.3  # at most this fraction of the smaller of two boxes may be covered (partial occlusion)


def _regular(n: int, r_out: float, r_in: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or a star when r_in is given), unit-centred."""
    pts = []
    k = 2 * n if r_in is not None else n
    for i in range(k):
        r = r_out if (r_in is None or i % 2 == 0) else r_in
        a = 2 * math.pi * i / k - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _cross(arm: float = 0.33) -> list[tuple[float, float]]:
    a, b = arm, 1.0
    return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]


# unit outlines (radius ~1) of the polygon classes; circle and ring are drawn as ellipses
POLYGONS: dict[str, Callable[[], list[tuple[float, float]]]] = {
    "square": lambda: [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "triangle": lambda: _regular(3, 1.0),
    "cross": _cross,
    "star": lambda: _regular(5, 1.0, 0.45),
}


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour with enough contrast to `avoid` (the local background)."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c.astype(int) - avoid.astype(int)).sum() > 150:
            return tuple(int(x) for x in c)
    return tuple(int(x) for x in 255 - avoid)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour gradient plus pixel noise."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    img = c0 * (1 - t) + c1 * t
    img = np.broadcast_to(img, (size, size, 3)) + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller box's area: how much of the smaller one may be hidden."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int) -> None:
    """Thin random strokes and arcs that belong to no class."""
    for _ in range(n):
        col = tuple(int(x) for x in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, size, 2)
        x1, y1 = np.clip(np.array([x0, y0]) + rng.normal(0, size / 4, 2), 0, size)
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 3)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
            draw.arc(box, float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=col, width=1)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                 colour: tuple[int, int, int]) -> list[float]:
    """Draw one object; return its tight box [x0, y0, x1, y1]."""
    if shape in ("circle", "ring"):
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=max(2, int(r * 0.35)))
        return box
    ca, sa = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in POLYGONS[shape]()]
    draw.polygon(pts, fill=colour)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [min(xs), min(ys), max(xs), max(ys)]


def generate_split(image_dir: Path, prefix: str, n_images: int, cfg: dict[str, Any], seed: int,
                   first_image_id: int = 1) -> dict[str, Any]:
    """Render `n_images` images into `image_dir/prefix/` and return their COCO dict."""
    classes = cfg["classes"]
    size = cfg["image_size"]
    (image_dir / prefix).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for k in tqdm(range(n_images), desc=f"synthetic {prefix}", unit="img", leave=False):
        image_id = first_image_id + k
        pixels = _background(rng, size)
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        _draw_clutter(draw, rng, size, int(rng.integers(0, cfg["clutter"] + 1)))
        boxes: list[list[float]] = []
        for _ in range(int(rng.integers(cfg["min_objects"], cfg["max_objects"] + 1))):
            for _attempt in range(20):
                # log-uniform object size: small and large objects both common
                d = math.exp(rng.uniform(math.log(cfg["min_size"]), math.log(cfg["max_size"])))
                r = d / 2
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                probe = [cx - r, cy - r, cx + r, cy + r]
                if all(_overlap(probe, b) <= MAX_OVERLAP for b in boxes):
                    break
            else:
                continue
            cat = int(rng.integers(len(classes)))
            local = pixels[int(cy), int(cx)]
            box = _draw_object(draw, classes[cat], cx, cy, r, float(rng.uniform(0, 2 * math.pi)),
                               _colour(rng, local))
            box = [max(0.0, box[0]), max(0.0, box[1]), min(float(size), box[2]), min(float(size), box[3])]
            boxes.append(box)
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat + 1, "bbox": [round(v, 2) for v in (box[0], box[1], w, h)],
                                "area": round(w * h, 2), "iscrowd": 0})
        file_name = f"{prefix}/{image_id:06d}.png"
        img.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}
