"""Paired per-image bootstrap of COCO bbox AP, to tell a real AP difference between two detectors from noise.

- `image_matches`: run pycocotools' per-image matching once and keep, per category, what AP needs.
- `ap_of`: COCO AP (percent) of a weighted resample of the images, exactly as pycocotools' `accumulate`
  and `summarize` compute it (weight 0 = image absent, 2 = image drawn twice).
- `paired_bootstrap`: the same image resamples for two detectors; the AP difference and its interval.
- `is_tie`: the interval contains 0.

Tie order: with weights 0/1 the result is pycocotools' to the last bit of the sort order. A weight k > 1
places the k copies of a detection next to each other in the score ranking; this differs from an
evaluation on physically duplicated images only when *different* detections have exactly equal scores.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # pycocotools Params.recThrs (bbox)


@dataclass(frozen=True, eq=False)
class ImageMatches:
    """Per-image COCO matching of one detector (area 'all', max maxDets), in pycocotools' ranking order.

    Images are positions in sorted `gt.getImgIds()`, categories positions in sorted `gt.getCatIds()`.
    For category k, `det_image[k]`, `tp[k]` and `fp[k]` list its detections sorted as `accumulate` sorts
    them (score descending, mergesort over images in order): the image position of each detection and,
    per IoU threshold (T x D_k), whether it is a true / false positive (dtMatches / not, dtIgnore excluded).
    `n_gt[k, i]`: non-ignored ground-truth boxes of category k in image i.
    """

    image_ids: tuple[int, ...]
    category_ids: tuple[int, ...]
    n_gt: np.ndarray
    det_image: tuple[np.ndarray, ...]
    tp: tuple[np.ndarray, ...]
    fp: tuple[np.ndarray, ...]

    @property
    def n_images(self) -> int:
        """Number of ground-truth images."""
        return len(self.image_ids)


def _evaluated(gt_json: str | Path, detections: list[dict]) -> Any:
    """A COCOeval after `evaluate()` (no accumulate); an empty result set when there are no detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        if detections:
            dt = gt.loadRes([dict(d) for d in detections])  # loadRes writes into the dicts it gets
        else:  # loadRes fails on []: an empty result set still counts the GT boxes
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]),
                          "categories": list(gt.dataset.get("categories", [])), "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
    return ev


def _category_dets(entries: list[tuple[int, dict]], n_iou: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image positions, tp, fp) of one category's detections, ranked like `accumulate` ranks them."""
    if not entries:
        empty = np.zeros((n_iou, 0), dtype=bool)
        return np.zeros(0, dtype=np.int64), empty, empty.copy()
    scores = np.concatenate([np.asarray(e["dtScores"], dtype=float) for _, e in entries])
    image = np.concatenate([np.full(len(e["dtScores"]), i, dtype=np.int64) for i, e in entries])
    matched = np.concatenate([e["dtMatches"] for _, e in entries], axis=1) > 0
    ignored = np.concatenate([e["dtIgnore"] for _, e in entries], axis=1) > 0
    order = np.argsort(-scores, kind="mergesort")
    tp = matched & ~ignored
    fp = ~matched & ~ignored
    return image[order], tp[:, order], fp[:, order]


def _frozen(a: np.ndarray) -> np.ndarray:
    """`a`, made read-only."""
    a.setflags(write=False)
    return a


def image_matches(gt_json: str | Path, detections: list[dict]) -> ImageMatches:
    """Match `detections` (COCO result dicts) to the GT of `gt_json` once, per image, for bootstrap AP."""
    ev = _evaluated(gt_json, detections)
    p = ev.params
    image_ids, category_ids = list(p.imgIds), list(p.catIds)
    n_img, n_areas, n_iou = len(image_ids), len(p.areaRng), len(p.iouThrs)
    n_gt = np.zeros((len(category_ids), n_img), dtype=np.int64)
    det_image, tp, fp = [], [], []
    for k in range(len(category_ids)):
        # evalImgs order: category, area range, image; area 'all' is index 0, and evaluate() already kept
        # the top p.maxDets[-1] detections per image
        base = k * n_areas * n_img
        entries = [(i, ev.evalImgs[base + i]) for i in range(n_img) if ev.evalImgs[base + i] is not None]
        for i, e in entries:
            n_gt[k, i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        img_k, tp_k, fp_k = _category_dets(entries, n_iou)
        det_image.append(_frozen(img_k))
        tp.append(_frozen(tp_k))
        fp.append(_frozen(fp_k))
    return ImageMatches(tuple(int(i) for i in image_ids), tuple(int(c) for c in category_ids), _frozen(n_gt),
                        tuple(det_image), tuple(tp), tuple(fp))


def _category_precision(tp: np.ndarray, fp: np.ndarray, npig: int) -> np.ndarray:
    """Interpolated precision (T x R) of one category, as pycocotools' `accumulate` computes it."""
    n_iou, nd = tp.shape
    q = np.zeros((n_iou, len(RECALL_THRESHOLDS)))
    if nd == 0:
        return q
    tp_sum = np.cumsum(tp, axis=1, dtype=np.int64).astype(float)
    fp_sum = np.cumsum(fp, axis=1, dtype=np.int64).astype(float)
    rc = tp_sum / npig
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone from the right
    for t in range(n_iou):
        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
        hit = inds < nd  # pycocotools leaves 0 where the recall is never reached
        q[t, hit] = pr[t, inds[hit]]
    return q


def ap_of(m: ImageMatches, image_weights: np.ndarray) -> float:
    """COCO AP (percent, IoU 0.5:0.95) of the resample that draws image i `image_weights[i]` times; NaN if no GT."""
    w = np.asarray(image_weights)
    if w.shape != (m.n_images,):
        raise ValueError(f"image_weights has shape {w.shape}, expected ({m.n_images},)")
    if np.any(w < 0) or not np.all(w == np.round(w)):
        raise ValueError("image_weights must be non-negative integers")
    w = w.astype(np.int64)
    npig = m.n_gt @ w
    per_category = []
    for k in np.flatnonzero(npig > 0):  # categories without GT are -1 in pycocotools: left out
        reps = w[m.det_image[k]]
        keep = np.repeat(np.arange(len(reps)), reps)
        per_category.append(_category_precision(m.tp[k][:, keep], m.fp[k][:, keep], int(npig[k])))
    if not per_category:
        return float("nan")
    return 100.0 * float(np.mean(np.stack(per_category)))


def _same_ground_truth(a: ImageMatches, b: ImageMatches) -> None:
    """Raise ValueError unless `a` and `b` were matched against the same images, categories and GT."""
    if a.image_ids != b.image_ids or a.category_ids != b.category_ids or not np.array_equal(a.n_gt, b.n_gt):
        raise ValueError("paired bootstrap needs both detectors evaluated on the same ground truth")


def resample_weights(n_images: int, n: int, seed: int) -> np.ndarray:
    """(n x n_images) draw counts of `n` bootstrap resamples of the images (with replacement), from `seed`."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n, n_images))
    flat = (draws + n_images * np.arange(n)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_images).reshape(n, n_images)


def paired_bootstrap(a: ImageMatches, b: ImageMatches, n: int, seed: int, offset: float = 0.0,
                     confidence: float = 0.9) -> dict[str, float | int]:
    """AP(a) - AP(b) + offset, with its paired-bootstrap interval and P(delta > 0) over `n` image resamples."""
    _same_ground_truth(a, b)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    full = np.ones(a.n_images, dtype=np.int64)
    delta = ap_of(a, full) - ap_of(b, full) + offset
    deltas = np.array([ap_of(a, w) - ap_of(b, w) for w in resample_weights(a.n_images, n, seed)]) + offset
    deltas = deltas[~np.isnan(deltas)]  # a resample without any GT box has no AP
    if deltas.size == 0:
        raise ValueError("no resample has a ground-truth box: AP is undefined")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return {"delta": float(delta), "low": float(low), "high": float(high),
            "p_better": float(np.mean(deltas > 0)), "n": int(n)}


def is_tie(result: dict[str, Any]) -> bool:
    """True when the bootstrap interval of `paired_bootstrap` contains 0 (no significant difference)."""
    return bool(result["low"] <= 0.0 <= result["high"])
