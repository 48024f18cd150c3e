"""Data: COCO load/validate, synthetic generator, prepared splits, dataset + transforms."""
