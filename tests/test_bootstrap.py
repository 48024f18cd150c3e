"""Paired bootstrap of COCO AP: exactness against pycocotools, resampling semantics, decisions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jdnas.engine.loop import coco_metrics
from jdnas.joint.bootstrap import ap_of, image_matches, is_tie, paired_bootstrap, resample_weights

SIZE = 200


def make_gt(path: Path, n_images: int, n_cats: int, seed: int, crowd: bool = False,
            empty_cats: int = 0) -> Path:
    """A tiny COCO gt json: `n_images` images with 0-3 boxes of each of the first n_cats - empty_cats categories."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 * i + 7, "file_name": f"{i}.jpg", "width": SIZE, "height": SIZE} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(n_cats)]
    anns = []
    for img in images:
        for c in range(n_cats - empty_cats):
            for _ in range(rng.integers(0, 4)):
                w, h = rng.uniform(10, 60, size=2)
                x, y = rng.uniform(0, SIZE - 60, size=2)
                anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": c + 1,
                             "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                             "iscrowd": int(crowd and rng.random() < 0.1)})
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    return path


def make_dets(gt_json: Path, seed: int, jitter: float = 4.0, miss: float = 0.2, n_false: int = 1,
              n_cats: int | None = None) -> list[dict]:
    """Noisy detections: most GT boxes found with jitter, some missed, a few false positives; distinct scores."""
    gt = json.loads(gt_json.read_text())
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]][:n_cats]
    dets = []
    for a in gt["annotations"]:
        if rng.random() < miss:
            continue
        x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, jitter, size=4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [float(x), float(y), float(max(w, 1)), float(max(h, 1))], "score": float(rng.random())})
    for img in gt["images"]:
        for _ in range(n_false):
            x, y = rng.uniform(0, SIZE - 40, size=2)
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                         "bbox": [float(x), float(y), 30.0, 30.0], "score": float(rng.random())})
    return dets


def ones(m) -> np.ndarray:
    return np.ones(m.n_images, dtype=np.int64)


@pytest.mark.parametrize("case", [
    dict(n_images=12, n_cats=1, seed=0),
    dict(n_images=20, n_cats=3, seed=1),
    dict(n_images=25, n_cats=4, seed=2, jitter=8.0, miss=0.4, n_false=3),
    dict(n_images=15, n_cats=3, seed=3, empty_cats=1),             # a category without GT is left out
    dict(n_images=15, n_cats=3, seed=4, det_cats=1),               # categories with GT but no detections
    dict(n_images=20, n_cats=2, seed=5, crowd=True),               # crowd boxes: dtIgnore is exercised
    dict(n_images=20, n_cats=2, seed=6, score_digits=1),           # tied scores within and across images
])
def test_full_set_equals_coco_metrics(tmp_path, case):
    case = dict(case)
    gt_kw = {k: case.pop(k) for k in ("n_images", "n_cats", "crowd", "empty_cats") if k in case}
    seed = case.pop("seed")
    det_cats = case.pop("det_cats", None)
    score_digits = case.pop("score_digits", None)
    gt = make_gt(tmp_path / "gt.json", seed=seed, **gt_kw)
    dets = make_dets(gt, seed=seed + 100, n_cats=det_cats, **case)
    if det_cats is not None:
        dets = [d for d in dets if d["category_id"] <= det_cats]
    if score_digits is not None:
        dets = [{**d, "score": round(d["score"], score_digits)} for d in dets]
    m = image_matches(gt, dets)
    assert ap_of(m, ones(m)) == pytest.approx(coco_metrics(gt, dets)["AP"], abs=1e-3)


def test_empty_and_perfect_detections(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=10, n_cats=2, seed=6)
    empty = image_matches(gt, [])
    assert ap_of(empty, ones(empty)) == 0.0 == coco_metrics(gt, [])["AP"]
    assert empty.n_gt.sum() == len(json.loads(gt.read_text())["annotations"])  # GT still counted
    anns = json.loads(gt.read_text())["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0 - i / 1000} for i, a in enumerate(anns)]
    m = image_matches(gt, perfect)
    assert ap_of(m, ones(m)) == pytest.approx(100.0)
    assert "segmentation" not in perfect[0]  # the caller's dicts are left alone


def test_empty_vs_something_is_not_a_tie(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=30, n_cats=2, seed=7)
    good, empty = image_matches(gt, make_dets(gt, seed=8)), image_matches(gt, [])
    r = paired_bootstrap(good, empty, n=100, seed=0)
    assert r["delta"] == pytest.approx(ap_of(good, ones(good))) and not is_tie(r) and r["p_better"] == 1.0


def duplicated(gt_json: Path, dets: list[dict], weights: np.ndarray, out: Path) -> tuple[Path, list[dict]]:
    """The gt json and detections with image i physically present weights[i] times (new ids, same boxes)."""
    gt = json.loads(gt_json.read_text())
    images, anns, new_dets = [], [], []
    for img, w in zip(sorted(gt["images"], key=lambda im: im["id"]), weights):
        for copy in range(int(w)):
            new_id = 100_000 * (copy + 1) + img["id"]
            images.append({**img, "id": new_id, "file_name": f"{new_id}.jpg"})
            anns += [{**a, "id": len(anns) + j + 1, "image_id": new_id}
                     for j, a in enumerate(a for a in gt["annotations"] if a["image_id"] == img["id"])]
            new_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == img["id"]]
    out.write_text(json.dumps({"images": images, "categories": gt["categories"], "annotations": anns}))
    return out, new_dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_equal_physically_duplicated_images(tmp_path, seed):
    gt = make_gt(tmp_path / "gt.json", n_images=15, n_cats=3, seed=10 + seed)
    dets = make_dets(gt, seed=20 + seed, jitter=6.0, miss=0.3, n_false=2)
    m = image_matches(gt, dets)
    weights = resample_weights(m.n_images, 1, seed=seed)[0]
    assert weights.max() >= 2 and weights.min() == 0  # both duplicates and absences are exercised
    gt2, dets2 = duplicated(gt, dets, weights, tmp_path / "dup.json")
    assert ap_of(m, weights) == pytest.approx(coco_metrics(gt2, dets2)["AP"], abs=1e-3)


def test_identical_detectors_tie_with_zero_delta(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=20, n_cats=2, seed=30)
    dets = make_dets(gt, seed=31)
    a, b = image_matches(gt, dets), image_matches(gt, dets)
    r = paired_bootstrap(a, b, n=50, seed=0)
    assert r == {"delta": 0.0, "low": 0.0, "high": 0.0, "p_better": 0.0, "n": 50} and is_tie(r)
    shifted = paired_bootstrap(a, b, n=50, seed=0, offset=-1.5)  # e.g. a latency penalty
    assert shifted["delta"] == shifted["low"] == shifted["high"] == -1.5 and not is_tie(shifted)


def test_clearly_better_detector_is_not_a_tie(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=40, n_cats=2, seed=40)
    good = make_dets(gt, seed=41, jitter=2.0, miss=0.05)
    rng = np.random.default_rng(42)
    worse = [d for d in good if d["bbox"][2] != 30.0 and rng.random() < 0.5] + \
            [d for d in good if d["bbox"][2] == 30.0]  # half the true positives dropped, false positives kept
    a, b = image_matches(gt, good), image_matches(gt, worse)
    r = paired_bootstrap(a, b, n=200, seed=0)
    assert r["delta"] > 10 and r["low"] > 0 and r["p_better"] > 0.99 and not is_tie(r)
    assert r["low"] <= r["delta"] <= r["high"]
    rev = paired_bootstrap(b, a, n=200, seed=0)
    assert rev["delta"] == pytest.approx(-r["delta"]) and rev["p_better"] < 0.01
    wide = paired_bootstrap(a, b, n=200, seed=0, confidence=0.99)
    assert wide["low"] <= r["low"] and wide["high"] >= r["high"]


def test_noisy_detectors_tie(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=20, n_cats=2, seed=50)
    a = image_matches(gt, make_dets(gt, seed=51, jitter=6.0, miss=0.3))
    b = image_matches(gt, make_dets(gt, seed=52, jitter=6.0, miss=0.3))
    r = paired_bootstrap(a, b, n=200, seed=0)
    assert is_tie(r) and 0.0 < r["p_better"] < 1.0


def test_deterministic_for_a_seed(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=20, n_cats=2, seed=60)
    dets_a, dets_b = make_dets(gt, seed=61), make_dets(gt, seed=62, jitter=8.0)
    r1 = paired_bootstrap(image_matches(gt, dets_a), image_matches(gt, dets_b), n=100, seed=5)
    r2 = paired_bootstrap(image_matches(gt, dets_a), image_matches(gt, dets_b), n=100, seed=5)
    assert r1 == r2
    r3 = paired_bootstrap(image_matches(gt, dets_a), image_matches(gt, dets_b), n=100, seed=6)
    assert r3["delta"] == r1["delta"] and (r3["low"], r3["high"]) != (r1["low"], r1["high"])


def test_resample_weights():
    w = resample_weights(30, 8, seed=3)
    assert w.shape == (8, 30) and (w.sum(axis=1) == 30).all() and (w >= 0).all()
    assert np.array_equal(w, resample_weights(30, 8, seed=3))


def test_bad_inputs(tmp_path):
    gt = make_gt(tmp_path / "gt.json", n_images=6, n_cats=2, seed=70)
    other = make_gt(tmp_path / "other.json", n_images=7, n_cats=2, seed=70)
    m, m_other = image_matches(gt, make_dets(gt, seed=71)), image_matches(other, make_dets(other, seed=71))
    with pytest.raises(ValueError, match="same ground truth"):
        paired_bootstrap(m, m_other, n=10, seed=0)
    with pytest.raises(ValueError, match="shape"):
        ap_of(m, np.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        ap_of(m, -ones(m))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(m, m, n=10, seed=0, confidence=1.0)


def test_200_resamples_of_100_images_4_classes_decide_alike_twice(tmp_path):
    """A decision's size (its speed is bench/bootstrap.py's): the same seed gives the same
    interval, which holds the observed difference; a finalist against itself is a tie at 0."""
    gt = make_gt(tmp_path / "gt.json", n_images=100, n_cats=4, seed=80)
    a = image_matches(gt, make_dets(gt, seed=81, n_false=3))
    b = image_matches(gt, make_dets(gt, seed=82, jitter=6.0, n_false=3))
    first, again = paired_bootstrap(a, b, n=200, seed=0), paired_bootstrap(a, b, n=200, seed=0)
    assert first == again and first["low"] <= first["delta"] <= first["high"]
    same = paired_bootstrap(a, a, n=200, seed=0)
    assert is_tie(same) and same["delta"] == same["low"] == same["high"] == 0.0
