"""Strict loading of a user's COCO-format dataset (annotation JSON + image folder).

Every kind of bad input is a `DataError` whose one-line message names the file and the
offending id or field. Boxes that stick out of their image are clipped or rejected according
to `data.out_of_image`; a box wholly outside its image is always rejected.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from jdnas.config import is_number
from jdnas.errors import DataError

REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

# image modes that convert to RGB without losing their meaning (16-bit and float modes do not)
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def _records(src: str, data: dict, key: str) -> list[dict]:
    items = data[key]
    if not isinstance(items, list):
        raise DataError(f"{src}: {key}: must be a list")
    seen: set = set()
    for i, rec in enumerate(items):
        if not isinstance(rec, dict):
            raise DataError(f"{src}: {key}[{i}]: must be an object")
        for field in REQUIRED[key]:
            if field not in rec:
                where = f"id={rec['id']}" if "id" in rec else f"[{i}]"
                raise DataError(f"{src}: {key} {where}: missing key '{field}'")
        if not isinstance(rec["id"], int) or isinstance(rec["id"], bool):
            raise DataError(f"{src}: {key}[{i}]: id must be an integer, got {rec['id']!r}")
        if rec["id"] in seen:
            raise DataError(f"{src}: {key}: duplicate id {rec['id']}")
        seen.add(rec["id"])
    return items


MAX_JSON_BYTES = 16 << 30  # an annotation file larger than this is not one (COCO train2017: 448 MB)


def _check_regular_file(path: Path, what: str) -> None:
    """A DataError that says what `path` is when it is not a readable regular file: missing, a
    folder, a FIFO or device, a link loop."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: too many levels of symbolic links (a link loop): give the {what} itself") from None
        if e.errno == errno.ENOTDIR:
            raise DataError(f"{path}: file not found (a part of the path is a file, not a folder)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise DataError(f"{path}: permission denied (make the {what} readable)") from None
        raise DataError(f"{path}: file not found" + (" (a broken link)" if path.is_symlink() else "")) from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a folder, not a file (give the {what})")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device): give the {what}")
    if st.st_size > MAX_JSON_BYTES:
        raise DataError(f"{path}: {st.st_size / 2**30:.0f} GiB, too large for an {what}")


def read_json(path: Path) -> Any:
    """Parse a JSON file; DataError naming the file and position on failure."""
    _check_regular_file(path, "annotation file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: invalid JSON: not UTF-8 text") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deep") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def _check_box(src: str, ann: dict, img: dict, policy: str) -> tuple[list[float], bool]:
    """Validate one bbox against its image; return the (possibly clipped) box and whether it was clipped."""
    box = ann["bbox"]
    where = f"{src}: annotations id={ann['id']}: bbox"
    if not isinstance(box, list) or len(box) != 4 or not all(is_number(v) for v in box):
        raise DataError(f"{where} must be 4 finite numbers [x, y, width, height], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise DataError(f"{where} width and height must be > 0, got {box!r}")
    W, H = float(img["width"]), float(img["height"])
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(W, x + w), min(H, y + h)
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return [x, y, w, h], False
    size = f"image {img['id']} ({img['width']}x{img['height']})"
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where} {box!r} lies wholly outside {size}: rejected")
    if policy == "reject":
        raise DataError(f"{where} {box!r} extends outside {size}: rejected (data.out_of_image=reject; "
                        "set it to clip to clip such boxes)")
    return [x0, y0, x1 - x0, y1 - y0], True


MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels' default: 7071 x 7071


def _too_large(where: str, w: int, h: int, max_pixels: int) -> DataError:
    return DataError(f"{where} is {w}x{h} = {w * h:,} pixels, above data.max_image_pixels = {max_pixels:,}: "
                     "too large to decode safely (raise the limit if the image is genuine)")


def _check_image_file(src: str, img: dict, image_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    path = image_dir / img["file_name"]
    if not path.is_file():
        raise DataError(f"{src}: images id={img['id']}: file_name '{img['file_name']}' not found in {image_dir}")
    where = f"{src}: images id={img['id']}: {path}"
    if img["width"] * img["height"] > max_pixels:
        raise _too_large(where, img["width"], img["height"], max_pixels)
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our limit, checked on the header before any pixel is decoded
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise _too_large(where, *im.size, max_pixels)
            im.load()  # a full decode: a truncated file fails here, not at some training iteration
            size, mode = im.size, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where} cannot be read as an image ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    if mode not in IMAGE_MODES:
        raise DataError(f"{where} has pixel mode {mode} (e.g. 16-bit): convert it to 8-bit RGB or grayscale")
    if size != (img["width"], img["height"]):
        raise DataError(f"{where} is {size[0]}x{size[1]} but width/height say {img['width']}x{img['height']}")


def load_coco(ann_path: str | Path, image_dir: str | Path, out_of_image: str = "clip",
              check_images: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[dict[str, Any], int]:
    """Load and validate a COCO file (with `check_images`, decode every image, refusing any over
    `max_pixels`). Returns (cleaned dataset dict, number of clipped boxes)."""
    ann_path, image_dir = Path(ann_path), Path(image_dir)
    src = str(ann_path)
    data = read_json(ann_path)
    if not image_dir.is_dir():
        kind = "is a file, not an image folder" if image_dir.is_file() else "image folder not found"
        raise DataError(f"{image_dir}: {kind} (given for {src})")
    if not isinstance(data, dict):
        raise DataError(f"{src}: top level must be an object with images, annotations, categories")
    for key in REQUIRED:
        if key not in data:
            raise DataError(f"{src}: missing key '{key}'")
    images = _records(src, data, "images")
    anns = _records(src, data, "annotations")
    cats = _records(src, data, "categories")
    if not images:
        raise DataError(f"{src}: images: empty dataset (no images)")
    if not cats:
        raise DataError(f"{src}: categories: empty (no categories)")
    if not anns:
        raise DataError(f"{src}: annotations: empty dataset (no annotations)")
    for img in images:
        for field in ("width", "height"):
            if not isinstance(img[field], int) or img[field] <= 0:
                raise DataError(f"{src}: images id={img['id']}: {field} must be a positive integer, got {img[field]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DataError(f"{src}: images id={img['id']}: file_name must be a non-empty string")
    names: dict[str, int] = {}
    for c in cats:
        if not isinstance(c["name"], str) or not c["name"].strip():
            raise DataError(f"{src}: categories id={c['id']}: name must be a non-empty string, got {c['name']!r}")
        if c["name"] in names:
            raise DataError(f"{src}: categories id={c['id']}: name {c['name']!r} is also category "
                            f"id={names[c['name']]}")
        names[c["name"]] = c["id"]
    by_id = {img["id"]: img for img in images}
    cat_ids = {c["id"] for c in cats}
    clean_anns, clipped = [], 0
    for ann in anns:
        where = f"{src}: annotations id={ann['id']}:"
        for field in ("image_id", "category_id"):
            if not _is_int(ann[field]):
                raise DataError(f"{where} {field} must be an integer, got {ann[field]!r}")
        if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
            raise DataError(f"{where} area must be a finite number >= 0, got {ann['area']!r}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1) or isinstance(ann.get("iscrowd"), bool):
            raise DataError(f"{where} iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if ann["image_id"] not in by_id:
            raise DataError(f"{src}: annotations id={ann['id']}: image_id {ann['image_id']!r} not in images")
        if ann["category_id"] not in cat_ids:
            raise DataError(f"{src}: annotations id={ann['id']}: category_id {ann['category_id']!r} not in categories")
        box, was_clipped = _check_box(src, ann, by_id[ann["image_id"]], out_of_image)
        clipped += was_clipped
        clean_anns.append({"id": ann["id"], "image_id": ann["image_id"], "category_id": ann["category_id"],
                           "bbox": box, "area": float(ann.get("area", box[2] * box[3])) if not was_clipped
                           else box[2] * box[3], "iscrowd": int(ann.get("iscrowd", 0))})
    if check_images:
        for img in images:
            _check_image_file(src, img, image_dir, max_pixels)
    clean = {
        "images": [{k: img[k] for k in REQUIRED["images"]} for img in images],
        "annotations": clean_anns,
        "categories": [{"id": c["id"], "name": c["name"]} for c in cats],
    }
    return clean, clipped


class LabelMap:
    """COCO category ids <-> contiguous labels 1..C (0 is background for torchvision)."""

    def __init__(self, categories: list[dict]) -> None:
        ids = sorted(c["id"] for c in categories)
        self.cat_to_label = {cid: i + 1 for i, cid in enumerate(ids)}
        self.label_to_cat = {i + 1: cid for i, cid in enumerate(ids)}
        names = {c["id"]: c["name"] for c in categories}
        self.names = [names[cid] for cid in ids]

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.cat_to_label) + 1
