"""The `prepare_data` stage: synthetic or user COCO data -> train / minival / val + manifest.

Outputs (in `data/prepared/`): `{train,minival,val}.json` (COCO, with a `jdnas.image_root`
entry that says where their `file_name`s live), `manifest.json` (counts and checksums) and,
for synthetic data, the rendered `images/`. The folder is built under a temporary name and
renamed at the end, so a failure leaves no output behind.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from jdnas.config import section, user_data
from jdnas.data.coco import load_coco
from jdnas.data.inspect import check_fit, data_bounds, data_stats, resolve_auto, snippet, suggest_model
from jdnas.data.synthetic import generate_split
from jdnas.errors import DataError
from jdnas.io import atomic_dir, check_outputs, file_sha256, load_json

SPLITS = ("train", "minival", "val")
DEFAULT_OUT = Path("data/prepared")
# what a prepared folder written before output markers existed holds: it may be replaced too
PREPARED_FILES = ("manifest.json", *(f"{s}.json" for s in SPLITS))


def _subset(data: dict, image_ids: set[int]) -> dict:
    return {
        "images": [im for im in data["images"] if im["id"] in image_ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids],
        "categories": data["categories"],
    }


def split_minival(data: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out a seeded `fraction` of the training images as minival (at least one image each side)."""
    ids = sorted(im["id"] for im in data["images"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_mini = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    mini = {ids[i] for i in order[:n_mini]}
    return _subset(data, set(ids) - mini), _subset(data, mini)


def _counts(data: dict) -> dict[str, Any]:
    per_cat = Counter(a["category_id"] for a in data["annotations"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    return {"images": len(data["images"]), "annotations": len(data["annotations"]),
            "per_category": {names[c]: per_cat.get(c, 0) for c in sorted(names)}}


def prepare_data(params: dict, out_dir: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    """Build the prepared dataset folder; return the manifest."""
    out_dir = Path(out_dir)
    d = params["data"]
    seed = params["seed"]
    if d["source"] == "coco":  # never into (or around) the user's data: a replaced folder is deleted
        check_outputs("prepare-data", {"--out": out_dir},
                      {f"data.coco.{k}": v for k, v in d["coco"].items()})
    with atomic_dir(out_dir, "prepare-data", legacy=PREPARED_FILES) as tmp:
        clipped = 0
        if d["source"] == "synthetic":
            syn = d["synthetic"]
            pool = generate_split(tmp / "images", "train", syn["train_images"], syn, seed=seed * 1000 + 1)
            val = generate_split(tmp / "images", "val", syn["val_images"], syn, seed=seed * 1000 + 2,
                                 first_image_id=syn["train_images"] + 1)
            roots = {"train": "images", "val": "images"}
        else:
            c = d["coco"]
            pool, clip_train = load_coco(c["train_annotations"], c["train_images"], d["out_of_image"],
                                         max_pixels=d["max_image_pixels"])
            val, clip_val = load_coco(c["val_annotations"], c["val_images"], d["out_of_image"],
                                      max_pixels=d["max_image_pixels"])
            if sorted(x["id"] for x in pool["categories"]) != sorted(x["id"] for x in val["categories"]):
                raise DataError(f"{c['val_annotations']}: categories: ids differ from those of "
                                f"{c['train_annotations']}")
            clipped = clip_train + clip_val
            roots = {"train": str(Path(c["train_images"]).resolve()), "val": str(Path(c["val_images"]).resolve())}
        src = "data.synthetic" if d["source"] == "synthetic" else d["coco"]["train_annotations"]
        if len(pool["images"]) < 2:
            raise DataError(f"{src}: images: {len(pool['images'])} training image(s); minival needs at least one "
                            "more besides the training images")
        train, minival = split_minival(pool, d["minival_fraction"], seed)
        splits = {"train": (train, roots["train"]), "minival": (minival, roots["train"]), "val": (val, roots["val"])}
        for name, (data, _) in splits.items():
            if not data["annotations"]:  # COCOeval would score any detector 0 AP on it, silently
                where = d["coco"]["val_annotations"] if name == "val" and d["source"] == "coco" else src
                raise DataError(f"{where}: annotations: the {name} split ({len(data['images'])} images) has no boxes"
                                + (" (raise data.minival_fraction)" if name == "minival" else ""))
        fit = data_fit(pool, val, minival, params["model"])
        manifest: dict[str, Any] = {"source": d["source"], "seed": seed, "clipped_boxes": clipped,
                                    "categories": pool["categories"], "splits": {}, **fit}
        for name, (data, root) in splits.items():
            path = tmp / f"{name}.json"
            path.write_text(json.dumps({**data, "jdnas": {"image_root": root}}))
            manifest["splits"][name] = {**_counts(data), "sha256": file_sha256(path)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"prepare_data: model settings that fit the data (what `auto` becomes):\n{snippet(fit['suggested'])}", end="")
    for w in fit["warnings"]:
        print(f"prepare_data: warning: {w}")
    if clipped:
        print(f"prepare_data: clipped {clipped} boxes that extended outside their image (data.out_of_image=clip)")
    return manifest


def data_fit(pool: dict, val: dict, minival: dict | None, model: dict) -> dict[str, Any]:
    """Stats of the training images (minival included) and of val, the model settings that fit
    them, the model params with `auto` resolved, and warnings where the params and data disagree."""
    stats, val_stats = data_stats(pool), data_stats(val)
    suggested = suggest_model(stats, model["box_detections_per_img"], (model["min_size"], model["max_size"]), val_stats)
    resolved = resolve_auto(model, suggested)
    counts = None if minival is None else {"images": len(minival["images"]), "boxes": len(minival["annotations"])}
    scratch = not model.get("checkpoint") and not str(model.get("base", "")).endswith((".pt", ".pth"))
    return {"stats": {"train": stats, "val": val_stats}, "suggested": suggested,
            "model": {k: resolved[k] for k in suggested},
            "warnings": check_fit(stats, resolved, counts, val_stats, from_scratch=scratch)}


TRAIN_SECTIONS = ("train_base", "train_student", "teacher_pool.train")


def resolved_params(params: dict, data_dir: str | Path) -> dict:
    """params with what depends on the prepared data filled in from its manifest: `auto` model
    values (the suggested ones) and 'N epochs' iteration counts (N x training images / batch size)."""
    epochs = any(isinstance(section(params, k)["iters"], str) for k in TRAIN_SECTIONS)
    if "auto" not in params["model"].values() and not epochs:
        return params
    path = Path(data_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    if "suggested" not in manifest:
        raise DataError(f"{path}: suggested: missing (rerun the prepare_data stage)")
    out = {**params, "model": resolve_auto(params["model"], manifest["suggested"])}
    images = manifest["splits"]["train"]["images"]
    for key in TRAIN_SECTIONS:
        cfg = section(out, key)
        if isinstance(cfg["iters"], str):
            n = float(cfg["iters"].split()[0])
            top, _, sub = key.partition(".")
            new = {**cfg, "iters": max(1, math.ceil(n * images / cfg["batch_size"]))}
            out = {**out, top: {**out[top], sub: new} if sub else new}
    return out


def prepared_bounds(bounds: dict, data_dir: str | Path, min_size: int, max_size: int) -> dict:
    """The search space's bounds for the prepared data at input `min_size`/`max_size`: `resize`
    only as far as the train split's objects stay visible (`data_bounds`). One rule for the joint
    search, prune_kd and the latency table's grid, so the table covers exactly what they can make
    (on data with small objects, the base's input size alone)."""
    if "resize" not in bounds["actions"] or not bounds["resize_min_object"]:
        return bounds  # nothing to bound (a bare manifest, without statistics, is enough)
    stats = train_stats(data_dir)
    if stats is None:
        raise DataError(f"{Path(data_dir) / 'manifest.json'}: stats: missing (rerun the prepare_data stage)")
    return data_bounds(bounds, stats, min_size, max_size)


def train_stats(data_dir: str | Path) -> dict | None:
    """The train split's statistics (`data_stats`) from a prepared manifest; None without them."""
    manifest = load_json(Path(data_dir) / "manifest.json")  # missing or not JSON: one line naming it
    return manifest.get("stats", {}).get("train") if isinstance(manifest, dict) else None


def typical_image(data_dir: str | Path) -> tuple[int, int] | None:
    """(height, width) of the train split's median image, landscape (its median short and long
    sides): the image the latency table is timed on, so that it is resized and padded to the
    tensor the detector really sees (a 144 x 208 image at min_size 128: 128 x 192, not 128 x 128).
    None where the manifest has no statistics."""
    stats = train_stats(data_dir)
    return None if stats is None else (round(stats["short_side"]["median"]), round(stats["long_side"]["median"]))


def user_data_fingerprint(params: dict) -> str:
    """A hash of the user's data as it is now: each annotation file's bytes, and the name, size and
    modification time of every file under the image folders (an image edited in place counts).
    Snakemake reruns prepare_data (and what depends on it) when it changes."""
    h = hashlib.sha256()
    for path in user_data(params):
        if path.is_file():
            h.update(f"{path}:{file_sha256(path)}".encode())
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{os.path.join(root, name)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_split(data_dir: str | Path, split: str) -> dict:
    """A prepared split's COCO dict."""
    return json.loads((Path(data_dir) / f"{split}.json").read_text())


def check_prepared(data_dir: str | Path) -> None:
    """A clear error unless `data_dir` is a folder `prepare_data` wrote (manifest and every split)."""
    data_dir = Path(data_dir)
    for name in ("manifest.json", *(f"{s}.json" for s in SPLITS)):
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name}: not found (--data must be a folder written by the prepare_data "
                            "stage: jdnas prepare-data --out DIR)")


def image_root(json_path: str | Path, data: dict) -> Path:
    """Where the `file_name`s of a prepared split live (relative roots are relative to the JSON)."""
    root = Path(data.get("jdnas", {}).get("image_root", "."))
    return root if root.is_absolute() else Path(json_path).parent / root
