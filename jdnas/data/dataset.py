"""Torch dataset over a prepared COCO split, its transforms, a resumable sampler and the collate.

Augmentation decisions (horizontal flip) are drawn by the sampler, not the dataset, so the
whole input stream is a function of (seed, iteration): a resumed run sees exactly the batches
an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.functional import pil_to_tensor

from jdnas.data.coco import LabelMap
from jdnas.data.prepare import image_root


def resize_to_fit(img: Image.Image, max_size: int) -> tuple[Image.Image, float]:
    """Downscale so the longer side is at most `max_size` (the detector resizes further itself)."""
    scale = min(1.0, max_size / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img, scale


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip an image (C, H, W) and its xyxy boxes left-right."""
    w = image.shape[-1]
    boxes = boxes.clone()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return image.flip(-1), boxes


class CocoDetection(Dataset):
    """Items are (image float tensor in [0, 1], target dict for torchvision detectors).

    The target holds `boxes` (xyxy, in the returned image's pixels), `labels` (contiguous),
    `image_id` and `scale` (returned / original size) so predictions map back to COCO space.
    An index may be an int or an (int, flip) pair from `IterationSampler`.
    """

    def __init__(self, json_path: str | Path, max_size: int | None = None) -> None:
        json_path = Path(json_path)
        data = json.loads(json_path.read_text())
        self.json_path = json_path
        self.root = image_root(json_path, data)
        self.labels = LabelMap(data["categories"])
        self.max_size = max_size
        anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                anns.setdefault(a["image_id"], []).append(a)
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.anns = [anns.get(im["id"], []) for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx, flip = index if isinstance(index, tuple) else (index, False)
        info = self.images[idx]
        with Image.open(self.root / info["file_name"]) as im:
            img = im.convert("RGB")
        scale = 1.0
        if self.max_size is not None:
            img, scale = resize_to_fit(img, self.max_size)
        image = pil_to_tensor(img).float().div_(255)
        boxes = torch.tensor([a["bbox"] for a in self.anns[idx]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes *= scale
        labels = torch.tensor([self.labels.cat_to_label[a["category_id"]] for a in self.anns[idx]],
                              dtype=torch.int64)
        if flip:
            image, boxes = hflip(image, boxes)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"]),
                       "scale": torch.tensor(scale)}


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Lists of images and targets, as torchvision detectors take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class IterationSampler(Sampler):
    """Yields (index, flip) batches for iterations [start, total): epoch-wise seeded shuffles.

    Batch i is the same whatever `start` is, which makes training resumable bit-for-bit in
    its data order.
    """

    def __init__(self, n: int, batch_size: int, total_iters: int, seed: int, start_iter: int = 0,
                 flip: bool = True) -> None:
        self.n, self.bs, self.total, self.seed, self.start, self.flip = n, batch_size, total_iters, seed, start_iter, flip

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, e])
        return rng.permutation(self.n), rng.random(self.n) < 0.5

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for it in range(self.start, self.total):
            batch = []
            for pos in range(it * self.bs, (it + 1) * self.bs):
                e, j = divmod(pos, self.n)
                if e not in cache:
                    cache.clear()
                    cache[e] = self._epoch(e)
                order, flips = cache[e]
                batch.append((int(order[j]), bool(flips[j]) and self.flip))
            yield batch

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class ShardedBatchSampler(Sampler):
    """This rank's share (`batch[rank::world]`) of every batch of another batch sampler."""

    def __init__(self, batches: Sampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.batches)


def batches_for(dataset: Dataset, batch_size: int, total_iters: int, seed: int, start_iter: int = 0,
                workers: int = 0, flip: bool = True, ctx: Any = None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding training batches for iterations [start_iter, total_iters); under
    torchrun (`ctx`, a `jdnas.engine.dist.DistContext`, active) this rank's share of each batch. On
    CUDA, batches come in pinned memory (so copies to the GPU overlap) from workers kept alive."""
    sampler: Any = IterationSampler(len(dataset), batch_size, total_iters, seed, start_iter, flip)
    if ctx is not None and ctx.active:
        sampler = ShardedBatchSampler(sampler, ctx.rank, ctx.world)
    # its own generator: creating the loader must not consume torch's global RNG (exact resume)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                                       persistent_workers=workers > 0)


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=workers, pin_memory=pin_memory)
