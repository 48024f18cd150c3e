import json

import numpy as np
import pytest
import torch
from PIL import Image

from jdnas.data.coco import LabelMap
from jdnas.data.dataset import CocoDetection, IterationSampler, collate, hflip
from jdnas.data.prepare import prepare_data, split_minival
from jdnas.data.synthetic import generate_split


def test_prepared_layout_and_manifest(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "minival", "val"}
    counts = {k: v["images"] for k, v in manifest["splits"].items()}
    assert counts["train"] + counts["minival"] == 24 and counts["val"] == 8
    for split in ("train", "minival", "val"):
        data = json.loads((prepared / f"{split}.json").read_text())
        assert len(data["images"]) == counts[split]
        assert data["annotations"], split
    train = {im["id"] for im in json.loads((prepared / "train.json").read_text())["images"]}
    mini = {im["id"] for im in json.loads((prepared / "minival.json").read_text())["images"]}
    assert not train & mini


def test_synthetic_is_deterministic(tmp_path, smoke_params):
    a = prepare_data(smoke_params, tmp_path / "a")
    b = prepare_data(smoke_params, tmp_path / "b")
    assert a == b
    img = "images/train/000003.png"
    assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()


def test_synthetic_classes_not_separable_by_colour(tmp_path):
    """Mean object colour per class is about the same: only shape tells classes apart."""
    cfg = {"image_size": 96, "classes": ["circle", "square", "triangle", "cross"], "min_objects": 2,
           "max_objects": 4, "min_size": 16, "max_size": 40, "clutter": 3}
    data = generate_split(tmp_path, "x", 150, cfg, seed=5)
    colours: dict[int, list] = {}
    for ann in data["annotations"]:
        im = np.asarray(Image.open(tmp_path / f"x/{ann['image_id']:06d}.png"))
        x, y, w, h = (int(v) for v in ann["bbox"])
        cx, cy = x + w // 2, y + h // 2
        if ann["category_id"] != 4:  # the cross's centre is filled; so are the others'
            colours.setdefault(ann["category_id"], []).append(im[cy, cx].astype(float))
    means = np.array([np.mean(v, axis=0) for v in colours.values()])
    assert np.ptp(means, axis=0).max() < 40  # of 255
    sizes = [a["bbox"][2] for a in data["annotations"]]
    assert min(sizes) < 20 and max(sizes) > 32  # small and large objects


def test_split_minival_is_seeded_and_disjoint():
    data = {"images": [{"id": i} for i in range(1, 21)],
            "annotations": [{"id": i, "image_id": i} for i in range(1, 21)], "categories": []}
    a1, m1 = split_minival(data, 0.25, seed=1)
    a2, m2 = split_minival(data, 0.25, seed=1)
    _, m3 = split_minival(data, 0.25, seed=2)
    assert m1 == m2 and m1 != m3
    assert len(m1["images"]) == 5 and len(a1["images"]) == 15
    assert {a["image_id"] for a in m1["annotations"]} == {im["id"] for im in m1["images"]}


def test_label_map_maps_sparse_category_ids():
    lm = LabelMap([{"id": 90, "name": "z"}, {"id": 3, "name": "a"}, {"id": 17, "name": "m"}])
    assert lm.cat_to_label == {3: 1, 17: 2, 90: 3}
    assert lm.label_to_cat == {1: 3, 2: 17, 3: 90}
    assert lm.names == ["a", "m", "z"] and lm.num_classes == 4


def test_dataset_items_and_collate(prepared):
    ds = CocoDetection(prepared / "train.json", max_size=32)
    image, target = ds[0]
    assert image.shape[0] == 3 and max(image.shape[1:]) == 32 and image.dtype == torch.float32
    assert float(target["scale"]) == pytest.approx(0.5)
    assert target["boxes"].shape[1] == 4 and (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    assert target["labels"].min() >= 1
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_flip_moves_boxes_with_pixels(prepared):
    ds = CocoDetection(prepared / "train.json")
    (img, t), (fimg, ft) = ds[(0, False)], ds[(0, True)]
    assert torch.equal(fimg, img.flip(-1))
    w = img.shape[-1]
    assert torch.allclose(ft["boxes"][:, 0], w - t["boxes"][:, 2])
    again, _ = hflip(*hflip(img, t["boxes"]))
    assert torch.equal(again, img)


def test_sampler_resumes_exactly():
    full = list(IterationSampler(n=10, batch_size=4, total_iters=9, seed=3))
    tail = list(IterationSampler(n=10, batch_size=4, total_iters=9, seed=3, start_iter=5))
    assert full[5:] == tail
    assert len(full) == 9
    epoch0 = [i for b in full for i, _ in b][:10]
    assert sorted(epoch0) == list(range(10))
